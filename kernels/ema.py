"""Momentum (EMA) update over the flat teacher buffer in one launch, with an optional bf16 copy.

The teacher's bf16 copy is written in the same pass (2 B/param more instead of a separate cast
that re-reads the fp32 teacher); the fp32 master stays, because a bf16-only teacher stalls: the
step (1 - m)(theta - theta') is usually far below half an ulp of bf16.

Written with plain pointer arithmetic and masked loads/stores only, so that triton 3.6 and its
CPU interpreter run it too.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fastmsd.kernels.gpu_compile import CompiledKernel, compile_kernel

BLOCK = 4096
# Offsets reach numel + BLOCK - 1 in the last program; past this they no longer fit int32.
_INT32_SAFE_NUMEL = 2**31 - BLOCK


@triton.jit
def _ema_kernel(momentum_ptr, student_ptr, shadow_ptr, weight, numel,
                BLOCK: tl.constexpr, SMALL_WEIGHT: tl.constexpr, WRITE_SHADOW: tl.constexpr,
                INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    t = tl.load(momentum_ptr + offs, mask=mask)
    s = tl.load(student_ptr + offs, mask=mask)
    # torch.lerp's two formulas, switched at weight 0.5 as torch does, so that m = 0 copies the
    # student exactly and the result matches torch's lerp formula for every m.
    if SMALL_WEIGHT:
        t = t + weight * (s - t)
    else:
        t = s - (s - t) * (1.0 - weight)
    tl.store(momentum_ptr + offs, t, mask=mask)
    if WRITE_SHADOW:
        # Round to nearest even on the bits rather than with .to(tl.bfloat16): the interpreter's
        # cast truncates, so only this form is exact (and tested) on both the GPU and the CPU.
        bits = t.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # The rounding carry would turn a NaN with a small payload into inf: keep it a NaN.
        rounded = tl.where(t != t, 0x7FC0, rounded)
        tl.store(shadow_ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)


def _check(name: str, x: torch.Tensor, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    if x.numel() != numel:
        raise ValueError(f"{name} has {x.numel()} elements, the momentum buffer {numel}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (a flat buffer)")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the momentum buffer on {device}")


@torch.no_grad()
def ema_update_(momentum: torch.Tensor, student: torch.Tensor, m: float,
                shadow: torch.Tensor | None = None) -> None:
    """theta' <- theta' + (1 - m)(theta - theta') in fp32, in place, in one launch.

    Same formulas and fp32 weight as ``momentum.lerp_(student, 1 - m)``. Whether
    ``t + w * (s - t)`` is contracted to an FMA differs: Triton on a GPU and torch's vectorised
    CPU lerp do, the interpreter and separate torch ops do not; the results then differ by that
    one rounding of ``w * (s - t)`` (none for m = 0 or 0.5, where the product is exact). With
    ``shadow`` (bf16, same numel), also writes ``shadow = momentum.to(torch.bfloat16)`` (round to
    nearest even) in the same pass.
    """
    if momentum.dtype != torch.float32:
        raise ValueError(f"momentum must be torch.float32, got {momentum.dtype}")
    if not momentum.is_contiguous():
        raise ValueError("momentum must be contiguous (a flat buffer)")
    numel, device = momentum.numel(), momentum.device
    _check("student", student, torch.float32, numel, device)
    if shadow is not None:
        _check("shadow", shadow, torch.bfloat16, numel, device)
    if not 0.0 <= m < 1.0:
        raise ValueError(f"momentum m must be in [0, 1), got {m}")
    if device.type == "cpu" and not isinstance(_ema_kernel, InterpretedFunction):
        raise ValueError("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing it)")
    if numel == 0:
        return
    # Rounded to fp32 here, as torch rounds lerp's weight, so that the branch below tests the
    # weight the kernel multiplies by (torch switches formulas on the fp32 weight).
    weight = float(np.float32(1.0 - m))
    on_cuda = device.type == "cuda"
    with torch.cuda.device(device) if on_cuda else contextlib.nullcontext():
        _ema_kernel[(triton.cdiv(numel, BLOCK),)](
            momentum, student,
            # Never read without WRITE_SHADOW; any valid pointer fills the slot.
            momentum if shadow is None else shadow,
            weight, numel,
            BLOCK=BLOCK, SMALL_WEIGHT=weight < 0.5, WRITE_SHADOW=shadow is not None,
            INT64=numel > _INT32_SAFE_NUMEL,
        )
    # Triton writes are invisible to autograd; bump the versions as lerp_ would.
    torch.autograd.graph.increment_version(momentum)
    if shadow is not None:
        torch.autograd.graph.increment_version(shadow)


def compile_for(arch: int, write_shadow: bool = True, small_weight: bool = True,
                int64: bool = False) -> CompiledKernel:
    """Builds the kernel for ``arch`` (e.g. 86) with no GPU present, as ``ema_update_`` launches
    it (4 warps, 3 stages: Triton's defaults) on aligned flat buffers. Run without TRITON_INTERPRET."""
    signature = {"momentum_ptr": "*fp32", "student_ptr": "*fp32",
                 "shadow_ptr": "*bf16" if write_shadow else "*fp32", "weight": "fp32",
                 "numel": "i64" if int64 else "i32"}
    constexprs = dict(BLOCK=BLOCK, SMALL_WEIGHT=small_weight, WRITE_SHADOW=write_shadow, INT64=int64)
    aligned = ["momentum_ptr", "student_ptr", "shadow_ptr"]
    return compile_kernel(_ema_kernel, arch, signature, constexprs, aligned, num_warps=4, num_stages=3)
