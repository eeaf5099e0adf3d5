"""MSD loss forward + backward: fused Triton kernel vs eager reference vs torch.compile vs open_clip.

    python -m bench.loss                       # b=256, D=256, Q=65,536, bf16 rows (GPU)
    python -m bench.loss --dtype fp32 --precision tf32
    python -m bench.loss --device cpu          # smaller default shapes; kernel rows not measured

Rows, side by side in one process on the same inputs:
- MSD (alpha = 0.4, full ring): the fused kernel, the eager reference, torch.compile of it;
- CLIP case (alpha = 0, ring = the batch): the kernel, the reference, open_clip's ClipLoss.
TFLOP/s counts the useful work of the math (student, teacher and dQ products per direction;
no teacher for alpha = 0), the same for every row, so rows compare by time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import NOT_MEASURED, bench_parser, environment, peak_extra_bytes, profile, report, time_ms
from fastmsd.objective import msd_loss_reference

NOT_INSTALLED = "not installed"


def make_inputs(b: int, dim: int, q: int, n_valid: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def unit(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device=device, dtype=dtype)

    ring_img, ring_txt = unit(q), unit(q)
    pos = ((torch.arange(b) + n_valid - b) % q).to(device)  # the batch's keys: the newest rows
    img, txt = unit(b).requires_grad_(), unit(b).requires_grad_()
    tau = torch.tensor(0.07, device=device, requires_grad=True)
    return img, txt, ring_img[pos], ring_txt[pos], ring_img, ring_txt, pos, tau


def step_fn(loss_fn, inputs, n_valid: int, alpha: float):
    img, txt, img_m, txt_m, ring_img, ring_txt, pos, tau = inputs

    def run() -> None:
        img.grad = txt.grad = tau.grad = None
        loss_fn(img, txt, img_m, txt_m, ring_img, ring_txt, pos, n_valid, tau, alpha).backward()

    return run


def clip_fn(inputs):
    """open_clip's loss on the same rows, or NOT_INSTALLED: a peer missing from the machine is a
    row that says so, not a failed bench."""
    try:
        from open_clip.loss import ClipLoss
    except ImportError:
        return NOT_INSTALLED

    img, txt, *_, tau = inputs
    clip = ClipLoss()

    def run() -> None:
        img.grad = txt.grad = tau.grad = None
        clip(img, txt, 1.0 / tau).backward()

    return run


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, help="micro-batch rows (default 256 on GPU, 64 on CPU)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--q", type=int, help="ring rows, all valid (default 65,536 on GPU, 4,096 on CPU)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="rows and rings (default bf16 on GPU, "
                        "fp32 on CPU, which has no fast bf16)")
    parser.add_argument("--precision", choices=["ieee", "tf32", "bf16"], default="tf32",
                        help="the kernel's fp32 dots (bf16 rows always use bf16 dots)")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    b = args.b or (256 if on_gpu else 64)
    q = args.q or (65536 if on_gpu else 4096)
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"

    kernel = None
    if on_gpu:
        from fastmsd.objective import select_loss

        kernel = select_loss("triton", device, args.precision)
    compiled = torch.compile(msd_loss_reference)

    def gflop(k: int, teacher: bool) -> float:
        return 2 * (3 if teacher else 2) * 2 * b * k * args.dim / 1e9

    cases = [("MSD, full ring", q, 0.4), ("CLIP, ring = batch", b, 0.0)]
    rows, env = [], environment(device)
    for case, n_valid, alpha in cases:
        inputs = make_inputs(b, args.dim, max(q, b), n_valid, dtype, device)
        # Each candidate is a function to time, or the reason it has no row of figures.
        candidates = [("fused Triton kernel",
                       step_fn(kernel, inputs, n_valid, alpha) if kernel else NOT_MEASURED),
                      ("eager reference", step_fn(msd_loss_reference, inputs, n_valid, alpha))]
        if alpha > 0:
            candidates.append(("torch.compile(reference)", step_fn(compiled, inputs, n_valid, alpha)))
        else:
            candidates.append(("open_clip ClipLoss", clip_fn(inputs)))
        for name, fn in candidates:
            if isinstance(fn, str):
                rows.append([case, name, fn, fn, fn])
                continue
            ms = time_ms(fn, device)
            extra = peak_extra_bytes(fn, device)
            rows.append([case, name, f"{ms:.3f}", f"{gflop(n_valid, alpha > 0) / ms:.3g}",
                         NOT_MEASURED if extra is None else f"{extra / 2**20:.1f}"])
            if args.profile:
                profile(fn, args.profile, f"loss-{case.split(',')[0].lower()}-{name.split()[0]}", device)
    notes = [f"b={b}, D={args.dim}, Q={q}, rows and rings {args.dtype}, kernel dots {args.precision}; "
             "forward + backward of both directions; median of 20 calls after 3 warm-ups"]
    if not on_gpu:
        notes.append("CPU: the Triton kernel runs only in the interpreter here, which is no speed "
                     "measurement, so its rows are not measured")
    report("loss forward + backward", ["case", "implementation", "ms", "TFLOP/s", "extra peak MiB"],
           rows, env, notes, None if args.no_append else args.results)


if __name__ == "__main__":
    main()
