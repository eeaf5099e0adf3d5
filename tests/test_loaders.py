"""The DALI CPU pipeline and the torch loader give the same evaluation tensors."""

import numpy as np
import pytest
from PIL import Image

from fastmsd.data import dali
from fastmsd.data.loader import load_images


@pytest.mark.skipif(not dali.available(), reason="nvidia-dali is not installed (the `dali` extra)")
@pytest.mark.parametrize("size", [64, 224])
def test_dali_cpu_matches_torch_loader(tmp_path, size):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(300, 256), (256, 400), (512, 512), (257, 255), (600, 300)] * 3):
        # Smooth structure plus noise, like a radiograph at cache resolution.
        y, x = np.mgrid[0:h, 0:w]
        img = 127 + 80 * np.sin(x / (9 + i)) * np.cos(y / (13 + i)) + rng.normal(0, 8, (h, w))
        path = tmp_path / f"{i:02d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)
        paths.append(path)
    torch_images = load_images(paths, size).float()
    dali_images = dali.eval_images(paths, size, batch_size=4).float()  # a ragged last batch
    assert dali_images.shape == torch_images.shape == (len(paths), 1, size, size)
    mad = (dali_images - torch_images).abs().mean().item() / 255
    assert mad < 2 / 255, mad


def left_bright_images(tmp_path, n=6):
    """Portrait and landscape JPEGs, bright on the picture's left: a flip would show."""
    paths = []
    for i in range(n):
        h, w = (300, 240) if i % 2 else (240, 320)
        img = np.full((h, w), 40, np.uint8)
        img[:, : w // 3] = 220
        path = tmp_path / f"l{i}.jpg"
        Image.fromarray(img).save(path, quality=95)
        paths.append(path)
    return paths


def test_memory_and_stream_loaders_agree_and_prefetch_changes_nothing(tmp_path):
    import torch

    from fastmsd.data.loader import MemoryImages, StreamImages

    paths = left_bright_images(tmp_path)
    cpu = torch.device("cpu")
    memory = MemoryImages(paths, 64, 3, cpu, seed=5)
    stream = StreamImages(paths, 64, 3, cpu, seed=5)
    first, second = torch.tensor([4, 0, 2]), torch.tensor([1, 5, 3])
    a = memory.batch(first, step=7)
    assert a.shape == (3, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, stream.batch(first, step=7, prefetch=second))
    assert torch.equal(memory.batch(second, step=8), stream.batch(second, step=8))  # the prefetched one
    assert not torch.equal(a, memory.batch(first, step=9))  # a new step, new augmentation
    assert (a[..., :20].mean(dim=(1, 2, 3)) > a[..., 44:].mean(dim=(1, 2, 3))).all()  # no flip


@pytest.mark.skipif(not dali.available(), reason="nvidia-dali is not installed (the `dali` extra)")
def test_dali_training_pipeline_on_the_cpu(tmp_path):
    import torch

    paths = left_bright_images(tmp_path)
    make = lambda: dali.DaliImages(paths, 64, 1, torch.device("cpu"), seed=3, batch_size=4)  # noqa: E731
    a, b = make(), make()
    idx = torch.tensor([0, 3, 5, 1])
    x = a.batch(idx, step=0)
    assert x.shape == (4, 1, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, b.batch(idx, step=0))  # seeded
    assert (x[..., :16].mean(dim=(1, 2, 3)) > x[..., 48:].mean(dim=(1, 2, 3))).all()  # no flip
    assert -3 < x.min() and x.max() < 3  # normalised


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_training_runs_with_each_streaming_loader(tmp_path, synth_cache, loader):
    if loader == "dali" and not dali.available():
        pytest.skip("nvidia-dali is not installed")
    from fastmsd.run import train
    from tests.conftest import micro_config

    cfg = micro_config(steps=2, batch_size=32, micro_batch_size=16, queue_size=64, loader=loader)
    cfg.train.data, cfg.train.runs_dir, cfg.train.name = str(synth_cache), str(tmp_path), loader
    run = train(cfg, progress=False)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2


STREAM_WITH_ONE_WORKER = """
import sys
from pathlib import Path

import torch

from fastmsd.data.loader import StreamImages

paths = sorted(Path(sys.argv[1]).glob("*.jpg"))
stream = StreamImages(paths, 64, 1, torch.device("cpu"), seed=0, workers=1)
first, second = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
stream.batch(first, step=0, prefetch=second)
print(tuple(stream.batch(second, step=1).shape))
"""


def test_stream_loader_with_one_worker_does_not_deadlock(tmp_path):
    """The prefetch decodes in the background while its files fan out over the worker pool; with
    one worker that pool must still be free. In a child process, so that a hang fails the test
    (after the timeout) instead of hanging the suite."""
    import subprocess
    import sys

    left_bright_images(tmp_path)
    done = subprocess.run([sys.executable, "-c", STREAM_WITH_ONE_WORKER, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(3, 1, 64, 64)"
