"""End-to-end training steps: the fast path against the eager reference path, side by side.

    python -m bench.step                         # GPU: base preset (ViT-B/16 + BERT-base, seq 128,
                                                 # 224 px), Q = 65,536, N = 4,096, under --gpu-mem 12G
    python -m bench.step --device cpu            # the tiny preset on the CPU
    python -m bench.step --batch-size 1024 --steps 2   # a shorter GPU run

Rows, each a fresh engine on the same synthetic effective batch, rings full (steady state):
- fast path: every switch on (bf16 autocast, fused AdamW, SDPA, bf16 teacher, Triton loss and
  EMA, pinned copies), micro-batch / checkpointing / key chunk chosen by the planner;
- eager + bf16 (GPU only): bf16 autocast, everything else off, no checkpointing, the largest
  micro-batch that fits (how a plain bf16 trainer without our switches runs);
- eager reference: every optimisation off (fp32, eager loss, foreach EMA, no SDPA, no
  checkpointing), the largest micro-batch that fits.
On the CPU there is no memory to plan: both paths use the preset's micro-batch.
"""

from __future__ import annotations

import copy
import gc
import time

import torch

from bench.common import NOT_MEASURED, bench_parser, environment, profile, report
from fastmsd.config import Config, StepSizes, format_size, parse_size, preset
from fastmsd.engine import Engine
from fastmsd.memory import Plan, cap_cuda_memory, fill_rings, probe_plan, synthetic_batch
from fastmsd.model import build_model


def path_config(base: Config, path: str) -> Config:
    cfg = copy.deepcopy(base)
    t = cfg.train
    if path == "fast":
        t.precision = "auto"
        return cfg
    t.precision = "bf16" if path == "eager + bf16" else "fp32"
    t.fused_adamw = t.sdpa = t.bf16_teacher = t.pin_memory = t.compile = False
    t.loss_impl, t.ema_impl, t.report_padding, t.checkpointing = "eager", "foreach", "fixed", "none"
    return cfg


def choose_sizes(cfg: Config, path: str, budget: int, device: torch.device) -> Plan:
    """Micro-batch, checkpointing and key chunk for this path under the budget (GPU)."""
    policies = None if path == "fast" else [(0, 0)]
    return probe_plan(cfg, cfg.model.vocab_size, device, budget, policies=policies)


def measure(cfg: Config, sizes: StepSizes, device: torch.device, warmup: int, steps: int,
            profile_dir: str | None, name: str) -> tuple[float, int | None]:
    """Images/s over ``steps`` timed optimizer steps, and the allocator's peak (GPU)."""
    torch.manual_seed(0)
    engine = Engine(cfg, build_model(cfg.model, cfg.model.vocab_size), device, sizes=sizes)
    fill_rings(engine.rings)
    batch = synthetic_batch(cfg, cfg.model.vocab_size, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        engine.train_step(batch)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step(batch)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    if profile_dir:
        profile(lambda: engine.train_step(batch), profile_dir, f"step-{name}", device)
    return steps * len(batch) / seconds, peak


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "base"], help="default: base on a GPU, tiny on the CPU")
    parser.add_argument("--gpu-mem", default="12G", help="the memory budget on a GPU (default 12G)")
    parser.add_argument("--batch-size", type=int, help="effective batch (default: the preset's)")
    parser.add_argument("--queue-size", type=int, help="ring capacity (default: the preset's)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per path (default 3 on a GPU, "
                                                  "20 on the CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--paths", default="fast,eager + bf16,eager",
                        help="comma-separated rows (default: all; eager + bf16 needs a GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    base = preset(args.preset or ("base" if on_gpu else "tiny"))
    if args.batch_size:
        base.train.batch_size = args.batch_size
    if args.queue_size:
        base.train.queue_size = args.queue_size
    base.train.queue_size = max(base.train.queue_size, base.train.batch_size)
    budget = parse_size(args.gpu_mem)
    args.steps = args.steps or (3 if on_gpu else 20)

    rows, notes, env = [], [], environment(device)
    for path in [p.strip() for p in args.paths.split(",")]:
        if path == "eager + bf16" and not on_gpu:
            continue
        cfg = path_config(base, path)
        sizes = StepSizes.of(cfg.train)
        if on_gpu:
            # The probes run uncapped (they measure peaks above the budget), the step capped.
            cap_cuda_memory(torch.cuda.get_device_properties(device).total_memory, device)
            plan = choose_sizes(cfg, path, budget, device)
            notes.append(f"{path}: {plan.describe()}")
            sizes = plan.sizes
            cap_cuda_memory(budget, device)
        img_s, peak = measure(cfg, sizes, device, args.warmup, args.steps, args.profile, path.split()[0])
        t = cfg.train
        rows.append([path, t.precision if on_gpu else "fp32", sizes.micro_batch_size,
                     -(-t.batch_size // sizes.micro_batch_size),
                     sizes.checkpointing, sizes.key_chunk, round(img_s, 1),
                     NOT_MEASURED if peak is None else format_size(peak)])
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    m, t = base.model, base.train
    notes.insert(0, f"{base.preset} preset: {m.image_encoder} at {m.image_size} px + {m.text_encoder}, "
                    f"seq {m.max_len}; effective batch {t.batch_size}, Q = {t.queue_size}; "
                    f"{args.warmup} untimed + {args.steps} timed optimizer steps per row; rings full")
    if on_gpu:
        notes.append(f"allocator capped at {args.gpu_mem} during the timed steps; peak = the allocator's "
                     "reserved peak (what the cap limits)")
    else:
        notes.append("CPU: no memory to plan, both rows at the preset's micro-batch; fp32 (no fast "
                     "bf16 here); the Triton loss and EMA run only in the interpreter on a CPU, so the "
                     "fast path uses the eager loss and torch's lerp here")
    report("training step, fast path vs eager reference",
           ["path", "precision", "micro-batch", "accum. steps", "checkpointing", "key chunk", "img/s",
            "peak memory"], rows, env, notes, None if args.no_append else args.results)


if __name__ == "__main__":
    main()
