"""`fastmsd eval`: outputs, and one-line errors for bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import micro_config
from tests.helpers import assert_one_line_error, run_cli


def test_eval_writes_results_tables_and_plots(micro_run, tmp_path):
    r = run_cli("eval", str(micro_run), "--task", "all", "--seeds", "0", "--out", str(tmp_path / "ev"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert {"zeroshot", "retrieval", "linear_probe"} <= results.keys()
    assert set(results["linear_probe"]) == {"1%", "10%", "100%"}
    assert "### Retrieval" in r.stdout and "Precision" in (tmp_path / "ev" / "results.md").read_text()
    listed = (tmp_path / "ev" / "5x200.csv").read_text().splitlines()
    assert listed[0] == "id,label" and len(listed) == 1 + 5 * 40


def test_prompt_file_with_unknown_class(micro_run, tmp_path):
    names = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion", "pneumothorax"]
    prompts = {"classes": {name: [f"{name} prompt"] for name in names}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(prompts))
    r = run_cli("eval", str(micro_run), "--task", "zeroshot", "--prompts", str(tmp_path / "p.yaml"),
                cwd=tmp_path)
    assert_one_line_error(r, "unknown class 'pneumothorax'")


def test_checkpoint_from_another_model(micro_run, tmp_path):
    from fastmsd.config import load_yaml, save_yaml

    other = tmp_path / "other"
    shutil.copytree(micro_run, other)
    cfg = load_yaml(other / "config.yaml")
    cfg.model.embed_dim = 32  # the saved weights project to 16
    save_yaml(cfg, other / "config.yaml")
    assert_one_line_error(run_cli("eval", str(other), cwd=tmp_path), "does not fit this model")


def test_cache_without_needed_labels_or_split(micro_run, synth_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(synth_cache, cache)
    (cache / "synthcxr-5x200.csv").unlink()
    r = run_cli("eval", str(micro_run), "--task", "zeroshot", "--data", str(cache), cwd=tmp_path)
    assert_one_line_error(r, "cannot make a 5x200 set")
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        row["labels"] = {k: None for k in row["labels"]}
    (cache / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert_one_line_error(run_cli("eval", str(micro_run), "--task", "linear-probe", "--data", str(cache),
                                  cwd=tmp_path), "no items labelled")

    empty = tmp_path / "empty-test"
    shutil.copytree(synth_cache, empty)
    rows = [json.loads(line) for line in (empty / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        row["split"] = "train"
    (empty / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert_one_line_error(run_cli("eval", str(micro_run), "--task", "linear-probe", "--data", str(empty),
                                  cwd=tmp_path), "no items in split 'test'")
    assert_one_line_error(run_cli("eval", str(micro_run), "--seeds", "x", cwd=tmp_path), "--seeds")


def test_eval_every_logs_with_the_training_metrics(synth_cache, tmp_path):
    from fastmsd.run import train

    cfg = micro_config(steps=2, batch_size=32, micro_batch_size=16, queue_size=64, eval_every=2)
    cfg.train.data, cfg.train.runs_dir, cfg.train.name = str(synth_cache), str(tmp_path), "periodic"
    run = train(cfg, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/zeroshot_macro_auc" in row]
    assert [row["step"] for row in evals] == [2]
    assert 0.0 <= evals[0]["eval/i2t_recall@10"] <= 1.0
    assert (run / "eval" / "step_00000002" / "results.json").is_file()


def test_5x200_rule_for_caches_without_a_list(synth_cache):
    from fastmsd.data.cache import Cache
    from fastmsd.eval.zeroshot import CLASSES, LABEL_COLUMNS, build_5x200

    cache = Cache(synth_cache)
    indices, labels = build_5x200(cache, seed=0, per_class=10)
    assert len(indices) == 50 and np.bincount(labels).tolist() == [10] * 5
    for i, c in zip(indices, labels, strict=True):
        row = cache.rows[i]
        assert row["split"] == "test"
        assert [row["labels"][LABEL_COLUMNS[name]] for name in CLASSES] == [float(k == c) for k in range(5)]
    assert build_5x200(cache, seed=0, per_class=10)[0] == indices  # deterministic
    assert build_5x200(cache, seed=1, per_class=10)[0] != indices  # the seed picks the items


def test_binary_task_thresholds_on_validation_only(micro_run, synth_cache, tmp_path):
    """A cache with one binary label (as RSNA, SIIM-ACR and COVIDx ship) gets the binary zero-shot
    task: AUC on test, the best-F1 threshold taken from the validation split alone."""
    from fastmsd.data.cache import Cache
    from fastmsd.eval import metrics
    from fastmsd.eval.runner import evaluate
    from fastmsd.eval.zeroshot import DEFAULT_PROMPTS, binary_scores
    from fastmsd.run import load_trained

    cache_dir = tmp_path / "binary"
    shutil.copytree(synth_cache, cache_dir)
    for name in ("tokens.npy", "lengths.npy", "synthcxr-5x200.csv"):
        (cache_dir / name).unlink()
    rows = [json.loads(line) for line in (cache_dir / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        row["labels"] = {"Pneumothorax": row["labels"]["Pneumothorax"]}
    (cache_dir / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cache = Cache(cache_dir)
    device = torch.device("cpu")
    cfg, model, tokenizer, _ = load_trained(micro_run, device)
    results = evaluate(model, tokenizer, cache, cfg.model, device, tmp_path / "out", seeds=(0,))
    assert "retrieval" not in results  # no reports in such a cache
    z = results["zeroshot"]
    def scores(split):
        task = "Pneumothorax"
        return binary_scores(model, tokenizer, cache, cfg.model, device, task, split, DEFAULT_PROMPTS)

    val_scores, val_pos = scores("validate")
    test_scores, test_pos = scores("test")
    assert z["task"] == "Pneumothorax" and z["n"] == len(test_scores)
    assert z["threshold"] == metrics.best_f1_threshold(val_scores, val_pos)
    assert z["auc"] == pytest.approx(metrics.roc_auc(test_scores, test_pos))
    assert z["accuracy"] == pytest.approx(((test_scores >= z["threshold"]) == test_pos).mean())
    assert set(results["linear_probe"]) == {"1%", "10%", "100%"}
    assert "Zero-shot, Pneumothorax" in (tmp_path / "out" / "results.md").read_text()
