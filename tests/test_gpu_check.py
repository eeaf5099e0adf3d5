"""bench/gpu_check.sh survives its failures: every step reports, the next one runs, and the
results are copied back whatever happened (on a CPU, with a stand-in python that always fails)."""

import os
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"


def run_script(tmp_path, *parts):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text("#!/bin/sh\necho \"stand-in python $*\"\nexit 3\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out)}
    return subprocess.run(["bash", str(SCRIPT), *parts], capture_output=True, text=True, env=env,
                           timeout=60), out


def test_every_step_reports_and_results_come_back(tmp_path):
    done, out = run_script(tmp_path, "loss", "plan")
    assert done.returncode == 0, done.stderr
    lines = [line for line in (out / "summary.txt").read_text().splitlines() if " / " in line]
    assert [line.split(":")[0] for line in lines] == [
        "loss / bf16-rows", "loss / fp32-tf32", "loss / fp32-ieee", "plan / base-12G"]
    assert all("exit 3" in line for line in lines)
    assert (out / "RESULTS.md").read_text() == (SCRIPT.parent / "RESULTS.md").read_text()
    assert "stand-in python -m bench.loss --dtype fp32 --precision ieee" in (out / "log.txt").read_text()
    # What the device machine sends back: at most 8 files, none in a sub-folder here.
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "log.txt", "summary.txt"]


def test_unknown_part_is_refused_before_anything_runs(tmp_path):
    done, out = run_script(tmp_path, "kernels", "everything")
    assert done.returncode == 2 and "unknown part everything" in done.stderr
    assert not out.exists()


def test_no_part_prints_the_parts_and_their_budgets(tmp_path):
    done, _ = run_script(tmp_path)
    assert done.returncode == 2
    budgets = {line.split()[0]: int(line.split()[1]) for line in done.stdout.splitlines()
               if line.strip() and line.split()[0] in {"kernels", "loss", "io", "plan", "step"}}
    assert set(budgets) == {"kernels", "loss", "io", "plan", "step"}
    assert max(budgets.values()) < 600  # each part fits one 10-minute device command
    limits: dict[str, int] = {}
    for part, limit in re.findall(r"^\s*step (\w+) \S+ (\d+) ", SCRIPT.read_text(), re.MULTILINE):
        limits[part] = limits.get(part, 0) + int(limit)
    assert limits == budgets  # a stated budget is the sum of its steps' limits
