"""`fastmsd export`: each format reloaded by its own library gives our embeddings and zero-shot
probabilities; nothing is dropped or added on the way; what open_clip cannot hold is refused."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fastmsd.config import Config, ConfigError, ModelConfig, TrainConfig, save_yaml
from fastmsd.data.text import tokenize, train_wordpiece
from tests.conftest import micro_config
from tests.helpers import assert_one_line_error

PROMPTS = [["no finding", "clear lungs"], ["enlarged heart", "cardiomegaly"], ["pleural effusion"]]
REPORTS = ["the heart is enlarged", "small left pleural effusion", "no acute cardiopulmonary process",
           "lungs are clear bilaterally", "mild pulmonary edema with cardiomegaly"] * 4


def make_run(root, model: ModelConfig, step: int = 3, figures: dict | None = None):
    """A run folder as training leaves it: config, tokenizer, one checkpoint of random weights
    (every parameter moved, so no zero bias or unit scale hides a mapping error)."""
    from fastmsd.checkpoint import save_checkpoint
    from fastmsd.model import build_model
    from fastmsd.momentum import Rings

    run = root / "runs" / "exported"
    tokenizer = train_wordpiece(REPORTS, 120, run / "tokenizer")
    model.vocab_size = len(tokenizer)
    cfg = Config(preset="test", model=model, train=TrainConfig(data="data/some-cache", batch_size=8,
                                                               queue_size=16, steps=step))
    save_yaml(cfg, run / "config.yaml")
    torch.manual_seed(0)
    msd = build_model(model, model.vocab_size)
    with torch.no_grad():
        for p in msd.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(run, step, msd, Rings(cfg.train.queue_size, model.embed_dim), {})
    if figures is not None:
        (run / "zeroshot.json").write_text(json.dumps(figures))
    return run


def load(run):
    """(config, model, tokenizer, checkpoint) as `fastmsd eval` and `fastmsd export` load them."""
    from fastmsd.run import load_trained

    return load_trained(run, torch.device("cpu"))


def ours(loaded):
    cfg, model, tokenizer, _ = loaded
    return cfg.model, model.student.eval(), model.tau.item(), tokenizer


def cli(capsys, *args) -> SimpleNamespace:
    """`fastmsd ARGS` in this process (a subprocess would import torch again)."""
    from fastmsd.cli import main

    capsys.readouterr()  # what came before (library progress bars) is not the command's
    code = main(list(args))
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def inputs(cfg: ModelConfig, tokenizer, n_images: int = 3):
    images = torch.randn(n_images, cfg.in_chans, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(1))
    prompts = [p for group in PROMPTS for p in group]
    ids, mask = tokenize(tokenizer, prompts, cfg.max_len)
    return images, ids.long(), mask


def class_probs(image_emb, text_emb, tau):
    """Zero-shot probabilities from per-prompt embeddings, grouped as PROMPTS."""
    import torch.nn.functional as F

    from fastmsd.eval.zeroshot import class_probabilities

    groups, start = [], 0
    for group in PROMPTS:
        groups.append(F.normalize(text_emb[start:start + len(group)].mean(0), dim=0))
        start += len(group)
    return torch.from_numpy(class_probabilities(image_emb, torch.stack(groups), tau))


def load_hf(out):
    """The hf export rebuilt by transformers and timm alone, strictly."""
    import timm
    from transformers import AutoModel, AutoTokenizer

    meta = json.loads((out / "fastmsd.json").read_text())
    text, info = AutoModel.from_pretrained(out / "text", output_loading_info=True,
                                           **meta["text_from_pretrained"])
    assert not any(info.values()), info  # missing, unexpected, mismatched: all empty
    kwargs = meta["timm_create_model"]
    weights = out / kwargs["pretrained_cfg_overlay"]["file"]
    kwargs["pretrained_cfg_overlay"]["file"] = str(weights)
    image = timm.create_model(**kwargs)
    saved = load_file(weights)
    assert saved.keys() == image.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in image.state_dict().items())
    heads = load_file(out / "heads.safetensors")
    return meta, text.eval(), image.eval(), heads, AutoTokenizer.from_pretrained(out / "text")


@torch.no_grad()
def check_hf(loaded, out):
    import torch.nn.functional as F

    cfg, tower, tau, tokenizer = ours(loaded)
    meta, text, image, heads, their_tokenizer = load_hf(out)
    assert meta["tau"] == pytest.approx(tau) and heads["tau"].item() == pytest.approx(tau)
    images, ids, mask = inputs(cfg, tokenizer)
    theirs_ids, theirs_mask = tokenize(their_tokenizer, [p for g in PROMPTS for p in g], meta["max_len"])
    assert torch.equal(theirs_ids.long(), ids) and torch.equal(theirs_mask, mask)
    features = image(images)
    image_emb = F.normalize(F.linear(features, heads["image_proj.weight"], heads["image_proj.bias"]), dim=-1)
    cls = text(input_ids=ids, attention_mask=mask.long()).last_hidden_state[:, 0]
    text_emb = F.normalize(F.linear(cls, heads["text_proj.weight"], heads["text_proj.bias"]), dim=-1)
    our_image, our_text = tower.encode_image(images), tower.encode_text(ids, mask)
    assert (image_emb - our_image).abs().max() < 1e-5
    assert (text_emb - our_text).abs().max() < 1e-5
    assert (class_probs(image_emb, text_emb, heads["tau"].item())
            - class_probs(our_image, our_text, tau)).abs().max() < 1e-5


@torch.no_grad()
def check_open_clip(loaded, out):
    import open_clip

    cfg, tower, tau, tokenizer = ours(loaded)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    images, ids, mask = inputs(cfg, tokenizer)
    their_ids = open_clip.get_tokenizer(f"local-dir:{out}")([p for g in PROMPTS for p in g])
    assert torch.equal(their_ids, ids)
    image_emb, text_emb = model.encode_image(images, normalize=True), model.encode_text(ids, normalize=True)
    our_image, our_text = tower.encode_image(images), tower.encode_text(ids, mask)
    assert (image_emb - our_image).abs().max() < 1e-5
    assert (text_emb - our_text).abs().max() < 1e-5
    their_tau = 1 / model.logit_scale.exp().item()
    assert their_tau == pytest.approx(tau, rel=1e-6)
    gap = class_probs(image_emb, text_emb, their_tau) - class_probs(our_image, our_text, tau)
    assert gap.abs().max() < 1e-5
    return preprocess


def test_hf_round_trip_with_card(tmp_path, capsys):
    figures = {"accuracy": 0.5, "macro_auc": 0.75, "n": 1000,
               "auc": {c: 0.75 for c in ("atelectasis", "cardiomegaly", "consolidation", "edema",
                                         "pleural_effusion")}}
    run = make_run(tmp_path, micro_config().model, figures=figures)
    r = cli(capsys, "export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hf"
    assert {p.name for p in out.iterdir()} == {"text", "image", "heads.safetensors", "fastmsd.json",
                                               "README.md"}
    check_hf(load(run), out)
    card = (out / "README.md").read_text()
    for needle in ("data/some-cache", "| steps | 3 of 3", "| effective batch | 8 |", "| queue size | 16 |",
                   "zeroshot.json", "**0.750**"):
        assert needle in card, needle
    # The tiny preset's 1-channel ConvNeXt with its own widths: open_clip cannot build it.
    r = cli(capsys, "export", str(run), "--format", "open_clip", "--out", str(tmp_path / "oc"))
    assert_one_line_error(r, "in_chans=1", "depths, dims", "--format hf")
    assert not (tmp_path / "oc").exists()
    assert_one_line_error(cli(capsys, "export", str(run), "--format", "hf", "--out", str(out)), "not empty")


def open_clip_model() -> ModelConfig:
    """What open_clip can express: a 3-channel timm model without constructor arguments, and a
    BERT whose hidden size is at least the embedding width."""
    micro = micro_config().model
    return ModelConfig(image_encoder="test_vit", image_size=160, in_chans=3, text_encoder="bert-tiny",
                       text_encoder_args=micro.text_encoder_args, max_len=16, embed_dim=16)


def test_open_clip_round_trip(tmp_path):
    from PIL import Image

    from fastmsd.data.loader import load_images, to_model_input

    run = make_run(tmp_path, open_clip_model())
    from fastmsd.export import export

    out = export(run, "open_clip", tmp_path / "oc")
    preprocess = check_open_clip(load(run), out)
    # open_clip's transforms of a square grey image give the tensor our evaluation feeds.
    Image.fromarray((torch.rand(200, 200) * 255).byte().numpy(), "L").save(tmp_path / "x.png")
    ours_x = to_model_input(load_images([tmp_path / "x.png"], 160), 3)
    theirs_x = preprocess(Image.open(tmp_path / "x.png"))[None]
    assert (ours_x - theirs_x).abs().max() < 1e-5


def test_open_clip_refuses_a_text_bias_it_cannot_hold(tmp_path, capsys):
    model = open_clip_model()
    model.embed_dim = 64  # wider than the 32-wide BERT: the projection's bias is out of its span
    run = make_run(tmp_path, model)
    r = cli(capsys, "export", str(run), "--format", "open_clip", "--out", str(tmp_path / "oc"))
    assert_one_line_error(r, "no bias", "here 32 and 64")


def test_base_architecture_round_trips(tmp_path):
    """ViT-B/16 and a BERT-base encoder, random weights: both formats, a few images. Built once
    and handed to the export as loaded (the micro tests cover the run folder and the CLI)."""
    from fastmsd.config import preset
    from fastmsd.export import export_trained
    from fastmsd.model import build_model

    cfg = Config(preset="base", model=preset("base").model)
    cfg.model.max_len = 16
    tokenizer = train_wordpiece(REPORTS, 120, tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = build_model(cfg.model, len(tokenizer))
    loaded = (cfg, model, tokenizer, tmp_path / "run" / "checkpoints" / "step_00000001")
    check_hf(loaded, export_trained(*loaded, "hf", tmp_path / "hf"))
    # check_open_clip reloads it with open_clip: the export need not do so too.
    check_open_clip(loaded, export_trained(*loaded, "open_clip", tmp_path / "oc", verify=False))


def test_fastmsd_reads_back_its_hf_export(tmp_path, capsys):
    """`fastmsd.load` of the export embeds and classifies as `fastmsd.load` of the run, and
    `--init EXPORT` starts from the same student as `--init RUN`."""
    import fastmsd
    from fastmsd.checkpoint import latest_checkpoint, student_weights
    from fastmsd.run import locate_init

    model = micro_config().model
    run = make_run(tmp_path, model)
    out = tmp_path / "hf"
    assert cli(capsys, "export", str(run), "--format", "hf", "--out", str(out)).returncode == 0
    from_run, from_export = fastmsd.load(run, device="cpu"), fastmsd.load(out, device="cpu")
    images = torch.randint(0, 256, (3, 1, 80, 70), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    assert (from_export.encode_images(images) - from_run.encode_images(images)).abs().max() < 1e-5
    assert (from_export.encode_reports(REPORTS[:5]) - from_run.encode_reports(REPORTS[:5])).abs().max() < 1e-5
    classes = {f"class {i}": group for i, group in enumerate(PROMPTS)}
    gap = from_export.zero_shot(images, classes) - from_run.zero_shot(images, classes)
    assert gap.abs().max() < 1e-5 and from_export.tau == pytest.approx(from_run.tau)

    init = locate_init(out, model)
    assert init.vocabulary == out / "text"
    want = student_weights(latest_checkpoint(run))
    got = init.weights(torch.device("cpu"))
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k]) for k in want)
    wider = micro_config().model
    wider.embed_dim = 32
    with pytest.raises(ConfigError, match="trained with embed_dim 16, this run configures 32"):
        locate_init(out, wider)
