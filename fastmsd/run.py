"""A training run: its folder, data, tokenizer and model, and the logged, checkpointed loop."""

from __future__ import annotations

import copy
import json
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from fastmsd.checkpoint import (
    copy_weights,
    find_checkpoint,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    new_run_weights,
    save_checkpoint,
    student_weights,
)
from fastmsd.config import (
    Config,
    ConfigError,
    ModelConfig,
    format_size,
    load_yaml,
    parse_data,
    parse_size,
    save_yaml,
)
from fastmsd.data import dali
from fastmsd.data.cache import Cache
from fastmsd.data.label_text import load_grammar
from fastmsd.data.loader import BatchStream, MemoryImages, StreamImages, to_device
from fastmsd.data.mix import MixStream, Source, training_source
from fastmsd.data.text import load_tokenizer, tokenize, trim_reports
from fastmsd.distributed import Dist, RankLost, from_env, shutdown
from fastmsd.engine import LOSS_TERMS, Batch, Engine, resolve_precision
from fastmsd.export import export_description, is_export, read_hf_export
from fastmsd.memory import (
    Plan,
    available_budget,
    cap_cuda_memory,
    plan_for_run,
)
from fastmsd.model import TEXT_CONFIGS, build_model, check_encoder_names

CONFIG_FILE = "config.yaml"
# synthcxr is drawn at 256 px; its cache keeps that (the tiny preset trains at 64, base at 224).
SYNTHCXR_CACHE_SIZE = 256
# The memory loader's limit for the decoded training split (uint8 at training resolution).
MEMORY_LOADER_BYTES = 2 * 2**30


def resolve_device(name: str) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} requested but CUDA is not available")
        # An explicit index: the allocator cap and the planner's counters need one.
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    return device


def ensure_data(data: str | Path, generate: bool) -> Cache:
    """The prepared cache training reads; of a mix (``--data PATH=WEIGHT,...``), its first, the one
    the run evaluates on. With ``generate`` (the default synthcxr location), a missing cache is
    made on first use: synthcxr is generated beside it, then prepared."""
    mix = parse_data(str(data))
    data = Path(data if mix is None else mix[0][0])
    if generate and not Cache.is_cache(data):
        from fastmsd.data.prepare import prepare
        from fastmsd.data.synthcxr import generate as generate_synthcxr

        raw = data.with_name(data.name.removesuffix("-cache"))
        print(f"first use: generating synthcxr in {raw} and preparing it into {data}")
        generate_synthcxr(raw)
        counts = prepare("synthcxr", raw, data, size=SYNTHCXR_CACHE_SIZE)
        print(f"prepared {counts['prepared']} of {counts['found']} images ({counts['rejected']} rejected)")
    if not data.is_dir():
        raise ConfigError(f"data folder {data} not found")
    if not Cache.is_cache(data):
        raise ConfigError(f"{data} is not a prepared cache: run `fastmsd prepare DATASET --root {data} "
                          "--out CACHE` and train with --data CACHE")
    return Cache(data)


def locate_checkpoint(runs_dir: str | Path, name: str | None, resume: str) -> Path:
    """The checkpoint that ``--resume`` names: "latest" of the named run (or of the most
    recently saved run), or a checkpoint folder."""
    if resume != "latest":
        checkpoint = Path(resume)
        if not is_complete(checkpoint):
            raise ConfigError(f"checkpoint {checkpoint} not found")
        return checkpoint
    runs_dir = Path(runs_dir)
    if name is not None:
        checkpoint = latest_checkpoint(runs_dir / name)
        if checkpoint is None:
            raise ConfigError(f"--resume latest: no checkpoint in {runs_dir / name}")
        return checkpoint
    found = [c for c in map(latest_checkpoint, runs_dir.glob("*")) if c is not None] \
        if runs_dir.is_dir() else []
    if not found:
        raise ConfigError(f"--resume latest: no run with a checkpoint in {runs_dir}")
    return max(found, key=lambda c: c.stat().st_mtime)


def run_config(checkpoint: Path) -> Config:
    """The saved configuration of the run a checkpoint belongs to."""
    return load_yaml(checkpoint.parent.parent / CONFIG_FILE)


def new_run_dir(cfg: Config) -> Path:
    name = cfg.train.name or f"{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.train.runs_dir) / name
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run folder {run_dir} already exists: pass --resume latest or another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.name = name
    save_yaml(cfg, run_dir / CONFIG_FILE)
    return run_dir


def training_data(cfg: Config, generate: bool) -> list[Source]:
    """The training sources ``--data`` names: one cache (weight 1), or a mix's caches in its order
    with their weights. A cache without reports, or with reports not in English, trains on texts
    written from its labels by the ``--label-prompts`` grammar, unless ``--no-label-text``."""
    t = cfg.train
    mix = parse_data(t.data)
    caches = [(ensure_data(t.data, generate), 1.0)] if mix is None else \
        [(ensure_data(folder, generate=False), weight) for folder, weight in mix]
    grammar = load_grammar(t.label_prompts) if t.label_text else None
    return [training_source(cache, weight, grammar, t.seed) for cache, weight in caches]


def check_vocabulary(cfg: Config, sources: Sequence[Source], vocabulary: Path | None) -> None:
    """Refuse data without a vocabulary: no source that trains on its reports, and neither a local
    text encoder folder nor an ``--init`` vocabulary (``run_tokens`` takes the first of those)."""
    if vocabulary is None and not Path(cfg.model.text_encoder).is_dir() and \
            not any(s.texts is None for s in sources):
        raise ConfigError("no cache of --data trains on its reports to give the run its vocabulary: mix in "
                          "one that does, train a --text-encoder model folder (it has its own tokenizer) or "
                          "--init a run")


def run_tokens(cfg: Config, sources: Sequence[Source], run_dir: Path, save: bool = True,
               vocabulary: Path | None = None):
    """The run's tokenizer and the token arrays of the sources' training items, end to end: the
    vocabulary of the first source that trains on its reports, copied into the run folder (``save``, so that
    evaluation needs only the run), with the cached arrays of every cache of that vocabulary and
    the other texts (reports of another vocabulary, label texts) tokenized by it; or, when the
    text encoder is a local model folder, that model's tokenizer over all the texts.

    ``vocabulary`` is the tokenizer folder of the run ``--init`` starts from: its weights embed
    that vocabulary's ids, so it replaces the cache's, whose WordPieces may be other ones."""
    check_vocabulary(cfg, sources, vocabulary)
    model = Path(cfg.model.text_encoder)
    if model.is_dir():
        tokenizer = load_tokenizer(model)
    else:
        provider = next((s.cache for s in sources if s.texts is None), None)
        tokenizer = provider.tokenizer() if vocabulary is None else load_tokenizer(vocabulary)
        if save:
            tokenizer.save_pretrained(run_dir / "tokenizer")
    arrays = [_source_tokens(cfg, tokenizer, source, reuse=not model.is_dir()) for source in sources]
    if len(arrays) == 1:  # no copy of a large cache's arrays
        return tokenizer, arrays[0]
    return tokenizer, (torch.cat([ids for ids, _ in arrays]), torch.cat([mask for _, mask in arrays]))


def _source_tokens(cfg: Config, tokenizer, source: Source, reuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A source's token arrays: its cache's own when ``reuse`` allows and the vocabulary is the
    cache's, else its texts tokenized."""
    max_len, cache = cfg.model.max_len, source.cache
    if source.texts is not None:
        return tokenize(tokenizer, source.texts, max_len)
    if reuse and tokenizer.get_vocab() == cache.tokenizer().get_vocab():
        return cache.token_arrays(source.indices, max_len)
    return tokenize(tokenizer, cache.texts(source.indices), max_len)


class PeakMemory:
    """The training loop's memory high-water marks. On a GPU, the peaks of the allocator since
    ``reset``: allocated (what tensors hold) and reserved (what the allocator took from the
    device, the figure ``--gpu-mem`` caps); on the CPU, the process's peak resident size."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        # The planner's probes ran uncapped batches on this device: their peaks are not the run's.
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {"memory_bytes": torch.cuda.max_memory_allocated(self.device),
                    "memory_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}
        return {"memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


@dataclass
class Logger:
    """metrics.jsonl and TensorBoard events in the run folder."""

    run_dir: Path

    def __post_init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (self.run_dir / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, step: int, metrics: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def build_loader(cfg: Config, paths: list[Path], device: torch.device, shard: tuple[int, int] = (0, 1)):
    """The ``--loader`` for the training split; auto keeps a split that fits in
    ``MEMORY_LOADER_BYTES`` decoded in memory, else streams it with DALI when installed, else torch."""
    kind, size = cfg.train.loader, cfg.model.image_size
    if kind == "auto":
        fits = len(paths) * size * size <= MEMORY_LOADER_BYTES
        kind = "memory" if fits else "dali" if dali.available() else "torch"
    args = (paths, size, cfg.model.in_chans, device, cfg.train.seed)
    if kind == "memory":
        return MemoryImages(*args, pin_memory=cfg.train.pin_memory, shard=shard)
    if kind == "torch":
        return StreamImages(*args, workers=cfg.train.loader_workers, pin_memory=cfg.train.pin_memory,
                            shard=shard)
    # DALI draws its own augmentation per rank (seed + rank): the same rows, other draws.
    return dali.DaliImages(paths, size, cfg.model.in_chans, device, cfg.train.seed + shard[0],
                           batch_size=cfg.train.batch_size // shard[1], num_threads=cfg.train.loader_workers)


def out_of_memory_error(training: Training, err: Exception) -> ConfigError:
    """A step that ran out of memory: what was running, what to do, and where training resumes."""
    plan, sizes = training.plan, training.engine.sizes
    what = plan.describe() if plan is not None else (
        f"micro-batch {sizes.micro_batch_size}, checkpointing {sizes.checkpointing}, keys in chunks of "
        f"{sizes.key_chunk}")
    if plan is not None:
        advice = ("the plan measured this step within the budget, so another process probably took GPU "
                  "memory (see nvidia-smi): free it, or lower --gpu-mem to what is free, which replans")
    else:
        advice = ("pass --gpu-mem with the memory this GPU has free to let the planner choose, or lower "
                  "--micro-batch-size / --key-chunk, or add --checkpointing all")
    first = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
    return ConfigError(f"out of memory in step {training.engine.step + 1} ({first}) with {what}; {advice}; "
                       f"{_resume_hint(training.run_dir)}")


def periodic_eval(engine: Engine, tokenizer, cache: Cache, cfg: Config, run_dir: Path) -> dict:
    """``--eval-every``: zero-shot and retrieval of the student so far, as scalars to log."""
    from fastmsd.eval.runner import evaluate

    r = evaluate(engine.model, tokenizer, cache, cfg.model, engine.device,
                 run_dir / "eval" / f"step_{engine.step:08d}", tasks=("zeroshot", "retrieval"))
    z, ret = r["zeroshot"], r["retrieval"]
    return {
        "eval/zeroshot_macro_auc": z["macro_auc"],
        "eval/zeroshot_accuracy": z["accuracy"],
        "eval/i2t_precision@5": ret["5x200"]["image_to_text_precision"][5],
        "eval/t2i_precision@5": ret["5x200"]["text_to_image_precision"][5],
        "eval/i2t_recall@10": ret["paired_test"]["image_to_text_recall"][10],
        "eval/t2i_recall@10": ret["paired_test"]["text_to_image_recall"][10],
    }


def train(cfg: Config, *, resume: str | None = None, stop_after: int | None = None,
          generate_data: bool = False, progress: bool = True) -> Path:
    """Train (or resume) a run and return its folder.

    ``resume`` is "latest" or a checkpoint folder; ``cfg`` is then the run's saved config (see
    ``run_config``) with any deliberate changes, such as more steps. ``stop_after`` ends this
    invocation after that many steps, with a checkpoint, as a job with a time slot would.
    Under torchrun every rank calls this; rank 0 alone writes the run folder."""
    cfg.validate()
    check_encoder_names(cfg.model)
    dist, device = from_env(resolve_device(cfg.train.device), cfg.train.dist_timeout)
    try:
        if cfg.train.batch_size % dist.world:
            raise ConfigError(f"the effective batch {cfg.train.batch_size} does not split evenly over "
                              f"{dist.world} ranks: choose a --batch-size that is a multiple of {dist.world}")
        return _train(cfg, dist, device, resume, stop_after, generate_data, progress and dist.is_main)
    finally:
        # Also after an error: a gloo group left to the interpreter's exit can abort the process
        # (SIGABRT) once its peers are gone, hiding the one-line error and its exit code.
        shutdown(dist)


def _resume_hint(run_dir: Path) -> str:
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint, {latest}, is intact: continue with --resume latest"


def _prepare_run(cfg: Config, dist: Dist, resume: str | None, generate_data: bool,
                 vocabulary: Path | None) -> tuple[Path | None, Path, list[Source]]:
    """(checkpoint to resume or None, run folder, training sources); the folder work is rank 0's.
    ``vocabulary``: the ``--init`` run's tokenizer folder, if any."""
    sources: list[Source] | None = None  # rank 0's, read once (other ranks read theirs below)

    def on_main() -> tuple[Path | None, Path]:
        nonlocal sources
        checkpoint = run_dir = None
        if resume is not None:
            checkpoint = locate_checkpoint(cfg.train.runs_dir, cfg.train.name, resume)
            run_dir = checkpoint.parent.parent
        sources = training_data(cfg, generate_data)
        check_vocabulary(cfg, sources, vocabulary)  # before a run folder is made
        if len(sources) > 1 or sources[0].texts is not None:
            print("training data:\n" + "\n".join(f"  {source.describe()}" for source in sources))
        if cfg.train.eval_every:
            from fastmsd.eval.zeroshot import load_zeroshot_set

            load_zeroshot_set(sources[0].cache)  # fail now, not after hours of training
        if run_dir is None:
            run_dir = new_run_dir(cfg)
        else:
            save_yaml(cfg, run_dir / CONFIG_FILE)
        return checkpoint, run_dir

    checkpoint, run_dir = dist.on_main(on_main, "the run set-up")
    cfg.train.name = run_dir.name
    return checkpoint, run_dir, sources or training_data(cfg, generate=False)


@dataclass(frozen=True)
class Init:
    """What ``--init`` starts a run from: a checkpoint (a run's latest or one named) or an ``hf``
    export."""

    path: Path
    vocabulary: Path | None  # the tokenizer its text encoder was trained with, if the run made one

    def weights(self, device: torch.device) -> dict:
        """A whole model's tensors: the student and tau, the momentum teacher a copy of the student."""
        if not is_export(self.path):
            return student_weights(self.path, device)
        _, tower, tau, _ = read_hf_export(self.path)
        student = {k: v.to(device) for k, v in tower.state_dict().items()}
        return new_run_weights(student, torch.tensor(tau, device=device))


# The model settings that shape the weights. Checked against the init's saved config before the
# run folder is made: the tensor-by-tensor check comes only once the model is built.
ARCHITECTURE = ("image_encoder", "image_encoder_args", "in_chans", "text_encoder", "text_encoder_args",
                "embed_dim")


def locate_init(source: str | Path, model: ModelConfig) -> Init:
    """The ``--init`` source, its architecture checked against ``model``."""
    if is_export(source):
        # An export records no text_encoder_args: its text tensors are checked once the model is built.
        trained = export_description(source)
        for name in (n for n in ARCHITECTURE if n != "text_encoder_args"):
            _same_architecture(source, name, trained[name], getattr(model, name))
        return Init(Path(source), Path(source) / "text")
    try:
        checkpoint = find_checkpoint(source)
    except ConfigError as err:
        raise ConfigError(f"--init: {err}") from None
    trained = run_config(checkpoint).model
    for name in ARCHITECTURE:
        _same_architecture(source, name, getattr(trained, name), getattr(model, name))
    vocabulary = checkpoint.parent.parent / "tokenizer"
    return Init(checkpoint, vocabulary if vocabulary.is_dir() else None)


def _same_architecture(source: str | Path, name: str, theirs, mine) -> None:
    # A local model folder may have moved since; its tensors are checked once the model is built.
    moved = name == "text_encoder" and Path(mine).is_dir() and theirs not in TEXT_CONFIGS
    if theirs != mine and not moved:
        raise ConfigError(f"--init {source} was trained with {name} {theirs!r}, this run configures "
                          f"{mine!r}: the architectures must match")


@dataclass
class Training:
    """What one invocation of ``train`` works with, from set-up to the last step."""

    cfg: Config
    dist: Dist
    device: torch.device
    run_dir: Path
    cache: Cache  # what the run evaluates on: the --data cache, a mix's first
    tokenizer: object
    input_ids: torch.Tensor  # the training items' tokens (a mix's sources end to end), on the host
    attention_mask: torch.Tensor
    engine: Engine
    images: object  # the --loader: .batch(indices, step, prefetch) -> images on the device
    stream: BatchStream | MixStream
    plan: Plan | None
    trim: bool  # cut each batch's reports to its longest

    @property
    def mine(self) -> slice:
        """This rank's rows of each effective batch."""
        n_local = self.cfg.train.batch_size // self.dist.world
        return slice(self.dist.rank * n_local, (self.dist.rank + 1) * n_local)


def _train(cfg: Config, dist: Dist, device: torch.device, resume: str | None, stop_after: int | None,
           generate_data: bool, progress: bool) -> Path:
    training = _set_up(cfg, dist, device, resume, generate_data, progress)
    _loop(training, stop_after, progress)
    _finish(training)
    return training.run_dir


def _set_up(cfg: Config, dist: Dist, device: torch.device, resume: str | None, generate_data: bool,
            progress: bool) -> Training:
    """Checks, the run folder, tokens, the plan, the engine, the loader; a checkpoint restored."""
    # Cheap checks first: a bad setting must not wait for the data and the model.
    resolve_precision(cfg.train.precision, device)
    if cfg.train.gpu_mem is not None:
        parse_size(cfg.train.gpu_mem)
    # A resumed run's config still names the --init it started from; its checkpoint holds the weights.
    init = locate_init(cfg.train.init, cfg.model) if cfg.train.init is not None and resume is None else None
    vocabulary = None if init is None else init.vocabulary
    checkpoint, run_dir, sources = _prepare_run(cfg, dist, resume, generate_data, vocabulary)
    tokenizer, (input_ids, attention_mask) = run_tokens(cfg, sources, run_dir, save=dist.is_main,
                                                        vocabulary=vocabulary)

    # The plan: rank 0 plans for its share of the effective batch; every rank runs that plan.
    share = copy.deepcopy(cfg)
    share.train.batch_size //= dist.world
    plan = dist.on_main(lambda: plan_for_run(share, run_dir, device, len(tokenizer), progress), "planning")
    if cfg.train.gpu_mem is not None and device.type == "cuda" and not dist.is_main:
        # Rank 0 capped itself in plan_for_run; with --no-plan there is no plan to say the budget.
        if plan is None:
            cap_cuda_memory(available_budget(parse_size(cfg.train.gpu_mem), device), device)
        else:
            cap_cuda_memory(plan.budget_bytes, device)

    # The engine, from the same seed on every rank.
    torch.manual_seed(cfg.train.seed)
    engine = Engine(cfg, build_model(cfg.model, len(tokenizer)), device, dist,
                    sizes=plan.sizes if plan is not None else None)
    if dist.rank:  # dropout draws of its own for each rank (the weights are rank 0's)
        torch.manual_seed(cfg.train.seed + 1_000_003 * dist.rank)

    # The data: every rank walks the same global shuffle and takes its own slice of each batch.
    paths = [path for source in sources for path in source.cache.image_paths(source.indices)]
    images = build_loader(cfg, paths, device, (dist.rank, dist.world))
    if parse_data(cfg.train.data) is None:
        stream = BatchStream(len(paths), cfg.train.batch_size, cfg.train.seed)
    else:
        stream = MixStream([len(s.indices) for s in sources], [s.weight for s in sources],
                           cfg.train.batch_size, cfg.train.seed)
    padding = cfg.train.report_padding
    trim = padding == "trim" or (padding == "auto" and not cfg.train.compile)

    # --init: trained weights, all else (optimizer, rings, schedule, data order) as in a new run.
    if init is not None:
        copy_weights(engine.model, init.weights(device), f"--init {cfg.train.init}")
        if dist.is_main:
            print(f"initialised from {init.path}")
    # Resume: weights, rings, optimizer, RNG streams and the data position.
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine.model, engine.rings, device)
        data = state.pop("data")
        if isinstance(stream, BatchStream) and "sources" in data:
            raise ConfigError(f"checkpoint {checkpoint} was saved by a run on a mix of caches: resume with "
                              "the run's own --data")
        stream.load_state_dict(data)
        engine.load_state_dict(state)
        if dist.is_main:
            print(f"resumed {checkpoint} at step {engine.step}")
    return Training(cfg, dist, device, run_dir, sources[0].cache, tokenizer, input_ids, attention_mask,
                    engine, images, stream, plan, trim)


def _next_batch(training: Training) -> Batch:
    """This rank's share of the next effective batch, on the device (the one after it prefetched)."""
    t, mine, engine = training.cfg.train, training.mine, training.engine
    idx = training.stream.next()[mine]
    ids, mask = training.input_ids[idx], training.attention_mask[idx]
    if training.trim:
        ids, mask = trim_reports(ids, mask)
    return Batch(training.images.batch(idx, engine.step, prefetch=training.stream.peek()[mine]),
                 to_device(ids.long(), training.device, t.pin_memory),
                 to_device(mask, training.device, t.pin_memory))


def _loop(training: Training, stop_after: int | None, progress: bool) -> None:
    """Optimizer steps up to --steps (or ``stop_after`` more), logging and checkpointing."""
    cfg, dist, engine, run_dir = training.cfg, training.dist, training.engine, training.run_dir
    t = cfg.train
    last = t.steps if stop_after is None else min(t.steps, engine.step + stop_after)
    logger = Logger(run_dir) if dist.is_main else None
    bar = tqdm(total=t.steps, initial=engine.step, desc=f"train {run_dir.name}", unit="step",
               disable=not progress, dynamic_ncols=True)
    # The loss terms summed on the device over a log interval: no host sync between logs.
    window = torch.zeros(len(LOSS_TERMS), device=training.device)
    window_steps, window_start = 0, time.perf_counter()
    memory = PeakMemory(training.device)
    memory.reset()
    try:
        while engine.step < last:
            try:
                batch = _next_batch(training)
                terms, grad_norm = engine.train_step(batch)
            except torch.OutOfMemoryError as err:
                raise out_of_memory_error(training, err) from None
            del batch  # before the next batch is loaded: two effective batches need not fit
            window += torch.stack([terms[name] for name in LOSS_TERMS])
            window_steps += 1
            bar.update(1)
            if engine.step % t.log_every == 0 or engine.step == last:
                # The only host syncs of the loop: once per log interval.
                dist.all_reduce_sum_([window], "the loss all-reduce")
                metrics = {**_loss_metrics(window, window_steps), "grad_norm": float(grad_norm),
                           "lr": engine.scheduler.get_last_lr()[0], "tau": engine.model.tau.item(),
                           "alpha": engine.alpha, "ring_n_valid": engine.rings.n_valid,
                           "img_per_s": window_steps * t.batch_size / (time.perf_counter() - window_start),
                           **memory.read()}
                if logger is not None:
                    logger.log(engine.step, metrics)
                shown = metrics.get("memory_reserved_bytes", metrics["memory_bytes"])
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", img_s=f"{metrics['img_per_s']:.0f}",
                                mem=format_size(shown))
                window.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if t.eval_every and engine.step % t.eval_every == 0 and logger is not None:
                scores = periodic_eval(engine, training.tokenizer, training.cache, cfg, run_dir)
                logger.log(engine.step, scores)
            if engine.step % t.save_every == 0 or engine.step == last:
                engine.check_in_sync()
                state = {**engine.state_dict(), "data": training.stream.state_dict()}
                if dist.is_main:
                    save_checkpoint(run_dir, engine.step, engine.model, engine.rings, state, t.keep_last)
    except RankLost as err:
        raise RankLost(f"{err}; {_resume_hint(run_dir)} (restart every rank)") from None
    finally:
        bar.close()
        if logger is not None:
            logger.close()


def _loss_metrics(window: torch.Tensor, steps: int) -> dict[str, float]:
    """The interval's mean loss and its two parts: "loss", "loss_contrastive", "loss_distillation"."""
    return {name if name == "loss" else f"loss_{name}": value / steps
            for name, value in zip(LOSS_TERMS, window.tolist(), strict=True)}


def _finish(training: Training) -> None:
    """Zero-shot evaluation of the finished run (rank 0), saved beside its checkpoints."""
    cfg, engine = training.cfg, training.engine
    if not (cfg.train.eval_at_end and engine.step == cfg.train.steps and training.dist.is_main):
        return
    from fastmsd.eval.zeroshot import evaluate_synthcxr, format_results

    try:
        results = evaluate_synthcxr(engine.model, training.tokenizer, training.cache, cfg.model,
                                    training.device)
    except ConfigError as err:
        print(f"no zero-shot evaluation at the end: {err}")
    else:
        (training.run_dir / "zeroshot.json").write_text(json.dumps(results, indent=2))
        print(format_results(results))


def load_trained(path: str | Path, device: torch.device):
    """(config, model, tokenizer, checkpoint) of a run folder (its latest checkpoint) or of a
    checkpoint folder."""
    checkpoint = find_checkpoint(path)
    cfg = run_config(checkpoint)
    source = Path(cfg.model.text_encoder)
    tokenizer = load_tokenizer(source if source.is_dir() else checkpoint.parent.parent / "tokenizer")
    model = build_model(cfg.model, len(tokenizer)).to(device)
    load_weights(checkpoint, model, device)
    return cfg, model, tokenizer, checkpoint
