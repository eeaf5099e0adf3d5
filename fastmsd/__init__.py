"""fastmsd: medical vision-language pretraining with momentum self-distillation (MSD)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load"]

if TYPE_CHECKING:
    from fastmsd.api import load


def __getattr__(name: str) -> Any:
    # `fastmsd.load` without importing torch at `import fastmsd`: the CLI imports this package
    # and promises fast one-line errors before any heavy import.
    if name == "load":
        from fastmsd.api import load

        return load
    raise AttributeError(f"module 'fastmsd' has no attribute {name!r}")
