"""`fastmsd prepare`: a dataset as it ships -> a cache of 8-bit JPEGs, a manifest and token arrays.

Cache layout (``--out``):
    images/ID.jpg          8-bit grayscale, shorter side ``size`` (aspect kept), bright = dense
    masks/FINDING/ID.png   8-bit, 255 = the finding, on the image's grid (datasets with masks)
    manifest.jsonl         one row per prepared item: id, image, dataset, split, view, patient,
                           study, labels, findings, impression, height, width, and masks
                           (label column -> mask path) when the dataset has masks
    rejects.csv            source,reason for every input that could not be prepared
    tokenizer/vocab.txt    the WordPiece vocabulary the tokens use (datasets with reports)
    tokens.npy, lengths.npy  int32 [n, max_len] token ids and [n] lengths, manifest order, of the
                           report text ``text`` chooses (the manifest keeps both sections)
    prepare.json           parameters, counts and the label columns that have masks, written
                           last: a cache is complete or absent

Prepared items are logged one per line in ``progress.jsonl`` as they finish, so a second run
skips them (resumable) and a finished cache prepares again to the same files (idempotent).
Nothing is dropped silently: prepared + rejected == found, and prepare says so.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fastmsd.config import ConfigError
from fastmsd.data.cache import MANIFEST, MARKER, PROGRESS, REJECTS, ZEROSHOT_LIST, check_text, choose_text
from fastmsd.data.datasets import DATASETS, Item, Reject, read_dataset
from fastmsd.data.images import RejectError, read_image, resize_shorter
from fastmsd.data.masks import MaskSource, mask_folder, render_mask, resize_mask
from fastmsd.data.mimic import extract_sections

VERSION = 1
_BLANK = re.compile(r"_{2,}")


def report_sections(text: str) -> tuple[str, str]:
    """FINDINGS and IMPRESSION, whitespace normalised, with MIMIC-CXR's fallback when both are
    missing (see :func:`fastmsd.data.mimic.extract_sections`); de-identification blanks of any
    length become "___", as MIMIC mostly writes them, so one token stands for every removed name."""
    sections = extract_sections(_BLANK.sub("___", text))
    return sections["findings"], sections["impression"]


def _source_mask(finding: str, source: MaskSource, shape: tuple[int, int]) -> np.ndarray:
    try:
        mask = render_mask(source, shape)
    except ValueError as err:
        raise RejectError(f"{finding} mask: {err}") from None
    if mask.shape != shape:
        # Stretching it would put the finding on the wrong pixels.
        raise RejectError(f"{finding} mask is {mask.shape[0]}x{mask.shape[1]}, "
                          f"its image {shape[0]}x{shape[1]}")
    return mask


def _save(pixels: np.ndarray, target: Path, **params) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    Image.fromarray(pixels).save(tmp, **params)
    os.replace(tmp, target)  # a half-written file never carries the final name


def _prepare_one(item: Item, out_dir: str, size: int) -> tuple[str, dict | None, str | None]:
    """Decode, resize and write one image and its masks (runs in a worker process)."""
    try:
        source = read_image(item.image)
        masks = {finding: _source_mask(finding, spec, source.shape) for finding, spec in item.masks.items()}
        img = resize_shorter(source, size)
    except RejectError as err:
        return item.id, None, str(err)
    out = Path(out_dir)
    paths = {}
    for finding, mask in masks.items():
        paths[finding] = f"masks/{mask_folder(finding)}/{item.id}.png"
        (out / paths[finding]).parent.mkdir(parents=True, exist_ok=True)
        _save(resize_mask(mask, img.shape).astype(np.uint8) * 255, out / paths[finding], format="PNG")
    # The image last: progress counts an item done when its image is there.
    _save(img, out / "images" / f"{item.id}.jpg", format="JPEG", quality=95)
    shape = {"height": int(img.shape[0]), "width": int(img.shape[1])}
    return item.id, {**shape, "masks": paths} if paths else shape, None


def _row(item: Item, findings: str, impression: str, shape: dict) -> dict:
    row = asdict(item)
    del row["report"], row["masks"]  # the mask sources; the written paths come in ``shape``
    row.update(image=f"images/{item.id}.jpg", findings=findings, impression=impression, **shape)
    return row


def _check_params(out: Path, params: dict) -> None:
    marker = out / MARKER
    if marker.is_file():
        saved = json.loads(marker.read_text())["params"]
        if saved != params:
            raise ConfigError(f"{out} holds a cache prepared with other parameters ({saved}); "
                              "use another --out")


def _load_progress(out: Path) -> dict[str, dict]:
    done = {}
    path = out / PROGRESS
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by an interrupted run: redo that item
                continue
            if all((out / path).is_file() for path in [row["image"], *row.get("masks", {}).values()]):
                done[row["id"]] = row
    return done


def _is_done(item: Item, done: dict[str, dict]) -> bool:
    # An item prepared before its dataset had masks is prepared again to get them.
    row = done.get(item.id)
    return row is not None and set(row.get("masks", {})) == set(item.masks)


def prepare(dataset: str, root: str | Path, out: str | Path, *, size: int = 512,
            workers: int | None = None, vocab_size: int = 30522, max_len: int = 128,
            tokenizer: str | Path | None = None, seed: int = 0, text: str = "both",
            progress: bool = True) -> dict:
    """Prepare ``dataset`` from ``root`` into the cache ``out``; returns the counts.

    ``text`` is the report text tokenized, one of ``TEXT_CHOICES`` (see
    :func:`fastmsd.data.cache.choose_text`)."""
    from fastmsd.data.text import load_tokenizer, tokenize, train_wordpiece

    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} not found")
    check_text(text)
    params = {"dataset": dataset, "root": str(root.resolve()), "size": size, "version": VERSION,
              "seed": seed, "max_len": max_len, "vocab_size": vocab_size,
              "tokenizer": None if tokenizer is None else str(tokenizer), "text": text}
    _check_params(out, params)
    items, rejects = read_dataset(dataset, root, seed=seed)
    found = len(items) + len(rejects)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # incomplete from here until the end

    sections: dict[str, tuple[str, str]] = {}
    todo: list[Item] = []
    for item in items:
        if item.report is not None:
            findings, impression = report_sections(item.report)
            if not (findings or impression):  # the fallback leaves a report with any text non-empty
                rejects.append(Reject(str(item.image), "empty report"))
                continue
            sections[item.id] = (findings, impression)
        todo.append(item)
    done = _load_progress(out)
    # Rewrite the log without torn or stale lines, so appends never continue a broken one.
    tmp = out / f".{PROGRESS}.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in done.values()))
    os.replace(tmp, out / PROGRESS)
    pending = [item for item in todo if not _is_done(item, done)]
    bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc=f"prepare {dataset}",
               unit="img", disable=not progress)
    by_id = {item.id: item for item in todo}
    with (out / PROGRESS).open("a") as log, ProcessPoolExecutor(max_workers=workers) as pool:
        for item_id, shape, reason in pool.map(_prepare_one, pending, [str(out)] * len(pending),
                                               [size] * len(pending), chunksize=16):
            item = by_id[item_id]
            if reason is not None:
                rejects.append(Reject(str(item.image), reason))
            else:
                row = _row(item, *sections.get(item_id, ("", "")), shape)
                log.write(json.dumps(row) + "\n")
                log.flush()
                done[item_id] = row
            bar.update(1)
    bar.close()

    rows = [done[item.id] for item in todo if item.id in done]
    with (out / MANIFEST).open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with (out / REJECTS).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "reason"])
        writer.writerows(sorted((r.source, r.reason) for r in rejects))
    if sections:
        texts = [choose_text(*sections[row["id"]], text) for row in rows]
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
            tok.save_pretrained(out / "tokenizer")  # the tokenizer files only, never model weights
        else:
            tok = train_wordpiece([t for t, row in zip(texts, rows, strict=True) if row["split"] == "train"],
                                  vocab_size, out / "tokenizer")
        ids, mask = tokenize(tok, texts, max_len)
        np.save(out / "tokens.npy", ids.numpy())
        np.save(out / "lengths.npy", mask.sum(1).to(dtype=ids.dtype).numpy())
    if (root / ZEROSHOT_LIST).is_file():
        shutil.copyfile(root / ZEROSHOT_LIST, out / ZEROSHOT_LIST)
    counts = {"found": found, "prepared": len(rows), "rejected": len(rejects)}
    if counts["prepared"] + counts["rejected"] != found:
        raise AssertionError(f"prepare lost items: {counts}")
    masks = sorted({finding for row in rows for finding in row.get("masks", {})})
    (out / MARKER).write_text(json.dumps({"params": params, "counts": counts, "masks": masks}, indent=2))
    return counts
