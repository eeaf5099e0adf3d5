"""Training images from a prepared cache, behind one interface, in a deterministic, resumable order.

``BatchStream`` decides which items each optimizer step sees (a seeded shuffle per epoch, its
position saved in checkpoints); a loader turns those indices into normalised image tensors on
the device:
- ``MemoryImages`` decodes the split once at training resolution (small sets: synthcxr, tests);
- ``StreamImages`` decodes every batch from the JPEGs, PIL in threads on the CPU or torchvision's
  decoder on a CUDA device, prefetching the next batch;
- ``fastmsd.data.dali.DaliImages`` runs the same steps as an NVIDIA DALI pipeline.
The torch loaders augment batched on the device from a generator keyed by (seed, step), so a
resumed run sees the same pixels. No flips anywhere: laterality is written in the reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# Grayscale radiographs: one mean/std for every channel.
MEAN, STD = 0.5, 0.25


def _half_up(x: float) -> int:
    # DALI rounds halves up (Python's round() goes to even): the loaders must agree to the pixel.
    return math.floor(x + 0.5)


def resize_crop(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """A grayscale image (PIL "L" or uint8 [H, W]) -> uint8 [size, size]: shorter side resized
    to ``size`` (bilinear), centre crop; the evaluation geometry of every loader."""
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, _half_up(w * scale)), max(size, _half_up(h * scale))),
                   Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = _half_up((w - size) / 2), _half_up((h - size) / 2)
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _load_one(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return resize_crop(im.convert("L"), size)


def load_images(paths: Sequence[Path], size: int, desc: str = "decode") -> torch.Tensor:
    """uint8 [n, 1, size, size]: shorter side resized to ``size``, centre crop."""
    with ThreadPoolExecutor() as pool:
        arrays = list(tqdm(pool.map(lambda p: _load_one(p, size), paths), total=len(paths),
                           desc=desc, leave=False, disable=None))
    return torch.from_numpy(np.stack(arrays))[:, None]


class DiskImages:
    """A split's images indexed like the uint8 [n, 1, size, size] tensor of :func:`load_images`, but decoded
    from their files at each access (PIL in threads): for a split too large to hold decoded in memory."""

    def __init__(self, paths: Sequence[Path], size: int, workers: int = 4):
        self.paths, self.size = np.asarray([str(p) for p in paths], dtype=object), size
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 1, self.size, self.size)

    def __getitem__(self, rows: slice | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(rows, torch.Tensor):
            rows = rows.numpy()
        chosen = self.paths[rows] if isinstance(rows, slice) else self.paths[np.asarray(rows, dtype=np.int64)]
        arrays = list(self.pool.map(lambda p: _load_one(Path(p), self.size), chosen))
        return torch.from_numpy(np.stack(arrays))[:, None]


# Splits up to this many decoded bytes are held in memory; larger ones (CheXpert's 224k training images
# are 11 GB at 224 px) are read from disk at each access.
IN_MEMORY_BYTES = 4 << 30


def split_images(paths: Sequence[Path], size: int, desc: str = "decode") -> torch.Tensor | DiskImages:
    """:func:`load_images` when the split fits in :data:`IN_MEMORY_BYTES`, else :class:`DiskImages`."""
    if len(paths) * size * size <= IN_MEMORY_BYTES:
        return load_images(paths, size, desc)
    return DiskImages(paths, size)


def to_model_input(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised float with ``in_chans`` channels."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    x = (x - MEAN) / STD
    return x.expand(-1, in_chans, -1, -1) if in_chans != x.shape[1] else x


def _draws(n: int, generator: torch.Generator, shard: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """One batch's random geometry (affine ``theta`` [n, 2, 3]) and photometry (contrast, brightness [n])."""
    rank, world = shard

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n * world, generator=generator)[rank * n : (rank + 1) * n]

    angle = uniform(-5.0, 5.0) * math.pi / 180.0
    scale = uniform(0.8, 1.0)
    shift_x, shift_y = uniform(-0.06, 0.06), uniform(-0.06, 0.06)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    return theta, uniform(0.85, 1.15), uniform(-0.08, 0.08)


def augment(images: torch.Tensor, generator: torch.Generator, chunk: int = 256,
            shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Random scale crop (0.8-1 of the side), rotation (+-5 degrees), shift, brightness and
    contrast, batched; returns float [0, 1]. No flips: laterality is written in the reports.
    ``shard`` = (rank, world): ``images`` are that rank's share of an effective batch, and get
    the draws the whole batch would give those rows in one process."""
    theta, contrast, brightness = _draws(images.shape[0], generator, shard)
    contrast = contrast.to(images.device)[:, None, None, None]
    brightness = brightness.to(images.device)[:, None, None, None]
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    # In chunks: the sampling grid and temporaries of a whole 4,096-image effective batch at
    # 224 px would take several GiB of a small GPU's budget.
    for s in range(0, images.shape[0], chunk):
        e = min(images.shape[0], s + chunk)
        x = images[s:e].float() / 255.0
        grid = F.affine_grid(theta[s:e].to(x.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        out[s:e] = ((x - mean) * contrast[s:e] + mean + brightness[s:e]).clamp(0.0, 1.0)
    return out


def augment_with_masks(images: torch.Tensor, masks: torch.Tensor,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment` of a batch, and its masks (bool [n, k, H, W]) moved by the same geometry: nearest
    neighbour, so they stay binary, and empty where the shifted image shows its border."""
    replay = torch.Generator()
    replay.set_state(generator.get_state())  # the draws augment() is about to make
    theta = _draws(images.shape[0], replay, (0, 1))[0].to(masks.device)
    grid = F.affine_grid(theta, [masks.shape[0], masks.shape[1], *masks.shape[2:]], align_corners=False)
    moved = F.grid_sample(masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return augment(images, generator), moved > 0.5


def normalize_(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """[0, 1] float images normalised in place (no second copy of an effective batch)."""
    x = x.sub_(MEAN).div_(STD)
    return x.expand(-1, in_chans, -1, -1) if in_chans != x.shape[1] else x


class BatchStream:
    """Index batches over epochs of a seeded shuffle; ``state_dict`` holds the data position."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"{n} training pairs are fewer than one effective batch ({batch_size})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> torch.Tensor:
        # Drop the ragged tail of an epoch so every optimizer step sees a full effective batch.
        if self.index + self.batch_size > self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return idx

    def peek(self) -> torch.Tensor:
        """The batch the next ``next()`` returns, without moving (for prefetching)."""
        state, perm = self.state_dict(), self._perm
        idx = self.next()
        self.epoch, self.index, self._perm = state["epoch"], state["index"], perm
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation()


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def to_device(t: torch.Tensor, device: torch.device, pin: bool = True) -> torch.Tensor:
    """Host to device; pinned and non-blocking so the copy overlaps compute."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)


class MemoryImages:
    """The whole split decoded once into host memory at training resolution (uint8)."""

    def __init__(self, paths: Sequence[Path], size: int, in_chans: int, device: torch.device, seed: int,
                 pin_memory: bool = True, shard: tuple[int, int] = (0, 1)):
        self.images = load_images(paths, size)
        self.in_chans, self.device, self.seed, self.pin = in_chans, device, seed, pin_memory
        self.shard = shard

    def batch(self, idx: torch.Tensor, step: int, prefetch: torch.Tensor | None = None) -> torch.Tensor:
        # uint8 pixels travel (4x fewer bytes than float) and are augmented on the device.
        images = to_device(self.images[idx], self.device, self.pin)
        return normalize_(augment(images, step_generator(self.seed, step), shard=self.shard), self.in_chans)


class StreamImages:
    """Each batch decoded from the cache's JPEGs: PIL in worker threads on the CPU, torchvision's
    batched JPEG decoder on a CUDA device; the next batch is decoded while this one trains."""

    def __init__(self, paths: Sequence[Path], size: int, in_chans: int, device: torch.device, seed: int,
                 workers: int = 2, pin_memory: bool = True, shard: tuple[int, int] = (0, 1)):
        self.paths, self.size, self.in_chans = list(paths), size, in_chans
        self.device, self.seed, self.pin, self.shard = device, seed, pin_memory, shard
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.pool = ThreadPoolExecutor(max_workers=workers)
        # The prefetch runs ``decode``, which fans its files out over ``pool``: were it a task of
        # ``pool`` itself, it would hold a worker while waiting on the others (one worker: forever).
        self.prefetcher = ThreadPoolExecutor(max_workers=1)
        self._ahead: tuple[torch.Tensor, object] | None = None

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 1, size, size] on the device: shorter side resized, centre crop."""
        chosen = [self.paths[i] for i in idx.tolist()]
        if self.device.type != "cuda":
            arrays = list(self.pool.map(lambda p: _load_one(p, self.size), chosen))
            return torch.from_numpy(np.stack(arrays))[:, None]
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        data = list(self.pool.map(lambda p: read_file(str(p)), chosen))
        decoded = decode_jpeg(data, mode=ImageReadMode.GRAY, device=self.device)
        return torch.stack([_resize_crop(img, self.size) for img in decoded])

    def batch(self, idx: torch.Tensor, step: int, prefetch: torch.Tensor | None = None) -> torch.Tensor:
        if self._ahead is not None and torch.equal(self._ahead[0], idx):
            images = self._ahead[1].result()
        else:
            images = self.decode(idx)
        self._ahead = None if prefetch is None else (prefetch, self.prefetcher.submit(self.decode, prefetch))
        images = to_device(images, self.device, self.pin)
        return normalize_(augment(images, step_generator(self.seed, step), shard=self.shard), self.in_chans)


def _resize_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """[1, H, W] uint8 -> [1, size, size]: the PIL path's geometry, in torch on the device."""
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, _half_up(h * scale)), max(size, _half_up(w * scale))
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = _half_up((nh - size) / 2), _half_up((nw - size) / 2)
    return x[0, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
