"""bench/loss.py on the CPU: the eager rows are measured, and a peer that is not installed is a
row that says so (the GPU machine has no open_clip)."""

import sys

import bench.loss


def test_loss_bench_reports_a_missing_peer(monkeypatch, tmp_path):
    results = tmp_path / "RESULTS.md"
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip raises ImportError
    monkeypatch.setitem(sys.modules, "open_clip.loss", None)
    monkeypatch.setattr(sys, "argv", ["loss", "--device", "cpu", "--b", "8", "--dim", "16", "--q", "64",
                                      "--results", str(results)])
    bench.loss.main()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line
            for line in results.read_text().splitlines() if line.startswith(("| MSD", "| CLIP"))}
    assert "not installed" in rows[("CLIP, ring = batch", "open_clip ClipLoss")]
    assert "not measured" in rows[("MSD, full ring", "fused Triton kernel")]  # the interpreter: no timing
    eager = rows[("MSD, full ring", "eager reference")].split("|")
    assert float(eager[3]) > 0  # ms measured
