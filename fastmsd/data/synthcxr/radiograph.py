"""One frontal chest radiograph: the patient positioned, the anatomy and findings drawn, the
film exposed."""

from __future__ import annotations

import numpy as np

from .anatomy import Chest, Thorax
from .findings import add_support_devices, draw_findings, reshape_thorax
from .labels import MASKED_FINDINGS
from .raster import Frame
from .sampling import uniform


def render_image(findings: dict[str, dict], rng: np.random.Generator,
                 size: int = 256) -> np.ndarray:
    """Draw one frontal chest radiograph showing ``findings``; returns uint8 [size, size].

    ``findings`` maps names from :data:`FINDINGS` to attributes (``side``: left / right /
    bilateral, ``severity``, ``zone`` for consolidation, ``uncertain``); an optional
    ``support_devices`` entry (``{"kinds": [...]}`` of ``line`` / ``ecg`` / ``tube``) adds
    lines and leads. The empty dict draws a normal study.
    """
    return render_with_masks(findings, rng, size)[0]


def render_with_masks(findings: dict[str, dict], rng: np.random.Generator,
                      size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`render_image`'s image, and a bool [size, size] mask for each of
    :data:`MASKED_FINDINGS` (all False when the finding is absent).

    The masks are taken from the regions the findings are drawn with and draw nothing from
    ``rng``, so the image is the one :func:`render_image` draws from the same generator.
    """
    frame = Frame.positioned(rng, size)
    thorax = Thorax.sample(rng)
    reshape_thorax(thorax, findings, rng)
    chest = Chest(frame, thorax, rng)
    draw_findings(chest, findings, rng)
    density = chest.radiodensity(rng)
    devices = findings.get("support_devices")
    if devices:
        add_support_devices(density, chest, devices, rng)
    empty = np.zeros((size, size), dtype=bool)
    return _expose(density, frame, rng), {f: chest.masks.get(f, empty) for f in MASKED_FINDINGS}


def _expose(density: np.ndarray, frame: Frame, rng: np.random.Generator) -> np.ndarray:
    """Window, gamma, a soft heel-effect gradient and quantum noise, to 8 bits."""
    low, high = uniform(rng, -0.03, 0.06), uniform(rng, 0.72, 0.88)
    img = np.clip((density - low) / (high - low), 0.0, 1.0)
    gamma = uniform(rng, 0.8, 1.25)
    heel, heel_direction = uniform(rng, -0.06, 0.06), uniform(rng, -1, 1)
    img = img ** gamma * (1.0 + heel * (frame.y + frame.x * heel_direction))
    # Uniform noise with the variance of N(0, sigma^2): cheaper to draw, looks the same.
    img = img + (rng.random(img.shape, dtype=np.float32) - 0.5) * uniform(rng, 0.035, 0.1)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
