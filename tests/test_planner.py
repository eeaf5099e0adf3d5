"""The --gpu-mem planner's logic, with a fake memory probe (and the real probe on the CPU)."""

import json

import pytest

from fastmsd.config import ConfigError, StepSizes, parse_checkpointing
from fastmsd.memory import (
    CHECKPOINT_EVERY,
    MAX_KEY_CHUNK,
    SAFETY_MARGIN,
    Measurement,
    OutOfMemory,
    Plan,
    StepProbe,
    _sizes,
    cached_plan,
    make_plan,
    plan_for_run,
)
from tests.conftest import micro_config

MiB = 2**20


class FakeProbe:
    """Memory and time of a step as simple functions of the micro-batch and the fraction of
    checkpointed blocks: checkpointing saves activation memory and costs recompute time."""

    def __init__(self, fixed=2000 * MiB, img_act=20 * MiB, txt_act=10 * MiB, device_bytes=None,
                 overhead=0.004, per_sample=0.001, recompute=0.35):
        self.fixed, self.img_act, self.txt_act = fixed, img_act, txt_act
        self.device_bytes = device_bytes
        self.overhead, self.per_sample, self.recompute = overhead, per_sample, recompute
        self.calls = []

    @staticmethod
    def fraction(every):
        return 0.0 if every == 0 else 1.0 / every

    def micro(self, b, image_every, text_every):
        self.calls.append(("micro", b, image_every, text_every))
        fi, ft = self.fraction(image_every), self.fraction(text_every)
        peak = self.fixed + b * (self.img_act * (1 - 0.85 * fi) + self.txt_act * (1 - 0.85 * ft))
        if self.device_bytes is not None and peak > self.device_bytes:
            raise OutOfMemory("fake device full")
        # Small micro-batches pay the per-call overhead more often; checkpointing recomputes.
        seconds = self.overhead + b * self.per_sample * (1 + self.recompute * (2 * fi + ft) / 3)
        return Measurement(int(peak), seconds)

    def keys(self, chunk):
        self.calls.append(("keys", chunk))
        return Measurement(int(self.fixed + chunk * MiB), 0.001 + chunk * 0.0003)

    def fixed_seconds(self):
        return 0.02

    def throughput(self, b, chunk, policy, n):
        m, k = self.micro(b, *policy), self.keys(chunk)
        return n / (-(-n // chunk) * k.seconds + n / b * m.seconds + self.fixed_seconds())


def brute_force(probe, n, usable):
    """Every candidate the planner could pick, with its throughput, by exhaustion."""
    chunks = [c for c in _sizes(min(n, MAX_KEY_CHUNK)) if probe.keys(c).peak_bytes <= usable]
    best = None
    for policy in [(i, t) for i in CHECKPOINT_EVERY for t in CHECKPOINT_EVERY]:
        for b in _sizes(n):
            if probe.micro(b, *policy).peak_bytes > usable:
                continue
            speed = probe.throughput(b, max(chunks), policy, n)
            if best is None or speed > best[0]:
                best = (speed, b, policy)
    return best


@pytest.mark.parametrize("budget_mib", [2500, 3000, 4000, 6000, 12288, 100000])
def test_plan_fits_the_budget_and_is_the_fastest_that_fits(budget_mib):
    probe, n = FakeProbe(), 4096
    budget = budget_mib * MiB
    plan = make_plan(probe, batch_size=n, budget=budget, device="fake", progress=False)
    usable = int(budget * (1 - SAFETY_MARGIN))
    assert plan.usable_bytes == usable
    # Never over budget: the chosen sizes measure within the usable part.
    policy = parse_checkpointing(plan.checkpointing)
    assert probe.micro(plan.micro_batch_size, *policy).peak_bytes <= usable
    assert probe.keys(plan.key_chunk).peak_bytes <= usable
    assert plan.peak_bytes <= usable
    speed, b, best_policy = brute_force(FakeProbe(), n, usable)
    assert plan.img_per_s == pytest.approx(speed, rel=1e-9)
    assert (plan.micro_batch_size, policy) == (b, best_policy)
    assert plan.accumulation_steps == -(-n // plan.micro_batch_size)


def test_plan_prefers_the_faster_of_two_that_fit():
    # A roomy budget: no checkpointing and the whole batch fit, and recompute only costs.
    roomy = make_plan(FakeProbe(), batch_size=256, budget=100000 * MiB, device="fake", progress=False)
    assert roomy.checkpointing == "none" and roomy.micro_batch_size == 256
    # When recompute is nearly free, larger checkpointed micro-batches win over small plain ones.
    tight = 2600 * MiB
    cheap = make_plan(FakeProbe(recompute=0.01, overhead=0.05), batch_size=4096, budget=tight,
                      device="fake", progress=False)
    dear = make_plan(FakeProbe(recompute=3.0, overhead=0.0001), batch_size=4096, budget=tight,
                     device="fake", progress=False)
    assert cheap.checkpointing == "all"
    assert dear.checkpointing == "none"
    assert cheap.micro_batch_size > dear.micro_batch_size


def test_plan_treats_a_probe_out_of_memory_as_not_fitting():
    # The device itself is smaller than the budget: the probe raises instead of measuring.
    probe = FakeProbe(device_bytes=3000 * MiB)
    plan = make_plan(probe, batch_size=4096, budget=12288 * MiB, device="fake", progress=False)
    policy = parse_checkpointing(plan.checkpointing)
    assert probe.micro(plan.micro_batch_size, *policy).peak_bytes <= 3000 * MiB


def test_too_small_a_budget_names_what_the_smallest_plan_needs():
    probe = FakeProbe()
    smallest = max(probe.micro(1, 1, 1).peak_bytes, probe.keys(1).peak_bytes)
    with pytest.raises(ConfigError) as err:
        make_plan(probe, batch_size=64, budget=2000 * MiB, device="fake", progress=False)
    text = str(err.value)
    assert "micro-batch 1 with every block checkpointed" in text
    assert "it needs 2.0 GiB" in text
    suggested = int(text.split("--gpu-mem ")[2].split("MiB")[0])
    assert suggested * MiB * (1 - SAFETY_MARGIN) >= smallest
    # ... and the suggestion is enough: that budget plans.
    make_plan(FakeProbe(), batch_size=64, budget=suggested * MiB, device="fake", progress=False)


def test_too_small_for_the_device_at_all():
    with pytest.raises(ConfigError, match="does not fit on the device at all"):
        make_plan(FakeProbe(device_bytes=100 * MiB), batch_size=64, budget=4000 * MiB, device="fake",
                  progress=False)


def test_sizes_are_ascending_and_end_at_the_limit():
    assert _sizes(4096)[:9] == [1, 2, 4, 6, 8, 12, 16, 24, 32]
    assert _sizes(100)[-1] == 100 and _sizes(1) == [1]
    assert all(a < b for a, b in zip(_sizes(4096), _sizes(4096)[1:], strict=False))


def _plan(**fields):
    values = dict(micro_batch_size=64, key_chunk=512, checkpointing="all", batch_size=4096,
                  budget_bytes=12 * 2**30, usable_bytes=11 * 2**30, peak_bytes=9 * 2**30, img_per_s=1000.0,
                  device="fake")
    return Plan(**{**values, **fields})


def test_plan_is_cached_per_key_and_reused(tmp_path):
    made = []

    def make():
        made.append(1)
        return _plan(micro_batch_size=32 * len(made))

    key = {"model": "vit", "gpu": "H200", "budget_bytes": 12 * 2**30, "precision": "bf16"}
    first, cached = cached_plan(tmp_path, key, make)
    assert not cached and len(made) == 1
    again, cached = cached_plan(tmp_path, key, make)
    assert cached and again == first and len(made) == 1
    # Another budget (or GPU, model, precision) plans again, and replaces the cache.
    other, cached = cached_plan(tmp_path, {**key, "budget_bytes": 8 * 2**30}, make)
    assert not cached and len(made) == 2 and other.micro_batch_size == 64
    # A torn file is planned again, never trusted.
    (tmp_path / "plan.json").write_text('{"key": ')
    _, cached = cached_plan(tmp_path, key, make)
    assert not cached and len(made) == 3
    assert json.loads((tmp_path / "plan.json").read_text())["key"] == key


def test_plan_description_names_the_choices():
    text = _plan().describe()
    for part in ("micro-batch 64 x 64 accumulation steps", "checkpointing all", "chunks of 512",
                 "12.0 GiB", "9.0 GiB of 11.0 GiB"):
        assert part in text


class CountingMeter:
    """Stands in for the CUDA allocator's counters on the CPU."""

    def __init__(self):
        self.resets = 0

    def reset(self):
        self.resets += 1

    def peak(self):
        return 1000 * MiB


def test_real_probe_runs_real_steps_on_the_cpu():
    import torch

    cfg = micro_config(batch_size=32, queue_size=64)
    meter = CountingMeter()
    probe = StepProbe(cfg, cfg.model.vocab_size, "cpu", meter=meter, repeats=1)
    m = probe.micro(8, 2, 1)
    assert m.peak_bytes == 1000 * MiB and m.seconds > 0
    assert probe.keys(16).seconds > 0 and probe.fixed_seconds() > 0
    assert probe.engine.rings.n_valid == 64
    plan = make_plan(probe, batch_size=32, budget=2000 * MiB, device="cpu", progress=False)
    assert plan.micro_batch_size in _sizes(32) and plan.key_chunk in _sizes(32)
    assert meter.resets > 5

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    probe.engine.micro_batch_loss = out_of_memory
    with pytest.raises(OutOfMemory, match="9.00 GiB") as err:
        probe.micro(32, 0, 0)
    assert err.value.__context__ is None  # nothing of the failed step kept alive


def test_gpu_mem_has_no_effect_on_the_cpu(tmp_path, capsys):
    cfg = micro_config(gpu_mem="12G")
    import torch

    assert plan_for_run(cfg, tmp_path, torch.device("cpu"), 200) is None
    assert "no effect" in capsys.readouterr().out
    assert not (tmp_path / "plan.json").exists()


def test_plan_for_run_plans_once_then_reuses_the_cached_plan(tmp_path, monkeypatch, capsys):
    """The run-level path with a faked 16 GiB GPU: plan, cache, apply, cap; then reuse."""
    import types

    import torch

    import fastmsd.memory as memory

    built, caps = [], []
    card = {"total": 16 * 2**30, "free": 15 * 2**30}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(name="Fake GPU", total_memory=card["total"]))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (card["free"], card["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    def set_fraction(fraction, device):
        assert device.index is not None  # torch refuses a bare "cuda" here
        caps.append(fraction)

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(memory, "StepProbe", lambda cfg, vocab, device: built.append(vocab) or FakeProbe())
    device = torch.device("cuda")

    cfg = micro_config(batch_size=4096, queue_size=4096, gpu_mem="12G", checkpointing="none")
    plan = plan_for_run(cfg, tmp_path, device, vocab_size=300, progress=False)
    assert built == [300] and caps == [0.75]  # probed once (at the larger vocabulary), then capped
    # The sizes go to the engine; the config stays what the user asked for.
    assert plan.sizes == StepSizes(plan.micro_batch_size, plan.key_chunk, plan.checkpointing)
    assert (cfg.train.micro_batch_size, cfg.train.key_chunk) == (8, 16)
    assert (plan.micro_batch_size, plan.key_chunk) != (8, 16)
    assert "planning for 12.0 GiB on Fake GPU" in capsys.readouterr().out

    again = micro_config(batch_size=4096, queue_size=4096, gpu_mem="12G")
    assert plan_for_run(again, tmp_path, device, vocab_size=300, progress=False) == plan
    assert built == [300] and "(cached)" in capsys.readouterr().out

    # Another budget is another plan; --no-plan only caps.
    smaller = micro_config(batch_size=4096, queue_size=4096, gpu_mem="4G")
    assert plan_for_run(smaller, tmp_path, device, vocab_size=300, progress=False).budget_bytes == 4 * 2**30
    assert len(built) == 2
    manual = micro_config(batch_size=4096, queue_size=4096, gpu_mem="8G", plan=False, micro_batch_size=7)
    assert plan_for_run(manual, tmp_path, device, vocab_size=300, progress=False) is None
    assert manual.train.micro_batch_size == 7 and caps[-1] == 0.5 and len(built) == 2
    with pytest.raises(ConfigError, match="exceeds"):
        plan_for_run(micro_config(gpu_mem="20G"), tmp_path, device, vocab_size=300, progress=False)

    # A "12 GB" card: it reports 11.76 GiB, 11.3 GiB of it free. --gpu-mem 12G plans for what is free.
    card.update(total=int(11.76 * 2**30), free=int(11.3 * 2**30))
    capsys.readouterr()
    consumer = micro_config(batch_size=4096, queue_size=4096, gpu_mem="12G")
    plan = plan_for_run(consumer, tmp_path / "consumer", device, vocab_size=300, progress=False)
    assert plan.budget_bytes == 45 * 2**28  # 11.25 GiB: the free memory, in 256 MiB steps
    assert "11.2 GiB is free on this GPU" in capsys.readouterr().out
    assert caps[-1] == pytest.approx(11.25 / 11.76, rel=1e-3)


def test_logged_memory_starts_after_the_probes(monkeypatch):
    """The planner's uncapped probes leave the allocator's peaks far above what the run uses:
    the loop's meter resets them first, and reports the reserved peak (what --gpu-mem caps)."""
    import torch

    from fastmsd.run import PeakMemory

    GiB = 2**30
    allocator = {"allocated": 0, "reserved": 0, "peak_allocated": 0, "peak_reserved": 0}

    def use(allocated, reserved):
        allocator.update(allocated=allocated, reserved=reserved)
        allocator["peak_allocated"] = max(allocator["peak_allocated"], allocated)
        allocator["peak_reserved"] = max(allocator["peak_reserved"], reserved)

    def reset(device):
        allocator.update(peak_allocated=allocator["allocated"], peak_reserved=allocator["reserved"])

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocator["peak_allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: allocator["peak_reserved"])
    use(20 * GiB, 22 * GiB)  # the largest probe
    use(0, 1 * GiB)  # probes freed, the cache emptied
    memory = PeakMemory(torch.device("cuda", 0))
    memory.reset()
    use(9 * GiB, 11 * GiB)  # training steps
    use(8 * GiB, 11 * GiB)
    assert memory.read() == {"memory_bytes": 9 * GiB, "memory_reserved_bytes": 11 * GiB}
