"""synthcxr: procedurally drawn chest radiographs with matching MIMIC-style reports.

The set is written in the MIMIC-CXR-JPG 2.0.0 layout (JPEGs, reports, split / metadata /
CheXpert CSVs) plus a small DICOM subset, so the real MIMIC readers run on it unchanged.
Everything is deterministic per ``seed``: the study plan comes from one generator seeded by
``seed`` and every image / report from generators seeded by ``(seed, item index)``, so an
item regenerates identically whatever the order or the number of worker processes.

Orientation follows the radiographic convention: the patient's right is on the image left.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import textwrap
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "FINDINGS",
    "ZEROSHOT_CLASSES",
    "CHEXPERT_COLUMNS",
    "generate",
    "preview",
    "render_image",
    "write_report",
]

VERSION = "1.0"

FINDINGS: tuple[str, ...] = (
    "atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion", "pneumothorax",
)
ZEROSHOT_CLASSES: tuple[str, ...] = (
    "atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion",
)
CHEXPERT_COLUMNS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
_LABEL = {
    "atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation", "edema": "Edema",
    "pleural_effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
}
# Sampling priors for train / validate / extra test studies (relative weights).
_PRIOR = {
    "atelectasis": 0.20, "cardiomegaly": 0.20, "consolidation": 0.14, "edema": 0.15,
    "pleural_effusion": 0.21, "pneumothorax": 0.10,
}
_P_NORMAL = 0.30
_P_UNCERTAIN = 0.04
_P_DEVICES = 0.18
_SEVERITY3 = ("mild", "moderate", "severe")
_SIZE3 = ("small", "moderate", "large")

_SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
_META_FILE = "mimic-cxr-2.0.0-metadata.csv"
_CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv"
_ZEROSHOT_FILE = "synthcxr-5x200.csv"
_MARKER = "synthcxr.json"
_PARTIAL = "synthcxr.partial"
_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_OWNED = {"files", "dicom", _SPLIT_FILE, _META_FILE, _CHEXPERT_FILE, _ZEROSHOT_FILE, _MARKER,
          _PARTIAL}


# --------------------------------------------------------------------------- image rendering

def _smooth(d: np.ndarray, edge: float) -> np.ndarray:
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


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
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


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance smooth noise: coarse white noise through two Gaussian interpolations.

    Far cheaper than blurring a full-resolution noise field.
    """
    m = _upsample_matrix(size, cells, 0.7)
    return m @ rng.standard_normal((cells, cells), dtype=np.float32) @ m.T


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return np.meshgrid(c, c, indexing="xy")


class _Frame:
    """Maps anatomical coordinates (about [-0.5, 0.5], x to the image right) to pixels."""

    def __init__(self, size: int, angle: float, scale: float, dx: float, dy: float):
        self.size, self.scale, self.dx, self.dy = size, scale, dx, dy
        self.cos, self.sin = float(np.cos(angle)), float(np.sin(angle))
        px, py = _pixel_grid(size)
        px, py = px - dx, py - dy
        self.X = (px * self.cos + py * self.sin) / scale
        self.Y = (-px * self.sin + py * self.cos) / scale

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
            seg = np.hypot(np.diff(x), np.diff(y)).sum() * self.scale * self.size
            t = np.linspace(0.0, 1.0, len(x))
            tt = np.linspace(0.0, 1.0, max(int(seg * 2.5), 2))
            px, py = self.to_pixels(np.interp(tt, t, x), np.interp(tt, t, y))
            ix, iy = np.round(px - 0.5).astype(int), np.round(py - 0.5).astype(int)
            ok = (ix >= 0) & (ix < self.size) & (iy >= 0) & (iy < self.size)
            canvas[iy[ok], ix[ok]] = 1.0
        sigma = max(width * self.size * self.scale, 0.5)
        out = _blur(canvas, sigma) * (np.sqrt(2.0 * np.pi) * sigma)
        return np.clip(out, 0.0, 1.0)


def _side_sign(side: str) -> float:
    # Patient's right is drawn on the image left.
    return -1.0 if side == "right" else 1.0


def _sides(side: str) -> tuple[float, ...]:
    return (-1.0, 1.0) if side == "bilateral" else (_side_sign(side),)


def _severity(attrs: dict, default: str = "moderate") -> float:
    """0..1 strength; uncertain findings are drawn faintly so the hedge is honest."""
    sev = attrs.get("severity", default)
    level = {"mild": 0.35, "small": 0.35, "moderate": 0.65, "large": 1.0, "severe": 1.0}[sev]
    return 0.25 if attrs.get("uncertain") else level


def _lung_mask(X, Y, sg, W, top, dome, mx, edge):
    lat = sg * (X - mx)
    t = np.clip((Y - top) / (dome - top), 0.0, 1.0)
    lateral = _smooth(W * (0.6 + 0.4 * np.sqrt(t)) - lat, edge)
    apex = _smooth(Y - (top + 3.5 * (lat - 0.45 * W) ** 2), edge)
    base = _smooth(dome + 2.4 * (lat - 0.4 * W) ** 2 - Y, edge)
    medial = _smooth(lat - 0.05 - 0.02 * _smooth(-0.12 - Y, 0.1), edge)
    return lateral * apex * base * medial


def render_image(findings: dict[str, dict], rng: np.random.Generator,
                 size: int = 256) -> np.ndarray:
    """Draw one frontal chest radiograph showing ``findings``; returns uint8 [size, size].

    ``findings`` maps names from :data:`FINDINGS` to attributes (``side``: left / right /
    bilateral, ``severity``, ``zone`` for consolidation, ``uncertain``); an optional
    ``support_devices`` entry (``{"kinds": [...]}`` of ``line`` / ``ecg`` / ``tube``) adds
    lines and leads. The empty dict draws a normal study.
    """
    def u(lo: float, hi: float) -> float:
        # Python floats keep every grid op in float32 (NumPy scalars would promote to float64).
        return float(rng.uniform(lo, hi))
    fr = _Frame(size, np.deg2rad(u(-4.0, 4.0)), u(0.9, 1.06), u(-0.035, 0.035),
                u(-0.03, 0.04))
    X, Y = fr.X, fr.Y
    px = 1.0 / (size * fr.scale)            # one pixel in anatomical units
    edge = max(0.012, 1.5 * px)

    W = u(0.32, 0.38)                       # half thoracic width at the bases
    top = u(-0.4, -0.34)
    dome_r = u(0.17, 0.24)
    dome_l = dome_r + u(0.01, 0.035)        # left hemidiaphragm usually sits lower
    mx = u(-0.012, 0.012)
    ctr = u(0.38, 0.46)

    ate = findings.get("atelectasis")
    if ate is not None:
        s = _severity(ate)
        for sg in _sides(ate.get("side", "left")):
            # Volume loss pulls the hemidiaphragm up and the mediastinum toward the collapse.
            if sg < 0:
                dome_r -= 0.03 + 0.05 * s
            else:
                dome_l -= 0.03 + 0.05 * s
            if ate.get("side") != "bilateral":
                mx += sg * 0.025 * s
    cm = findings.get("cardiomegaly")
    if cm is not None:
        ctr = 0.52 + 0.17 * _severity(cm) + u(-0.015, 0.015)

    half = W + 0.13 + 0.08 * np.clip(-Y - 0.3, 0, None)
    body = _smooth(half - np.abs(X - mx), 0.03) * (0.8 + 0.2 * (1 - ((X - mx) / half) ** 2))
    lungs = {sg: _lung_mask(X, Y, sg, W, top, dome_l if sg > 0 else dome_r, mx, edge)
             for sg in (-1.0, 1.0)}
    air = {sg: np.ones_like(X) for sg in lungs}      # fraction of normal aeration kept
    extra = np.zeros_like(X)                         # added density inside the lungs

    # Heart: an ellipse resting on the diaphragm, two thirds of it left of the midline.
    hw = ctr * W
    hh = 0.13 + 0.4 * (hw - 0.14)
    hcx = mx + 0.28 * hw
    hcy = 0.5 * (dome_r + dome_l) - 0.5 * hh
    ang = float(np.deg2rad(u(-22.0, -10.0)))
    hx, hy = X - hcx, Y - hcy
    hu = (hx * np.cos(ang) + hy * np.sin(ang)) / hw
    hv = (-hx * np.sin(ang) + hy * np.cos(ang)) / hh
    heart = _smooth(1.0 - np.sqrt(hu * hu + hv * hv), 0.05)
    # The aortic knob and the upper mediastinum displace lung like the heart does.
    knob = _smooth(0.04 - np.hypot(X - mx - 0.055, Y - top - 0.14), 0.02)
    heart = np.maximum(heart, knob)

    # Vessel markings: bright streaks radiating from each hilum, fading to the periphery.
    markings = np.zeros_like(X)
    for sg in (-1.0, 1.0):
        hlx, hly = mx + sg * 0.1, -0.03
        r = np.hypot(X - hlx, Y - hly)
        th = np.arctan2(Y - hly, sg * (X - hlx))
        n1, n2, ph0, ph1 = int(rng.integers(14, 20)), int(rng.integers(27, 35)), u(0, 6.3), u(0, 6.3)
        # Integer powers by repeated squaring: float ``**`` is several times slower.
        c1 = 0.5 + 0.5 * np.cos(n1 * th + ph0 + 4.0 * r)
        c2 = 0.5 + 0.5 * np.cos(n2 * th + ph1 - 9.0 * r)
        c1 *= c1
        c2 *= c2
        c2 *= c2
        streak = c1 * c1 * c1 + 0.6 * c2 * c2
        markings += streak * np.exp(-r / 0.13) + 0.9 * np.exp(-(r / 0.045) ** 2)
    markings = _blur(markings, 0.6 * size / 256)
    texture = 0.5 * _smooth_noise(rng, size, 64)

    pe = findings.get("pleural_effusion")
    if pe is not None:
        s = _severity(pe)
        for sg in _sides(pe.get("side", "right")):
            dome = dome_l if sg > 0 else dome_r
            lat = sg * (X - mx)
            level = dome + 0.03 - (0.1 + 0.26 * s) * (dome - top) / 0.55 + u(-0.01, 0.01)
            # Meniscus: the fluid climbs the lateral chest wall.
            menisc = level - (0.05 + 0.05 * s) * np.clip((lat - 0.35 * W) / (0.65 * W), 0, 1) ** 2
            fluid = _smooth(Y - menisc, 0.035) * _smooth(lat - 0.02, 0.02)
            air[sg] *= 1.0 - fluid
            extra += 0.06 * fluid * _smooth(W + 0.02 - lat, 0.02)

    pt = findings.get("pneumothorax")
    ptx = np.zeros_like(X)
    pleural_line = np.zeros_like(X)
    if pt is not None:
        sg = _side_sign(pt.get("side", "right"))
        c = 0.12 + 0.25 * _severity(pt, "small")
        dome = dome_l if sg > 0 else dome_r
        # The lung shrinks toward its medial base, so air collects apically and laterally.
        ax, ay = mx + sg * 0.08, dome
        cx, cy = ax + (X - ax) / (1 - c), ay + (Y - ay) / (1 - c)
        collapsed = _lung_mask(cx, cy, sg, W, top, dome, mx, edge)
        ptx = np.clip(lungs[sg] - collapsed, 0.0, 1.0)
        thin = _lung_mask(cx, cy, sg, W, top, dome, mx, 1.2 * px)
        # Only the apicolateral edge borders air; the medial edge stays against the hilum.
        pleural_line = 4.0 * thin * (1.0 - thin) * lungs[sg] * _smooth(sg * (X - mx) - 0.13, 0.03)
        extra += 0.05 * collapsed

    co = findings.get("consolidation")
    if co is not None:
        s = _severity(co)
        sg = _side_sign(co.get("side", "right"))
        dome = dome_l if sg > 0 else dome_r
        zy = {"upper": top + 0.14, "mid": 0.5 * (top + dome) + 0.02, "lower": dome - 0.09}
        cyy = zy[co.get("zone", "lower")] + u(-0.02, 0.02)
        cxx = mx + sg * u(0.45, 0.62) * W
        blob = np.zeros_like(X)
        for _ in range(int(rng.integers(4, 8))):
            bx, by = cxx + u(-0.05, 0.05), cyy + u(-0.035, 0.035)
            sig = u(0.03, 0.055) * (0.7 + 0.5 * s)
            blob += np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2 * sig * sig))
        blob = 1.0 - np.exp(-2.2 * blob * (1.0 + 0.25 * texture))
        if co.get("air_bronchograms"):
            # Branches fan out from a trunk that points away from the hilum.
            a = np.arctan2(cyy + 0.03, sg * (cxx - mx - sg * 0.1))
            bx0, by0 = cxx - sg * 0.05 * np.cos(a), cyy - 0.05 * np.sin(a)
            paths = []
            for da in rng.uniform(-0.6, 0.6, 3):
                ln = u(0.06, 0.1)
                paths.append((np.array([bx0, bx0 + sg * ln * np.cos(a + da)]),
                              np.array([by0, by0 + ln * np.sin(a + da)])))
            blob *= 1.0 - 0.5 * fr.strokes(paths, 0.0035)
        air[sg] *= 1.0 - (0.45 + 0.45 * s) * blob

    ed = findings.get("edema")
    if ed is not None:
        s = _severity(ed)
        haze = np.zeros_like(X)
        for sg in (-1.0, 1.0):
            # Bat-wing: broad perihilar haze sparing the periphery.
            haze += np.exp(-(((X - mx - sg * 0.13) / (0.1 + 0.05 * s)) ** 2
                             + ((Y + 0.02) / (0.13 + 0.06 * s)) ** 2))
        haze = np.clip(haze * (1.0 + 0.3 * texture), 0.0, 1.0)
        for sg in air:
            air[sg] *= 1.0 - (0.25 + 0.45 * s) * haze
        markings = _blur(markings, (1.0 + 2.5 * s) * size / 256) * (1.0 + 0.6 * s)
        kerley = []
        for sg in (-1.0, 1.0):
            dome = dome_l if sg > 0 else dome_r
            for yy in dome - np.sort(rng.uniform(0.03, 0.16, int(rng.integers(3, 7)))):
                xl = mx + sg * (W - 0.005 - 0.02 * (yy < dome - 0.1))
                kerley.append((np.array([xl, xl - sg * u(0.03, 0.05)]), np.array([yy, yy])))
        extra += (0.05 + 0.05 * s) * fr.strokes(kerley, 0.0035)

    if ate is not None:
        s = _severity(ate)
        plates = []
        for sg in _sides(ate.get("side", "left")):
            dome = dome_l if sg > 0 else dome_r
            y0 = dome - u(0.05, 0.09)
            plates.append((mx + sg * np.array([0.1, 0.45 * W, 0.85 * W]),
                           np.array([y0 + u(-0.01, 0.01), y0 - u(0.0, 0.015),
                                     y0 - u(0.01, 0.04)])))
        band = fr.strokes(plates, 0.006 + 0.007 * s)
        for sg in air:
            air[sg] *= 1.0 - 0.9 * band

    lung_air = sum(lungs[sg] * air[sg] for sg in lungs) * (1.0 - 0.85 * heart)
    lung_any = lungs[-1.0] + lungs[1.0]
    D = 0.62 * body
    D = D - 0.44 * lung_air - 0.12 * ptx
    D += (0.085 * markings + 0.012 * texture) * lung_air * (1.0 - ptx)
    D += extra * lung_any + 0.04 * heart + 0.2 * pleural_line

    # Bones: spine, posterior ribs and clavicles over the thorax.
    spine = _smooth(0.032 - np.abs(X - mx), 0.012)
    D += 0.1 * spine * (0.75 + 0.25 * np.cos(2 * np.pi * Y / 0.06)) * _smooth(0.45 - Y, 0.02)
    lat = np.abs(X - mx)
    # Posterior ribs arch up and out from the spine; anterior ribs slope down medially.
    phase = (Y + 0.75 * lat - 1.3 * lat * lat - u(0, 0.07)) / u(0.062, 0.072)
    rib = np.exp(-((phase - np.round(phase)) / 0.17) ** 2)
    phase = (Y + 0.5 * lat - u(0, 0.1)) / u(0.085, 0.1)
    rib += 0.45 * np.exp(-((phase - np.round(phase)) / 0.2) ** 2)
    D += 0.06 * rib * (0.4 + 0.6 * lung_any) * _smooth(W + 0.04 - lat, 0.02) * _smooth(lat - 0.03, 0.02) \
        * _smooth(Y - top + 0.06, 0.03) * _smooth(0.5 * (dome_r + dome_l) + 0.1 - Y, 0.04)
    trachea = _smooth(0.013 - np.abs(X - mx), 0.008) * _smooth(-0.1 - Y, 0.03)
    D -= 0.1 * trachea
    clav = []
    for sg in (-1.0, 1.0):
        y0 = top + u(-0.03, 0.0)
        clav.append((mx + sg * np.array([0.045, 0.15, 0.3, W + 0.08]),
                     np.array([y0 + 0.045, y0 + 0.025, y0 - 0.005, y0 - 0.04])))
    D += 0.14 * fr.strokes(clav, 0.011)

    devices = findings.get("support_devices")
    if devices:
        kinds = devices.get("kinds", ["line"])
        paths, leads = [], []
        if "line" in kinds:
            sg = 1.0 if rng.random() < 0.5 else -1.0
            tip = u(-0.14, -0.05)
            paths.append((mx + sg * np.array([W + 0.1, W - 0.05, 0.12, 0.04, 0.02]),
                          np.array([top - 0.05, top + 0.01, top + 0.05, top + 0.12, tip])))
        if "tube" in kinds:
            paths.append((np.full(2, mx), np.array([-0.5, u(-0.2, -0.14)])))
        if "ecg" in kinds:
            ang = np.linspace(0, 2 * np.pi, 24)
            for _ in range(int(rng.integers(3, 6))):
                ex, ey = u(-W, W), u(top, dome_r)
                leads.append((ex + 0.018 * np.cos(ang), ey + 0.018 * np.sin(ang)))
                leads.append((np.array([ex, ex + u(-0.1, 0.1), ex + u(-0.3, 0.3)]),
                              np.array([ey, ey + u(-0.15, 0.05), -0.6])))
        D += 0.3 * fr.strokes(paths, 0.0035) + 0.15 * fr.strokes(leads, 0.002)

    # Exposure: window, gamma, a soft heel-effect gradient and quantum noise.
    lo, hi = u(-0.03, 0.06), u(0.72, 0.88)
    img = np.clip((D - lo) / (hi - lo), 0.0, 1.0)
    img = img ** u(0.8, 1.25) * (1.0 + u(-0.06, 0.06) * (fr.Y + fr.X * u(-1, 1)))
    # Uniform noise with the variance of N(0, sigma^2): cheaper to draw, looks the same.
    img = img + (rng.random(img.shape, dtype=np.float32) - 0.5) * u(0.035, 0.1)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- reports

_SEV_ADV = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
_LOBES = {("right", "upper"): "right upper lobe", ("right", "mid"): "right middle lobe",
          ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
          ("left", "mid"): "lingula", ("left", "lower"): "left lower lobe"}
_NEG_NAMES = {"pleural_effusion": "pleural effusion", "pneumothorax": "pneumothorax",
              "consolidation": "focal consolidation", "edema": "pulmonary edema",
              "atelectasis": "atelectasis"}
_INDICATIONS = (
    "shortness of breath", "chest pain", "fever and cough", "hypoxia", "dyspnea on exertion",
    "leukocytosis", "weakness", "preoperative evaluation", "tachycardia", "s/p fall",
    "altered mental status", "productive cough",
)
_NO_HEART = {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": 0.0}
_NORMAL_FINDINGS = (
    ("The lungs are clear. The cardiomediastinal silhouette is within normal limits.",
     _NO_HEART),
    ("The lungs are well expanded and clear. Heart size and mediastinal contours are normal.",
     _NO_HEART),
    ("Lungs are clear bilaterally. The heart size is normal. Hilar contours are unremarkable.",
     {"Cardiomegaly": 0.0}),
    ("The lungs are clear without focal consolidation. Cardiac and mediastinal silhouettes "
     "are unremarkable.", {**_NO_HEART, "Consolidation": 0.0}),
)
_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.", "No acute intrathoracic process.",
    "Normal chest radiograph.", "No acute cardiopulmonary abnormality.",
)
_FILLERS = (
    "Imaged osseous structures are intact.", "No free air below the right hemidiaphragm.",
    "Mild degenerative changes of the thoracic spine.", "The bony thorax is unremarkable.",
)
_DEVICE_TEXT = {
    "line": ("A central venous catheter terminates in the mid SVC.",
             "Right internal jugular line tip projects over the cavoatrial junction."),
    "tube": ("Endotracheal tube tip terminates 4 cm above the carina.",
             "The endotracheal tube is in standard position."),
    "ecg": ("ECG leads overlie the chest.", "Monitoring leads are noted."),
}


def _side_word(side: str) -> str:
    return "bilateral" if side == "bilateral" else side


def _mention(name: str, a: dict, rng: np.random.Generator) -> tuple[str, str, dict[str, float]]:
    """A findings sentence, an impression phrase and the labels the sentence asserts.

    The impression phrase asserts only the finding's own label.
    """
    def pick(options: tuple[str, ...] | list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    side = a.get("side", "right")
    sev = a.get("severity", "moderate")
    label = {_LABEL[name]: -1.0 if a.get("uncertain") else 1.0}
    if name == "cardiomegaly":
        adv = _SEV_ADV[sev]
        if a.get("uncertain"):
            return (pick(("The heart is possibly mildly enlarged.",
                          "Borderline heart size, possibly mild cardiomegaly.")),
                    "Possible mild cardiomegaly.", label)
        return (pick((f"The heart is {adv} enlarged.", f"There is {sev} cardiomegaly.",
                      f"The cardiac silhouette is {adv} enlarged.",
                      f"{adv.capitalize()} enlarged cardiac silhouette.")),
                pick((f"{sev.capitalize()} cardiomegaly.", "Cardiomegaly.",
                      f"{adv.capitalize()} enlarged heart.")), label)
    if name == "pleural_effusion":
        sw = _side_word(side)
        if a.get("uncertain"):
            return (pick((f"Possible small {sw} pleural effusion.",
                          f"Blunting of the {side} costophrenic angle may represent a small "
                          "effusion." if side != "bilateral" else
                          "Possible small bilateral pleural effusions.")),
                    f"Possible small {sw} pleural effusion.", label)
        plural = "effusions" if side == "bilateral" else "effusion"
        return (pick((f"There is a {sev} {sw} pleural {plural}." if side != "bilateral" else
                      f"There are {sev} bilateral pleural effusions.",
                      f"{sev.capitalize()} {sw} pleural {plural} with associated "
                      "basilar opacity.",
                      f"Layering {sw} pleural fluid with a meniscus, compatible with "
                      f"{'' if side == 'bilateral' else 'a '}{sev} {plural}.")),
                pick((f"{sev.capitalize()} {sw} pleural {plural}.",
                      f"{sev.capitalize()} {sw} {plural}.")), label)
    if name == "pneumothorax":
        sev = a.get("severity", "small")
        if a.get("uncertain"):
            return (f"Possible tiny {side} apical pneumothorax.",
                    f"Possible tiny {side} pneumothorax.", label)
        return (pick((f"There is a {sev} {side} pneumothorax.",
                      f"{sev.capitalize()} {side} apical pneumothorax with a visible pleural "
                      "line.",
                      f"A {side} pleural line is seen with absent lung markings laterally, "
                      f"consistent with a {sev} pneumothorax.",
                      f"{sev.capitalize()} {side} apicolateral pleural air collection beyond a "
                      "visible pleural line.")),
                pick((f"{sev.capitalize()} {side} pneumothorax.",
                      f"{sev.capitalize()} amount of {side} pleural air.")), label)
    if name == "consolidation":
        lobe = _LOBES[(side, a.get("zone", "lower"))]
        zone = a.get("zone", "lower")
        bronch = " with air bronchograms" if a.get("air_bronchograms") else ""
        if a.get("uncertain"):
            return (f"Subtle opacity in the {lobe} may represent early consolidation.",
                    f"Possible early consolidation in the {lobe}.",
                    {**label, "Lung Opacity": 1.0})
        sent = pick((f"There is dense consolidation in the {lobe}{bronch}.",
                     f"Focal consolidation is seen in the {side} {zone} lung zone{bronch}.",
                     f"Patchy airspace opacity in the {lobe}{bronch}, compatible with "
                     "consolidation.",
                     f"Airspace consolidation in the {lobe}{bronch}, concerning for pneumonia.",
                     f"Dense airspace opacification of the {lobe}{bronch}."))
        labels = dict(label)
        if "opaci" in sent:
            labels["Lung Opacity"] = 1.0
        if "pneumonia" in sent:
            labels["Pneumonia"] = -1.0
        return sent, pick((f"{lobe.capitalize()} consolidation.",
                           f"Consolidation in the {lobe}.")), labels
    if name == "edema":
        if a.get("uncertain"):
            return ("Possible mild interstitial edema.", "Possible mild pulmonary edema.",
                    label)
        return (pick((f"There is {sev} pulmonary edema.",
                      f"{sev.capitalize()} pulmonary vascular congestion with perihilar "
                      "haziness.",
                      f"Perihilar haziness and Kerley B lines, consistent with {sev} "
                      "interstitial edema.",
                      f"Diffuse bilateral perihilar opacities in a bat-wing distribution, "
                      f"compatible with {sev} alveolar edema.")),
                pick((f"{sev.capitalize()} pulmonary edema.",
                      f"{sev.capitalize()} pulmonary vascular congestion.",
                      f"Findings consistent with {sev} fluid overload.")), label)
    if name == "atelectasis":
        where = "bibasilar" if side == "bilateral" else f"{side} basilar"
        if a.get("uncertain"):
            return (f"Minimal {where} opacity, possibly atelectasis.",
                    f"Possible {where} atelectasis.", {**label, "Lung Opacity": 1.0})
        base = "bases" if side == "bilateral" else f"{side} base"
        hemi = "hemidiaphragms" if side == "bilateral" else f"{side} hemidiaphragm"
        sent = pick((f"Plate-like atelectasis at the {base}.",
                     f"Linear {where} opacity consistent with atelectasis.",
                     f"{where.capitalize()} volume loss with elevation of the {hemi}, "
                     "consistent with collapse.",
                     f"There is {where} subsegmental atelectasis."))
        labels = dict(label)
        if "opacity" in sent:
            labels["Lung Opacity"] = 1.0
        return sent, pick((f"{where.capitalize()} atelectasis.",
                           f"{where.capitalize()} collapse.")), labels
    raise ValueError(f"unknown finding {name!r}")


def _merge(into: dict[str, float], labels: dict[str, float]) -> None:
    # CheXpert precedence: a positive mention wins over uncertain, uncertain over negative.
    rank = {1.0: 2, -1.0: 1, 0.0: 0}
    for k, v in labels.items():
        if k not in into or rank[v] > rank[into[k]]:
            into[k] = v


def write_report(findings: dict[str, dict], rng: np.random.Generator, *,
                 view: str = "PA") -> tuple[str, dict[str, float]]:
    """Write a MIMIC-style report for ``findings``; returns (text, CheXpert labels).

    Labels only hold the columns the text mentions (1.0 / 0.0 / -1.0); unmentioned columns
    are absent, i.e. blank in the CSV.
    """
    def pick(options: tuple[str, ...] | list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    present = [f for f in FINDINGS if f in findings]
    order = rng.permutation(len(present))
    find_sents: list[tuple[str, dict[str, float]]] = []
    impressions: list[tuple[str, dict[str, float]]] = []
    for i in order:
        name, attrs = present[i], findings[present[i]]
        sent, imp, labels = _mention(name, attrs, rng)
        find_sents.append((sent, labels))
        impressions.append((imp, {_LABEL[name]: -1.0 if attrs.get("uncertain") else 1.0}))

    negations: list[tuple[str, dict[str, float]]] = []
    if "cardiomegaly" not in findings and rng.random() < 0.6:
        negations.append((pick(("The heart size is normal.", "Heart size is normal.",
                                "Normal cardiac silhouette.",
                                "The cardiomediastinal silhouette is within normal limits.")),
                          {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": 0.0}))
    probs = {"pleural_effusion": 0.7, "pneumothorax": 0.7, "consolidation": 0.55,
             "edema": 0.35, "atelectasis": 0.08}
    negated = [f for f in probs if f not in findings and rng.random() < probs[f]]
    if negated:
        names = [_NEG_NAMES[f] for f in negated]
        text = names[0] if len(names) == 1 else (
            f"{names[0]} or {names[1]}" if len(names) == 2
            else ", ".join(names[:-1]) + f", or {names[-1]}")
        negations.append((f"No {text}.", {_LABEL[f]: 0.0 for f in negated}))

    devices = findings.get("support_devices")
    dev_sents = [(pick(_DEVICE_TEXT[k]), {"Support Devices": 1.0})
                 for k in (devices or {}).get("kinds", [])]

    if present:
        body = find_sents + dev_sents + negations
        if rng.random() < 0.3:
            body.append((pick(_FILLERS), {}))
        impr = impressions + ([("Support devices as described.", {"Support Devices": 1.0})]
                              if dev_sents and rng.random() < 0.4 else [])
        if len(impr) > 1 and rng.random() < 0.5:
            first, rest = impr[0][0], [s[0].rstrip(".") for s in impr[1:]]
            joined = first.rstrip(".") + "".join(
                f", {r[0].lower() + r[1:]}" for r in rest[:-1]) + f" and {rest[-1][0].lower()}" \
                + f"{rest[-1][1:]}."
            impr = [(joined, {k: v for _, lab in impr for k, v in lab.items()})]
    else:
        body = [_NORMAL_FINDINGS[int(rng.integers(len(_NORMAL_FINDINGS)))]] + dev_sents
        body += [n for n in negations if "Cardiomegaly" not in n[1]]
        if rng.random() < 0.4:
            body.append((pick(_FILLERS), {}))
        impr = [(pick(_NORMAL_IMPRESSIONS), {})]

    # Occasionally drop one section (never both), as real reports do.
    r = rng.random()
    keep_findings, keep_impression = r >= 0.08, not (0.08 <= r < 0.13)
    labels: dict[str, float] = {}
    sections: list[str] = []
    exam = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
    sex = "woman" if rng.random() < 0.5 else "man"
    head = [f" EXAMINATION:  {exam}",
            f" INDICATION:  ___ year old {sex} with {pick(_INDICATIONS)}."
            if rng.random() < 0.7 else f" HISTORY:  ___{sex[0].upper()} with "
            f"{pick(_INDICATIONS)}.",
            " COMPARISON:  " + pick(("None.", "___.", "Chest radiograph from ___."))]
    if rng.random() < 0.2:
        head[0], head[1] = head[1], head[0]
    if rng.random() < 0.3:
        head.insert(2, " TECHNIQUE:  " + ("PA and lateral views of the chest."
                                          if view == "PA" else "Portable AP chest radiograph."))
    sections.extend(head)
    wrap = textwrap.TextWrapper(width=78, initial_indent=" ", subsequent_indent=" ")
    if keep_findings and keep_impression and rng.random() < 0.03:
        sents = body + impr
        sections.append(" FINDINGS AND IMPRESSION:\n\n" + wrap.fill(" ".join(s for s, _ in sents)))
        for _, lab in sents:
            _merge(labels, lab)
    else:
        if keep_findings:
            header = " Findings:" if rng.random() < 0.1 else " FINDINGS:"
            sections.append(header + "\n\n" + wrap.fill(" ".join(s for s, _ in body)))
            for _, lab in body:
                _merge(labels, lab)
        if keep_impression:
            header = " CONCLUSION:" if rng.random() < 0.08 else " IMPRESSION:"
            sections.append(header + "\n\n" + wrap.fill(" ".join(s for s, _ in impr)))
            for _, lab in impr:
                _merge(labels, lab)
    if not any(labels.get(c) in (1.0, -1.0) for c in CHEXPERT_COLUMNS if c != "Support Devices"):
        labels["No Finding"] = 1.0
    text = " " * 33 + "FINAL REPORT\n" + "\n\n".join(sections) + "\n"
    return text, labels


# --------------------------------------------------------------------------- study plan

def _sample_attrs(name: str, rng: np.random.Generator, *, allow_uncertain: bool) -> dict:
    def pick(options: tuple[str, ...], p: tuple[float, ...]) -> str:
        return str(options[rng.choice(len(options), p=p)])

    if name == "cardiomegaly":
        a = {"severity": pick(_SEVERITY3, (0.45, 0.35, 0.2))}
    elif name == "edema":
        a = {"severity": pick(_SEVERITY3, (0.4, 0.4, 0.2))}
    elif name == "pleural_effusion":
        a = {"side": pick(("left", "right", "bilateral"), (0.33, 0.37, 0.3)),
             "severity": pick(_SIZE3, (0.4, 0.4, 0.2))}
    elif name == "pneumothorax":
        a = {"side": pick(("left", "right"), (0.5, 0.5)),
             "severity": pick(_SIZE3, (0.45, 0.35, 0.2))}
    elif name == "consolidation":
        a = {"side": pick(("left", "right"), (0.45, 0.55)),
             "zone": pick(("upper", "mid", "lower"), (0.25, 0.3, 0.45)),
             "severity": pick(_SEVERITY3, (0.3, 0.4, 0.3)),
             "air_bronchograms": bool(rng.random() < 0.3)}
    else:
        a = {"side": pick(("left", "right", "bilateral"), (0.35, 0.3, 0.35)),
             "severity": pick(("mild", "moderate"), (0.5, 0.5))}
    if allow_uncertain and rng.random() < _P_UNCERTAIN:
        a["uncertain"] = True
    return a


def _sample_findings(rng: np.random.Generator, only: str | None = None) -> dict[str, dict]:
    if only is not None:
        names = [only]
    elif rng.random() < _P_NORMAL:
        names = []
    else:
        k = int(rng.choice(3, p=(0.55, 0.3, 0.15))) + 1
        w = np.array([_PRIOR[f] for f in FINDINGS])
        names = [FINDINGS[i] for i in rng.choice(len(FINDINGS), k, replace=False, p=w / w.sum())]
    findings = {n: _sample_attrs(n, rng, allow_uncertain=only is None) for n in names}
    if rng.random() < _P_DEVICES:
        kinds = [k for k in ("line", "tube", "ecg") if rng.random() < 0.5] or ["line"]
        findings["support_devices"] = {"kinds": kinds}
    return findings


def _make_plan(seed: int, n_train: int, n_per_class: int, n_dicom: int) -> list[dict]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    n_extra = max(1, round(0.05 * n_train))
    # (split, single-finding class or "") for each patient, studies per patient below.
    patients: list[tuple[str, str, int]] = []
    for split, n_studies in (("train", n_train), ("validate", n_extra)):
        left = n_studies
        while left > 0:
            k = min(left, int(rng.integers(1, 4)))
            patients.append((split, "", k))
            left -= k
    patients += [("test", cls, 1) for cls in ZEROSHOT_CLASSES for _ in range(n_per_class)]
    patients += [("test", "", 1) for _ in range(n_extra)]

    n_studies = sum(p[2] for p in patients)
    subjects = 10_000_000 + rng.choice(9_999_999, len(patients), replace=False)
    studies = 50_000_000 + rng.choice(9_999_999, n_studies, replace=False)
    items: list[dict] = []
    for (split, cls, k), subject in zip(patients, subjects, strict=True):
        day = int(rng.integers(0, 365 * 80))
        for _ in range(k):
            day += int(rng.integers(1, 400))
            date = np.datetime64("2110-01-01") + np.timedelta64(day, "D")
            view = "PA" if rng.random() < 0.6 else "AP"
            items.append({
                "index": len(items), "split": split, "label": cls,
                "subject_id": str(subject), "study_id": str(studies[len(items)]),
                "dicom_id": "-".join(rng.bytes(20).hex()[i:i + 8] for i in range(0, 40, 8)),
                "view": view, "date": str(date).replace("-", ""),
                "time": f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}"
                        f"{int(rng.integers(0, 60)):02d}.{int(rng.integers(0, 1000)):03d}",
                "findings": _sample_findings(rng, cls or None),
                "dicom": "",          # photometric interpretation when in the DICOM subset
            })
    test = [it for it in items if it["split"] == "test"]
    # Alternate the photometric kinds so that even a tiny subset has both.
    for k, i in enumerate(rng.choice(len(test), min(n_dicom, len(test)), replace=False)):
        test[int(i)]["dicom"] = "MONOCHROME1" if k % 2 else "MONOCHROME2"
    return items


# --------------------------------------------------------------------------- writing

def _relative_dir(item: dict) -> Path:
    s = item["subject_id"]
    return Path("files") / f"p{s[:2]}" / f"p{s}"


def _write_dicom(path: Path, img: np.ndarray, item: dict, seed: int, monochrome1: bool) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["synthcxr", str(seed), item["dicom_id"], kind])

    cr_storage = "1.2.840.10008.5.1.4.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = cr_storage
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = cr_storage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "CR"
    ds.PatientID = item["subject_id"]
    ds.PatientName = "SYNTH^CXR"
    ds.StudyID = item["study_id"][-8:]
    ds.StudyDate = item["date"]
    ds.StudyTime = item["time"]
    ds.ViewPosition = item["view"]
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, 0.0, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    values = np.round(img.astype(np.float32) * (4095.0 / 255.0)).astype(np.uint16)
    if monochrome1:
        # MONOCHROME1 stores inverted values: readers must invert to get dark lungs back.
        ds.PhotometricInterpretation = "MONOCHROME1"
        values = (4095 - values).astype(np.uint16)
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = values.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _render_items(root: str, seed: int, size: int, items: list[dict]) -> list[tuple[int, dict]]:
    """Worker body: write the JPEG, report (and DICOM) of each item; return its labels."""
    out = []
    for item in items:
        img_seq, rep_seq = np.random.SeedSequence(seed, spawn_key=(1, item["index"])).spawn(2)
        img = render_image(item["findings"], np.random.default_rng(img_seq), size)
        text, labels = write_report(item["findings"], np.random.default_rng(rep_seq),
                                    view=item["view"])
        folder = Path(root) / _relative_dir(item)
        study_dir = folder / f"s{item['study_id']}"
        study_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(study_dir / f"{item['dicom_id']}.jpg", quality=95)
        (folder / f"s{item['study_id']}.txt").write_text(text)
        if item["dicom"]:
            _write_dicom(Path(root) / "dicom" / f"{item['dicom_id']}.dcm", img, item, seed,
                         item["dicom"] == "MONOCHROME1")
        out.append((item["index"], labels))
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _check_out_dir(out: Path, params: dict) -> bool:
    """True when ``out`` already holds this exact set; clears a partial earlier attempt."""
    marker = out / _MARKER
    if marker.is_file():
        done = json.loads(marker.read_text()).get("params")
        if done == params:
            return True
        raise FileExistsError(f"{out} holds a synthcxr set made with other parameters {done}")
    if out.exists() and any(out.iterdir()):
        names = {p.name for p in out.iterdir()}
        if not (out / _PARTIAL).is_file() or not names <= _OWNED:
            raise FileExistsError(f"{out} is not empty and holds no synthcxr set; refusing to "
                                  "write there")
        for name in names - {_PARTIAL}:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return False


def generate(out_dir: str | Path, *, seed: int = 0, n_train: int = 5000, n_per_class: int = 200,
             size: int = 256, n_dicom: int = 16, workers: int | None = None,
             progress: bool = True) -> Path:
    """Write a synthcxr set in the MIMIC-CXR-JPG layout under ``out_dir``; returns it.

    Returns at once when ``out_dir`` already holds a complete set with the same parameters;
    a partial earlier attempt is cleared and regenerated; any other non-empty folder (or a
    set made with other parameters) raises FileExistsError.
    """
    out = Path(out_dir)
    params = {"version": VERSION, "seed": seed, "n_train": n_train,
              "n_per_class": n_per_class, "size": size, "n_dicom": n_dicom}
    if _check_out_dir(out, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / _PARTIAL).write_text("generation in progress or interrupted\n")
    (out / "dicom").mkdir(exist_ok=True)

    items = _make_plan(seed, n_train, n_per_class, n_dicom)
    workers = max(1, workers or os.cpu_count() or 1)
    chunk = max(8, min(64, len(items) // (workers * 4) or 1))
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    labels: dict[int, dict] = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc="synthcxr", unit="img")
    if workers == 1:
        for c in chunks:
            labels.update(_render_items(str(out), seed, size, c))
            if bar is not None:
                bar.update(len(c))
    else:
        # Each worker must run single-threaded BLAS: with the default thread pool every
        # process spins on all cores and rendering gets ~8x slower. The thread count is read
        # when numpy loads, hence fresh (spawned) workers started with the variables set.
        saved = {k: os.environ.get(k) for k in _BLAS_THREAD_VARS}
        os.environ.update(dict.fromkeys(_BLAS_THREAD_VARS, "1"))
        try:
            with ProcessPoolExecutor(max_workers=workers,
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_render_items, str(out), seed, size, c) for c in chunks]
                for fut in futures:
                    res = fut.result()
                    labels.update(res)
                    if bar is not None:
                        bar.update(len(res))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if bar is not None:
        bar.close()

    rows = sorted(items, key=lambda it: (it["subject_id"], it["study_id"], it["dicom_id"]))
    _write_csv(out / _SPLIT_FILE, ["dicom_id", "study_id", "subject_id", "split"],
               [[it["dicom_id"], it["study_id"], it["subject_id"], it["split"]] for it in rows])
    _write_csv(out / _META_FILE,
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning"],
               [[it["dicom_id"], it["subject_id"], it["study_id"], proc, it["view"], str(size),
                 str(size), it["date"], it["time"], proc, view_meaning, orient]
                for it in rows
                for proc, view_meaning, orient in [
                    ("CHEST (PA AND LAT)", "postero-anterior", "Erect") if it["view"] == "PA"
                    else ("CHEST (PORTABLE AP)", "antero-posterior", "Recumbent")]])
    _write_csv(out / _CHEXPERT_FILE, ["subject_id", "study_id", *CHEXPERT_COLUMNS],
               [[it["subject_id"], it["study_id"],
                 *(_fmt(labels[it["index"]].get(c)) for c in CHEXPERT_COLUMNS)] for it in rows])
    _write_csv(out / _ZEROSHOT_FILE, ["dicom_id", "label"],
               [[it["dicom_id"], it["label"]] for it in rows if it["label"]])
    _write_csv(out / "dicom" / "index.csv", ["dicom_id", "path"],
               [[it["dicom_id"], f"dicom/{it['dicom_id']}.dcm"] for it in rows if it["dicom"]])

    counts = {s: sum(it["split"] == s for it in items) for s in ("train", "validate", "test")}
    info = {"generator": "synthcxr", "version": VERSION, "seed": seed, "params": params,
            "counts": counts, "n_subjects": len({it["subject_id"] for it in items}),
            "zeroshot": {c: n_per_class for c in ZEROSHOT_CLASSES}, "image_size": size,
            "orientation": "patient right on image left"}
    # The marker is written last and atomically: its presence means the set is complete.
    tmp = out / (_MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / _MARKER)
    (out / _PARTIAL).unlink()
    return out


# --------------------------------------------------------------------------- preview

def preview(root: str | Path, out_png: str | Path, *, n: int = 12, split: str = "train",
            seed: int = 0) -> Path:
    """Write a PNG grid of ``n`` random ``split`` images, each beside its report text."""
    from .mimic import extract_sections, read_mimic_cxr

    records = [r for r in read_mimic_cxr(root) if r.split == split]
    if not records:
        raise ValueError(f"no {split!r} images under {root}")
    rng = np.random.default_rng(seed)
    chosen = [records[int(i)] for i in np.sort(rng.choice(len(records), min(n, len(records)),
                                                          replace=False))]
    font = ImageFont.load_default()
    tile, text_w, cols = 256, 440, 2
    rows = (len(chosen) + cols - 1) // cols
    sheet = Image.new("L", (cols * (tile + text_w), rows * tile), 255)
    draw = ImageDraw.Draw(sheet)
    for k, rec in enumerate(chosen):
        x0, y0 = (k % cols) * (tile + text_w), (k // cols) * tile
        with Image.open(rec.image_path) as im:
            sheet.paste(im.convert("L").resize((tile, tile)), (x0, y0))
        sec = extract_sections(rec.report_path.read_text())
        positives = [f"{c}={v:g}" for c, v in rec.labels.items() if v not in (None, 0.0)]
        lines = [f"{rec.dicom_id[:17]}  {rec.view}", "labels: " + ", ".join(positives)]
        for title in ("findings", "impression"):
            if sec[title]:
                lines += textwrap.wrap(f"{title.upper()}: {sec[title]}", 70)
        draw.text((x0 + tile + 6, y0 + 4), "\n".join(lines[:21]), fill=0, font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
