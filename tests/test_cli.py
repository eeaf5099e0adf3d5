"""User errors: one line on stderr naming the problem, exit code 2, no traceback."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

from fastmsd import cli
from fastmsd.config import Config, ConfigError, option_name, parse_size, preset, setting_of
from tests.helpers import ROOT, assert_one_line_error, run_cli


@pytest.mark.parametrize("text,expected", [
    ("12G", 12 * 2**30), ("12GiB", 12 * 2**30), ("12GB", 12 * 2**30), ("12000MiB", 12000 * 2**20),
    ("11.5g", int(11.5 * 2**30)), (" 512M ", 512 * 2**20), ("1T", 2**40),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12", "twelve", "12X", "-1G", "1.2.3G", "G", "", "12 G B", "0G", "12KiBs"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_malformed_gpu_mem(tmp_path):
    assert_one_line_error(run_cli("train", "--gpu-mem", "12gigs", cwd=tmp_path), "12gigs", "malformed")


def test_queue_smaller_than_batch(tmp_path):
    r = run_cli("train", "--preset", "tiny", "--batch-size", "256", "--queue-size", "128", cwd=tmp_path)
    assert_one_line_error(r, "queue size 128", "effective batch 256")


def test_missing_data_folder(tmp_path):
    assert_one_line_error(run_cli("train", "--data", str(tmp_path / "nope"), cwd=tmp_path),
                          "data folder", "nope")


def test_unknown_encoders(tmp_path, synth_cache):
    common = ("train", "--preset", "tiny", "--data", str(synth_cache), "--no-progress")
    r = run_cli(*common, "--image-encoder", "vit_imaginary_1b", cwd=tmp_path)
    assert_one_line_error(r, "unknown image encoder 'vit_imaginary_1b'")
    r = run_cli(*common, "--text-encoder", "bert-imaginary", cwd=tmp_path)
    assert_one_line_error(r, "unknown text encoder 'bert-imaginary'")


def test_resume_without_checkpoint(tmp_path):
    assert_one_line_error(run_cli("train", "--resume", "latest", cwd=tmp_path), "--resume latest")


def test_train_resume_eval_end_to_end(tmp_path, synth_cache):
    common = ("--data", str(synth_cache), "--runs-dir", str(tmp_path / "runs"), "--name", "e2e",
              "--batch-size", "32", "--micro-batch-size", "16", "--queue-size", "64", "--no-progress")
    r = run_cli("train", *common, "--steps", "5", "--stop-after", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "macro" not in r.stdout  # stopped early: no evaluation yet
    r = run_cli("train", *common, "--steps", "3", cwd=tmp_path)  # the run exists: refuse, lose nothing
    assert_one_line_error(r, "already exists", "--resume latest")
    r = run_cli("train", *common, "--resume", "latest", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "macro" in r.stdout
    run = tmp_path / "runs" / "e2e"
    assert (run / "checkpoints" / "step_00000005").is_dir() and (run / "metrics.jsonl").is_file()
    assert any((run / "tb").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The loss and its two logged parts, which add up to it (alpha ramps up from 0 at step 0).
    assert [row["step"] for row in rows] == [3, 5]  # each invocation logs its last step
    for row in rows:
        assert row["loss_contrastive"] > 0 and row["loss_distillation"] >= 0
        assert abs(row["loss_contrastive"] + row["loss_distillation"] - row["loss"]) <= 1e-5 * row["loss"]
    assert rows[-1]["loss_distillation"] > 0
    r = run_cli("eval", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "### Zero-shot, 5x200" in r.stdout and "### Linear probe" in r.stdout


def test_synth_with_preview(tmp_path):
    r = run_cli("synth", "--out", str(tmp_path / "s"), "--n-train", "20", "--n-per-class", "2",
                "--size", "64", "--workers", "1", "--preview", str(tmp_path / "grid.png"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:
        assert im.width > 200 and im.height > 100


def test_gpu_mem_caps_the_allocator(monkeypatch):
    import types

    import torch

    from fastmsd.memory import cap_cuda_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=16 * 2**30))
    def set_fraction(fraction, device):
        # torch's own check: the device needs an index (a bare "cuda" raises ValueError there).
        assert device.index is not None
        calls.append((fraction, str(device)))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cap_cuda_memory(parse_size("12G"), "cuda:1") == 0.75
    assert cap_cuda_memory(parse_size("8G"), torch.device("cuda")) == 0.5
    assert calls == [(0.75, "cuda:1"), (0.5, "cuda:0")]
    with pytest.raises(ConfigError, match="exceeds"):
        cap_cuda_memory(parse_size("20G"), "cuda:0")


def test_plan_needs_a_gpu(tmp_path):
    assert_one_line_error(run_cli("plan", "--gpu-mem", "12G", "--device", "cpu", cwd=tmp_path),
                          "fastmsd plan", "CUDA")


def test_malformed_checkpointing(tmp_path):
    assert_one_line_error(run_cli("train", "--checkpointing", "image=x", "--no-progress", cwd=tmp_path),
                          "--checkpointing", "image=K,text=K")


def test_planner_settings_and_explicit_sizes_conflict(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cuda_available", lambda: True)
    assert cli.main(["train", "--gpu-mem", "12G", "--micro-batch-size", "8", "--checkpointing", "all"]) == 2
    err = capsys.readouterr().err
    assert "--micro-batch-size and --checkpointing" in err and "--no-plan" in err


def test_help_and_argument_errors_do_not_import_torch():
    """The CLI's promise: argument errors come fast, before any heavy import."""
    code = textwrap.dedent("""
        import sys
        from fastmsd import cli
        for argv in (["train", "--help"], ["plan", "--help"], ["train", "--gpu-mem", "12gigs"],
                     ["train", "--steps", "0"], ["train", "--image-size", "x"]):
            try:
                assert cli.main(argv) == 2, argv
            except SystemExit:
                pass
        assert "torch" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def _options(command):
    sub = next(a for a in cli._parser()._actions if isinstance(a, cli.argparse._SubParsersAction))
    return {a.dest: a.option_strings for a in sub.choices[command]._actions}


def test_every_config_field_has_an_option():
    train, plan = _options("train"), _options("plan")
    for _, cls in cli._SECTIONS:
        for f in dataclasses.fields(cls):
            assert option_name(f) in train[f.name], f.name
            assert (f.name in plan) != setting_of(f).train_only, f.name
    assert train["eval_at_end"] == ["--eval", "--no-eval"] and "--no-sdpa" in train["sdpa"]


def test_only_given_options_override_the_preset():
    args = cli._parser().parse_args([
        "train", "--preset", "tiny", "--device", "cpu", "--weight-decay", "0.1", "--pretrained", "--no-eval",
        "--accum-mode", "naive", "--text-encoder-args", '{"num_hidden_layers": 2}'])
    expected = preset("tiny")
    expected.model.pretrained, expected.model.text_encoder_args = True, {"num_hidden_layers": 2}
    t = expected.train
    t.device, t.weight_decay, t.eval_at_end, t.accum_mode = "cpu", 0.1, False, "naive"
    assert cli._train_config(args) == expected


def test_a_json_option_takes_only_an_object(capsys):
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["train", "--image-encoder-args", "[1, 2]"])
    assert "--image-encoder-args: not a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,message", [
    ("accum_mode", "x", "unknown --accum-mode 'x' (exact or naive)"),
    ("loader", "y", "unknown --loader 'y' (auto, memory, torch or dali)"),
    ("report_padding", "z", "unknown --report-padding 'z' (auto, fixed or trim)"),
])
def test_validate_checks_the_declared_choices(field, value, message):
    cfg = Config()
    setattr(cfg.train, field, value)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert str(err.value) == message
