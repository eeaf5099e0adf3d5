"""Findings drawn on the chest.

A finding may reshape the thorax before the anatomy is drawn (atelectasis pulls the
diaphragm up, cardiomegaly enlarges the heart) and then changes the drawn layers: how much
of each lung stays aerated, density added inside the lungs, the vessel markings. Support
devices are laid over the composed radiodensity, in front of everything.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .anatomy import SIDES, Chest, Thorax, lung_mask
from .raster import blur, smoothstep
from .sampling import uniform


def side_sign(side: str) -> float:
    # Patient's right is drawn on the image left.
    return -1.0 if side == "right" else 1.0


def side_signs(side: str) -> tuple[float, ...]:
    return SIDES if side == "bilateral" else (side_sign(side),)


def strength(attrs: dict, default: str = "moderate") -> float:
    """0..1 strength; uncertain findings are drawn faintly so the hedge is honest."""
    severity = attrs.get("severity", default)
    level = {"mild": 0.35, "small": 0.35, "moderate": 0.65, "large": 1.0, "severe": 1.0}[severity]
    return 0.25 if attrs.get("uncertain") else level


# --- atelectasis: volume loss before the anatomy is drawn, plate-like bands after

def _atelectasis_volume_loss(thorax: Thorax, attrs: dict, rng: np.random.Generator) -> None:
    """Volume loss pulls the hemidiaphragm up and the mediastinum toward the collapse."""
    s = strength(attrs)
    for side in side_signs(attrs.get("side", "left")):
        if side < 0:
            thorax.dome_right -= 0.03 + 0.05 * s
        else:
            thorax.dome_left -= 0.03 + 0.05 * s
        if attrs.get("side") != "bilateral":
            thorax.midline += side * 0.025 * s


def _atelectasis_plates(chest: Chest, attrs: dict, rng: np.random.Generator) -> None:
    """Plate-like bands of collapsed lung above each affected dome."""
    s = strength(attrs)
    thorax = chest.thorax
    plates = []
    for side in side_signs(attrs.get("side", "left")):
        y0 = thorax.dome(side) - uniform(rng, 0.05, 0.09)
        plates.append((thorax.midline + side * np.array([0.1, 0.45 * thorax.half_width,
                                                         0.85 * thorax.half_width]),
                       np.array([y0 + uniform(rng, -0.01, 0.01), y0 - uniform(rng, 0.0, 0.015),
                                 y0 - uniform(rng, 0.01, 0.04)])))
    band = chest.frame.strokes(plates, 0.006 + 0.007 * s)
    for side in chest.aeration:
        chest.aeration[side] *= 1.0 - 0.9 * band


# --- the other findings

def _enlarged_heart(thorax: Thorax, attrs: dict, rng: np.random.Generator) -> None:
    thorax.heart_ratio = 0.52 + 0.17 * strength(attrs) + uniform(rng, -0.015, 0.015)


def _pleural_effusion(chest: Chest, attrs: dict, rng: np.random.Generator) -> None:
    """Fluid fills each affected base up to a level that rises with the effusion's size."""
    s = strength(attrs)
    thorax, y = chest.thorax, chest.frame.y
    width = thorax.half_width
    for side in side_signs(attrs.get("side", "right")):
        dome = thorax.dome(side)
        lateral = thorax.lateral(chest.frame.x, side)
        level = dome + 0.03 - (0.1 + 0.26 * s) * (dome - thorax.apex) / 0.55 + uniform(rng, -0.01, 0.01)
        # Meniscus: the fluid climbs the lateral chest wall.
        meniscus = level - (0.05 + 0.05 * s) * np.clip((lateral - 0.35 * width) / (0.65 * width), 0, 1) ** 2
        fluid = smoothstep(y - meniscus, 0.035) * smoothstep(lateral - 0.02, 0.02)
        chest.aeration[side] *= 1.0 - fluid
        # The fluid term spans the whole base; the effusion is the part inside the pleural space.
        region = (fluid > 0.5) & (chest.lungs[side] > 0.5)
        chest.masks["pleural_effusion"] = chest.masks.get("pleural_effusion", False) | region
        chest.lung_density += 0.06 * fluid * smoothstep(width + 0.02 - lateral, 0.02)


def _pneumothorax(chest: Chest, attrs: dict, rng: np.random.Generator) -> None:
    """The lung collapses away from the chest wall, leaving air and a visible pleural line."""
    side = side_sign(attrs.get("side", "right"))
    collapse = 0.12 + 0.25 * strength(attrs, "small")
    thorax, x, y = chest.thorax, chest.frame.x, chest.frame.y
    # The lung shrinks toward its medial base, so air collects apically and laterally.
    anchor_x, anchor_y = thorax.midline + side * 0.08, thorax.dome(side)
    shrunk_x = anchor_x + (x - anchor_x) / (1 - collapse)
    shrunk_y = anchor_y + (y - anchor_y) / (1 - collapse)
    collapsed = lung_mask(shrunk_x, shrunk_y, side, thorax, chest.edge)
    chest.pleural_air = np.clip(chest.lungs[side] - collapsed, 0.0, 1.0)
    chest.masks["pneumothorax"] = chest.pleural_air > 0.5
    sharp = lung_mask(shrunk_x, shrunk_y, side, thorax, 1.2 * chest.frame.pixel)
    # Only the apicolateral edge borders air; the medial edge stays against the hilum.
    chest.pleural_line = 4.0 * sharp * (1.0 - sharp) * chest.lungs[side] \
        * smoothstep(thorax.lateral(x, side) - 0.13, 0.03)
    chest.lung_density += 0.05 * collapsed


def _consolidation(chest: Chest, attrs: dict, rng: np.random.Generator) -> None:
    """A cluster of overlapping blobs in one lung zone, optionally crossed by air bronchograms."""
    s = strength(attrs)
    side = side_sign(attrs.get("side", "right"))
    thorax, x, y = chest.thorax, chest.frame.x, chest.frame.y
    dome = thorax.dome(side)
    zone_y = {"upper": thorax.apex + 0.14, "mid": 0.5 * (thorax.apex + dome) + 0.02,
              "lower": dome - 0.09}
    centre_y = zone_y[attrs.get("zone", "lower")] + uniform(rng, -0.02, 0.02)
    centre_x = thorax.midline + side * uniform(rng, 0.45, 0.62) * thorax.half_width
    blob = np.zeros_like(x)
    for _ in range(int(rng.integers(4, 8))):
        bx, by = centre_x + uniform(rng, -0.05, 0.05), centre_y + uniform(rng, -0.035, 0.035)
        sigma = uniform(rng, 0.03, 0.055) * (0.7 + 0.5 * s)
        blob += np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * sigma * sigma))
    blob = 1.0 - np.exp(-2.2 * blob * (1.0 + 0.25 * chest.texture))
    if attrs.get("air_bronchograms"):
        blob *= 1.0 - 0.5 * _air_bronchograms(chest, side, centre_x, centre_y, rng)
    chest.aeration[side] *= 1.0 - (0.45 + 0.45 * s) * blob


def _air_bronchograms(chest: Chest, side: float, centre_x: float, centre_y: float,
                      rng: np.random.Generator) -> np.ndarray:
    # Branches fan out from a trunk that points away from the hilum.
    midline = chest.thorax.midline
    trunk = np.arctan2(centre_y + 0.03, side * (centre_x - midline - side * 0.1))
    start_x, start_y = centre_x - side * 0.05 * np.cos(trunk), centre_y - 0.05 * np.sin(trunk)
    branches = []
    for turn in rng.uniform(-0.6, 0.6, 3):
        length = uniform(rng, 0.06, 0.1)
        branches.append((np.array([start_x, start_x + side * length * np.cos(trunk + turn)]),
                         np.array([start_y, start_y + length * np.sin(trunk + turn)])))
    return chest.frame.strokes(branches, 0.0035)


def _edema(chest: Chest, attrs: dict, rng: np.random.Generator) -> None:
    """Perihilar haze, blurred and engorged vessels, and Kerley B lines at the bases."""
    s = strength(attrs)
    thorax, x, y = chest.thorax, chest.frame.x, chest.frame.y
    haze = np.zeros_like(x)
    for side in SIDES:
        # Bat-wing: broad perihilar haze sparing the periphery.
        haze += np.exp(-(((x - thorax.midline - side * 0.13) / (0.1 + 0.05 * s)) ** 2
                         + ((y + 0.02) / (0.13 + 0.06 * s)) ** 2))
    haze = np.clip(haze * (1.0 + 0.3 * chest.texture), 0.0, 1.0)
    for side in chest.aeration:
        chest.aeration[side] *= 1.0 - (0.25 + 0.45 * s) * haze
    chest.vessels = blur(chest.vessels, (1.0 + 2.5 * s) * chest.frame.size / 256) * (1.0 + 0.6 * s)
    kerley = []
    for side in SIDES:
        dome = thorax.dome(side)
        for line_y in dome - np.sort(rng.uniform(0.03, 0.16, int(rng.integers(3, 7)))):
            wall_x = thorax.midline + side * (thorax.half_width - 0.005 - 0.02 * (line_y < dome - 0.1))
            kerley.append((np.array([wall_x, wall_x - side * uniform(rng, 0.03, 0.05)]),
                           np.array([line_y, line_y])))
    chest.lung_density += (0.05 + 0.05 * s) * chest.frame.strokes(kerley, 0.0035)


# Findings that move landmarks, applied to the thorax before the anatomy is drawn.
_RESHAPES: tuple[tuple[str, Callable[[Thorax, dict, np.random.Generator], None]], ...] = (
    ("atelectasis", _atelectasis_volume_loss),
    ("cardiomegaly", _enlarged_heart),
)
# Findings drawn on the chest. The order is part of every seeded image: each finding draws
# from the same generator, and edema blurs the markings the others leave.
_DRAWS: tuple[tuple[str, Callable[[Chest, dict, np.random.Generator], None]], ...] = (
    ("pleural_effusion", _pleural_effusion),
    ("pneumothorax", _pneumothorax),
    ("consolidation", _consolidation),
    ("edema", _edema),
    ("atelectasis", _atelectasis_plates),
)


def reshape_thorax(thorax: Thorax, findings: dict[str, dict], rng: np.random.Generator) -> None:
    for name, reshape in _RESHAPES:
        if findings.get(name) is not None:
            reshape(thorax, findings[name], rng)


def draw_findings(chest: Chest, findings: dict[str, dict], rng: np.random.Generator) -> None:
    for name, draw in _DRAWS:
        if findings.get(name) is not None:
            draw(chest, findings[name], rng)


def add_support_devices(density: np.ndarray, chest: Chest, devices: dict,
                        rng: np.random.Generator) -> None:
    """Lines and tubes, and ECG leads with their wires, laid over the radiodensity."""
    thorax = chest.thorax
    midline, width, apex = thorax.midline, thorax.half_width, thorax.apex
    kinds = devices.get("kinds", ["line"])
    paths, leads = [], []
    if "line" in kinds:
        side = 1.0 if rng.random() < 0.5 else -1.0
        tip = uniform(rng, -0.14, -0.05)
        paths.append((midline + side * np.array([width + 0.1, width - 0.05, 0.12, 0.04, 0.02]),
                      np.array([apex - 0.05, apex + 0.01, apex + 0.05, apex + 0.12, tip])))
    if "tube" in kinds:
        paths.append((np.full(2, midline), np.array([-0.5, uniform(rng, -0.2, -0.14)])))
    if "ecg" in kinds:
        around = np.linspace(0, 2 * np.pi, 24)
        for _ in range(int(rng.integers(3, 6))):
            ex, ey = uniform(rng, -width, width), uniform(rng, apex, thorax.dome_right)
            leads.append((ex + 0.018 * np.cos(around), ey + 0.018 * np.sin(around)))
            leads.append((np.array([ex, ex + uniform(rng, -0.1, 0.1), ex + uniform(rng, -0.3, 0.3)]),
                          np.array([ey, ey + uniform(rng, -0.15, 0.05), -0.6])))
    density += 0.3 * chest.frame.strokes(paths, 0.0035) + 0.15 * chest.frame.strokes(leads, 0.002)
