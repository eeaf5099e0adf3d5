"""The `fastmsd` command: train, plan, synth, prepare, eval.

User errors (bad sizes, unknown encoders, missing folders) end in one line on stderr and exit
code 2; heavy imports wait until the arguments have been checked, so those errors come fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fastmsd.config import Config, ConfigError, TrainConfig, preset
from fastmsd.memory import parse_size

DEFAULT_DATA = TrainConfig.data
DEFAULT_SYNTHCXR = "data/synthcxr"

# CLI option -> (config section, field). Only options the user gives override the preset, or
# the saved config of a resumed run.
_OVERRIDES = {
    "data": ("train", "data"),
    "runs_dir": ("train", "runs_dir"),
    "name": ("train", "name"),
    "device": ("train", "device"),
    "precision": ("train", "precision"),
    "steps": ("train", "steps"),
    "batch_size": ("train", "batch_size"),
    "micro_batch_size": ("train", "micro_batch_size"),
    "key_chunk": ("train", "key_chunk"),
    "queue_size": ("train", "queue_size"),
    "accum_mode": ("train", "accum_mode"),
    "loss_impl": ("train", "loss_impl"),
    "loader": ("train", "loader"),
    "loader_workers": ("train", "loader_workers"),
    "ema_impl": ("train", "ema_impl"),
    "dot_precision": ("train", "dot_precision"),
    "alpha": ("train", "alpha"),
    "alpha_warmup_steps": ("train", "alpha_warmup_steps"),
    "lr": ("train", "lr"),
    "seed": ("train", "seed"),
    "checkpointing": ("train", "checkpointing"),
    "plan": ("train", "plan"),
    "dist_timeout": ("train", "dist_timeout"),
    "fused_adamw": ("train", "fused_adamw"),
    "sdpa": ("train", "sdpa"),
    "bf16_teacher": ("train", "bf16_teacher"),
    "pin_memory": ("train", "pin_memory"),
    "compile": ("train", "compile"),
    "report_padding": ("train", "report_padding"),
    "log_every": ("train", "log_every"),
    "save_every": ("train", "save_every"),
    "gpu_mem": ("train", "gpu_mem"),
    "eval_at_end": ("train", "eval_at_end"),
    "eval_every": ("train", "eval_every"),
    "image_encoder": ("model", "image_encoder"),
    "text_encoder": ("model", "text_encoder"),
}


def _step_options(p: argparse.ArgumentParser, gpu_mem_required: bool = False) -> None:
    """What shapes a step: shared by `train` and `plan`."""
    p.add_argument("--preset", choices=["tiny", "base"], help="model and schedule preset")
    p.add_argument("--config", help="a YAML config (as saved in a run folder) instead of a preset")
    p.add_argument("--runs-dir", help="where run folders live (default runs)")
    p.add_argument("--name", help="run name (default PRESET-DATE-TIME); the plan is cached in its folder")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--gpu-mem", required=gpu_mem_required,
                   help="GPU memory budget, e.g. 12G, 12GiB, 12000MiB: the allocator is capped there "
                        "and the planner picks micro-batch, checkpointing and key chunk")
    if not gpu_mem_required:  # `fastmsd plan` always plans
        p.add_argument("--plan", action=argparse.BooleanOptionalAction, default=None,
                       help="with --gpu-mem, let the planner choose (default) or only cap the allocator")
    p.add_argument("--batch-size", type=int, help="effective batch N")
    p.add_argument("--queue-size", type=int, help="ring capacity Q (>= N)")
    p.add_argument("--accum-mode", choices=["exact", "naive"])
    p.add_argument("--loss-impl", choices=["auto", "triton", "eager"],
                   help="fused Triton loss or the eager reference (auto: Triton on CUDA)")
    p.add_argument("--ema-impl", choices=["auto", "triton", "foreach"],
                   help="flat Triton EMA or torch's lerp (auto: Triton on CUDA)")
    p.add_argument("--dot-precision", choices=["ieee", "tf32", "bf16"],
                   help="the fused loss's fp32 dot products (default tf32)")
    p.add_argument("--image-encoder", help="timm model name")
    p.add_argument("--text-encoder", help="transformers model name or local model folder")
    fast = p.add_argument_group("fast path (each on by default but --compile; off to measure)")
    for flag, text in (("fused-adamw", "torch's fused AdamW (CUDA)"),
                       ("sdpa", "fused scaled-dot-product attention in both encoders"),
                       ("bf16-teacher", "keys phase on a bf16 shadow of the teacher (under bf16)"),
                       ("pin-memory", "pinned, non-blocking host-to-device copies"),
                       ("compile", "torch.compile the encoders")):
        fast.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=text)
    fast.add_argument("--report-padding", choices=["auto", "fixed", "trim"],
                      help="pad reports to max_len (static shapes) or cut each batch to its longest "
                           "(auto: fixed with --compile, else trim)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmsd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model (default: tiny on synthcxr on CPU, base on GPU)")
    _step_options(tr)
    tr.add_argument("--data", help=f"a cache made by `fastmsd prepare` (default {DEFAULT_DATA}: "
                                   "synthcxr, generated and prepared on first use)")
    tr.add_argument("--resume", help="'latest' (of --name, or the newest run) or a checkpoint folder")
    tr.add_argument("--stop-after", type=int, help="stop this invocation after N steps (resumable)")
    tr.add_argument("--steps", type=int, help="optimizer steps of the whole schedule")
    tr.add_argument("--micro-batch-size", type=int, help="micro-batch b (A = ceil(N / b))")
    tr.add_argument("--key-chunk", type=int, help="keys-phase chunk size")
    tr.add_argument("--checkpointing", help="activation checkpointing of the student's blocks: none, "
                                            "all, or image=K,text=K (every K-th block; 0 for none)")
    tr.add_argument("--loader", choices=["auto", "memory", "torch", "dali"],
                    help="auto: decode a small split once into memory, else stream it (DALI if installed)")
    tr.add_argument("--loader-workers", type=int, help="decoding threads (default 2)")
    tr.add_argument("--alpha", type=float, help="distillation weight after the ramp")
    tr.add_argument("--alpha-warmup-steps", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--log-every", type=int)
    tr.add_argument("--save-every", type=int)
    tr.add_argument("--eval-every", type=int,
                    help="zero-shot and retrieval every K steps, logged with the training metrics")
    tr.add_argument("--no-eval", dest="eval_at_end", action="store_false", default=None,
                    help="skip the zero-shot evaluation at the end")
    tr.add_argument("--dist-timeout", type=float,
                    help="torchrun: seconds a rank waits for the others before failing (default 1800)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")

    pl = sub.add_parser("plan", help="show the micro-batch / checkpointing plan for a GPU memory budget")
    _step_options(pl, gpu_mem_required=True)
    pl.add_argument("--no-progress", action="store_true", help="no progress bar")

    sy = sub.add_parser("synth", help="generate the synthcxr dataset")
    sy.add_argument("--out", default=DEFAULT_SYNTHCXR, help=f"output folder (default {DEFAULT_SYNTHCXR})")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--n-train", type=int, default=5000, help="training images")
    sy.add_argument("--n-per-class", type=int, default=200, help="zero-shot test images per class")
    sy.add_argument("--size", type=int, default=256, help="image side in pixels")
    sy.add_argument("--workers", type=int, help="processes (default: all cores)")
    sy.add_argument("--preview", help="also write a PNG grid of samples with their reports")

    pr = sub.add_parser("prepare", help="decode, resize and tokenize a dataset into a training cache")
    pr.add_argument("dataset", help="mimic-cxr, chexpert, rsna-pneumonia, covidx, siim-pneumothorax "
                                    "or synthcxr")
    pr.add_argument("--root", required=True, help="the dataset folder, as it ships")
    pr.add_argument("--out", required=True, help="the cache folder")
    pr.add_argument("--size", type=int, default=512, help="shorter image side in pixels (default 512)")
    pr.add_argument("--workers", type=int, help="processes (default: all cores)")
    pr.add_argument("--max-len", type=int, default=128, help="report tokens kept (default 128)")
    pr.add_argument("--vocab-size", type=int, default=30522,
                    help="WordPiece vocabulary built from the training reports (default 30522)")
    pr.add_argument("--tokenizer", help="use this tokenizer folder (e.g. a text encoder's) instead")
    pr.add_argument("--seed", type=int, default=0, help="seed of the datasets' hashed splits")
    pr.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="zero-shot, retrieval and linear-probe evaluation of a checkpoint")
    ev.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    ev.add_argument("--task", choices=["zeroshot", "retrieval", "linear-probe", "all"], default="all")
    ev.add_argument("--data", help="a prepared cache (default: the run's training cache)")
    ev.add_argument("--out", help="output folder (default RUN/eval/CHECKPOINT)")
    ev.add_argument("--seeds", default="0,1,2", help="linear-probe seeds (default 0,1,2)")
    ev.add_argument("--prompts", help="YAML file of zero-shot prompts (default: fastmsd/eval/prompts.yaml)")
    ev.add_argument("--device", default="auto")
    return parser


def _positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _train_config(args: argparse.Namespace) -> Config:
    import torch

    from fastmsd.config import load_yaml
    from fastmsd.run import locate_checkpoint, run_config

    if getattr(args, "resume", None) is not None:
        runs_dir = args.runs_dir or TrainConfig.runs_dir
        cfg = run_config(locate_checkpoint(runs_dir, args.name, args.resume))
    elif args.config is not None:
        cfg = load_yaml(args.config)
    else:
        device = args.device or "auto"
        on_gpu = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        cfg = preset(args.preset or ("base" if on_gpu else "tiny"))
    for option, (section, field) in _OVERRIDES.items():
        value = getattr(args, option, None)
        if value is not None:
            setattr(getattr(cfg, section), field, value)
    cfg.validate()
    return cfg


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _train(args: argparse.Namespace) -> None:
    if args.gpu_mem is not None:
        parse_size(args.gpu_mem)
    _positive(args, ["steps", "batch_size", "micro_batch_size", "key_chunk", "queue_size",
                     "stop_after", "log_every", "save_every", "loader_workers"])
    if args.eval_every is not None and args.eval_every < 0:
        raise ConfigError(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.data is not None and not Path(args.data).is_dir():
        raise ConfigError(f"data folder {args.data} not found")
    planned = [f"--{name.replace('_', '-')}" for name in ("micro_batch_size", "key_chunk", "checkpointing")
               if getattr(args, name) is not None]
    on_gpu = (args.device or "auto") != "cpu" and _cuda_available()
    if args.gpu_mem is not None and args.plan is not False and planned and on_gpu:
        raise ConfigError(f"{' and '.join(planned)} would be overridden by the --gpu-mem planner: "
                          "drop them, or add --no-plan to set them yourself under the cap")
    cfg = _train_config(args)
    from fastmsd.run import train

    train(cfg, resume=args.resume, stop_after=args.stop_after,
          generate_data=cfg.train.data == DEFAULT_DATA, progress=not args.no_progress)


def _plan(args: argparse.Namespace) -> None:
    import hashlib

    import torch

    from fastmsd.memory import plan_for_run, plan_key
    from fastmsd.model import check_encoder_names
    from fastmsd.run import resolve_device

    _positive(args, ["batch_size", "queue_size"])
    parse_size(args.gpu_mem)
    cfg = _train_config(args)
    check_encoder_names(cfg.model)
    device = resolve_device(cfg.train.device)
    if device.type != "cuda":
        raise ConfigError(f"fastmsd plan measures real steps on a CUDA device; {device} has no GPU budget")
    cfg.train.plan = True  # even if a --config says plan: false
    runs = Path(cfg.train.runs_dir)
    if cfg.train.name is not None:
        cache_dir = runs / cfg.train.name
    else:  # one folder per key, so that any later `fastmsd plan` of the same setup is instant
        props = torch.cuda.get_device_properties(device)
        key = plan_key(cfg, props.name, props.total_memory, parse_size(args.gpu_mem))
        cache_dir = runs / "plans" / hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    plan_for_run(cfg, cache_dir, device, cfg.model.vocab_size, progress=not args.no_progress)


def _synth(args: argparse.Namespace) -> None:
    _positive(args, ["n_train", "n_per_class", "size", "workers"])
    from fastmsd.data.synthcxr import generate, preview

    out = generate(args.out, seed=args.seed, n_train=args.n_train, n_per_class=args.n_per_class,
                   size=args.size, workers=args.workers)
    print(f"synthcxr ready in {out}")
    if args.preview:
        print(f"preview written to {preview(out, args.preview)}")


def _prepare(args: argparse.Namespace) -> None:
    _positive(args, ["size", "workers", "max_len", "vocab_size"])
    from fastmsd.data.prepare import prepare

    counts = prepare(args.dataset, args.root, args.out, size=args.size, workers=args.workers,
                     vocab_size=args.vocab_size, max_len=args.max_len, tokenizer=args.tokenizer,
                     seed=args.seed, progress=not args.no_progress)
    print(f"{args.dataset}: found {counts['found']}, prepared {counts['prepared']}, "
          f"rejected {counts['rejected']} (reasons in {Path(args.out) / 'rejects.csv'})")


def _eval(args: argparse.Namespace) -> None:
    from fastmsd.eval.runner import TASKS, evaluate, format_markdown
    from fastmsd.eval.zeroshot import DEFAULT_PROMPTS, load_prompts
    from fastmsd.run import ensure_data, load_trained, resolve_device

    tasks = TASKS if args.task == "all" else (args.task,)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    prompts = load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    device = resolve_device(args.device)
    cfg, model, tokenizer, checkpoint = load_trained(args.run, device)
    cache = ensure_data(args.data or cfg.train.data, generate=False)
    out = Path(args.out) if args.out else checkpoint.parent.parent / "eval" / checkpoint.name
    evaluate(model, tokenizer, cache, cfg.model, device, out, tasks, seeds, checkpoint=str(checkpoint),
             prompts=prompts)
    print(f"{checkpoint} on {cache.root}\n{format_markdown(json.loads((out / 'results.json').read_text()))}")
    print(f"results, plots and the 5x200 list in {out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"train": _train, "plan": _plan, "synth": _synth, "prepare": _prepare, "eval": _eval}
        commands[args.command](args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"fastmsd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastmsd: interrupted (resume from the last checkpoint with --resume latest)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
