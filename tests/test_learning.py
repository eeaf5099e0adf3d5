"""A short run on synthcxr must clearly beat the untrained model at zero-shot classification."""

import json

import torch

from fastmsd.config import preset
from fastmsd.data.cache import Cache
from fastmsd.data.text import load_tokenizer
from fastmsd.eval.zeroshot import evaluate_synthcxr
from fastmsd.model import build_model
from fastmsd.run import load_trained, train


def test_short_training_beats_untrained_zero_shot(tmp_path, synth_cache):
    cfg = preset("tiny")
    cfg.train.data, cfg.train.runs_dir, cfg.train.name = str(synth_cache), str(tmp_path), "learn"
    # A 640-pair set: a queue of two effective batches, since a ring holding most of a small
    # set fills the negatives with near-copies of each positive.
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.alpha_warmup_steps = 150, 10, 75
    cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.queue_size = 64, 32, 128
    run_dir = train(cfg, progress=False)

    trained = json.loads((run_dir / "zeroshot.json").read_text())
    device = torch.device("cpu")
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    torch.manual_seed(cfg.train.seed)
    cache = Cache(synth_cache)
    untrained = evaluate_synthcxr(build_model(cfg.model, len(tokenizer)), tokenizer, cache, cfg.model, device)
    assert trained["n"] == untrained["n"] == 5 * 40
    assert trained["macro_auc"] >= untrained["macro_auc"] + 0.15, (trained, untrained)
    assert trained["macro_auc"] >= 0.75, trained

    # `fastmsd eval` reloads the same weights from the checkpoint and gets the same figures.
    cfg2, model, tok2, _ = load_trained(run_dir, device)
    again = evaluate_synthcxr(model, tok2, cache, cfg2.model, device)
    assert abs(again["macro_auc"] - trained["macro_auc"]) < 1e-6
