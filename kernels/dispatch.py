"""Where the Triton kernels run: the choice behind ``--loss-impl`` and ``--ema-impl``.

The kernels of fastmsd live in this folder, one module each (``msd_loss``: the fused queue
InfoNCE + distillation loss, forward and backward; ``ema``: the momentum update over the flat
buffer, with an optional bf16 teacher copy), and import as ``fastmsd.kernels`` through the link
``fastmsd/kernels -> ../kernels``. The folder has no ``__init__.py`` on purpose. transformers (5.25
and later) imports Hugging Face's ``kernels`` distribution, and a regular package here would win
over it whenever the repository root is on ``sys.path`` (pytest, ``python -m``, ``python -c``
there). A folder without ``__init__.py`` is only a namespace portion, and Python prefers a
regular package of the same name wherever on the path it finds one. The eager paths in
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
