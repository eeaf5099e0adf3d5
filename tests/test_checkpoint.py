"""Atomic checkpoints, keep-last-k, and bit-exact resume."""

import pytest
import torch
from safetensors.torch import load_file

import fastmsd.checkpoint as ckpt
from fastmsd.engine import Engine
from fastmsd.run import run_config, train
from tests.conftest import micro_config
from tests.helpers import make_engine


def test_failure_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    engine = make_engine(micro_config())
    first = ckpt.save_checkpoint(tmp_path, 1, engine.model, engine.rings, engine.state_dict())
    saved = engine.student_flat.clone()
    with torch.no_grad():
        engine.student_flat.add_(1.0)

    def crash(obj, path, *args, **kwargs):
        open(path, "wb").write(b"partial")  # a torn write, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, engine.model, engine.rings, engine.state_dict())
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == first
    restored = make_engine(micro_config())
    state = ckpt.load_checkpoint(first, restored.model, restored.rings)
    assert state["step"] == 0
    assert torch.equal(restored.student_flat, saved)
    # The next successful save replaces the torn temporary folder.
    ckpt.save_checkpoint(tmp_path, 2, engine.model, engine.rings, engine.state_dict())
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_keep_last_k(tmp_path):
    engine = make_engine(micro_config())
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, engine.model, engine.rings, engine.state_dict(), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]


def test_incomplete_checkpoint_is_refused(tmp_path):
    engine = make_engine(micro_config())
    path = ckpt.save_checkpoint(tmp_path, 3, engine.model, engine.rings, engine.state_dict())
    (path / "rings.safetensors").unlink()
    assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.load_checkpoint(path, engine.model, engine.rings)


def final_state(run_dir):
    path = ckpt.latest_checkpoint(run_dir)
    return (load_file(path / "model.safetensors"), load_file(path / "rings.safetensors"),
            torch.load(path / "trainer.pt", weights_only=True))


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_resume_is_bit_exact(tmp_path, synth_cache):
    """2k steps in one run == k steps, stop, --resume latest, k steps."""
    def cfg(name):
        c = micro_config(steps=6, save_every=100, batch_size=32, micro_batch_size=16, queue_size=80,
                         alpha_warmup_steps=4)
        c.model.text_encoder_args = {**c.model.text_encoder_args, "hidden_dropout_prob": 0.1}
        c.train.data, c.train.runs_dir, c.train.name = str(synth_cache), str(tmp_path), name
        return c

    whole = train(cfg("whole"), progress=False)
    split = train(cfg("split"), stop_after=3, progress=False)
    assert ckpt.latest_checkpoint(split).name == "step_00000003"
    train(cfg("split"), resume="latest", progress=False)
    model_a, rings_a, state_a = final_state(whole)
    model_b, rings_b, state_b = final_state(split)
    assert state_a["step"] == state_b["step"] == 6
    assert any(k.startswith("momentum.") for k in model_a)
    assert_same(model_a, model_b, "model")  # student, momentum, tau
    assert_same(rings_a, rings_b, "rings")
    assert_same(state_a, state_b, "trainer")  # optimizer, scheduler, RNG, ring pointer, data position
    assert state_a["ring_n_valid"] == 80 and state_a["ring_ptr"] == 6 * 32 % 80


def test_out_of_memory_mid_run_is_reported_and_keeps_the_last_checkpoint(tmp_path, synth_cache, monkeypatch):
    """Another process takes GPU memory after planning: the step that fails names the plan and
    what to do, and the run resumes from its last checkpoint."""
    import fastmsd.run as run_module
    from fastmsd.config import ConfigError
    from fastmsd.memory import Plan

    plan = Plan(micro_batch_size=16, key_chunk=32, checkpointing="image=2,text=1", batch_size=32,
                budget_bytes=12 * 2**30, usable_bytes=11 * 2**30, peak_bytes=10 * 2**30, img_per_s=900.0,
                device="fake GPU")

    def fake_plan(cfg, cache_dir, device, vocab_size, progress=True):
        return plan

    real_step = Engine.train_step
    sizes = []

    def step_that_runs_out(self, batch):
        sizes.append(self.sizes)
        if self.step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, batch)

    monkeypatch.setattr(run_module, "plan_for_run", fake_plan)
    monkeypatch.setattr(Engine, "train_step", step_that_runs_out)
    cfg = micro_config(steps=6, save_every=2, batch_size=32, queue_size=64, gpu_mem="12G")
    cfg.train.data, cfg.train.runs_dir, cfg.train.name = str(synth_cache), str(tmp_path), "oom"
    with pytest.raises(ConfigError) as err:
        train(cfg, progress=False)
    text = str(err.value)
    assert "out of memory in step 4" in text and "Tried to allocate 2.00 GiB" in text
    assert plan.describe() in text and "another process" in text and "--gpu-mem" in text
    last = tmp_path / "oom" / "checkpoints" / "step_00000002"
    assert f"{last}" in text and "--resume latest" in text
    assert ckpt.latest_checkpoint(tmp_path / "oom") == last and ckpt.is_complete(last)
    assert set(sizes) == {plan.sizes}  # the engine ran the plan's sizes
    assert "checkpointing: none" in (tmp_path / "oom" / "config.yaml").read_text()  # the user's setting
    monkeypatch.setattr(Engine, "train_step", real_step)
    train(run_config(last), resume="latest", progress=False)
    assert ckpt.latest_checkpoint(tmp_path / "oom").name == "step_00000006"


def test_out_of_memory_without_a_plan_suggests_settings(tmp_path, synth_cache, monkeypatch):
    from fastmsd.config import ConfigError

    def no_memory(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Engine, "train_step", no_memory)
    cfg = micro_config(steps=2, batch_size=32, queue_size=64)
    cfg.train.data, cfg.train.runs_dir, cfg.train.name = str(synth_cache), str(tmp_path), "oom"
    with pytest.raises(ConfigError, match="out of memory in step 1") as err:
        train(cfg, progress=False)
    assert "--checkpointing all" in str(err.value) and "no checkpoint was written yet" in str(err.value)
