"""The eager reference MSD loss (docs/design.md, "The objective"), the oracle and the baseline, and the
dispatch between it and the fused Triton kernel.

Both directions share one formula: student rows ``q`` against a ring ``bank`` of momentum
keys, soft targets ``y = alpha * softmax(teacher logits) + (1 - alpha) * onehot(pos)``, and the
cross-entropy summed over rows and divided by ``divisor`` (the effective batch N under exact
accumulation, so that summed micro-batch gradients equal the gradient of one large batch).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastmsd.config import ConfigError
from fastmsd.kernels.dispatch import use_triton


def _check(
    img: torch.Tensor,
    ring_img: torch.Tensor,
    ring_txt: torch.Tensor,
    pos: torch.Tensor,
    n_valid: int,
) -> None:
    if img.ndim != 2 or ring_img.ndim != 2 or ring_img.shape != ring_txt.shape:
        raise ValueError(
            f"expected rows [b, D] and two rings [Q, D]; got {tuple(img.shape)}, "
            f"{tuple(ring_img.shape)}, {tuple(ring_txt.shape)}"
        )
    if img.shape[1] != ring_img.shape[1]:
        raise ValueError(f"row width {img.shape[1]} != ring width {ring_img.shape[1]}")
    if pos.shape != (img.shape[0],):
        raise ValueError(f"pos must have shape ({img.shape[0]},), got {tuple(pos.shape)}")
    if not 0 < n_valid <= ring_img.shape[0]:
        raise ValueError(f"n_valid {n_valid} outside (0, {ring_img.shape[0]}]")


def _direction(
    q: torch.Tensor,
    q_m: torch.Tensor,
    bank: torch.Tensor,
    pos: torch.Tensor,
    tau: torch.Tensor | float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of one direction, and (detached) its contrastive and
    distillation parts: (1 - alpha) CE(onehot) and alpha CE(teacher)."""
    # At least fp32 (bf16 rows under autocast), fp64 kept for the oracle.
    dtype = torch.promote_types(q.dtype, torch.float32)
    bank = bank.to(dtype)
    logits = q.to(dtype) @ bank.T / tau
    rows = torch.arange(len(pos), device=pos.device)
    with torch.no_grad():
        target = torch.zeros_like(logits)
        if alpha > 0:
            teacher = q_m.to(dtype) @ bank.T / tau
            target += alpha * teacher.softmax(dim=-1)
        soft = target.clone() if alpha > 0 else None
        target[rows, pos] += 1.0 - alpha
    log_p = F.log_softmax(logits, dim=-1)
    loss = -(target * log_p).sum()
    with torch.no_grad():
        contrastive = -(1.0 - alpha) * log_p[rows, pos].sum()
        distillation = -(soft * log_p).sum() if soft is not None else torch.zeros_like(contrastive)
    return loss, contrastive, distillation


def msd_loss_reference(
    img: torch.Tensor,
    txt: torch.Tensor,
    img_m: torch.Tensor,
    txt_m: torch.Tensor,
    ring_img: torch.Tensor,
    ring_txt: torch.Tensor,
    pos: torch.Tensor,
    n_valid: int,
    tau: torch.Tensor | float,
    alpha: float,
    divisor: int | None = None,
    output_dict: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Scalar MSD loss of one micro-batch, averaged over the image->text and text->image terms.

    img, txt: student rows [b, D]; img_m, txt_m: teacher rows [b, D]; ring_img, ring_txt: [Q, D]
    with the valid keys in rows ``0 .. n_valid - 1`` (a ring fills from row 0 and stays full);
    pos: long [b], the ring row of each row's own (positive) key; divisor: defaults to b.
    ``output_dict``: {"loss", "contrastive", "distillation"}, the two parts detached (they sum to
    the loss), each with the same mean and divisor.
    """
    _check(img, ring_img, ring_txt, pos, n_valid)
    divisor = img.shape[0] if divisor is None else divisor
    i2t = _direction(img, img_m, ring_txt[:n_valid], pos, tau, alpha)
    t2i = _direction(txt, txt_m, ring_img[:n_valid], pos, tau, alpha)
    loss, contrastive, distillation = ((a + b) / (2 * divisor) for a, b in zip(i2t, t2i, strict=True))
    if output_dict:
        return {"loss": loss, "contrastive": contrastive, "distillation": distillation}
    return loss


def select_loss(impl: str, device: torch.device, precision: str = "tf32",
                dim: int | None = None) -> Callable[..., torch.Tensor]:
    """The loss function for ``--loss-impl``: auto is the fused Triton kernel on CUDA and this
    eager reference elsewhere; ``precision`` sets the kernel's fp32 dots (ieee, tf32, bf16).
    On a GPU whose shared memory no tile of the kernel fits at embedding width ``dim``, auto
    falls back to the reference with a warning and triton is a ConfigError naming the limit."""
    if not use_triton("--loss-impl", impl, device, "eager"):
        return msd_loss_reference
    from fastmsd.kernels.msd_loss import KERNELS, device_arch, msd_loss, tiles_for

    if device.type == "cuda" and dim is not None:
        try:
            for kernel in KERNELS:  # the engine's rings and rows are fp32
                tiles_for(kernel, device_arch(device), torch.float32, precision, dim)
        except ValueError as refused:
            if impl == "triton":
                raise ConfigError(f"--loss-impl triton: {refused}") from None
            warnings.warn(f"--loss-impl auto takes the eager loss: {refused}", stacklevel=2)
            return msd_loss_reference
    return functools.partial(msd_loss, precision=precision)


class MSDLoss(nn.Module):
    """The MSD loss of one micro-batch against the rings, as a module: the fused kernel or the
    eager reference, chosen once (``select_loss``), called with named arguments. Returns
    {"loss", "contrastive", "distillation"} (the parts detached, for logging), or with
    ``output_dict=False`` the loss alone."""

    def __init__(self, impl: str = "auto", device: torch.device | str = "cpu", precision: str = "tf32",
                 dim: int | None = None):
        super().__init__()
        self.fn = select_loss(impl, torch.device(device), precision, dim)

    @property
    def fused(self) -> bool:
        return self.fn is not msd_loss_reference

    def forward(self, *, img: torch.Tensor, txt: torch.Tensor, img_m: torch.Tensor, txt_m: torch.Tensor,
                ring_img: torch.Tensor, ring_txt: torch.Tensor, pos: torch.Tensor, n_valid: int,
                tau: torch.Tensor, alpha: float, divisor: int | None = None,
                output_dict: bool = True) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.fn(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, alpha, divisor,
                       output_dict)
