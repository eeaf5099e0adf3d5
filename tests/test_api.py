"""fastmsd.load and `fastmsd embed`: the evaluation suite's embeddings and numbers from a run."""

import csv
import gc
import json
import shutil
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fastmsd
from fastmsd import cli
from fastmsd.data.cache import Cache
from fastmsd.data.images import RejectError, read_image
from fastmsd.data.loader import load_images
from fastmsd.eval.embed import image_embeddings, text_embeddings
from fastmsd.eval.metrics import macro_auc_ovr
from fastmsd.eval.zeroshot import CLASSES, DEFAULT_PROMPTS, class_probabilities_of, load_zeroshot_set
from fastmsd.run import load_trained
from tests.helpers import ROOT, assert_one_line_error, rg1_files, run_cli

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def encoder(micro_run):
    return fastmsd.load(micro_run, device="cpu")


@pytest.fixture(scope="module")
def trained(micro_run):
    """The same run through the evaluation suite's loader: (config, model, tokenizer)."""
    cfg, model, tokenizer, _ = load_trained(micro_run, CPU)
    return cfg, model, tokenizer


@pytest.fixture(scope="module")
def paths(synth_cache):
    cache = Cache(synth_cache)
    return cache.image_paths(list(range(24)))


def test_load_keeps_only_the_student(micro_run, monkeypatch):
    import fastmsd.run

    teachers = []

    def spy(path, device):
        cfg, model, tokenizer, checkpoint = load_trained(path, device)
        teachers.append(weakref.ref(model.momentum))
        return cfg, model, tokenizer, checkpoint

    monkeypatch.setattr(fastmsd.run, "load_trained", spy)
    enc = fastmsd.load(micro_run, device="cpu")
    gc.collect()
    assert teachers and teachers[0]() is None  # the momentum teacher is freed
    assert isinstance(enc.student, fastmsd.model.Tower) and not enc.student.training
    assert (enc.cfg.image_size, enc.cfg.in_chans, enc.cfg.max_len) == (32, 1, 16)
    assert enc.tau > 0 and "checkpoints" in enc.source


def test_paths_give_the_evaluation_embeddings(encoder, trained, paths):
    cfg, model, _ = trained
    expected = image_embeddings(model.student, paths, cfg.model, CPU)
    got = encoder.encode_images(paths, batch_size=10, progress=False)
    assert got.dtype == torch.float32 and got.shape == (len(paths), 16)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(paths)))


def test_tensors_pil_and_paths_give_the_same_rows(encoder, paths):
    from_paths = encoder.encode_images(paths)
    raw = torch.from_numpy(np.stack([read_image(p) for p in paths]))[:, None]  # uint8 at 64 px
    rgb = raw.expand(-1, 3, -1, -1).contiguous()
    prepared = load_images(paths, encoder.cfg.image_size).float() / 255  # float: already preprocessed
    pil = [Image.open(p) for p in paths]
    for other in (raw, rgb, prepared, pil, [np.asarray(im) for im in pil]):
        torch.testing.assert_close(encoder.encode_images(other, batch_size=7), from_paths, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="taken as preprocessed"):
        encoder.encode_images(raw.float())  # float at another size: not preprocessed


def test_dicom_paths(encoder, synth_root):
    dicoms = sorted((synth_root / "dicom").glob("*.dcm")) + list(rg1_files().values())[:1]
    assert len(dicoms) >= 2
    emb = encoder.encode_images(dicoms)
    torch.testing.assert_close(emb, encoder.encode_images([read_image(p) for p in dicoms]), atol=1e-6, rtol=0)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(dicoms)))


def test_unreadable_files_raise_or_are_listed(encoder, paths, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(paths[0].read_bytes()[:200])
    with pytest.raises(RejectError, match="bad.jpg: truncated or corrupt image"):
        encoder.encode_images([paths[0], bad])
    rejects = []
    emb = encoder.encode_images([paths[0], bad, paths[1]], batch_size=2, rejects=rejects)
    assert [i for i, _ in rejects] == [1] and "truncated" in rejects[0][1]
    torch.testing.assert_close(emb, encoder.encode_images(paths[:2]), atol=1e-6, rtol=0)


def test_reports_similarity_and_zero_shot_match_the_evaluation(encoder, trained, paths, synth_cache):
    cfg, model, tokenizer = trained
    texts = Cache(synth_cache).texts(list(range(24)))
    reports = encoder.encode_reports(texts)
    torch.testing.assert_close(reports, text_embeddings(model.student, tokenizer, texts, cfg.model, CPU),
                               atol=1e-6, rtol=0)
    images = encoder.encode_images(paths)
    torch.testing.assert_close(encoder.similarity(images, reports), images @ reports.T)
    classes = {c: DEFAULT_PROMPTS.classes[c] for c in CLASSES}
    expected = class_probabilities_of(model, tokenizer, cfg.model, CPU, images)
    np.testing.assert_allclose(encoder.zero_shot(paths, classes).numpy(), expected, atol=1e-6)
    assert encoder.encode_reports([]).shape == (0, 16)


def test_zero_shot_macro_auc_equals_fastmsd_eval(encoder, micro_run, synth_cache, tmp_path):
    """The acceptance check: the API reproduces `fastmsd eval` on the 5x200 set exactly."""
    r = run_cli("eval", str(micro_run), "--task", "zeroshot", "--out", str(tmp_path / "ev"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    evaluated = json.loads((tmp_path / "ev" / "results.json").read_text())["zeroshot"]["macro_auc"]
    cache = Cache(synth_cache)
    indices, labels = load_zeroshot_set(cache)
    probs = encoder.zero_shot(cache.image_paths(indices), {c: DEFAULT_PROMPTS.classes[c] for c in CLASSES})
    assert macro_auc_ovr(probs.numpy(), labels)[0] == evaluated


def test_embed_end_to_end(encoder, micro_run, synth_root, paths, tmp_path):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(paths[0], folder / "a.jpg")
    shutil.copy(paths[1], folder / "nested" / "b.JPG")
    dicom = next((synth_root / "dicom").glob("*.dcm"))
    shutil.copy(dicom, folder / "nested" / "c.dcm")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "reports.txt").write_text("no acute findings\n\nlarge right pleural effusion\n")
    out = tmp_path / "out" / "emb.safetensors"
    r = run_cli("embed", str(micro_run), "--images", str(folder), "--reports", str(tmp_path / "reports.txt"),
                "--out", str(out), "--no-progress", "--batch-size", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "embedded 3 images (1 rejected" in r.stdout
    tensors = load_file(out)
    with (tmp_path / "out" / "emb.ids.csv").open() as f:
        ids = list(csv.DictReader(f))
    assert [(row["kind"], row["row"], row["id"]) for row in ids] == [
        ("image", "0", "a.jpg"), ("image", "1", "nested/b.JPG"), ("image", "2", "nested/c.dcm"),
        ("report", "0", "1"), ("report", "1", "3")]
    kept = [folder / "a.jpg", folder / "nested" / "b.JPG", folder / "nested" / "c.dcm"]
    torch.testing.assert_close(tensors["image_embeddings"], encoder.encode_images(kept), atol=1e-6, rtol=0)
    torch.testing.assert_close(tensors["report_embeddings"],
                               encoder.encode_reports(["no acute findings", "large right pleural effusion"]),
                               atol=1e-6, rtol=0)
    with (tmp_path / "out" / "emb.rejects.csv").open() as f:
        rejects = list(csv.DictReader(f))
    assert [row["source"] for row in rejects] == [str(folder / "broken.jpg")]
    assert "corrupt" in rejects[0]["reason"] or "not an image" in rejects[0]["reason"]

    # A list of paths (relative to the list's folder), a CSV of reports, npz output; in-process.
    (folder / "list.txt").write_text("a.jpg\nnested/c.dcm\n")
    (tmp_path / "reports.csv").write_text('id,text\nr7,"effusion, right"\n')
    assert cli.main(["embed", str(micro_run), "--images", str(folder / "list.txt"), "--reports",
                     str(tmp_path / "reports.csv"), "--out", str(tmp_path / "emb.npz"), "--no-progress",
                     "--device", "cpu"]) == 0
    saved = np.load(tmp_path / "emb.npz")
    np.testing.assert_allclose(saved["image_embeddings"], tensors["image_embeddings"][[0, 2]].numpy(),
                               atol=1e-6)
    assert saved["report_embeddings"].shape == (1, 16)
    assert (tmp_path / "emb.ids.csv").read_text().splitlines()[-1] == "report,0,r7"


def test_a_cache_as_image_source(synth_cache):
    from fastmsd.api import image_sources

    cache = Cache(synth_cache)
    ids, found = image_sources(synth_cache)
    assert ids == [row["id"] for row in cache.rows] and found[0] == cache.image_paths([0])[0]


def test_embed_errors_are_one_line(micro_run, tmp_path):
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "e.safetensors")
    assert_one_line_error(run_cli("embed", str(micro_run), "--images", str(tmp_path / "empty"), "--out", out),
                          "no images in")
    assert_one_line_error(run_cli("embed", str(micro_run), "--images", str(tmp_path), "--out", "e.pt"),
                          ".safetensors or .npz")
    # Before any heavy import: a missing run or nothing to embed.
    code = textwrap.dedent(f"""
        import sys
        from fastmsd import cli
        assert cli.main(["embed", "no-such-run", "--images", ".", "--out", "e.npz"]) == 2
        assert cli.main(["embed", {str(micro_run)!r}, "--out", "e.npz"]) == 2
        assert "torch" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert "run no-such-run not found" in r.stderr and "nothing to embed" in r.stderr
    with pytest.raises(fastmsd.config.ConfigError, match="neither a run"):
        fastmsd.load(tmp_path / "empty", device="cpu")
