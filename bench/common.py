"""Shared harness of the bench scripts: environment, timing, peak memory, profiling, report.

Run the scripts as modules from the repository root (``python -m bench.ema``), so that they
import this file as ``bench.common``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NOT_MEASURED = "not measured"
# Distribution names, read from the installed metadata: importing them would cost seconds.
_PACKAGES = {"torch": "torch", "triton": "triton", "timm": "timm", "transformers": "transformers",
             "open_clip": "open_clip_torch", "numpy": "numpy"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
    except OSError:
        match = None
    name = match.group(1).strip() if match else (platform.processor() or platform.machine())
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def environment(device: torch.device) -> dict[str, str]:
    """Device, library versions (those installed), Python and the UTC date of this run."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        name = f"{_cpu_name()} (no GPU)"
    env = {"device": name}
    for label, dist in _PACKAGES.items():
        try:
            env[label] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    env["python"] = platform.python_version()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of one call of ``fn``: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start_s))
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory of one call of ``fn`` above what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _device(value: str) -> torch.device:
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)


def bench_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every bench script takes; ``--device`` parses to a torch.device."""
    parser = argparse.ArgumentParser(description=description)
    # argparse runs string defaults through `type` too, so "auto" arrives resolved.
    parser.add_argument("--device", type=_device, default="auto",
                        help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="write a torch.profiler trace of each measured call (Perfetto / chrome://tracing)")
    parser.add_argument("--no-append", action="store_true", help=f"do not append the table to {RESULTS.name}")
    parser.add_argument("--results", metavar="PATH", type=Path, default=RESULTS,
                        help="Markdown file the table is appended to (default: %(default)s)")
    return parser


def profile(fn: Callable[[], object], out_dir: str | Path, name: str, device: torch.device) -> Path:
    """Trace a few calls of ``fn`` with torch.profiler; returns the chrome trace json written."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()  # first-call costs (compilation, allocator growth) stay out of the trace
    _sync(device)
    with torch_profile(activities=activities) as prof:
        for i in range(3):
            with record_function(f"{name}#{i}"):
                fn()
        _sync(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") + ".json")
    prof.export_chrome_trace(str(path))
    return path


def _cell(value: object) -> str:
    if value is None:
        return NOT_MEASURED
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value)
        # Three significant digits, without exponent notation.
        return f"{value:,.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of one Markdown table; cells that are None render as "not measured"."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)} has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def report(title: str, header: Sequence[str], rows: Sequence[Sequence[object]], env: dict[str, str],
           notes: Sequence[str] = (), results: str | Path | None = None) -> str:
    """Render one Markdown table, print it, append it to ``results`` unless None; returns the text.

    Cells that are None render as "not measured".
    """
    lines = [f"## {title}", "", " · ".join(f"{k}: {v}" for k, v in env.items()), ""]
    lines += markdown_table(header, rows)
    if notes:
        lines.append("")
        lines.extend(f"- {note}" for note in notes)
    text = "\n".join(lines) + "\n"
    print(text)
    if results is not None:
        with open(results, "a") as f:
            f.write("\n" + text)
    return text
