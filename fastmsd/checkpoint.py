"""Checkpoints: safetensors weights + trainer state, written atomically, keep-last-k.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX`` holding ``model.safetensors`` (student,
momentum, tau), ``rings.safetensors`` and ``trainer.pt`` (optimizer, scheduler, scaler, RNG
states, ring pointer, data position). It is written under a hidden temporary name, every file
fsynced, then renamed into place: a checkpoint is complete or absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastmsd.config import ConfigError
from fastmsd.momentum import Rings

FILES = ("model.safetensors", "rings.safetensors", "trainer.pt")
_PREFIX = "step_"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # Parameters are views of one flat buffer; safetensors refuses shared storage, so copy, to
    # host memory: a device copy of the model would need GPU memory that no plan counted.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, rings: Rings,
                    trainer_state: dict[str, Any], keep_last: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_tensors(model), tmp / "model.safetensors")
    save_file({"img": rings.img.contiguous(), "txt": rings.txt.contiguous()}, tmp / "rings.safetensors")
    torch.save({**trainer_state, "ring_ptr": rings.ptr, "ring_n_valid": rings.n_valid}, tmp / "trainer.pt")
    for name in FILES:
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():
        # Re-saving a step (after a resume): the old copy goes only once the new one is whole.
        old = root / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(root)
    for stale in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale)
    return final


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return path.name.startswith(_PREFIX) and all((path / f).is_file() for f in FILES)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def copy_weights(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``module`` in place, all or nothing.

    torch's ``load_state_dict`` copies every tensor that fits before it raises on one that does
    not, which would leave a half-loaded model behind the error; so every name and shape is
    checked first, and the first misfit named in a one-line ConfigError.
    """
    expected = module.state_dict()
    problem = None
    for name, target in expected.items():
        found = tensors.get(name)
        if found is None:
            problem = f"tensor {name} is missing"
        elif found.shape != target.shape:
            problem = (f"tensor {name} has shape {tuple(found.shape)}, this model's is "
                       f"{tuple(target.shape)}")
        if problem is not None:
            break
    else:
        extra = sorted(set(tensors) - set(expected))
        if extra:
            problem = f"tensor {extra[0]} is not in this model"
    if problem is not None:
        raise ConfigError(f"{source} does not fit this model (another preset or encoder?): {problem}")
    module.load_state_dict(tensors)


def load_weights(path: str | Path, model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Copy a checkpoint's model weights into ``model`` in place."""
    copy_weights(model, load_file(Path(path) / "model.safetensors", device=str(device)), f"checkpoint {path}")


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path names: itself, or the latest of a run folder."""
    path = Path(path)
    checkpoint = path if is_complete(path) else latest_checkpoint(path)
    if checkpoint is None:
        raise ConfigError(f"{path} is neither a run with a checkpoint nor a checkpoint")
    return checkpoint


def student_weights(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's student and temperature as a whole model's tensors, the momentum teacher a
    copy of the student: the state a new run starts in (its teacher also begins as the student)."""
    saved = load_file(Path(path) / "model.safetensors", device=str(device))
    student = {k.removeprefix("student."): v for k, v in saved.items() if k.startswith("student.")}
    return new_run_weights(student, saved.get("tau"))


def new_run_weights(student: dict[str, torch.Tensor], tau: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A whole model's tensors from a student tower's and tau: the momentum teacher a copy of the
    student, as in any new run."""
    prefixed = {f"student.{k}": v for k, v in student.items()}
    teacher = {f"momentum.tower.{k}": v for k, v in student.items()}
    return {**prefixed, **teacher, **({"tau": tau} if tau is not None else {})}


def load_checkpoint(path: str | Path, model: nn.Module, rings: Rings,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Restore weights and rings in place (parameter views survive); return the trainer state."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    load_weights(path, model, device)
    # RNG states must stay on the host; the optimizer moves its own state to the parameters.
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    ring_tensors = load_file(path / "rings.safetensors", device=str(device))
    rings.load_state_dict({**ring_tensors, "ptr": state.pop("ring_ptr"),
                           "n_valid": state.pop("ring_n_valid")})
    return state
