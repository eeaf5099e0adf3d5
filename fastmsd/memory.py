"""`--gpu-mem` parsing and the CUDA allocator cap (the micro-batch planner comes later)."""

from __future__ import annotations

import re

from fastmsd.config import ConfigError

# GPU memory is sold in binary units (a "12 GB" card has 12,288 MiB), so G, GB and GiB all
# mean 2**30: reading GB as 10**9 would silently cap a 12 GB card at 11.2 GiB.
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'12G', '12GiB', '12GB', '12000MiB', '11.5G' -> bytes. Anything else is a ConfigError."""
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(
            f"malformed memory size {text!r}: expected a number and a unit, e.g. 12G, 12GiB or 12000MiB"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 2**20:
        raise ConfigError(f"memory size {text!r} is below 1 MiB")
    return int(value)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def cap_cuda_memory(budget: int, device) -> float:
    """Cap this process's CUDA allocator at ``budget`` bytes so a large card behaves like a
    small one; returns the fraction of the device set."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    if budget > total:
        raise ConfigError(
            f"--gpu-mem {format_size(budget)} exceeds the {format_size(total)} of {device}"
        )
    fraction = budget / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
