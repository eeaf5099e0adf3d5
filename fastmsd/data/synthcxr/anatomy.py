"""The normal chest: thorax geometry, lungs, heart, vessel markings and bones.

Sides are signs along x: -1.0 is the patient's right, drawn on the image left as on real
films, and +1.0 the patient's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .raster import Frame, blur, smooth_noise, smoothstep
from .sampling import uniform

SIDES = (-1.0, 1.0)


@dataclass
class Thorax:
    """Where the chest's landmarks sit, in anatomical coordinates; findings may move them
    before the chest is drawn."""

    half_width: float           # half the thoracic width at the bases
    apex: float                 # height of the lung apices
    dome_right: float           # height of each hemidiaphragm's dome
    dome_left: float
    midline: float              # the mediastinum's x
    heart_ratio: float          # heart width over thoracic width (cardiothoracic ratio)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Thorax:
        half_width = uniform(rng, 0.32, 0.38)
        apex = uniform(rng, -0.4, -0.34)
        dome_right = uniform(rng, 0.17, 0.24)
        dome_left = dome_right + uniform(rng, 0.01, 0.035)  # the left usually sits lower
        return cls(half_width, apex, dome_right, dome_left, uniform(rng, -0.012, 0.012),
                   uniform(rng, 0.38, 0.46))

    def dome(self, side: float) -> float:
        return self.dome_left if side > 0 else self.dome_right

    @property
    def diaphragm(self) -> float:
        """Mean height of the two domes."""
        return 0.5 * (self.dome_right + self.dome_left)

    def lateral(self, x: np.ndarray, side: float) -> np.ndarray:
        """Distance from the midline toward ``side``'s chest wall (negative across it)."""
        return side * (x - self.midline)


def lung_mask(x: np.ndarray, y: np.ndarray, side: float, thorax: Thorax, edge: float) -> np.ndarray:
    """Soft mask of one lung at coordinates ``x``, ``y``; ``edge`` is the blur of its border."""
    width, apex, dome = thorax.half_width, thorax.apex, thorax.dome(side)
    lateral = thorax.lateral(x, side)
    depth = np.clip((y - apex) / (dome - apex), 0.0, 1.0)
    chest_wall = smoothstep(width * (0.6 + 0.4 * np.sqrt(depth)) - lateral, edge)
    top = smoothstep(y - (apex + 3.5 * (lateral - 0.45 * width) ** 2), edge)
    base = smoothstep(dome + 2.4 * (lateral - 0.4 * width) ** 2 - y, edge)
    mediastinum = smoothstep(lateral - 0.05 - 0.02 * smoothstep(-0.12 - y, 0.1), edge)
    return chest_wall * top * base * mediastinum


def _soft_tissue(x: np.ndarray, y: np.ndarray, thorax: Thorax) -> np.ndarray:
    """The body outline, widening toward the shoulders and thinning at its sides."""
    half = thorax.half_width + 0.13 + 0.08 * np.clip(-y - 0.3, 0, None)
    centred = x - thorax.midline
    return smoothstep(half - np.abs(centred), 0.03) * (0.8 + 0.2 * (1 - (centred / half) ** 2))


def _heart(x: np.ndarray, y: np.ndarray, thorax: Thorax, rng: np.random.Generator) -> np.ndarray:
    """An ellipse resting on the diaphragm, two thirds of it left of the midline."""
    half_width = thorax.heart_ratio * thorax.half_width
    half_height = 0.13 + 0.4 * (half_width - 0.14)
    centre_x = thorax.midline + 0.28 * half_width
    centre_y = thorax.diaphragm - 0.5 * half_height
    tilt = float(np.deg2rad(uniform(rng, -22.0, -10.0)))
    dx, dy = x - centre_x, y - centre_y
    along = (dx * np.cos(tilt) + dy * np.sin(tilt)) / half_width
    across = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / half_height
    heart = smoothstep(1.0 - np.sqrt(along * along + across * across), 0.05)
    # The aortic knob and the upper mediastinum displace lung like the heart does.
    knob = smoothstep(0.04 - np.hypot(x - thorax.midline - 0.055, y - thorax.apex - 0.14), 0.02)
    return np.maximum(heart, knob)


def _vessel_markings(x: np.ndarray, y: np.ndarray, thorax: Thorax, rng: np.random.Generator,
                     size: int) -> np.ndarray:
    """Bright streaks radiating from each hilum, fading to the periphery."""
    markings = np.zeros_like(x)
    for side in SIDES:
        hilum_x, hilum_y = thorax.midline + side * 0.1, -0.03
        radius = np.hypot(x - hilum_x, y - hilum_y)
        angle = np.arctan2(y - hilum_y, side * (x - hilum_x))
        n_coarse, n_fine = int(rng.integers(14, 20)), int(rng.integers(27, 35))
        phase_coarse, phase_fine = uniform(rng, 0, 6.3), uniform(rng, 0, 6.3)
        # Integer powers by repeated squaring: float ``**`` is several times slower.
        coarse = 0.5 + 0.5 * np.cos(n_coarse * angle + phase_coarse + 4.0 * radius)
        fine = 0.5 + 0.5 * np.cos(n_fine * angle + phase_fine - 9.0 * radius)
        coarse *= coarse
        fine *= fine
        fine *= fine
        streak = coarse * coarse * coarse + 0.6 * fine * fine
        markings += streak * np.exp(-radius / 0.13) + 0.9 * np.exp(-(radius / 0.045) ** 2)
    return blur(markings, 0.6 * size / 256)


class Chest:
    """The drawn normal chest and the layers findings change before :meth:`radiodensity`
    composes them."""

    def __init__(self, frame: Frame, thorax: Thorax, rng: np.random.Generator):
        x, y = frame.x, frame.y
        self.frame, self.thorax = frame, thorax
        self.edge = max(0.012, 1.5 * frame.pixel)     # blur of the lung borders
        self.body = _soft_tissue(x, y, thorax)
        self.lungs = {side: lung_mask(x, y, side, thorax, self.edge) for side in SIDES}
        self.aeration = {side: np.ones_like(x) for side in self.lungs}  # share of air left
        # Ground-truth regions of the findings drawn, by finding name (bool [size, size]).
        self.masks: dict[str, np.ndarray] = {}
        self.lung_density = np.zeros_like(x)          # density added inside the lungs
        self.pleural_air = np.zeros_like(x)           # a pneumothorax's air outside the lung
        self.pleural_line = np.zeros_like(x)          # the visceral pleura bordering that air
        self.heart = _heart(x, y, thorax, rng)
        self.vessels = _vessel_markings(x, y, thorax, rng, frame.size)
        self.texture = 0.5 * smooth_noise(rng, frame.size, 64)

    def radiodensity(self, rng: np.random.Generator) -> np.ndarray:
        """Attenuation of soft tissue, lungs, heart and bones (bright = dense)."""
        lung_air = sum(self.lungs[side] * self.aeration[side] for side in self.lungs) \
            * (1.0 - 0.85 * self.heart)
        lung_field = self.lungs[-1.0] + self.lungs[1.0]
        density = 0.62 * self.body
        density = density - 0.44 * lung_air - 0.12 * self.pleural_air
        density += (0.085 * self.vessels + 0.012 * self.texture) * lung_air * (1.0 - self.pleural_air)
        density += self.lung_density * lung_field + 0.04 * self.heart + 0.2 * self.pleural_line
        self._add_bones(density, lung_field, rng)
        return density

    def _add_bones(self, density: np.ndarray, lung_field: np.ndarray,
                   rng: np.random.Generator) -> None:
        """Spine, ribs and clavicles over the thorax, and the trachea's air column."""
        x, y, thorax = self.frame.x, self.frame.y, self.thorax
        midline, width, apex = thorax.midline, thorax.half_width, thorax.apex
        spine = smoothstep(0.032 - np.abs(x - midline), 0.012)
        density += 0.1 * spine * (0.75 + 0.25 * np.cos(2 * np.pi * y / 0.06)) \
            * smoothstep(0.45 - y, 0.02)
        off = np.abs(x - midline)
        # Posterior ribs arch up and out from the spine; anterior ribs slope down medially.
        phase = (y + 0.75 * off - 1.3 * off * off - uniform(rng, 0, 0.07)) / uniform(rng, 0.062, 0.072)
        rib = np.exp(-((phase - np.round(phase)) / 0.17) ** 2)
        phase = (y + 0.5 * off - uniform(rng, 0, 0.1)) / uniform(rng, 0.085, 0.1)
        rib += 0.45 * np.exp(-((phase - np.round(phase)) / 0.2) ** 2)
        density += 0.06 * rib * (0.4 + 0.6 * lung_field) * smoothstep(width + 0.04 - off, 0.02) \
            * smoothstep(off - 0.03, 0.02) * smoothstep(y - apex + 0.06, 0.03) \
            * smoothstep(thorax.diaphragm + 0.1 - y, 0.04)
        trachea = smoothstep(0.013 - np.abs(x - midline), 0.008) * smoothstep(-0.1 - y, 0.03)
        density -= 0.1 * trachea
        clavicles = []
        for side in SIDES:
            y0 = apex + uniform(rng, -0.03, 0.0)
            clavicles.append((midline + side * np.array([0.045, 0.15, 0.3, width + 0.08]),
                              np.array([y0 + 0.045, y0 + 0.025, y0 - 0.005, y0 - 0.04])))
        density += 0.14 * self.frame.strokes(clavicles, 0.011)
