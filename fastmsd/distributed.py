"""torch.distributed for training on several processes (torchrun): who computes what.

The semantics are those of one process: every rank embeds the keys of its share of the
effective batch, the keys are all-gathered so that each rank writes the same block into its own
identical rings, each rank trains its rows against the full ring, and the summed gradients are
all-reduced once per optimizer step.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastmsd.config import ConfigError

# DDP's default bucket is 25 MiB; larger ones amortise a collective's latency over more bytes.
BUCKET_ELEMENTS = 2**24  # 64 MiB of fp32
BLOCKING_WAIT = "TORCH_NCCL_BLOCKING_WAIT"


class RankLost(ConfigError):
    """A collective failed: another rank died, or stalled past the timeout."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; world 1 (the default) is a plain single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _guard(self, what: str, run):
        try:
            return run()
        except torch.OutOfMemoryError:
            raise  # not a lost rank: the out-of-memory report applies
        except RuntimeError as err:  # DistBackendError, DistNetworkError, gloo's connection errors
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            stalled = f"a rank died, or stalled past --dist-timeout {self.timeout_s:g} s"
            raise RankLost(f"rank {self.rank} of {self.world} lost contact with the others during {what} "
                           f"({stalled}): {first}") from None

    def all_gather(self, t: torch.Tensor, what: str = "all-gather") -> torch.Tensor:
        """Every rank's ``t`` (equal shapes), concatenated along dim 0 in rank order."""
        if not self.active:
            return t
        out = torch.empty((self.world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        self._guard(what, lambda: dist.all_gather_into_tensor(out, t.contiguous()))
        return out

    def all_reduce_sum_(self, tensors: list[torch.Tensor], what: str = "all-reduce") -> None:
        """Sum ``tensors`` over the ranks in place: one collective per bucket of about
        BUCKET_ELEMENTS (a flat copy of all gradients at once would cost 4 bytes a parameter)."""
        if not self.active:
            return
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for t in tensors:
            if buckets[-1] and size + t.numel() > BUCKET_ELEMENTS:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.numel()
        for bucket in filter(None, buckets):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            self._guard(what, lambda f=flat: dist.all_reduce(f))
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket]), strict=True):
                b.copy_(part.view_as(b))

    def on_main(self, fn, what: str):
        """``fn()`` run by rank 0, its result on every rank; an error there stops every rank
        at once with its message (instead of leaving them waiting for the timeout)."""
        if not self.active:
            return fn()
        if not self.is_main:
            status, value = self.broadcast_object(None, what)
            if status == "error":
                raise ConfigError(f"rank 0 stopped during {what}: {value}")
            return value
        try:
            result = fn()
        except Exception as err:
            self.broadcast_object(("error", str(err)), what)
            raise
        self.broadcast_object(("ok", result), what)
        return result

    def broadcast_(self, tensor: torch.Tensor, what: str = "broadcast") -> None:
        if self.active:
            self._guard(what, lambda: dist.broadcast(tensor, 0))

    def broadcast_object(self, obj=None, what: str = "broadcast"):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        self._guard(what, lambda: dist.broadcast_object_list(box, 0))
        return box[0]

    def all_gather_object(self, obj, what: str = "all-gather") -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        self._guard(what, lambda: dist.all_gather_object(out, obj))
        return out


def from_env(device: torch.device, timeout_s: float) -> tuple[Dist, torch.device]:
    """The process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL on GPUs, gloo on the CPU; each rank on GPU LOCAL_RANK. Without torchrun: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(timeout_s=timeout_s), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank}, but this node has {torch.cuda.device_count()} GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            # NCCL collectives are asynchronous: a lost rank would surface in its watchdog thread,
            # which kills the process with no word of the checkpoint to resume from. In blocking
            # wait (read when the group is made) there is no watchdog, and the collective itself
            # raises in this thread after the timeout, where Dist._guard turns it into RankLost.
            # The price: each collective (the keys all-gather, the gradient all-reduce, once a
            # step each) holds the host until it completes.
            os.environ.setdefault(BLOCKING_WAIT, "1")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local_rank, timeout_s), device


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def fingerprint(*tensors: torch.Tensor, chunk: int = 2**22) -> bytes:
    """Exact bytes of two float64 summaries of each tensor (its sum, and a position-weighted
    sum, so that swapped rows show), computed in chunks so that no full-size copy is made."""
    parts = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        sums = torch.zeros(2, dtype=torch.float64, device=flat.device)
        for start in range(0, flat.numel(), chunk):
            part = flat[start : start + chunk].double()
            position = torch.arange(start + 1, start + 1 + part.numel(), dtype=torch.float64,
                                    device=part.device)
            sums += torch.stack([part.sum(), (part * position).sum()])
        parts.append(tuple(sums.tolist()))
    return pickle.dumps(parts)
