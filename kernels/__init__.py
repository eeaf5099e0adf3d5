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
