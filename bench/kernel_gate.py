"""The compile gate: the Triton kernels built ahead of time for every GPU architecture we serve.

No GPU needed. Every launch shape the launchers can choose is compiled for sm_80, sm_86, sm_89,
sm_90 and sm_120 with Triton's bundled ptxas; each must fit that card's shared memory per block
and spill no registers, or (a shape no tile fits) be refused by the launcher with an error that
names the limit. The Triton interpreter, which runs the numerical tests, cannot see either.

    python -m bench.kernel_gate                 # a representative set (tests/test_kernel_compile.py)
    python -m bench.kernel_gate --full --write  # every configuration (make kernel-gate); rewrites the
                                                # resource tables in bench/RESULTS.md and README.md

Run it from the repository root without TRITON_INTERPRET. Exit status 1 if anything fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
import triton

from bench.common import RESULTS, markdown_table, report
from fastmsd.kernels import ema, msd_loss
from fastmsd.kernels.gpu_compile import ARCHS, SHARED_MEMORY

README = Path(__file__).resolve().parent.parent / "README.md"
# Every padded width (BLOCK_D) from 16 to MAX_DIM, and widths that are not multiples of 16
# (another specialisation of the D argument).
FULL_DIMS = (16, 32, 64, 100, 128, 200, 256, 384, 512)
TABLE_BEGIN, TABLE_END = "<!-- kernel-resources:begin -->", "<!-- kernel-resources:end -->"


def cases(full: bool) -> list[tuple]:
    """("msd", arch, kernel, mode, dim, teacher) and ("ema", arch, write_shadow, small_weight, int64)."""
    dims = FULL_DIMS if full else (256,)
    teachers = (True, False) if full else (True,)
    out = [("msd", arch, kernel, mode, dim, teacher) for arch in ARCHS for kernel in msd_loss.KERNELS
           for mode in msd_loss.MODES for dim in dims for teacher in teachers]
    flags = [(s, w, i) for s in (True, False) for w in (True, False) for i in (False, True)] if full \
        else [(True, True, False)]
    return out + [("ema", arch, *f) for arch in ARCHS for f in flags]


def build(case: tuple) -> dict:
    """One case's outcome: its resources and "ok" / "FAIL", or "refused" with the launcher's message."""
    row = {"case": list(case)}
    try:
        if case[0] == "msd":
            _, arch, kernel, mode, dim, teacher = case
            dtype, precision = msd_loss.MODES[mode]
            tiles = msd_loss.tiles_for(kernel, arch, dtype, precision, dim)
            row["tiles"] = f"{tiles.block_m}x{tiles.block_n}, {tiles.num_warps}w, {tiles.num_stages}s"
            built = msd_loss.compile_for(arch, kernel, dtype, precision, dim, teacher)
        else:
            _, arch, shadow, small, int64 = case
            built = ema.compile_for(arch, shadow, small, int64)
    except ValueError as refused:
        limit_named = re.search(r"[\d,]+ B of shared memory", str(refused)) is not None
        return {**row, "status": "refused" if limit_named else "FAIL", "error": str(refused)}
    except Exception as error:  # a compiler error is a gate failure, reported with the others
        return {**row, "status": "FAIL", "error": f"{type(error).__name__}: {str(error)[:500]}"}
    return {**row, **asdict(built), "status": "ok" if built.fits else "FAIL"}


def run(full: bool, workers: int) -> list[dict]:
    todo = cases(full)
    with ProcessPoolExecutor(workers) as pool:
        rows = []
        for i, row in enumerate(pool.map(build, todo), 1):
            rows.append(row)
            print(f"\r{i}/{len(todo)} built", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def _table_rows(rows: list[dict], dims: set[int]) -> list[list]:
    """One line per architecture, kernel, mode and width (teacher on: the larger build)."""
    out = []
    for r in rows:
        kind, arch, *rest = r["case"]
        if kind != "msd" or rest[2] not in dims or not rest[3]:
            continue
        kernel, mode, dim, _ = rest
        if r["status"] == "refused":
            out.append([f"sm_{arch}", kernel, mode, dim, "refused", "", f"{SHARED_MEMORY[arch]:,}",
                        "", "", ""])
            continue
        out.append([f"sm_{arch}", kernel, mode, dim, r.get("tiles", ""), f"{r.get('shared', 0):,}",
                    f"{SHARED_MEMORY[arch]:,}", r.get("registers", ""), r.get("stack", ""),
                    "yes" if r.get("wgmma") else "no"])
    return out


HEADER = ["arch", "kernel", "mode", "D", "tiles (m x n, warps, stages)", "shared B", "limit B",
          "registers", "spill B", "wgmma"]


def write_readme_table(rows: list[dict]) -> None:
    lines = markdown_table(HEADER, _table_rows(rows, {256}))
    text = README.read_text()
    begin, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    README.write_text(text[:begin] + "\n" + "\n".join(lines) + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every configuration, not the representative set")
    parser.add_argument("--write", action="store_true",
                        help="rewrite the resource table in README.md and append one to bench/RESULTS.md")
    parser.add_argument("--json", metavar="PATH", help="also write every outcome as JSON")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the gate compiles for GPUs, the interpreter cannot")
    rows = run(args.full, args.workers)
    failed = [r for r in rows if r["status"] == "FAIL"]
    for r in failed:
        print("FAIL", r["case"], r.get("error") or f"shared {r['shared']:,} B, spill {r['stack']} B",
              file=sys.stderr)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "refused", "FAIL")}
    print(f"{counts['ok']} fit, {counts['refused']} refused by the launcher (limit named), "
          f"{counts['FAIL']} failed")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    widths = {256} if not args.full else {128, 256, 512}
    env = {"device": "none (ahead-of-time builds)", "triton": triton.__version__, "torch": torch.__version__}
    notes = [f"{len(rows)} builds ({'every configuration' if args.full else 'representative set'}), "
             f"{counts['ok']} fit, {counts['refused']} refused, {counts['FAIL']} failed; spill B is the "
             "stack frame per thread (spilled registers), 0 required.",
             "Modes: fp32 rows with ieee / tf32 / bf16 dots, or bf16 rows and rings (bf16 dots); teacher on."]
    report("kernel resources per GPU architecture (compile gate)", HEADER, _table_rows(rows, widths), env,
           notes, results=RESULTS if args.write else None)
    if args.write:
        write_readme_table(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
