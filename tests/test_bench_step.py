"""bench/step.py on the CPU: both paths train for real and land in one table."""

import sys

import bench.step


def test_step_bench_runs_both_paths_on_the_cpu(monkeypatch, capsys, tmp_path):
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["step", "--device", "cpu", "--batch-size", "32", "--queue-size", "64",
                                      "--steps", "1", "--results", str(results)])
    bench.step.main()
    table = results.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| fast") or line.startswith("| eager")]
    assert len(rows) == 2
    assert all(float(row.split("|")[7].replace(",", "")) > 0 for row in rows)  # img/s measured
    assert "eager + bf16" not in table  # a GPU row: never on the CPU
