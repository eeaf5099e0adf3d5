"""The CUDA allocator cap (`--gpu-mem`) and the micro-batch / checkpointing planner."""

from __future__ import annotations

import copy
import gc
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from fastmsd.config import ConfigError, StepSizes, format_checkpointing, format_size, parse_size


def cap_cuda_memory(budget: int, device) -> float:
    """Cap this process's CUDA allocator at ``budget`` bytes so a large card behaves like a
    small one; returns the fraction of the device set."""
    device = torch.device(device)
    if device.index is None:  # torch's setter refuses a bare "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    if budget > total:
        raise ConfigError(
            f"--gpu-mem {format_size(budget)} exceeds the {format_size(total)} of {device}"
        )
    fraction = budget / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


# The planner (docs/design.md, "The planner"): probe real steps, keep what fits, take the fastest.

# Held back from the budget for what a probe does not see: allocator fragmentation over a long
# run, the loader's next batch, the CUDA context's own growth.
SAFETY_MARGIN = 0.08
# Every K-th block checkpointed, per encoder: none, every second, all.
CHECKPOINT_EVERY = (0, 2, 1)
# Past this the keys phase (forward only) runs no faster; it only holds more memory.
MAX_KEY_CHUNK = 1024
PLAN_FILE = "plan.json"
# How far past the card's reported size --gpu-mem may go (a "12 GB" card reports ~11.8 GiB).
BUDGET_SLACK = 0.05


class OutOfMemory(Exception):
    """A probe that the device could not hold at all."""


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int  # the allocator's peak while the probed work ran (persistent state included)
    seconds: float  # wall time of one call


class Probe(Protocol):
    """Runs the real work of a step at a given size and measures it."""

    def micro(self, micro_batch: int, image_every: int, text_every: int) -> Measurement:
        """Student forward + backward of one micro-batch against the full ring."""

    def keys(self, chunk: int) -> Measurement:
        """Teacher forward of one keys-phase chunk."""

    def fixed_seconds(self) -> float:
        """Per optimizer step: clip, AdamW, EMA."""


@dataclass
class Plan:
    micro_batch_size: int
    key_chunk: int
    checkpointing: str
    batch_size: int
    budget_bytes: int
    usable_bytes: int
    peak_bytes: int
    img_per_s: float
    device: str

    @property
    def sizes(self) -> StepSizes:
        return StepSizes(self.micro_batch_size, self.key_chunk, self.checkpointing)

    @property
    def accumulation_steps(self) -> int:
        return -(-self.batch_size // self.micro_batch_size)

    def describe(self) -> str:
        return (f"plan for {format_size(self.budget_bytes)} on {self.device}: micro-batch "
                f"{self.micro_batch_size} x {self.accumulation_steps} accumulation steps for "
                f"{self.batch_size} rows a step (per rank under torchrun), checkpointing "
                f"{self.checkpointing}, keys in chunks of {self.key_chunk}; measured peak "
                f"{format_size(self.peak_bytes)} of {format_size(self.usable_bytes)} usable, "
                f"about {self.img_per_s:,.0f} img/s")


def _sizes(limit: int) -> list[int]:
    """1, 2, 4, 8, 12, 16, 24, 32, 48, ... up to ``limit`` (and ``limit`` itself)."""
    sizes, k = {1, 2}, 4
    while k <= limit:
        sizes.update((k, k * 3 // 2))
        k *= 2
    return sorted(s for s in sizes | {limit} if s <= limit)


def _largest_fitting(sizes: list[int], measure) -> tuple[int, Measurement] | None:
    """The largest size whose measurement fits (memory grows with size: a bisection)."""
    lo, hi, best = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        m = measure(sizes[mid])
        if m is not None:
            best, lo = (sizes[mid], m), mid + 1
        else:
            hi = mid - 1
    return best


def make_plan(probe: Probe, *, batch_size: int, budget: int, device: str,
              margin: float = SAFETY_MARGIN, progress: bool = True,
              policies: Sequence[tuple[int, int]] | None = None) -> Plan:
    """The micro-batch size, checkpointing policy (of ``policies``, default every pair of
    CHECKPOINT_EVERY) and key chunk with the highest measured throughput whose measured peak
    stays within ``budget`` less the safety margin."""
    usable = int(budget * (1.0 - margin))
    # Peaks of the smallest step (micro-batch 1, every block checkpointed; key chunk 1): what
    # the error names when nothing fits.
    smallest: dict[str, int] = {}
    bar = tqdm(desc="planning", unit="probe", disable=not progress, leave=False)

    def fits(run, smallest_as: str | None = None) -> Measurement | None:
        bar.update(1)
        try:
            m = run()
        except OutOfMemory:
            return None
        if smallest_as is not None:
            smallest[smallest_as] = m.peak_bytes
        return m if m.peak_bytes <= usable else None

    best: Plan | None = None
    try:
        keys = _largest_fitting(_sizes(min(batch_size, MAX_KEY_CHUNK)), lambda c: fits(
            lambda: probe.keys(c), "keys" if c == 1 else None))
        fixed = probe.fixed_seconds() if keys is not None else 0.0
        for policy in (policies or [(i, t) for i in CHECKPOINT_EVERY for t in CHECKPOINT_EVERY]):
            if keys is None:
                break
            found = _largest_fitting(_sizes(batch_size), lambda b, p=policy: fits(
                lambda: probe.micro(b, *p), "micro" if (b, p) == (1, (1, 1)) else None))
            if found is None:
                continue
            (b, m), (chunk, k) = found, keys
            seconds = -(-batch_size // chunk) * k.seconds + batch_size / b * m.seconds + fixed
            plan = Plan(b, chunk, format_checkpointing(*policy), batch_size, budget, usable,
                        max(m.peak_bytes, k.peak_bytes), batch_size / seconds, device)
            # Faster wins; at equal speed, the smaller peak.
            if best is None or (plan.img_per_s, -plan.peak_bytes) > (best.img_per_s, -best.peak_bytes):
                best = plan
    finally:
        bar.close()
    if best is None:
        if "micro" not in smallest:
            fits(lambda: probe.micro(1, 1, 1), "micro")
        if smallest:
            need = max(smallest.values())
            needed = (f"it needs {format_size(need)}; with the {margin:.0%} safety margin, "
                      f"--gpu-mem {math.ceil(need / (1.0 - margin) / 2**20)}MiB at least")
        else:
            needed = "it does not fit on the device at all"
        raise ConfigError(f"--gpu-mem {format_size(budget)} is too small for this model: even micro-batch "
                          f"1 with every block checkpointed does not fit ({needed}); raise --gpu-mem "
                          "or choose smaller encoders")
    return best


def plan_key(cfg, device_name: str, device_bytes: int, budget: int) -> dict:
    """What a plan depends on: the model, the GPU, the budget, the precision, and the step's
    other sizes and switches. A cached plan is reused only for an equal key."""
    m, t = cfg.model, cfg.train
    key = {
        "model": {k: getattr(m, k) for k in ("image_encoder", "image_encoder_args", "image_size", "in_chans",
                                             "text_encoder", "text_encoder_args", "max_len", "embed_dim")},
        "vocab_size": cfg.model.vocab_size,
        "gpu": device_name,
        "gpu_bytes": device_bytes,
        "budget_bytes": budget,
        "precision": t.precision,
        "step": {k: getattr(t, k) for k in ("batch_size", "queue_size", "accum_mode", "loss_impl", "ema_impl",
                                            "dot_precision", "fused_adamw", "sdpa", "bf16_teacher")},
        "torch": torch.__version__,
    }
    return json.loads(json.dumps(key))  # as it reads back from plan.json (tuples become lists)


def cached_plan(run_dir: Path, key: dict, make: Callable[[], Plan]) -> tuple[Plan, bool]:
    """The plan cached in ``run_dir`` for ``key``, or a new one (then cached); and whether it
    came from the cache."""
    path = Path(run_dir) / PLAN_FILE
    try:
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            return Plan(**saved["plan"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, torn or of another version: plan again
    plan = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "plan": asdict(plan)}, indent=2))
    tmp.replace(path)
    return plan, False


class CudaMeter:
    """The CUDA allocator's peak of reserved memory (what the cap limits)."""

    def __init__(self, device):
        self.device = device

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device)


def synthetic_batch(cfg, vocab_size: int, device):
    """One effective batch as the loaders hand it over, at its worst case: float images and
    reports of full length."""
    from fastmsd.engine import Batch

    m, n = cfg.model, cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, m.image_size, m.image_size, generator=g).to(device)
    return Batch(images.expand(-1, m.in_chans, -1, -1),
                 torch.randint(0, vocab_size, (n, m.max_len), generator=g).to(device),
                 torch.ones(n, m.max_len, dtype=torch.bool, device=device))


def fill_rings(rings) -> None:
    """Rings full of unit keys: the steady state of a run, and the loss's largest work."""
    g = torch.Generator().manual_seed(1)
    for ring in (rings.img, rings.txt):
        ring.copy_(torch.nn.functional.normalize(torch.randn(ring.shape, generator=g), dim=-1))
    rings.n_valid = rings.capacity


def probe_plan(cfg, vocab_size: int, device, budget: int, *, progress: bool = True,
               policies: Sequence[tuple[int, int]] | None = None) -> Plan:
    """``make_plan`` over real steps of ``cfg`` in a throwaway engine, freed afterwards."""
    probe = StepProbe(cfg, vocab_size, device)
    try:
        return make_plan(probe, batch_size=cfg.train.batch_size, budget=budget,
                         device=torch.cuda.get_device_name(device), progress=progress, policies=policies)
    finally:
        del probe
        gc.collect()
        torch.cuda.empty_cache()


def measure(work: Callable[[], object], meter, device: torch.device, repeats: int = 2) -> Measurement:
    """The peak memory (``meter``) and mean seconds of ``work`` after a warm-up call; OutOfMemory if the
    device cannot hold it."""
    try:
        meter.reset()
        work()  # warm-up: first-call allocations and kernel selection
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        return Measurement(meter.peak(), seconds)
    except torch.OutOfMemoryError as err:
        message = str(err)
    # Raised outside the handler: the CUDA error's traceback (and the activations its frames
    # hold) must not ride along as the new exception's context into the next probe.
    raise OutOfMemory(message)


class StepProbe:
    """Real steps of the configured model on synthetic tensors, in a throwaway engine that holds
    what training holds: weights, momentum, bf16 shadow, gradients, AdamW state, full rings and
    the effective batch's images and tokens."""

    def __init__(self, cfg, vocab_size: int, device, meter=None, repeats: int = 2):
        from fastmsd.engine import Engine
        from fastmsd.model import build_model

        cfg = copy.deepcopy(cfg)
        cfg.train.compile = False  # compiling every probed shape would take longer than the plan saves
        self.device, self.repeats = torch.device(device), repeats
        self.meter = meter or CudaMeter(self.device)
        self.engine = Engine(cfg, build_model(cfg.model, vocab_size), self.device)
        self.batch = synthetic_batch(cfg, vocab_size, self.device)
        fill_rings(self.engine.rings)
        # One step allocates the AdamW state; gradients then stay allocated, as between the
        # micro-batches of a real step.
        self.engine.sizes = replace(self.engine.sizes, micro_batch_size=1)
        self.engine.train_step(self.batch.slice(0, 1))
        self._restore_grads()

    def _run(self, work) -> Measurement:
        return measure(work, self.meter, self.device, self.repeats)

    def micro(self, micro_batch: int, image_every: int, text_every: int) -> Measurement:
        engine = self.engine
        engine.model.set_checkpointing(image_every, text_every)
        micro = self.batch.slice(0, micro_batch)
        return self._run(lambda: engine.micro_batch_loss(micro, 0, len(self.batch), 0.4)["loss"].backward())

    def keys(self, chunk: int) -> Measurement:
        engine = self.engine
        engine.sizes = replace(engine.sizes, key_chunk=chunk)
        keys = self.batch.slice(0, chunk)
        return self._run(lambda: engine.encode_keys(keys))

    def fixed_seconds(self) -> float:
        engine = self.engine
        return self._run(lambda: (engine.optimizer_step(0), self._restore_grads())).seconds

    def _restore_grads(self) -> None:
        for p in self.engine.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


def available_budget(budget: int, device) -> int:
    """What of ``budget`` this process can really hold on ``device``. A "12 GB" card reports a
    little under 12 GiB and its CUDA context and other processes hold part of that, so
    ``--gpu-mem 12G`` there means what is free (rounded down to 256 MiB, so that a cached plan
    is found again); a budget well beyond the card is an error, not a guess."""
    free, total = torch.cuda.mem_get_info(device)
    if budget > total * (1 + BUDGET_SLACK):
        raise ConfigError(f"--gpu-mem {format_size(budget)} exceeds the {format_size(total)} of "
                          f"{torch.cuda.get_device_name(device)}")
    available = (free + torch.cuda.memory_reserved(device)) // 2**28 * 2**28
    if budget <= available:
        return budget
    print(f"note: --gpu-mem {format_size(budget)}: {format_size(available)} is free on this GPU (the CUDA "
          f"context and other processes hold the rest); planning for {format_size(available)}")
    return available


def plan_for_run(cfg, cache_dir: Path, device, vocab_size: int, progress: bool = True) -> Plan | None:
    """Apply ``--gpu-mem``: on a GPU, the plan (cached in ``cache_dir``) whose ``sizes`` (micro-
    batch, checkpointing, key chunk) the engine is to run, after which the allocator is capped
    at the budget. The probes run before the cap, so that they measure peaks above the budget
    instead of failing."""
    t = cfg.train
    if t.gpu_mem is None:
        return None
    budget = parse_size(t.gpu_mem)
    if device.type != "cuda":
        print(f"note: --gpu-mem {t.gpu_mem} has no effect on {device}")
        return None
    props = torch.cuda.get_device_properties(device)
    budget = available_budget(budget, device)
    if not t.plan:
        cap_cuda_memory(budget, device)
        return None

    def make() -> Plan:
        print(f"planning for {format_size(budget)} on {props.name}: probing real steps "
              f"(cached in {Path(cache_dir) / PLAN_FILE})")
        return probe_plan(cfg, max(vocab_size, cfg.model.vocab_size), device, budget, progress=progress)

    plan, cached = cached_plan(cache_dir, plan_key(cfg, props.name, props.total_memory, budget), make)
    cap_cuda_memory(plan.budget_bytes, device)
    print(plan.describe() + (" (cached)" if cached else ""))
    return plan


