"""Ahead-of-time builds of the Triton kernels for a GPU architecture, on a machine with no GPU.

The interpreter that runs the kernel tests on the CPU accepts tiles that a GPU compiler refuses
or that cannot launch: too much shared memory per block for the card, or registers spilled to
local memory. ``triton.compile`` with a ``GPUTarget`` runs the whole pipeline down to a cubin
with the ptxas that Triton bundles, and the bundled cuobjdump reads the cubin's registers and
stack frame (spilled registers live there; Triton's kernels have no other local arrays). The
compile gate (tests/test_kernel_compile.py, bench/kernel_gate.py) holds every launch shape the
launchers can choose to these figures. Kernels must be plain ``@triton.jit`` functions: run this
without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Shared memory one block may use (the opt-in maximum), by compute capability: RTX 30 (sm_86),
# RTX 40 (sm_89) and RTX 50 (sm_120) 99 KB, A100 (sm_80) 163 KB, H100 / H200 (sm_90) 227 KB.
SHARED_MEMORY = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 120: 101_376}
ARCHS = tuple(SHARED_MEMORY)


@dataclass(frozen=True)
class CompiledKernel:
    """What one build of a kernel needs on its architecture."""

    name: str
    arch: int
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    stack: int  # bytes of stack frame per thread: spilled registers
    wgmma: bool  # Hopper's warp-group MMA instructions were emitted

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_MEMORY[self.arch] and self.stack == 0


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")


def _registers_and_stack(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return int(found.group(1)), int(found.group(2))


def compile_kernel(fn: triton.JITFunction, arch: int, signature: dict[str, str], constexprs: dict,
                   divisible: Iterable[str], num_warps: int, num_stages: int) -> CompiledKernel:
    """Builds ``fn`` for ``arch`` (compute capability, e.g. 86). ``signature`` types the runtime
    arguments ("*fp32", "i32", ...); ``divisible`` names those a launch specialises as divisible
    by 16 (aligned pointers, sizes), which is what enables vectorised, pipelined loads."""
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                       constexprs=constexprs, attrs=attrs)
    built = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    registers, stack = _registers_and_stack(built.asm["cubin"])
    wgmma = "wgmma" in built.asm["ptx"]
    return CompiledKernel(fn.__name__, arch, built.metadata.shared, registers, stack, wgmma)
