"""The `fastmsd` command: train, plan, synth, prepare, eval, finetune, embed, export.

User errors (bad sizes, unknown encoders, missing folders) end in one line on stderr and exit
code 2; heavy imports wait until the arguments have been checked, so those errors come fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fastmsd.config import (
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    check_finetune_task,
    option_name,
    parse_data,
    parse_size,
    preset,
    setting_of,
)

DEFAULT_DATA = TrainConfig.data
DEFAULT_SYNTHCXR = "data/synthcxr"
_SECTIONS = (("model settings", ModelConfig), ("training settings", TrainConfig))
_OVERRIDE_NOTE = ("Every config setting has an option; those given override the preset, the --config "
                  "file or the saved config of a resumed run.")
# The fields whose options the CLI checks for values below 1 before anything heavy is imported.
_POSITIVE = [f.name for _, cls in _SECTIONS for f in dataclasses.fields(cls) if setting_of(f).positive]


def _value_type(hint: Any) -> type:
    """str, int, float, bool or dict: what a field so annotated holds (X for X | None)."""
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    return get_origin(hint) or hint


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def _step_options(p: argparse.ArgumentParser, for_plan: bool = False) -> None:
    """Shared by `train` and `plan`: where the config comes from, and an option for every config
    field (for `plan`, those not train_only). Each field's option defaults to None, so only the
    options the user gives override the preset, or the saved config of a resumed run."""
    p.add_argument("--preset", choices=["tiny", "base"], help="model and schedule preset")
    p.add_argument("--config", help="a YAML config (as saved in a run folder) instead of a preset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for title, cls in _SECTIONS:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            s = setting_of(f)
            if for_plan and s.train_only:
                continue
            group = s.group or title
            if group not in groups:
                groups[group] = p.add_argument_group(group)
            kind = _value_type(hints[f.name])
            if kind is bool:
                options: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
            else:
                options = {"type": _json_object if kind is dict else kind, "choices": s.choices,
                           "metavar": s.metavar}
            # `fastmsd plan` shows the plan for a budget, so it needs one.
            groups[group].add_argument(option_name(f), dest=f.name, default=None, help=s.help,
                                       required=for_plan and f.name == "gpu_mem", **options)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmsd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model (default: tiny on synthcxr on CPU, base on GPU)",
                        description=_OVERRIDE_NOTE)
    _step_options(tr)
    tr.add_argument("--resume", help="'latest' (of --name, or the newest run) or a checkpoint folder")
    tr.add_argument("--stop-after", type=int, help="stop this invocation after N steps (resumable)")

    pl = sub.add_parser("plan", help="show the micro-batch / checkpointing plan for a GPU memory budget",
                        description="The model and step settings of `fastmsd train`, less what the planner "
                                    "picks; those given override the preset or the --config file.")
    _step_options(pl, for_plan=True)

    sy = sub.add_parser("synth", help="generate the synthcxr dataset")
    sy.add_argument("--out", default=DEFAULT_SYNTHCXR, help=f"output folder (default {DEFAULT_SYNTHCXR})")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--n-train", type=int, default=5000, help="training images")
    sy.add_argument("--n-per-class", type=int, default=200, help="zero-shot test images per class")
    sy.add_argument("--size", type=int, default=256, help="image side in pixels")
    sy.add_argument("--workers", type=int, help="processes (default: all cores)")
    sy.add_argument("--preview", help="also write a PNG grid of samples with their reports")

    pr = sub.add_parser("prepare", help="decode, resize and tokenize a dataset into a training cache")
    pr.add_argument("dataset", help="mimic-cxr, chexpert, rsna-pneumonia, covidx, siim-pneumothorax, "
                                    "synthcxr, iu-xray, chestxray14, vindr-cxr, padchest or chexpert-plus")
    pr.add_argument("--root", required=True, help="the dataset folder, as it ships")
    pr.add_argument("--out", required=True, help="the cache folder")
    pr.add_argument("--size", type=int, default=512, help="shorter image side in pixels (default 512)")
    pr.add_argument("--workers", type=int, help="processes (default: all cores)")
    pr.add_argument("--max-len", type=int, default=128, help="report tokens kept (default 128)")
    pr.add_argument("--vocab-size", type=int, default=30522,
                    help="WordPiece vocabulary built from the training reports (default 30522)")
    pr.add_argument("--tokenizer", help="use this tokenizer folder (e.g. a text encoder's) instead")
    pr.add_argument("--seed", type=int, default=0, help="seed of the datasets' hashed splits")
    pr.add_argument("--text", default="both",
                    help="report text to train on: findings, impression, both (joined, the default) or "
                         "longest (the longer section, as CXR-CLIP); a missing section gives the other")
    pr.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="zero-shot, retrieval and linear-probe evaluation of a checkpoint")
    ev.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    ev.add_argument("--task", choices=["zeroshot", "retrieval", "linear-probe", "all"], default="all")
    ev.add_argument("--data", help="a prepared cache (default: the run's training cache)")
    ev.add_argument("--out", help="output folder (default RUN/eval/CHECKPOINT)")
    ev.add_argument("--seeds", default="0,1,2", help="linear-probe seeds (default 0,1,2)")
    ev.add_argument("--prompts", help="YAML file of zero-shot prompts (default: fastmsd/eval/prompts.yaml)")
    ev.add_argument("--device", default="auto")

    ft = sub.add_parser("finetune", help="fine-tune a run's image encoder on label fractions (test "
                                         "AUC or Dice at 1 / 10 / 100 %% of the labels)")
    ft.add_argument("run", help="a run folder (its latest checkpoint), a checkpoint folder or an hf export")
    ft.add_argument("--data", required=True, help="a prepared cache with labels")
    ft.add_argument("--task", default="classify",
                    help="classify (linear head, AUC) or segment (U-Net / DPT decoder on the cache's "
                         "masks, Dice)")
    ft.add_argument("--fraction", default="0.01,0.1,1", help="label fractions (default 0.01,0.1,1)")
    ft.add_argument("--seeds", default="0,1,2", help="seeds per fraction (default 0,1,2)")
    ft.add_argument("--freeze-encoder", action="store_true", help="train the head (or decoder) only")
    ft.add_argument("--epochs", type=int, default=10, help="epochs per (fraction, seed) (default 10)")
    ft.add_argument("--batch-size", type=int, default=32, help="default 32")
    ft.add_argument("--lr", type=float, default=1e-4, help="encoder learning rate (default 1e-4)")
    ft.add_argument("--head-lr", type=float, default=1e-3, help="head / decoder learning rate (default 1e-3)")
    ft.add_argument("--from-scratch", action="store_true", help="the same architecture, randomly initialised")
    ft.add_argument("--from", dest="init", metavar="imagenet:FILE",
                    help="start from a local timm checkpoint instead of the run's weights")
    ft.add_argument("--out", help="output folder (default RUN/finetune/TASK, TASK-scratch or TASK-imagenet)")
    ft.add_argument("--device", default="auto")
    ft.add_argument("--gpu-mem", help="fit the steps into this much GPU memory (e.g. 12G): the planner picks "
                                      "the micro-batch and checkpointing, then the allocator is capped")
    ft.add_argument("--checkpointing", type=int, default=0, metavar="EVERY",
                    help="gradient checkpointing of every EVERY-th encoder block (default 0: none, or the "
                         "planner's choice under --gpu-mem)")
    ft.add_argument("--no-progress", action="store_true")

    em = sub.add_parser("embed", help="image and report embeddings of a trained model, written to a file")
    em.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    em.add_argument("--images", help="a folder of .jpg/.jpeg/.png/.dcm/.dicom files (searched recursively), "
                                     "a prepared cache, or a text file of image paths, one a line")
    em.add_argument("--reports", help="a text file with one report a line, or a CSV with id and text columns")
    em.add_argument("--out", required=True, help="FILE.safetensors or FILE.npz; the rows' ids go to "
                                                 "FILE.ids.csv, unreadable images to FILE.rejects.csv")
    em.add_argument("--batch-size", type=int, default=256, help="images decoded and embedded at a time")
    em.add_argument("--device", default="auto")
    em.add_argument("--bf16", action="store_true", help="bfloat16 autocast on a CUDA device")
    em.add_argument("--no-progress", action="store_true")

    ex = sub.add_parser("export", help="write a run's student tower for transformers + timm, or open_clip")
    ex.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    ex.add_argument("--format", required=True, choices=["hf", "open_clip"],
                    help="hf: text/ (transformers), image/ (timm weights), heads and config; "
                         "open_clip: a local-dir: folder for open_clip.create_model")
    ex.add_argument("--out", required=True, help="output folder (new or empty)")
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
    for section in (cfg.model, cfg.train):
        for f in dataclasses.fields(section):
            value = getattr(args, f.name, None)  # absent: a train_only field under `plan`
            if value is not None:
                setattr(section, f.name, value)
    cfg.validate()
    return cfg


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _train(args: argparse.Namespace) -> None:
    if args.gpu_mem is not None:
        parse_size(args.gpu_mem)
    _positive(args, [*_POSITIVE, "stop_after"])
    if args.eval_every is not None and args.eval_every < 0:
        raise ConfigError(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.data is not None:
        mix = parse_data(args.data)
        for folder in [args.data] if mix is None else [folder for folder, _ in mix]:
            if not Path(folder).is_dir():
                raise ConfigError(f"data folder {folder} not found")
    if args.init is not None and args.resume is not None:
        raise ConfigError("--init starts a new run from trained weights and --resume continues a run: "
                          "pass one of them")
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

    _positive(args, _POSITIVE)
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
                     seed=args.seed, text=args.text, progress=not args.no_progress)
    print(f"{args.dataset}: found {counts['found']}, prepared {counts['prepared']}, "
          f"rejected {counts['rejected']} (reasons in {Path(args.out) / 'rejects.csv'})")


def _eval(args: argparse.Namespace) -> None:
    from fastmsd.eval.runner import TASKS, evaluate, format_markdown
    from fastmsd.eval.zeroshot import DEFAULT_PROMPTS, load_prompts
    from fastmsd.run import ensure_data, load_trained, resolve_device

    tasks = TASKS if args.task == "all" else (args.task,)
    seeds = _numbers(args.seeds, "--seeds", int)
    prompts = load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    device = resolve_device(args.device)
    cfg, model, tokenizer, checkpoint = load_trained(args.run, device)
    cache = ensure_data(args.data or cfg.train.data, generate=False)
    out = Path(args.out) if args.out else checkpoint.parent.parent / "eval" / checkpoint.name
    evaluate(model, tokenizer, cache, cfg.model, device, out, tasks, seeds, checkpoint=str(checkpoint),
             prompts=prompts)
    print(f"{checkpoint} on {cache.root}\n{format_markdown(json.loads((out / 'results.json').read_text()))}")
    print(f"results, plots and the 5x200 list in {out}")


def _numbers(text: str, option: str, kind: type) -> tuple:
    try:
        return tuple(kind(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated {kind.__name__}s, got {text!r}") from None


def _finetune(args: argparse.Namespace) -> None:
    check_finetune_task(args.task)
    _positive(args, ["epochs", "batch_size"])
    fractions = _numbers(args.fraction, "--fraction", float)
    if not all(0 < f <= 1 for f in fractions):
        raise ConfigError(f"--fraction values must be in (0, 1], got {args.fraction!r}")
    seeds = _numbers(args.seeds, "--seeds", int)
    if args.checkpointing < 0:
        raise ConfigError(f"--checkpointing must be >= 0, got {args.checkpointing}")
    budget = parse_size(args.gpu_mem) if args.gpu_mem is not None else None
    if not Path(args.run).exists():
        raise ConfigError(f"run {args.run} not found")
    if not (Path(args.data) / "prepare.json").is_file():
        raise ConfigError(f"--data {args.data} is not a prepared cache (run `fastmsd prepare` into it first)")
    if args.from_scratch and args.init is not None:
        raise ConfigError("--from-scratch and --from both say where to start: pass one of them")
    if args.init is not None:
        kind, _, file = args.init.partition(":")
        if kind != "imagenet" or not file:
            raise ConfigError(f"--from takes imagenet:FILE (a local timm checkpoint), got {args.init!r}")
        if not Path(file).is_file():
            raise ConfigError(f"--from {args.init}: {file} not found")
    init = "scratch" if args.from_scratch else args.init or "pretrained"

    from fastmsd.checkpoint import find_checkpoint
    from fastmsd.data.cache import Cache
    from fastmsd.export import is_export
    from fastmsd.finetune import Settings, finetune, format_markdown, load_start
    from fastmsd.finetune.protocol import task_columns
    from fastmsd.run import resolve_device

    device = resolve_device(args.device)
    cache = Cache(args.data)
    task_columns(cache, args.task)  # a cache without what the task needs fails before the model loads
    start = load_start(args.run, init)
    if args.out is not None:
        out = Path(args.out)
    else:
        run = Path(args.run) if is_export(args.run) else find_checkpoint(args.run).parent.parent
        out = run / "finetune" / (args.task if init == "pretrained" else f"{args.task}-{init.split(':')[0]}")
    settings = Settings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
                        freeze_encoder=args.freeze_encoder, checkpointing=args.checkpointing)
    results = finetune(start, cache, out, args.task, fractions, seeds, settings, device,
                       progress=not args.no_progress, gpu_mem=budget)
    print(f"{start.source} on {cache.root}\n{format_markdown(results)}")
    print(f"results and {'ROC' if args.task == 'classify' else 'mask'} plots in {out}")


def _embed(args: argparse.Namespace) -> None:
    _positive(args, ["batch_size"])
    if args.images is None and args.reports is None:
        raise ConfigError("nothing to embed: give --images, --reports or both")
    for option, value in (("run", args.run), ("--images", args.images), ("--reports", args.reports)):
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{option} {value} not found")
    from fastmsd.api import embed_to_file, output_files

    counts = embed_to_file(args.run, args.out, args.images, args.reports, args.device, args.batch_size,
                           args.bf16, progress=not args.no_progress)
    out, ids, rejects = output_files(args.out)
    print(f"embedded {counts['images']} images ({counts['rejected']} rejected, reasons in {rejects}) and "
          f"{counts['reports']} reports into {out}; row ids in {ids}")


def _export(args: argparse.Namespace) -> None:
    from fastmsd.export import export

    out = export(args.run, args.format, args.out)
    print(f"{args.format} export of {args.run} in {out} (see its README.md)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"train": _train, "plan": _plan, "synth": _synth, "prepare": _prepare, "eval": _eval,
                    "finetune": _finetune, "embed": _embed, "export": _export}
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
