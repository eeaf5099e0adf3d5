"""torchrun with gloo on the CPU: 2 real processes train like 1, resume, and fail fast when a
rank dies."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastmsd.checkpoint as ckpt
from fastmsd.config import save_yaml
from tests.conftest import micro_config
from tests.helpers import rel_err

DRIVER = str(Path(__file__).with_name("ddp_driver.py"))
STEPS = 4


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("TRITON_INTERPRET", None)  # the eager loss on the CPU: no kernels involved
    return env


def _args(tmp, cache, name, *more):
    cfg = micro_config(batch_size=32, micro_batch_size=8, key_chunk=16, queue_size=80, steps=STEPS,
                       alpha_warmup_steps=0, save_every=100, log_every=1, loader="memory", device="cpu")
    config = Path(tmp) / "micro.yaml"
    save_yaml(cfg, config)
    return ["train", "--config", str(config), "--data", str(cache), "--runs-dir", str(Path(tmp) / "runs"),
            "--name", name, "--no-progress", *more]


def torchrun(nproc, args, dump=None, timeout=400):
    dump_env = {} if dump is None else {"FASTMSD_TEST_DUMP": str(dump)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           DRIVER, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**dump_env))


def load(dump, rank):
    return torch.load(Path(dump) / f"rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, synth_cache):
    tmp = tmp_path_factory.mktemp("ddp")
    r = torchrun(2, _args(tmp, synth_cache, "two"), dump=tmp / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r


def test_two_processes_train_like_one(two_ranks, synth_cache):
    tmp, _ = two_ranks
    one = subprocess.run([sys.executable, DRIVER, *_args(tmp, synth_cache, "one")], capture_output=True,
                         text=True, timeout=300, env=_env(FASTMSD_TEST_DUMP=str(tmp / "one")))
    assert one.returncode == 0, one.stderr[-3000:]
    single, rank0, rank1 = load(tmp / "one", 0), load(tmp / "two", 0), load(tmp / "two", 1)
    # Both ranks hold the same model and the same rings, bit for bit.
    for key in rank0:
        assert torch.equal(torch.as_tensor(rank0[key]), torch.as_tensor(rank1[key])), key
    # ... and they equal one process running the same effective batch.
    assert (rank0["ptr"], rank0["n_valid"]) == (single["ptr"], single["n_valid"]) == (STEPS * 32 % 80, 80)
    for key in ("student", "momentum", "tau"):
        assert rel_err(rank0[key], single[key]) <= 1e-5, key
    for key in ("ring_img", "ring_txt"):
        assert (rank0[key] - single[key]).abs().max() <= 1e-5, key
    # Training moved the student far more than the tolerance (the momentum copy lags at init).
    assert rel_err(single["student"], single["momentum"]) > 100 * 1e-5
    # Rank 0 alone logs and saves: one metrics line per step, one final checkpoint.
    lines = (tmp / "runs" / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS
    assert ckpt.latest_checkpoint(tmp / "runs" / "two").name == f"step_{STEPS:08d}"


def test_resume_across_two_processes(two_ranks, synth_cache):
    tmp, _ = two_ranks
    first = torchrun(2, _args(tmp, synth_cache, "split", "--stop-after", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert ckpt.latest_checkpoint(tmp / "runs" / "split").name == "step_00000002"
    second = torchrun(2, _args(tmp, synth_cache, "split", "--resume", "latest"), dump=tmp / "split")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stdout
    for rank in (0, 1):
        whole, resumed = load(tmp / "two", rank), load(tmp / "split", rank)
        for key in whole:
            assert torch.equal(torch.as_tensor(whole[key]), torch.as_tensor(resumed[key])), (rank, key)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(args, timeout=240, **extra):
    """Two ranks with torchrun's environment but no launcher watching them: what they do on
    their own when something goes wrong. Returns [(returncode, stderr)] by rank."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **extra)
        procs.append(subprocess.Popen([sys.executable, DRIVER, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errors, strict=True)]
    finally:
        for p in procs:
            p.kill()


def test_a_dead_rank_fails_the_others_fast(tmp_path, synth_cache):
    """Rank 1 dies in step 3: rank 0 must stop with a clear error, not hang, and the checkpoint
    of step 2 stays valid."""
    args = _args(tmp_path, synth_cache, "dies", "--save-every", "2", "--dist-timeout", "60")
    start = time.monotonic()
    (code0, err0), (code1, _) = spawn_ranks(args, FASTMSD_TEST_DIE_AT="1:2")
    assert time.monotonic() - start < 240
    assert code1 == 17
    assert code0 == 2, err0[-3000:]
    message = err0.strip().splitlines()[-1]
    assert "rank 0 of 2 lost contact" in message and "--resume latest" in message
    last = tmp_path / "runs" / "dies" / "checkpoints" / "step_00000002"
    assert str(last) in message
    assert ckpt.latest_checkpoint(tmp_path / "runs" / "dies") == last and ckpt.is_complete(last)


def test_an_error_on_rank_0_stops_every_rank_at_once(two_ranks, synth_cache):
    """The run exists already: rank 0 refuses, and rank 1 hears why instead of waiting out the
    timeout in the next collective."""
    tmp, _ = two_ranks
    start = time.monotonic()
    (code0, err0), (code1, err1) = spawn_ranks(_args(tmp, synth_cache, "two"))
    assert time.monotonic() - start < 120
    assert code0 == code1 == 2, (err0[-2000:], err1[-2000:])
    assert "already exists" in err0.strip().splitlines()[-1]
    assert "rank 0 stopped during the run set-up" in err1 and "already exists" in err1


@pytest.mark.parametrize("backend_device,user_setting,expected", [
    ("cuda", None, "1"),  # NCCL: blocking wait, so a lost rank raises where _guard sees it
    ("cuda", "0", "0"),  # a user's own choice stands
    ("cpu", None, None),  # gloo raises in the caller's thread anyway
])
def test_nccl_collectives_wait_blocking(monkeypatch, backend_device, user_setting, expected):
    """Only the set-up is provable without GPUs: the process group is made with
    TORCH_NCCL_BLOCKING_WAIT in the environment, which NCCL reads at that moment."""
    import torch.distributed as dist

    from fastmsd import distributed

    seen = {}

    def init_process_group(backend, timeout):
        seen.update(backend=backend, blocking=os.environ.get(distributed.BLOCKING_WAIT),
                    timeout=timeout.total_seconds())

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    # Set first, so that monkeypatch restores the variable's absence after from_env set it.
    monkeypatch.setenv(distributed.BLOCKING_WAIT, user_setting or "")
    if user_setting is None:
        monkeypatch.delenv(distributed.BLOCKING_WAIT)
    d, device = distributed.from_env(torch.device(backend_device), 90.0)
    assert (d.rank, d.world) == (1, 2)
    assert seen == {"backend": "nccl" if backend_device == "cuda" else "gloo", "blocking": expected,
                    "timeout": 90.0}
    if backend_device == "cuda":
        assert device == torch.device("cuda", 1)
