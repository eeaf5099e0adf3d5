"""Segmentation masks: SIIM run-length decoding, RSNA boxes, synthcxr's ground truth, and masks in
the prepared cache on the prepared image's grid."""

import json

import numpy as np
import pytest
from PIL import Image

from fastmsd.config import ConfigError
from fastmsd.data.cache import MARKER, Cache
from fastmsd.data.datasets import read_dataset
from fastmsd.data.masks import BoxMask, RleMask, decode_rle, render_mask, resize_mask
from fastmsd.data.prepare import prepare
from fastmsd.data.synthcxr import generate, render_image
from fastmsd.data.synthcxr.labels import MASKED_FINDINGS
from fastmsd.data.synthcxr.radiograph import render_with_masks
from tests.helpers import write_dicom


def reference_decode(rle: str, width: int, height: int) -> np.ndarray:
    """SIIM's decoding written out pixel by pixel: relative offsets, pixels counted down each
    column, the columns left to right."""
    mask = np.zeros((height, width), dtype=bool)
    if rle.strip() == "-1":
        return mask
    numbers = [int(v) for v in rle.split()]
    position = 0
    for offset, length in zip(numbers[0::2], numbers[1::2], strict=True):
        position += offset
        for index in range(position, position + length):
            mask[index % height, index // height] = True
        position += length
    return mask


def encode(mask: np.ndarray) -> str:
    """The SIIM encoding of a bool [H, W] mask ("-1" when empty)."""
    column_major = mask.T.reshape(-1)
    pairs, end, index = [], 0, 0
    while index < column_major.size:
        if column_major[index]:
            start = index
            while index < column_major.size and column_major[index]:
                index += 1
            pairs += [start - end, index - start]
            end = index
        else:
            index += 1
    return " ".join(map(str, pairs)) if pairs else "-1"


def test_decode_rle_by_hand():
    # 3 rows x 4 columns, column-major: index 0 is (0, 0), index 3 is (0, 1), the last (2, 3).
    assert decode_rle("-1", 4, 3).shape == (3, 4) and not decode_rle(" -1", 4, 3).any()
    expected = np.zeros((3, 4), dtype=bool)
    expected[0, 0] = expected[1, 0] = True            # run 0..1
    expected[1, 1] = expected[2, 1] = True            # offset 2 from 2 -> 4..5
    expected[2, 3] = True                              # the last pixel
    assert (decode_rle("0 2 2 2 5 1", 4, 3) == expected).all()
    assert (reference_decode("0 2 2 2 5 1", 4, 3) == expected).all()


@pytest.mark.parametrize("seed", range(6))
def test_decode_rle_matches_an_independent_decoder(seed):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    mask = rng.random((height, width)) < rng.choice([0.0, 0.3, 0.8, 1.0])
    if seed == 1:
        mask[0, 0] = mask[-1, -1] = True          # both ends of the pixel order
    rle = encode(mask)
    assert (decode_rle(rle, width, height) == mask).all()
    assert (reference_decode(rle, width, height) == mask).all()


def test_several_rows_are_unioned_and_bad_runs_are_refused():
    a, b = np.zeros((4, 5), dtype=bool), np.zeros((4, 5), dtype=bool)
    a[0, :2], b[3, 4], b[1:3, 2] = True, True, True
    union = render_mask(RleMask((encode(a), encode(b)), shape=(4, 5)))
    assert (union == (a | b)).all()
    assert not render_mask(RleMask((), shape=(4, 5))).any()
    for bad, needle in (("1 2 3", "pairs"), ("0 x", "integers"), ("15 6", "past the"), ("-2 3", "pairs")):
        with pytest.raises(ValueError, match=needle):
            decode_rle(bad, 5, 4)


def test_boxes_and_nearest_neighbour_resize():
    mask = render_mask(BoxMask(((1.0, 2.0, 3.0, 1.0), (0.0, 0.0, 1.0, 1.0)), shape=(4, 6)))
    expected = np.zeros((4, 6), dtype=bool)
    expected[2, 1:4] = expected[0, 0] = True
    assert (mask == expected).all()
    with pytest.raises(ValueError, match="not inside"):
        render_mask(BoxMask(((4.0, 0.0, 3.0, 1.0),), shape=(4, 6)))
    big = resize_mask(expected, (8, 12))
    assert big.dtype == bool and (big[::2, ::2] == expected).all()


def test_boxes_on_the_image_grid_take_its_size():
    """VinDr's boxes have no fixed grid: they are drawn on whatever size the image decodes to."""
    boxes = BoxMask(((1.0, 2.0, 3.0, 1.0),), shape=None)
    expected = np.zeros((5, 7), dtype=bool)
    expected[2, 1:4] = True
    assert (render_mask(boxes, (5, 7)) == expected).all()
    with pytest.raises(ValueError, match="not inside"):
        render_mask(boxes, (2, 7))
    with pytest.raises(ValueError, match="image's size"):
        render_mask(boxes)


def test_synthcxr_masks_leave_the_image_unchanged():
    findings = {"pneumothorax": {"side": "left", "severity": "large"},
                "pleural_effusion": {"side": "right", "severity": "moderate"}}
    img, masks = render_with_masks(findings, np.random.default_rng(5), 96)
    assert (img == render_image(findings, np.random.default_rng(5), 96)).all()
    assert set(masks) == set(MASKED_FINDINGS)
    # Patient's left is the image right; the effusion is in the right (image left) base.
    assert masks["pneumothorax"][:, 48:].sum() > 0 and not masks["pneumothorax"][:, :40].any()
    assert masks["pleural_effusion"][:, :48].sum() > 0 and not masks["pleural_effusion"][:, 56:].any()
    _, none = render_with_masks({}, np.random.default_rng(5), 96)
    assert not any(m.any() for m in none.values())


def test_synthcxr_masks_reach_the_cache(tmp_path):
    root = generate(tmp_path / "synth", n_train=24, n_per_class=2, size=48, n_dicom=0, workers=1,
                    progress=False)
    out = tmp_path / "cache"
    prepare("synthcxr", root, out, size=32, workers=1, max_len=16, progress=False)
    cache = Cache(out)
    assert cache.has_masks and cache.mask_findings == ("Pleural Effusion", "Pneumothorax")
    with pytest.raises(ConfigError, match="name the finding"):
        cache.mask_paths([0])
    indices = list(range(len(cache.rows)))
    positives = 0
    for finding in cache.mask_findings:
        folder = finding.lower().replace(" ", "_")
        for i, path in zip(indices, cache.mask_paths(indices, finding), strict=True):
            row = cache.rows[i]
            source = np.asarray(Image.open(root / "masks" / folder / f"{row['id']}.png")) > 0
            cached = np.asarray(Image.open(path))
            image = np.asarray(Image.open(cache.image_paths([i])[0]))
            assert cached.shape == (row["height"], row["width"]) == image.shape
            assert set(np.unique(cached)) <= {0, 255}
            assert ((cached > 0) == resize_mask(source, cached.shape)).all()
            positives += int(cached.any())
    assert positives > 0
    # A cache from before masks: prepare.json without the list.
    info = json.loads((out / MARKER).read_text())
    del info["masks"]
    (out / MARKER).write_text(json.dumps(info))
    assert not Cache(out).has_masks


def _pixels(size: int) -> np.ndarray:
    return np.arange(size * size).reshape(size, size) % 4096


def _siim(root, ids, sizes, rows):
    (root / "train-rle.csv").parent.mkdir(parents=True)
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\n" + "".join(f"{i}, {r}\n" for i, r in rows))
    for image_id, size in zip(ids, sizes, strict=True):
        folder = root / "dicom-images-train" / f"study.{image_id}" / f"series.{image_id}"
        folder.mkdir(parents=True)
        write_dicom(folder / f"{image_id}.dcm", _pixels(size))


def test_siim_masks_in_the_cache_and_a_mismatched_image_is_rejected(tmp_path):
    ids = ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"]
    a, b = np.zeros((1024, 1024), dtype=bool), np.zeros((1024, 1024), dtype=bool)
    a[100:300, 600:700] = True
    b[0, 0] = b[1023, 1023] = True
    rows = [(ids[0], encode(a)), (ids[0], encode(b)), (ids[1], "-1"), (ids[2], encode(a)), (ids[3], "-1")]
    # A negative is empty on any grid: only the positive 512 x 512 image cannot be annotated.
    _siim(tmp_path / "siim", ids, [1024, 1024, 512, 512], rows)
    items, _ = read_dataset("siim-pneumothorax", tmp_path / "siim")
    assert (render_mask(items[0].masks["Pneumothorax"]) == (a | b)).all()

    out = tmp_path / "cache"
    counts = prepare("siim-pneumothorax", tmp_path / "siim", out, size=64, workers=1, progress=False)
    assert counts == {"found": 4, "prepared": 3, "rejected": 1}
    reasons = (out / "rejects.csv").read_text()
    assert "Pneumothorax mask is 1024x1024, its image 512x512" in reasons and ids[2] in reasons
    cache = Cache(out)
    by_id = {row["id"]: i for i, row in enumerate(cache.rows)}
    first, empty = (np.asarray(Image.open(p)) > 0 for p in cache.mask_paths([by_id[ids[0]], by_id[ids[1]]]))
    assert (first == resize_mask(a | b, (64, 64))).all() and first.any() and not empty.any()
    assert not (np.asarray(Image.open(cache.mask_paths([by_id[ids[3]]])[0])) > 0).any()


def test_rsna_boxes_in_the_cache(tmp_path):
    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\np1,0,0,512,512,1\np1,768,512,256,512,1\np2,,,,,0\n")
    for pid in ("p1", "p2"):
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", _pixels(1024))
    prepare("rsna-pneumonia", root, tmp_path / "cache", size=8, workers=1, progress=False)
    cache = Cache(tmp_path / "cache")
    assert cache.mask_findings == ("Pneumonia",)
    by_id = {row["id"]: i for i, row in enumerate(cache.rows)}
    p1, p2 = (np.asarray(Image.open(p)) > 0 for p in cache.mask_paths([by_id["p1"], by_id["p2"]]))
    expected = np.zeros((8, 8), dtype=bool)
    expected[:4, :4] = expected[4:, 6:] = True
    assert (p1 == expected).all() and not p2.any()
    with pytest.raises(ConfigError, match="no 'Pneumothorax' masks"):
        cache.mask_paths([0], "Pneumothorax")
