"""Raster primitives the radiograph is built from: soft masks, blurs, smooth noise, and the
frame that maps anatomical coordinates to pixels."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .sampling import uniform


def smoothstep(d: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-mask from a signed distance-like value (positive inside)."""
    s = np.clip(0.5 + d / edge, 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


@lru_cache(maxsize=64)
def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    # A dense Toeplitz matrix turns a separable Gaussian blur into two small matmuls, which
    # beats any pure-numpy convolution loop at these sizes (scipy is not available).
    idx = np.arange(n, dtype=np.float32)
    k = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    k[k < 1e-6] = 0.0     # denormal float32 tails would make the matmuls ~10x slower
    k /= k.sum(axis=1, keepdims=True)
    return k.astype(np.float32)


def blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a square image; ``sigma_px`` in pixels."""
    if sigma_px < 0.3:
        return a
    g = _gauss_matrix(a.shape[0], round(float(sigma_px), 2))
    return g @ a @ g.T


@lru_cache(maxsize=16)
def _upsample_matrix(size: int, cells: int, sigma_cells: float) -> np.ndarray:
    centres = (np.arange(size) + 0.5) / size * cells - 0.5
    k = np.exp(-0.5 * ((centres[:, None] - np.arange(cells)[None, :]) / sigma_cells) ** 2)
    k[k < 1e-6] = 0.0     # avoid denormal float32 tails (slow matmuls)
    k /= np.sqrt((k * k).sum(axis=1, keepdims=True))   # unit variance for white input
    return k.astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance smooth noise: coarse white noise through two Gaussian interpolations.

    Far cheaper than blurring a full-resolution noise field.
    """
    m = _upsample_matrix(size, cells, 0.7)
    return m @ rng.standard_normal((cells, cells), dtype=np.float32) @ m.T


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return np.meshgrid(c, c, indexing="xy")


class Frame:
    """Maps anatomical coordinates (about [-0.5, 0.5], x to the image right) to pixels.

    ``x`` and ``y`` hold the anatomical coordinates of every pixel; ``pixel`` is the width of
    one pixel in anatomical units.
    """

    def __init__(self, size: int, angle: float, scale: float, dx: float, dy: float):
        self.size, self.scale, self.dx, self.dy = size, scale, dx, dy
        self.cos, self.sin = float(np.cos(angle)), float(np.sin(angle))
        px, py = _pixel_grid(size)
        px, py = px - dx, py - dy
        self.x = (px * self.cos + py * self.sin) / scale
        self.y = (-px * self.sin + py * self.cos) / scale
        self.pixel = 1.0 / (size * scale)

    @classmethod
    def positioned(cls, rng: np.random.Generator, size: int) -> Frame:
        """A patient placed as on a real film: slightly tilted, magnified and off centre."""
        return cls(size, np.deg2rad(uniform(rng, -4.0, 4.0)), uniform(rng, 0.9, 1.06),
                   uniform(rng, -0.035, 0.035), uniform(rng, -0.03, 0.04))

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        px = self.scale * (x * self.cos - y * self.sin) + self.dx + 0.5
        py = self.scale * (x * self.sin + y * self.cos) + self.dy + 0.5
        return px * self.size, py * self.size

    def strokes(self, paths: list[tuple[np.ndarray, np.ndarray]], width: float) -> np.ndarray:
        """Rasterise thin polylines (anatomical coords) into a [0, 1] intensity map.

        Points are splatted densely and blurred once, which is far cheaper than a distance
        field per segment.
        """
        canvas = np.zeros((self.size, self.size), np.float32)
        for x, y in paths:
            length_px = np.hypot(np.diff(x), np.diff(y)).sum() * self.scale * self.size
            t = np.linspace(0.0, 1.0, len(x))
            dense = np.linspace(0.0, 1.0, max(int(length_px * 2.5), 2))
            px, py = self.to_pixels(np.interp(dense, t, x), np.interp(dense, t, y))
            ix, iy = np.round(px - 0.5).astype(int), np.round(py - 0.5).astype(int)
            inside = (ix >= 0) & (ix < self.size) & (iy >= 0) & (iy < self.size)
            canvas[iy[inside], ix[inside]] = 1.0
        sigma = max(width * self.size * self.scale, 0.5)
        out = blur(canvas, sigma) * (np.sqrt(2.0 * np.pi) * sigma)
        return np.clip(out, 0.0, 1.0)
