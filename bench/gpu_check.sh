#!/usr/bin/env bash
# The prepared GPU checks, in parts that each fit one device command (10 minutes):
#
#   bash bench/gpu_check.sh PART [PART ...]
#
#   part     budget  what
#   kernels  480 s   GPU-only tests: the loss kernel in every dot mode, the EMA, no host sync
#   loss     420 s   bench.loss: bf16 rows, fp32 rows with tf32 and with ieee dots
#   io       240 s   bench.ema and bench.data (the loader bench reads a carried cache, below)
#   plan     540 s   `fastmsd plan --gpu-mem 12G --preset base`
#   step     540 s   bench.step under 12G: the fast path, then both eager rows (effective batch
#                    1,024, shorter than the preset's 4,096, to fit)
#
# A part's budget is the sum of its steps' limits; each step is killed at its limit, reports its
# exit status and time, and the next one runs whatever happened. Nothing is installed: the
# commands run from the repository root with it on PYTHONPATH (the device machine has no package
# registry; torch, triton, timm and transformers are its own).
#
# What comes back (at most 8 files may): in $OUT (default bench/gpu-out), summary.txt (the GPU,
# then one line per step: part, step, exit status, seconds), log.txt (every step's output), and
# RESULTS.md (bench/RESULTS.md with the benches' tables appended), copied on exit whatever fails.
#
# The device machine has no pydicom (which `fastmsd prepare` needs), so `io` reads a cache
# prepared here beforehand (git ignores bench/gpu-cache/) and carried:
#   python -m bench.data --cache bench/gpu-cache --batches 1 --no-append   # builds it (~20 MB)
# then run with carry: ["bench/gpu-cache"].
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

# step PART NAME LIMIT_S COMMAND...: run it under its limit, log it, one summary line.
step() {
  local part=$1 name=$2 limit=$3 start rc
  shift 3
  start=$(date +%s)
  echo "=== $part / $name (limit ${limit} s): $*" >>"$log"
  timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && rc="124 (killed at its limit)"
  echo "$part / $name: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$summary"
}

part_kernels() {
  # The GPU rerun of the loss tests (every dot mode) and the GPU-only checks.
  step kernels tests 480 env FASTMSD_TEST_DEVICE=cuda \
    python -m pytest -q -p no:cacheprovider tests/test_kernel_loss.py tests/test_on_gpu.py
}

part_loss() {
  step loss bf16-rows 140 python -m bench.loss --dtype bf16 --precision tf32
  step loss fp32-tf32 140 python -m bench.loss --dtype fp32 --precision tf32
  step loss fp32-ieee 140 python -m bench.loss --dtype fp32 --precision ieee
}

part_io() {
  step io ema 90 python -m bench.ema
  if [ -d bench/gpu-cache ]; then
    step io data 150 python -m bench.data --cache bench/gpu-cache
  else
    echo "io / data: skipped, no bench/gpu-cache carried (see the header)" | tee -a "$summary"
  fi
}

part_plan() {
  # The 12G plan for the base preset (ViT-B/16 + BERT-base); the run folder stays on the machine.
  step plan base-12G 540 python -m fastmsd plan --gpu-mem 12G --preset base \
    --runs-dir /tmp/fastmsd-plan --no-progress
}

part_step() {
  # Under the same cap; each path plans its own sizes, so the rows are split over two steps.
  step step fast 270 python -m bench.step --gpu-mem 12G --batch-size 1024 --steps 2 --paths fast
  step step eager 270 python -m bench.step --gpu-mem 12G --batch-size 1024 --steps 2 \
    --paths "eager + bf16,eager"
}

if [ $# = 0 ]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
for part in "$@"; do
  if ! declare -F "part_$part" >/dev/null; then
    echo "unknown part $part (kernels, loss, io, plan, step)" >&2
    exit 2
  fi
done
out=${OUT:-bench/gpu-out}
mkdir -p "$out"
summary=$out/summary.txt log=$out/log.txt
trap 'cp bench/RESULTS.md "$out/RESULTS.md"' EXIT
command -v nvidia-smi >/dev/null \
  && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$summary"
for part in "$@"; do
  "part_$part"
done
