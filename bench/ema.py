"""EMA (momentum teacher) update: the flat Triton kernel against torch and timm formulations.

    python -m bench.ema [--device cuda] [--params 195e6] [--tensors 349] [--ema-decay 0.995]
                        [--profile DIR] [--no-append] [--results PATH]

Tensor sizes follow the ViT-B/16 + BERT-base layout (349 parameter tensors, 195.3 M elements),
cycled to ``--tensors`` and scaled to ``--params``. Every method is elementwise, so only the
sizes matter and the tensors are 1-D. Student and teacher are each flattened into one buffer by
``fastmsd.momentum.flatten_parameters``, as the engine does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bench.common import bench_parser, environment, peak_extra_bytes, profile, report, time_ms
from fastmsd.kernels.ema import ema_update_
from fastmsd.momentum import flatten_parameters

CPU_PARAMS = 10e6


def model_layout() -> list[int]:
    """Parameter sizes of ViT-B/16 (no classifier head) + BERT-base, built on the meta device."""
    import timm
    import transformers

    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", num_classes=0)
        bert = transformers.BertModel(transformers.BertConfig())
    return [p.numel() for module in (vit, bert) for p in module.parameters()]


def scaled_layout(layout: list[int], params: float, tensors: int) -> list[int]:
    cycled = [layout[i % len(layout)] for i in range(tensors)]
    scale = params / sum(cycled)
    return [max(1, round(n * scale)) for n in cycled]


class ParamSet(nn.Module):
    def __init__(self, sizes: list[int], device: torch.device):
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(0.02 * torch.randn(n, device=device)) for n in sizes)


def methods(student: ParamSet, teacher: ParamSet, m: float,
            device: torch.device) -> list[tuple[str, int, Callable[[], object] | None]]:
    """(name, bytes per parameter the update needs, call or None where not measured)."""
    from timm.utils import ModelEmaV3

    student_flat = flatten_parameters(student)
    teacher_flat = flatten_parameters(teacher)
    shadow = torch.empty(teacher_flat.numel(), dtype=torch.bfloat16, device=device)
    s_views = [p.detach() for p in student.parameters()]
    t_views = [p.detach() for p in teacher.parameters()]
    timm_ema = ModelEmaV3(student, decay=m)
    on_gpu = device.type == "cuda"

    def loop() -> None:
        for t, s in zip(t_views, s_views, strict=True):
            t.mul_(m).add_(s, alpha=1.0 - m)

    # The interpreter runs the kernel on the CPU at numpy speed: no timing to report there.
    return [
        ("Triton flat kernel `ema_update_`", 12,
         (lambda: ema_update_(teacher_flat, student_flat, m)) if on_gpu else None),
        ("Triton flat kernel + bf16 shadow", 14,
         (lambda: ema_update_(teacher_flat, student_flat, m, shadow)) if on_gpu else None),
        ("torch `lerp_` on the flat buffer", 12, lambda: teacher_flat.lerp_(student_flat, 1.0 - m)),
        (f"torch `_foreach_lerp_` over {len(t_views)} views", 12,
         lambda: torch._foreach_lerp_(t_views, s_views, 1.0 - m)),
        ("Python loop `mul_` + `add_` (ALBEF)", 12, loop),
        ("timm `ModelEmaV3.update`", 12, lambda: timm_ema.update(student)),
    ]


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--params", type=float, default=None,
        help=f"total parameters (default: the real 195.3 M on a GPU, {CPU_PARAMS / 1e6:g} M on a CPU)")
    parser.add_argument("--tensors", type=int, default=349, help="number of parameter tensors")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay m")
    args = parser.parse_args()
    device = args.device

    torch.manual_seed(0)
    layout = model_layout()
    params = args.params or (sum(layout) if device.type == "cuda" else CPU_PARAMS)
    sizes = scaled_layout(layout, params, args.tensors)
    numel = sum(sizes)
    env = environment(device)
    with torch.no_grad():
        student, teacher = ParamSet(sizes, device), ParamSet(sizes, device)
        rows = []
        for name, bytes_per_param, fn in methods(student, teacher, args.ema_decay, device):
            if fn is None:
                rows.append([name, None, None, None])
                continue
            ms = time_ms(fn, device)
            extra = peak_extra_bytes(fn, device)
            rows.append([name, ms, bytes_per_param * numel / (ms * 1e6),
                         None if extra is None else extra / 2**20])
            if args.profile:
                print(f"trace: {profile(fn, args.profile, 'ema_' + name, device)}")

    real = sizes == layout
    notes = [
        f"{numel:,} fp32 parameters in {len(sizes)} tensors, sizes of ViT-B/16 + BERT-base"
        f"{'' if real else ' (cycled and scaled)'}; m = {args.ema_decay}; median of 20 calls after 3 "
        "warm-up.",
        "GB/s: the bytes the update needs over the time, 12 B/param (read teacher and student, write "
        "teacher), 14 with the bf16 copy; the same count for every row, though `mul_` + `add_` moves 20 "
        "and timm also walks the state dict.",
        "Extra peak: CUDA allocator peak during one call above what was allocated before it.",
        "timm `ModelEmaV3` deep-copies the student and updates that per-tensor copy, not the flat teacher.",
    ]
    if device.type != "cuda":
        notes.append("Triton rows: not measured on the CPU, where the kernel runs only in the Triton "
                     "interpreter (numpy), which is not a speed measurement. Memory: measured on CUDA only.")
    report(f"EMA update, {numel / 1e6:.1f} M parameters, {device.type}",
           ["method", "ms", "GB/s", "extra peak MiB"], rows, env, notes,
           None if args.no_append else args.results)


if __name__ == "__main__":
    main()
