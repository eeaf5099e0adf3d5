"""The momentum side: the momentum teacher (an EMA copy of the student over one flat buffer) and
the two rings of its keys."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fastmsd.kernels.dispatch import use_triton


def flatten_parameters(module: nn.Module) -> torch.Tensor:
    """Move every parameter of ``module`` into one flat buffer and make each a view of it.

    One buffer turns the EMA into a single fused op. Parameters must share one dtype and
    device; call this after the module has reached its device, since ``.to()`` would replace
    the views with fresh tensors.
    """
    params = list(module.parameters())
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"flat buffer needs one dtype and device, got {dtypes} on {devices}")
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset : offset + n].view_as(p)
        offset += n
    return flat


def is_view_of(module: nn.Module, flat: torch.Tensor) -> bool:
    """True while every parameter still lives inside ``flat`` (nothing reallocated it)."""
    start = flat.data_ptr()
    end = start + flat.numel() * flat.element_size()
    return all(start <= p.data_ptr() < end for p in module.parameters())


@torch.no_grad()
def ema_update(momentum_flat: torch.Tensor, student_flat: torch.Tensor, m: float,
               shadow: torch.Tensor | None = None) -> None:
    """theta' = m * theta' + (1 - m) * theta, in place, in one op over the flat buffers; then
    the bf16 ``shadow`` of theta', when given (the Triton kernel fuses both into one pass)."""
    momentum_flat.lerp_(student_flat, 1.0 - m)
    if shadow is not None:
        shadow.copy_(momentum_flat)


EMAFn = Callable[[torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], None]


def select_ema(impl: str, device: torch.device) -> EMAFn:
    """The EMA for ``--ema-impl``: auto is the flat Triton kernel on CUDA and torch's lerp
    ("foreach": here one tensor, the flat buffer) elsewhere."""
    if not use_triton("--ema-impl", impl, device, "foreach"):
        return ema_update
    from fastmsd.kernels.ema import ema_update_

    return ema_update_


class MomentumTeacher(nn.Module):
    """The momentum teacher: an EMA copy of the student towers, whose embeddings fill the rings
    and whose similarities make the soft targets.

    It owns everything that keeps the copy: its parameters in one flat fp32 buffer, the EMA that
    updates them from the student's flat buffer, and, under bf16 autocast, a bf16 shadow copy
    that the keys phase runs instead of re-casting the fp32 weights in every forward (the EMA
    rewrites it in the same pass). Only the fp32 copy is saved; loading it re-derives the shadow.
    Call ``prepare`` once the model is on its device.
    """

    def __init__(self, student: nn.Module, decay: float):
        super().__init__()
        self.tower = copy.deepcopy(student).requires_grad_(False)
        self.decay = decay
        self.flat: torch.Tensor | None = None
        # A list, not an attribute: the shadow is no submodule, so it stays out of the state
        # dict and of .to(), which would otherwise replace its flat views.
        self._shadow: list[nn.Module] = []
        self._shadow_flat: torch.Tensor | None = None
        self._ema: EMAFn = ema_update
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh_shadow())

    def prepare(self, ema_impl: str, bf16_shadow: bool) -> None:
        """Flatten the copy's parameters (after ``.to(device)``, which would replace the views),
        choose the EMA for ``--ema-impl``, and make the bf16 shadow if asked."""
        self.flat = flatten_parameters(self.tower)
        self._ema = select_ema(ema_impl, self.flat.device)
        self._shadow.clear()
        self._shadow_flat = None
        if bf16_shadow:
            shadow = copy.deepcopy(self.tower).to(torch.bfloat16)
            self._shadow.append(shadow)
            self._shadow_flat = flatten_parameters(shadow)

    def train(self, mode: bool = True) -> MomentumTeacher:
        # The teacher is a fixed target inside a step: never dropout, never batch statistics.
        return super().train(False)

    @property
    def encoder(self) -> nn.Module:
        """The tower the keys phase runs: the bf16 shadow when there is one."""
        return self._shadow[0] if self._shadow else self.tower

    def towers(self) -> list[nn.Module]:
        """The fp32 copy and, when there is one, its bf16 shadow."""
        return [self.tower, *self._shadow]

    @property
    def shadow_flat(self) -> torch.Tensor | None:
        return self._shadow_flat

    def get_decay(self, step: int) -> float:
        """The EMA coefficient m at optimizer step ``step``: constant; a schedule overrides this."""
        return self.decay

    @torch.no_grad()
    def update(self, student_flat: torch.Tensor, step: int) -> None:
        """theta' <- m theta' + (1 - m) theta over the flat buffers, and the shadow with it."""
        if self.flat is None:
            raise RuntimeError("MomentumTeacher.prepare must run before the first update")
        self._ema(self.flat, student_flat, self.get_decay(step), self._shadow_flat)

    @torch.no_grad()
    def refresh_shadow(self) -> None:
        if self._shadow_flat is not None:
            self._shadow_flat.copy_(self.flat)


class Rings:
    """Image and text rings of momentum keys, written in place at a host-side pointer.

    Rows ``0 .. n_valid - 1`` hold keys: the rings fill from row 0 and, once full, stay full,
    so the valid slots are always a prefix. ``ptr`` and ``n_valid`` are Python ints so that
    no step needs a device-to-host sync.
    """

    def __init__(self, capacity: int, dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValueError(f"ring capacity must be positive, got {capacity}")
        self.img = torch.zeros(capacity, dim, device=device, dtype=dtype)
        self.txt = torch.zeros(capacity, dim, device=device, dtype=dtype)
        self.ptr = 0
        self.n_valid = 0

    @property
    def capacity(self) -> int:
        return self.img.shape[0]

    def rows(self, offset: int, n: int) -> torch.Tensor:
        """Ring rows of the keys ``offset .. offset + n - 1`` of the current effective batch."""
        start = self.ptr + offset
        return (torch.arange(start, start + n, device=self.img.device) % self.capacity)

    @torch.no_grad()
    def write(self, offset: int, k_img: torch.Tensor, k_txt: torch.Tensor) -> None:
        """Write keys at rows ``ptr + offset ...`` (mod Q) without moving the pointer."""
        n = k_img.shape[0]
        if n > self.capacity:
            raise ValueError(f"{n} keys do not fit a ring of {self.capacity}")
        start = (self.ptr + offset) % self.capacity
        first = min(n, self.capacity - start)
        for ring, keys in ((self.img, k_img), (self.txt, k_txt)):
            ring[start : start + first] = keys[:first]
            ring[: n - first] = keys[first:]
        if self.n_valid < self.capacity:
            # Not yet full means ptr == n_valid, so the written rows extend the valid prefix.
            self.n_valid = min(self.capacity, max(self.n_valid, self.ptr + offset + n))

    def advance(self, n: int) -> None:
        self.ptr = (self.ptr + n) % self.capacity

    def state_dict(self) -> dict:
        return {"img": self.img, "txt": self.txt, "ptr": self.ptr, "n_valid": self.n_valid}

    def load_state_dict(self, state: dict) -> None:
        if state["img"].shape != self.img.shape:
            raise ValueError(
                f"ring shape {tuple(state['img'].shape)} in the checkpoint, {tuple(self.img.shape)} here"
            )
        self.img.copy_(state["img"])
        self.txt.copy_(state["txt"])
        self.ptr = int(state["ptr"])
        self.n_valid = int(state["n_valid"])
