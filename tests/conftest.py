import os

# Kernel tests run on the CPU in Triton's interpreter (set before triton is imported), or on a
# GPU when bench/gpu_check.sh sets FASTMSD_TEST_DEVICE=cuda.
TEST_DEVICE = os.environ.get("FASTMSD_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastmsd.config import Config, ModelConfig, TrainConfig  # noqa: E402

torch.set_num_threads(2)


def micro_config(**train) -> Config:
    """A model small enough for gradient-level tests: LayerNorm-only encoders, no dropout."""
    model = ModelConfig(
        image_encoder="convnext_atto",
        image_encoder_args={"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]},
        image_size=32,
        in_chans=1,
        text_encoder="bert-tiny",
        text_encoder_args={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 64},
        max_len=16,
        vocab_size=200,
        embed_dim=16,
    )
    defaults = dict(batch_size=32, micro_batch_size=8, key_chunk=16, queue_size=64, steps=10,
                    warmup_steps=2, alpha_warmup_steps=0, log_every=1, save_every=1000,
                    eval_at_end=False, lr=1e-3)
    return Config(preset="micro", model=model, train=TrainConfig(**{**defaults, **train}))


@pytest.fixture
def micro_cfg() -> Config:
    return micro_config()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthcxr set shared by the tests that train (generated once per session)."""
    from fastmsd.data.synthcxr import generate

    return generate(tmp_path_factory.mktemp("synthcxr"), seed=0, n_train=640, n_per_class=40,
                    size=64, n_dicom=2, workers=2, progress=False)


@pytest.fixture(scope="session")
def synth_cache(synth_root, tmp_path_factory):
    """``synth_root`` prepared into a training cache (64 px, as the tests train)."""
    from fastmsd.data.prepare import prepare

    out = tmp_path_factory.mktemp("synthcxr-cache")
    prepare("synthcxr", synth_root, out, size=64, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, synth_cache):
    """A micro run trained for two steps on ``synth_cache`` (once per test module)."""
    from fastmsd.run import train

    cfg = micro_config(steps=2, batch_size=32, micro_batch_size=16, queue_size=64)
    runs = tmp_path_factory.mktemp("runs")
    cfg.train.data, cfg.train.runs_dir, cfg.train.name = str(synth_cache), str(runs), "micro"
    return train(cfg, progress=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synth_cache):
    """A short real training of the tiny preset on ``synth_cache`` (minutes on a CPU; once per session, as
    the learning tests of evaluation and fine-tuning share it)."""
    from fastmsd.config import preset
    from fastmsd.run import train

    cfg = preset("tiny")
    cfg.train.data, cfg.train.name = str(synth_cache), "learn"
    cfg.train.runs_dir = str(tmp_path_factory.mktemp("runs"))
    # A 640-pair set: a queue of two effective batches, since a ring holding most of a small
    # set fills the negatives with near-copies of each positive.
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.alpha_warmup_steps = 150, 10, 75
    cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.queue_size = 64, 32, 128
    return train(cfg, progress=False)
