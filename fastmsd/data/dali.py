"""NVIDIA DALI pipelines over a prepared cache: JPEG decoding on the GPU ("mixed") when there is
one, on DALI's CPU backend otherwise (the `dali` extra installs it).

The evaluation pipeline mirrors ``fastmsd.data.loader.load_images`` (shorter side resized with
antialiasing, centre crop), so both loaders give the same tensors up to resampling rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fastmsd.config import ConfigError


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def eval_images(paths: Sequence[Path], size: int, *, device: str = "cpu", batch_size: int = 64,
                num_threads: int = 2) -> torch.Tensor:
    """uint8 [n, 1, size, size]: decode, resize the shorter side to ``size``, centre crop."""
    if not available():
        raise ConfigError("the DALI loader needs nvidia-dali (pip install 'fastmsd[dali]')")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    files = [str(p) for p in paths]
    batch_size = max(1, min(batch_size, len(files)))
    gpu = device == "gpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=0 if gpu else None,
                  prefetch_queue_depth=1)
    def pipe():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=False, pad_last_batch=True,
                                   name="reader")
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.GRAY)
        images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop(images, crop=(size, size), out_of_bounds_policy="trim_to_shape")

    pipeline = pipe()
    pipeline.build()
    batches = []
    for _ in range((len(files) + batch_size - 1) // batch_size):
        (out,) = pipeline.run()
        if gpu:
            out = out.as_cpu()
        batches.append(np.stack([np.asarray(out[i]) for i in range(len(out))]))
    images = np.concatenate(batches)[: len(files)]  # drop the padding of the last batch
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


class DaliImages:
    """Training batches as a DALI pipeline: the cache's JPEG bytes in the stream's order, decoded
    on the GPU ("mixed") or DALI's CPU backend, random resized crop, small rotation, brightness
    and contrast, normalisation; no flips. DALI draws its own random numbers from ``seed``, so
    after a resume the data position is exact but the augmentation draws are new ones."""

    def __init__(self, paths: Sequence[Path], size: int, in_chans: int, device: torch.device,
                 seed: int, batch_size: int, num_threads: int = 2):
        if not available():
            raise ConfigError("--loader dali needs nvidia-dali (pip install 'fastmsd[dali]')")
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        from fastmsd.data.loader import MEAN, STD

        self.paths, self.in_chans, self.device = list(paths), in_chans, device
        gpu = device.type == "cuda"

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, seed=seed,
                      device_id=(device.index or 0) if gpu else None, prefetch_queue_depth=1)
        def pipe():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.GRAY)
            images = fn.random_resized_crop(images, size=(size, size), random_area=(0.64, 1.0),
                                            random_aspect_ratio=(0.9, 1.1), antialias=True)
            images = fn.rotate(images, angle=fn.random.uniform(range=(-5.0, 5.0)), keep_size=True,
                               fill_value=0)
            images = fn.brightness_contrast(images, brightness=fn.random.uniform(range=(0.92, 1.08)),
                                            contrast=fn.random.uniform(range=(0.85, 1.15)))
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[255.0 * MEAN], std=[255.0 * STD], mirror=0)

        self.pipeline = pipe()
        self.pipeline.build()

    def batch(self, idx: torch.Tensor, step: int, prefetch: torch.Tensor | None = None) -> torch.Tensor:
        self.pipeline.feed_input("jpegs", [np.fromfile(self.paths[i], dtype=np.uint8) for i in idx.tolist()])
        (out,) = self.pipeline.run()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = out.as_tensor()
            images = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(tensor, images, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            images = torch.from_numpy(np.array(out.as_tensor()))
        return images.expand(-1, self.in_chans, -1, -1) if self.in_chans != 1 else images
