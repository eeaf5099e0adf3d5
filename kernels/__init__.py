"""Triton kernels of fastmsd, imported as ``fastmsd.kernels`` (setup.py maps this folder).

- ``msd_loss``: the fused queue InfoNCE + distillation loss, forward and backward;
- ``ema``: the momentum update over the flat buffer, with an optional bf16 teacher copy.

The engine picks them with ``--loss-impl`` / ``--ema-impl``; the eager paths in
``fastmsd.objective`` and ``fastmsd.momentum`` stay the oracles.
"""

import os


def interpreting() -> bool:
    """Triton runs on CPU tensors only in its interpreter (tests, debugging); the variable must
    be set before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(option: str, impl: str, device, eager: str) -> bool:
    """Whether ``--OPTION IMPL`` means the Triton kernel on ``device``: auto takes it on CUDA
    and the eager path ``eager`` elsewhere; an explicit triton off CUDA needs the interpreter."""
    from fastmsd.config import ConfigError

    if impl == "auto":
        return device.type == "cuda"
    if impl == eager:
        return False
    if impl != "triton":
        raise ConfigError(f"unknown {option} {impl!r} (auto, triton or {eager})")
    if device.type != "cuda" and not interpreting():
        raise ConfigError(f"{option} triton needs a CUDA device (or TRITON_INTERPRET=1), not {device}")
    return True
