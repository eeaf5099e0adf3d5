"""The compile gate: the kernels built for real GPUs, where the interpreter cannot look.

bench/kernel_gate.py compiles a representative set (both loss kernels in every mode at D = 256,
the engine's width, and the EMA kernel) for sm_80, sm_86, sm_89, sm_90 and sm_120 with Triton's
bundled ptxas, in a subprocess without TRITON_INTERPRET; every build must fit the card's shared
memory per block and spill nothing. ``make kernel-gate`` runs every configuration.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastmsd.kernels import msd_loss
from fastmsd.kernels.gpu_compile import ARCHS, SHARED_MEMORY
from tests.helpers import ROOT


def test_every_kernel_builds_and_fits_every_architecture(tmp_path):
    out = tmp_path / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_gate", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    failed = [(r["case"], r.get("error"), r.get("shared"), r.get("stack"))
              for r in rows if r["status"] != "ok"]
    assert not failed and proc.returncode == 0, failed
    built = {tuple(r["case"][:3]) for r in rows if r["case"][0] == "msd"}
    assert built == {("msd", arch, kernel) for arch in ARCHS for kernel in msd_loss.KERNELS}
    assert {r["case"][1] for r in rows if r["case"][0] == "ema"} == set(ARCHS)
    for r in rows:
        assert r["shared"] <= SHARED_MEMORY[r["arch"]] and r["stack"] == 0, r
    # Hopper's tiles are chosen for its warp-group MMA: Triton must actually emit it there.
    hopper_bf16 = [r for r in rows if r["case"][0] == "msd" and r["arch"] == 90 and r["case"][3] == "bf16"]
    assert hopper_bf16 and all(r["wgmma"] for r in hopper_bf16)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: f"sm_{arch}")
def test_every_mode_has_tiles_at_the_engines_width(arch):
    for kernel in msd_loss.KERNELS:
        for dtype, precision in msd_loss.MODES.values():
            tiles = msd_loss.tiles_for(kernel, arch, dtype, precision, 256)
            assert tiles.block_m >= 16 and tiles.block_n >= 16


def test_a_width_no_tile_fits_is_refused_with_the_limit():
    with pytest.raises(ValueError, match=r"backward kernel does not fit sm_86 at D=512 .* 101,376 B of"):
        msd_loss.tiles_for("backward", 86, torch.float32, "tf32", 512)
    with pytest.raises(ValueError, match="compute capability 8.0 or newer"):
        msd_loss.tiles_for("forward", 75, torch.float32, "tf32", 256)


def test_the_engine_refuses_or_falls_back_on_such_a_gpu(monkeypatch):
    from fastmsd.config import ConfigError
    from fastmsd.objective import msd_loss_reference, select_loss

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    cuda = torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="--loss-impl triton: .* 101,376 B of shared memory"):
        select_loss("triton", cuda, "tf32", dim=512)
    with pytest.warns(UserWarning, match="--loss-impl auto takes the eager loss"):
        assert select_loss("auto", cuda, "tf32", dim=512) is msd_loss_reference
    assert select_loss("auto", cuda, "tf32", dim=256) is not msd_loss_reference
