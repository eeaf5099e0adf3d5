"""`fastmsd export`: a run's student tower in a form other libraries load without fastmsd.

- ``hf``: ``text/`` (a transformers model folder with the run's tokenizer), ``image/`` (the timm
  backbone's weights), ``heads.safetensors`` (both projections and tau), ``fastmsd.json`` (how to
  rebuild and feed the tower) and a model card, README.md;
- ``open_clip``: an open_clip ``local-dir:`` folder (``open_clip_config.json``,
  ``open_clip_model.safetensors``, the text encoder's config and the tokenizer) and the card,
  checked after writing by loading it with open_clip and comparing embeddings.

open_clip's towers are narrower than ours; ``open_clip_limits`` names what a run needs that
they cannot hold, so that the export fails up front with the reason instead of producing a
model that embeds differently.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastmsd.checkpoint import copy_weights
from fastmsd.config import Config, ConfigError, ModelConfig
from fastmsd.data.loader import MEAN, STD
from fastmsd.data.text import load_tokenizer
from fastmsd.model import MSDModel, Tower, build_image_encoder, build_text_encoder

FORMATS = ("hf", "open_clip")
DESCRIPTION = "fastmsd.json"
# Embeddings of the exported model may differ from ours by float rounding only.
TOLERANCE = 1e-5


def _state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    # Own contiguous copies: safetensors refuses tensors that share storage.
    return {prefix + k: v.detach().to("cpu", torch.float32, copy=True).contiguous()
            for k, v in module.state_dict().items()}


def _text_load_kwargs(tower: Tower) -> dict:
    """What ``AutoModel.from_pretrained`` needs to build our text encoder: BERT without its
    pooling layer, which fastmsd never trains (the embedding reads the CLS state)."""
    return {"add_pooling_layer": False} if tower.text_encoder.config.model_type == "bert" else {}


def _preprocessing(cfg: ModelConfig) -> dict:
    return {
        "grayscale": True,
        "resize": f"shorter side to {cfg.image_size} px, bilinear",
        "crop": f"centre {cfg.image_size} x {cfg.image_size}",
        "scale": "pixel / 255",
        "mean": MEAN,
        "std": STD,
        "channels": f"the grey channel repeated to {cfg.in_chans}",
    }


def _timm_arguments(cfg: ModelConfig) -> dict:
    """``timm.create_model(**these)`` rebuilds the hf export's image encoder (``file`` relative to
    the export). The overlay's num_classes and input_size match the saved weights, so that timm
    loads them strictly and leaves the stem as it is."""
    overlay = {"file": "image/model.safetensors", "num_classes": 0,
               "input_size": [cfg.in_chans, cfg.image_size, cfg.image_size]}
    return {"model_name": cfg.image_encoder, "pretrained": True, "num_classes": 0, "in_chans": cfg.in_chans,
            "pretrained_cfg_overlay": overlay, **cfg.image_encoder_args}


def _description(cfg: Config, tower: Tower, checkpoint: Path, tau: float, fmt: str) -> dict:
    m = cfg.model
    return {
        "format": fmt,
        "run": str(checkpoint.parent.parent),
        "checkpoint": checkpoint.name,
        "step": int(checkpoint.name.removeprefix("step_")),
        "image_encoder": m.image_encoder,
        "image_encoder_args": m.image_encoder_args,
        "image_size": m.image_size,
        "in_chans": m.in_chans,
        "text_encoder": m.text_encoder,
        "max_len": m.max_len,
        "embed_dim": m.embed_dim,
        "tau": tau,
        "preprocessing": _preprocessing(m),
        **({"timm_create_model": _timm_arguments(m),
            "text_from_pretrained": _text_load_kwargs(tower)} if fmt == "hf" else {}),
        "embedding": {
            "image": "normalize(image_proj(image_encoder(x)))",
            "text": "normalize(text_proj(text_encoder(ids, mask).last_hidden_state[:, 0]))",
        },
    }


def _evaluation(run_dir: Path, checkpoint: Path) -> tuple[str, str] | None:
    """(where from, Markdown) of the run's latest figures for this checkpoint: those of
    `fastmsd eval` if it was run on it, else the zero-shot evaluation training ends with."""
    from fastmsd.eval.runner import format_markdown
    from fastmsd.eval.zeroshot import format_results

    evaluated = run_dir / "eval" / checkpoint.name / "results.json"
    if evaluated.is_file():
        return f"`fastmsd eval` ({evaluated.relative_to(run_dir)})", \
            format_markdown(json.loads(evaluated.read_text()))
    at_end = run_dir / "zeroshot.json"
    if at_end.is_file():
        return "the zero-shot evaluation at the end of training (zeroshot.json)", \
            format_results(json.loads(at_end.read_text()))
    return None


def model_card(cfg: Config, checkpoint: Path, fmt: str, tau: float) -> str:
    """README.md of an export: what the model is, how it was trained, how well it did."""
    m, t = cfg.model, cfg.train
    run_dir = checkpoint.parent.parent
    step = int(checkpoint.name.removeprefix("step_"))
    lines = [
        f"# {run_dir.name} ({fmt} export)",
        "",
        "A medical image-report embedding model trained with fastmsd (momentum self-distillation).",
        "",
        "| | |",
        "|---|---|",
        f"| image encoder | timm `{m.image_encoder}` {json.dumps(m.image_encoder_args)}, "
        f"{m.in_chans} channel(s), {m.image_size} px |",
        f"| text encoder | `{m.text_encoder}`, {m.max_len} tokens, CLS state |",
        f"| embedding | {m.embed_dim} wide, unit length; temperature tau = {tau:.5f} |",
        f"| data | `{t.data}` |",
        f"| steps | {step} of {t.steps} ({checkpoint.name}) |",
        f"| effective batch | {t.batch_size} |",
        f"| queue size | {t.queue_size} |",
        f"| preset | {cfg.preset} |",
        "",
        "Images: grayscale, shorter side resized to the image size (bilinear), centre crop, pixel / 255, "
        f"then (x - {MEAN}) / {STD}, the grey channel repeated to the input channels.",
        "",
        "## Evaluation",
        "",
    ]
    figures = _evaluation(run_dir, checkpoint)
    if figures is None:
        lines.append("The run holds no evaluation of this checkpoint (run `fastmsd eval` on it).")
    else:
        source, table = figures
        lines += [f"From {source}:", "", table]
    return "\n".join(lines) + "\n"


def _write_text_folder(tower: Tower, tokenizer, max_len: int, out: Path, weights: bool) -> None:
    """The text encoder's transformers config (and weights) and the tokenizer, in ``out``."""
    tokenizer.model_max_length = max_len  # so that truncation=True cuts where training did
    tokenizer.save_pretrained(out)
    if weights:
        tower.text_encoder.save_pretrained(out)
    else:
        tower.text_encoder.config.save_pretrained(out)


def _export_hf(cfg: Config, tower: Tower, tau: float, tokenizer, out: Path) -> None:
    _write_text_folder(tower, tokenizer, cfg.model.max_len, out / "text", weights=True)
    (out / "image").mkdir()
    save_file(_state(tower.image_encoder), out / "image" / "model.safetensors")
    heads = {**_state(tower.image_proj, "image_proj."), **_state(tower.text_proj, "text_proj."),
             "tau": torch.tensor(tau)}
    save_file(heads, out / "heads.safetensors")


def _final_layer_norm(text_encoder: nn.Module) -> nn.LayerNorm | None:
    """The LayerNorm that writes the last hidden state of a BERT-style encoder, else None."""
    try:
        layers = text_encoder.get_submodule("encoder.layer")
        norm = layers[-1].get_submodule("output.LayerNorm")
    except (AttributeError, IndexError, TypeError):
        return None
    return norm if isinstance(norm, nn.LayerNorm) and norm.bias is not None else None


def _folded_text_bias(tower: Tower) -> torch.Tensor | None:
    """The shift d of the final LayerNorm's bias with text_proj.weight @ d = text_proj.bias, or None.

    open_clip's linear text projection has no bias. Ours reads the CLS state, which the final
    LayerNorm ends with ``+ beta``; where the projection's bias lies in the span of its weight
    (hidden size >= embed_dim, full rank), moving it into beta gives the same projected CLS state.
    The other tokens' states shift by d too, which only open_clip's ``output_tokens`` would show."""
    weight, bias = tower.text_proj.weight.detach().double(), tower.text_proj.bias.detach().double()
    shift = torch.linalg.lstsq(weight, bias[:, None], driver="gelsd").solution[:, 0]
    if (weight @ shift - bias).norm() > TOLERANCE * max(bias.norm().item(), 1.0):
        return None
    return shift


def open_clip_limits(cfg: ModelConfig, tower: Tower, tokenizer) -> list[str]:
    """Why open_clip cannot hold this tower with the same embeddings (empty: it can)."""
    from open_clip.hf_configs import arch_dict

    reasons = []
    if cfg.in_chans != 3:
        reasons.append(f"its timm image tower always takes 3 input channels (here in_chans={cfg.in_chans})")
    if cfg.image_encoder_args:
        reasons.append("its timm image tower passes no constructor arguments to timm (this run sets "
                       f"{', '.join(sorted(cfg.image_encoder_args))})")
    model_type = tower.text_encoder.config.model_type
    if model_type not in arch_dict:
        reasons.append(f"its HF text tower does not know the {model_type!r} architecture")
    pad = tower.text_encoder.config.pad_token_id
    if tokenizer.pad_token_id != pad:
        # open_clip masks exactly the tokens equal to the config's pad id.
        reasons.append(f"its HF text tower masks token {pad}, the config's pad id, but the tokenizer pads "
                       f"with {tokenizer.pad_token_id}")
    if _final_layer_norm(tower.text_encoder) is None or _folded_text_bias(tower) is None:
        hidden, dim = tower.text_proj.in_features, tower.text_proj.out_features
        reasons.append("its HF text projection has no bias, and this run's text_proj bias cannot be folded "
                       "into the text encoder's final LayerNorm (that needs a BERT-style encoder and a "
                       f"full-rank text_proj with hidden size >= embed_dim; here {hidden} and {dim})")
    return reasons


def _open_clip_state(tower: Tower, tau: float) -> dict[str, torch.Tensor]:
    text = _state(tower.text_encoder, "text.transformer.")
    norm = _final_layer_norm(tower.text_encoder)
    name = next(f"text.transformer.{n}.bias" for n, m in tower.text_encoder.named_modules() if m is norm)
    text[name] = (text[name].double() + _folded_text_bias(tower)).float()
    return {
        **_state(tower.image_encoder, "visual.trunk."),
        "visual.head.proj.weight": _state(tower.image_proj)["weight"],
        "visual.head.proj.bias": _state(tower.image_proj)["bias"],
        **text,
        "text.proj.weight": _state(tower.text_proj)["weight"],
        # open_clip multiplies similarities by exp(logit_scale): 1 / tau.
        "logit_scale": torch.tensor(math.log(1.0 / tau)),
    }


def _export_open_clip(cfg: Config, tower: Tower, tau: float, tokenizer, out: Path, verify: bool) -> None:
    m = cfg.model
    # open_clip reads the tokenizer from the local-dir folder itself, and the text encoder's
    # config from hf_model_name: both live in `out`, named by absolute path (open_clip resolves
    # a relative one from the working directory, not from the folder).
    _write_text_folder(tower, tokenizer, m.max_len, out, weights=False)
    home = str(out.resolve())
    config = {
        "model_cfg": {
            "embed_dim": m.embed_dim,
            "vision_cfg": {
                "timm_model_name": m.image_encoder,
                "timm_model_pretrained": False,
                "timm_pool": "",  # the timm model's own pooling, as fastmsd trains it
                "timm_proj": "linear",
                "timm_proj_bias": True,
                "image_size": m.image_size,
            },
            "text_cfg": {
                "hf_model_name": home,
                "hf_tokenizer_name": home,
                "hf_model_pretrained": False,
                "hf_proj_type": "linear",
                # "cls_pooler" would add BERT's untrained pooling layer and read its output.
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": m.max_len,
            },
        },
        "preprocess_cfg": {"mean": [MEAN] * 3, "std": [STD] * 3, "interpolation": "bilinear",
                           "resize_mode": "shortest"},
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(_open_clip_state(tower, tau), out / "open_clip_model.safetensors")
    if verify:
        _check_open_clip(out, tower, m)


@torch.no_grad()
def _check_open_clip(out: Path, tower: Tower, cfg: ModelConfig) -> None:
    """Load the export with open_clip (strictly: a missing or extra weight fails) and compare its
    embeddings of a random image and a token row with ours."""
    import open_clip

    try:
        model = open_clip.create_model(f"local-dir:{out}")
    except RuntimeError as err:
        raise ConfigError(f"open_clip cannot load the export: {str(err).splitlines()[0]}") from None
    model.eval()
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    vocab = tower.text_encoder.config.vocab_size
    ids = torch.randint(5, vocab, (2, min(cfg.max_len, 8)), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    pairs = ((model.encode_image(images, normalize=True), tower.encode_image(images)),
             (model.encode_text(ids, normalize=True), tower.encode_text(ids, mask)))
    for name, (theirs, ours) in zip(("image", "text"), pairs, strict=True):
        gap = (theirs - ours).abs().max().item()
        if gap > TOLERANCE:
            raise ConfigError(f"open_clip's {name} embeddings differ from fastmsd's by {gap:.2e} "
                              f"(more than {TOLERANCE:g}); the export is not faithful")


def export(run: str | Path, fmt: str, out: str | Path) -> Path:
    """Export the student tower of a run (its latest checkpoint) or of a checkpoint folder."""
    from fastmsd.run import load_trained

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} ({' or '.join(FORMATS)})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} exists and is not empty")
    if fmt == "open_clip":
        try:
            import open_clip  # noqa: F401
        except ImportError:
            raise ConfigError("--format open_clip needs open_clip: pip install open-clip-torch") from None
    cfg, model, tokenizer, checkpoint = load_trained(run, torch.device("cpu"))
    return export_trained(cfg, model, tokenizer, checkpoint, fmt, out)


def export_trained(cfg: Config, model: MSDModel, tokenizer, checkpoint: Path, fmt: str, out: Path,
                   verify: bool = True) -> Path:
    """``export`` of a model already loaded (on the CPU) by ``fastmsd.run.load_trained``.
    ``verify``: load an open_clip export back with open_clip and compare embeddings (one more
    model build; off only where the caller checks the export itself)."""
    tower = model.student.eval()
    tau = model.tau.item()
    if fmt == "open_clip":
        reasons = open_clip_limits(cfg.model, tower, tokenizer)
        if reasons:
            raise ConfigError(f"open_clip cannot express this model: {'; '.join(reasons)} "
                              "(use --format hf)")
    out.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "hf":
            _export_hf(cfg, tower, tau, tokenizer, out)
        else:
            _export_open_clip(cfg, tower, tau, tokenizer, out, verify)
        description = _description(cfg, tower, checkpoint, tau, fmt)
        (out / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
        (out / "README.md").write_text(model_card(cfg, checkpoint, fmt, tau))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # half an export must not pass for a whole one
        raise
    return out


def is_export(path: str | Path) -> bool:
    return (Path(path) / DESCRIPTION).is_file()


def export_description(path: str | Path) -> dict:
    """An export's ``fastmsd.json``; only the ``hf`` format is one fastmsd reads back."""
    description = json.loads((Path(path) / DESCRIPTION).read_text())
    if description.get("format") != "hf":
        raise ConfigError(f"{path} is a {description.get('format')} export, which open_clip reads; fastmsd "
                          "reads back the hf format")
    return description


def read_hf_export(path: str | Path) -> tuple[ModelConfig, Tower, float, object]:
    """(model settings, student tower, tau, tokenizer) of an ``hf`` export, on the CPU: what
    ``fastmsd.load`` and ``--init`` take from it. Every tensor is checked before any is copied."""
    path = Path(path)
    d = export_description(path)
    cfg = ModelConfig(image_encoder=d["image_encoder"], image_encoder_args=d["image_encoder_args"],
                      image_size=d["image_size"], in_chans=d["in_chans"], text_encoder=str(path / "text"),
                      max_len=d["max_len"], embed_dim=d["embed_dim"])
    tokenizer = load_tokenizer(path / "text")
    tower = Tower(build_image_encoder(cfg), build_text_encoder(cfg, len(tokenizer)), cfg.embed_dim)
    copy_weights(tower.image_encoder, load_file(path / "image" / "model.safetensors"), f"export {path}")
    heads = load_file(path / "heads.safetensors")
    tau = float(heads.pop("tau"))
    copy_weights(nn.ModuleDict({"image_proj": tower.image_proj, "text_proj": tower.text_proj}), heads,
                 f"export {path}")
    return cfg, tower.eval(), tau, tokenizer
