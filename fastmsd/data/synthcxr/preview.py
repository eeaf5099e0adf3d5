"""A contact sheet of generated images beside their reports, for looking at a set."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..mimic import extract_sections, read_mimic_cxr


def preview(root: str | Path, out_png: str | Path, *, n: int = 12, split: str = "train",
            seed: int = 0) -> Path:
    """Write a PNG grid of ``n`` random ``split`` images, each beside its report text."""
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
