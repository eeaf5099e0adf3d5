"""Using a trained model: ``fastmsd.load`` and the ``Encoder`` it returns.

    import fastmsd
    enc = fastmsd.load("runs/base-20260101-120000")          # a run folder or a checkpoint folder
    img = enc.encode_images(["a.dcm", "b.png"])              # [2, D] fp32 unit rows on the CPU
    txt = enc.encode_reports(["No acute findings.", "Large left pleural effusion."])
    enc.similarity(img, txt)                                 # [2, 2] cosine similarities
    enc.zero_shot(["a.dcm"], {"effusion": ["pleural effusion"], "normal": ["no findings"]})

Images and reports go through exactly the evaluation suite's steps (``fastmsd.eval``), so an
``Encoder`` reproduces ``fastmsd eval`` numbers on the same inputs. ``embed_to_file`` is
``fastmsd embed``: embeddings of a folder, cache or list of images and of a report file.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fastmsd.config import ConfigError, ModelConfig
from fastmsd.data.images import RejectError, pil_to_uint8, read_image
from fastmsd.data.loader import resize_crop
from fastmsd.eval.embed import image_batch_embeddings, text_embeddings
from fastmsd.eval.zeroshot import class_probabilities, prompt_embeddings
from fastmsd.model import Tower

ImageItem = str | Path | Image.Image | np.ndarray
Images = torch.Tensor | Sequence[ImageItem]


class Encoder:
    """The student towers of a trained model with its tokenizer, temperature and evaluation
    preprocessing: all that inference needs (no teacher, rings or optimizer).

    ``bf16``: run the encoders under bfloat16 autocast on a CUDA device (ignored on the CPU);
    the results are still fp32 unit rows on the CPU. An export folder's reader builds an
    ``Encoder`` from the same parts as ``load`` does from a checkpoint.
    """

    def __init__(self, student: Tower, tokenizer, tau: float, cfg: ModelConfig,
                 device: str | torch.device | None = None, bf16: bool = False, source: str = ""):
        from fastmsd.run import resolve_device

        self.device = resolve_device("auto" if device is None else str(device))
        self.student = student.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.tau, self.cfg = tokenizer, float(tau), cfg
        self.bf16, self.source = bf16, source

    @property
    def embed_dim(self) -> int:
        return self.student.image_proj.out_features

    def __repr__(self) -> str:
        return (f"Encoder({self.source or 'unsaved'}: {self.cfg.image_encoder} + {self.cfg.text_encoder}, "
                f"{self.cfg.image_size} px, D={self.embed_dim}, tau={self.tau:.4f}, on {self.device})")

    def _autocast(self):
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _unit(self, emb: torch.Tensor) -> torch.Tensor:
        # bf16 outputs are unit only to bf16 precision; fp32 ones are left bit-identical to eval's.
        return F.normalize(emb, dim=1) if self.bf16 and self.device.type == "cuda" else emb

    def encode_images(self, images: Images, batch_size: int = 256, progress: bool = False,
                      rejects: list[tuple[int, str]] | None = None) -> torch.Tensor:
        """[n, D] fp32 unit rows (CPU) of ``images``, preprocessed as the evaluation suite does.

        ``images`` is one of
        - a uint8 tensor [n, C, H, W] of raw images of any size (C = 1, or 3 for RGB, turned to
          grayscale as PIL does): resized (shorter side) and centre-cropped to the model's size;
        - a float tensor [n, 1 or in_chans, size, size] in [0, 1], already resized and cropped:
          only the model's normalisation is applied;
        - a sequence of file paths (DICOM, JPEG, PNG: decoded as ``fastmsd prepare`` decodes
          them), PIL images or uint8 [H, W] arrays, which are then resized and cropped.
        Files are decoded one batch at a time, so memory stays bounded by ``batch_size``.
        An unreadable file raises ``RejectError``; with a ``rejects`` list, it is appended there
        as (position in ``images``, reason) instead and left out of the rows.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        bar = tqdm(total=len(images), desc="embed images", unit="img", disable=not progress)
        with bar, torch.inference_mode(), self._autocast():
            emb = image_batch_embeddings(self.student, self._batches(images, batch_size, rejects, bar),
                                         self.cfg.in_chans, self.device)
        return self._unit(emb)

    def _batches(self, images: Images, batch_size: int, rejects: list[tuple[int, str]] | None,
                 bar: tqdm) -> Iterator[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                yield self._tensor_batch(batch)
                bar.update(len(batch))
            return
        with ThreadPoolExecutor() as pool:
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                kept = []
                for i, (array, reason) in enumerate(pool.map(self._decode, batch), start):
                    if reason is None:
                        kept.append(array)
                    elif rejects is None:
                        raise RejectError(f"{images[i]}: {reason}")
                    else:
                        rejects.append((i, reason))
                if kept:
                    yield torch.from_numpy(np.stack(kept))[:, None]
                bar.update(len(batch))

    def _decode(self, item: ImageItem) -> tuple[np.ndarray | None, str | None]:
        """(uint8 [size, size], None), or (None, the reason) for an unreadable file."""
        if isinstance(item, (str, Path)):
            try:
                array = read_image(item)
            except RejectError as err:
                return None, str(err)
        elif isinstance(item, Image.Image):
            array = pil_to_uint8(item)
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 2:
            array = item
        else:
            raise TypeError("an image is a path, a PIL image or a uint8 [H, W] array, "
                            f"got {type(item).__name__}")
        return resize_crop(array, self.cfg.image_size), None

    def _tensor_batch(self, images: torch.Tensor) -> torch.Tensor:
        size, in_chans = self.cfg.image_size, self.cfg.in_chans
        if images.ndim != 4:
            raise ValueError(f"an image tensor is [n, C, H, W], got shape {list(images.shape)}")
        if images.is_floating_point():
            if images.shape[1] not in (1, in_chans) or images.shape[2:] != (size, size):
                chans = "1" if in_chans == 1 else f"1 or {in_chans}"
                raise ValueError(f"float images are taken as preprocessed: [n, {chans}, {size}, {size}] "
                                 f"in [0, 1], got {list(images.shape)}")
            return images
        if images.dtype != torch.uint8 or images.shape[1] not in (1, 3):
            raise ValueError(f"raw images are uint8 [n, 1 or 3, H, W], got {images.dtype} "
                             f"{list(images.shape)}")
        if images.shape[1] == 1 and images.shape[2:] == (size, size):
            return images  # already at the model's size: resizing would return the same pixels
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        grays = [a[..., 0] if a.shape[-1] == 1 else pil_to_uint8(Image.fromarray(a, "RGB")) for a in arrays]
        return torch.from_numpy(np.stack([resize_crop(g, size) for g in grays]))[:, None]

    def encode_reports(self, reports: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[n, D] fp32 unit rows (CPU) of report texts, tokenized to the run's ``max_len``."""
        if not reports:
            return torch.empty(0, self.embed_dim)
        with torch.inference_mode(), self._autocast():
            emb = text_embeddings(self.student, self.tokenizer, list(reports), self.cfg, self.device,
                                  batch_size)
        return self._unit(emb)

    def similarity(self, image_emb: torch.Tensor, report_emb: torch.Tensor) -> torch.Tensor:
        """[n_images, n_reports] plain cosine similarities of unit rows, in [-1, 1]; divide by
        ``tau`` for the logits the model was trained with."""
        return image_emb.float() @ report_emb.float().T

    def zero_shot(self, images: Images, classes: Mapping[str, Sequence[str]],
                  batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """[n, C] class probabilities, columns in the order of ``classes`` (class -> prompts): a
        softmax at the model's temperature over each class's mean prompt embedding, exactly as
        ``fastmsd eval`` scores the 5x200 task."""
        if not classes or any(not prompts for prompts in classes.values()):
            raise ConfigError("zero_shot needs at least one class, each with at least one prompt")
        image_emb = self.encode_images(images, batch_size, progress)
        with torch.inference_mode(), self._autocast():
            class_emb = prompt_embeddings(self.student, self.tokenizer, self.cfg, self.device,
                                          [list(prompts) for prompts in classes.values()])
        return torch.from_numpy(class_probabilities(image_emb, class_emb, self.tau))


def load(path: str | Path, device: str | torch.device | None = None, bf16: bool = False) -> Encoder:
    """An ``Encoder`` of a run folder (its latest checkpoint), a checkpoint folder or an ``hf``
    export (`fastmsd export`), on ``device`` (default: CUDA when available, else the CPU)."""
    from fastmsd.export import is_export, read_hf_export
    from fastmsd.run import load_trained

    if is_export(path):
        cfg, tower, tau, tokenizer = read_hf_export(path)
        return Encoder(tower, tokenizer, tau, cfg, device, bf16, str(path))

    # Built on the CPU, so the momentum teacher never takes device memory; it is freed with
    # ``model`` when this function returns, and only the student moves to the device.
    cfg, model, tokenizer, checkpoint = load_trained(path, torch.device("cpu"))
    return Encoder(model.student, tokenizer, model.tau.item(), cfg.model, device, bf16, str(checkpoint))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
OUT_FORMATS = (".safetensors", ".npz")


def image_sources(source: str | Path) -> tuple[list[str], list[Path]]:
    """(ids, paths) of what ``fastmsd embed --images`` names: a prepared cache (its manifest's
    ids and images); a folder (its image files by suffix, searched recursively, as datasets ship
    nested folders; ids are the paths relative to it); or a text file of paths, one a line (ids
    as written; relative paths are taken from the list's folder, so that a list travels with
    its images)."""
    from fastmsd.data.cache import Cache

    source = Path(source)
    if Cache.is_cache(source):
        cache = Cache(source)
        ids, paths = [row["id"] for row in cache.rows], cache.image_paths(list(range(len(cache.rows))))
    elif source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and p.is_file() and not p.name.startswith("."))
        ids = [p.relative_to(source).as_posix() for p in paths]
    else:
        ids = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        paths = [source.parent / line for line in ids]
    if not paths:
        raise ConfigError(f"no images in {source} (looked for {', '.join(IMAGE_SUFFIXES)} files, recursively)"
                          if source.is_dir() else f"no images in {source}")
    return ids, paths


def read_reports(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, texts): a .csv file with ``id`` and ``text`` columns, or a text file with one report
    a line (ids are line numbers from 1; blank lines are skipped)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not {"id", "text"} <= set(reader.fieldnames or ()):
                raise ConfigError(f"report file {path} needs `id` and `text` columns")
            rows = list(reader)
        pairs = [(row["id"], row["text"]) for row in rows]
    else:
        pairs = [(str(n), line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1)
                 if line.strip()]
    if not pairs:
        raise ConfigError(f"no reports in {path}")
    return [i for i, _ in pairs], [t for _, t in pairs]


def output_files(out: str | Path) -> tuple[Path, Path, Path]:
    """The embeddings file and, beside it, FILE.ids.csv (ids in row order) and FILE.rejects.csv."""
    out = Path(out)
    if out.suffix not in OUT_FORMATS:
        raise ConfigError(f"--out {out}: the embeddings file ends in {' or '.join(OUT_FORMATS)}")
    return out, out.with_suffix(".ids.csv"), out.with_suffix(".rejects.csv")


def embed_to_file(run: str | Path, out: str | Path, images: str | Path | None = None,
                  reports: str | Path | None = None, device: str | None = None, batch_size: int = 256,
                  bf16: bool = False, progress: bool = True) -> dict[str, int]:
    """``fastmsd embed``: embeddings of ``images`` and ``reports`` (see ``image_sources`` and
    ``read_reports``) written to ``out`` as ``image_embeddings`` / ``report_embeddings``, the
    ids of their rows to FILE.ids.csv (kind,row,id) and unreadable images to FILE.rejects.csv
    (source,reason, as ``fastmsd prepare`` lists them). Returns the counts."""
    from safetensors.torch import save_file

    out, ids_file, rejects_file = output_files(out)
    image_ids, paths = image_sources(images) if images is not None else ([], [])
    report_ids, texts = read_reports(reports) if reports is not None else ([], [])
    encoder = load(run, device, bf16)
    tensors, rows, rejects = {}, [], []
    if images is not None:
        tensors["image_embeddings"] = encoder.encode_images(paths, batch_size, progress, rejects)
        rejected = {i for i, _ in rejects}
        kept = [image_id for i, image_id in enumerate(image_ids) if i not in rejected]
        rows += [("image", row, image_id) for row, image_id in enumerate(kept)]
    if reports is not None:
        tensors["report_embeddings"] = encoder.encode_reports(texts, batch_size)
        rows += [("report", row, report_id) for row, report_id in enumerate(report_ids)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, **{name: t.numpy() for name, t in tensors.items()})
    else:
        save_file(tensors, out, metadata={"checkpoint": encoder.source})
    with ids_file.open("w", newline="") as f:
        csv.writer(f).writerows([("kind", "row", "id"), *rows])
    if images is not None:
        with rejects_file.open("w", newline="") as f:
            csv.writer(f).writerows([("source", "reason"), *sorted((str(paths[i]), r) for i, r in rejects)])
    return {"images": len(paths) - len(rejects), "rejected": len(rejects), "reports": len(report_ids)}
