"""Encoders by name (timm / transformers), projections, and the student + momentum pair."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastmsd.checkpoint import copy_weights
from fastmsd.config import ConfigError, ModelConfig
from fastmsd.momentum import MomentumTeacher

# Architectures that can be built offline from a config alone (no hub access): BertConfig
# overrides. Dropout is off in the tiny encoder because its runs are too short to overfit.
TEXT_CONFIGS: dict[str, dict] = {
    "bert-tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 512,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
    "bert-base-uncased": {},
}


def _check_image_name(cfg: ModelConfig) -> None:
    import timm

    if not timm.is_model(cfg.image_encoder):
        raise ConfigError(
            f"unknown image encoder {cfg.image_encoder!r}: not a timm model name "
            "(see timm.list_models())"
        )


def _check_text_name(cfg: ModelConfig) -> None:
    if not Path(cfg.text_encoder).is_dir() and cfg.text_encoder not in TEXT_CONFIGS:
        raise ConfigError(
            f"unknown text encoder {cfg.text_encoder!r}: give a local model directory or one of "
            f"{', '.join(TEXT_CONFIGS)}"
        )


def check_encoder_names(cfg: ModelConfig) -> None:
    """Fail fast, before any run folder is made, on encoder names nothing can build."""
    _check_image_name(cfg)
    _check_text_name(cfg)


def build_image_encoder(cfg: ModelConfig) -> nn.Module:
    """A timm backbone returning pooled features (``num_features`` wide)."""
    import timm

    _check_image_name(cfg)
    pretrained = cfg.pretrained and cfg.image_weights is None
    encoder = timm.create_model(cfg.image_encoder, pretrained=pretrained, num_classes=0,
                                in_chans=cfg.in_chans, **cfg.image_encoder_args)
    if cfg.image_weights is not None:
        load_image_weights(encoder, cfg.image_weights, cfg.in_chans)
    return encoder


def load_image_weights(encoder: nn.Module, path: str | Path, in_chans: int) -> None:
    """A local timm checkpoint into ``encoder``: safetensors, or a torch file holding the tensors
    or wrapping them (``state_dict_ema``, ``model_ema``, ``state_dict`` or ``model``, the EMA
    first, as timm reads them), an RGB stem adapted to the encoder's channels.

    timm's own loader (``pretrained_cfg_overlay={"file": ...}``) is not used: with the classifier
    dropped (``num_classes=0``) it loads non-strictly, so a file lacking weights would leave them
    at random, and a misfit tensor raises after the others were copied.
    """
    from timm.models import adapt_input_conv, load_state_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image encoder weights {path} not found")
    try:
        tensors = load_state_dict(str(path))
    except Exception as err:  # a torch pickle holding more than tensors, a corrupt file
        raise ConfigError(f"image encoder weights {path} unreadable: {str(err).splitlines()[0]}") from None
    pretrained_cfg = encoder.pretrained_cfg
    # As timm does for hub weights: the stem's input channels are adapted (summed for one channel);
    # a stem that already has the encoder's channels is kept as it is.
    base_chans = (pretrained_cfg.get("input_size") or (3,))[0]
    first = pretrained_cfg.get("first_conv") or ()
    for conv in (first,) if isinstance(first, str) else first:
        name, target = f"{conv}.weight", encoder.get_submodule(conv).weight
        if name in tensors and tensors[name].ndim == 4 and tensors[name].shape[1] != target.shape[1]:
            tensors[name] = adapt_input_conv(in_chans, tensors[name], base_chans=base_chans)
    classifier = pretrained_cfg.get("classifier") or ()
    for head in (classifier,) if isinstance(classifier, str) else classifier:
        tensors.pop(f"{head}.weight", None)
        tensors.pop(f"{head}.bias", None)
    copy_weights(encoder, tensors, f"image encoder weights {path}")


def build_text_encoder(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """A transformers encoder whose CLS state embeds a report.

    A local directory loads its config and weights; a known name is built from its config
    alone (random init, the vocabulary sized to our tokenizer) unless ``pretrained`` asks the
    hub for weights.
    """
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    source = Path(cfg.text_encoder)
    if source.is_dir():
        config = AutoConfig.from_pretrained(source)
        for key, value in cfg.text_encoder_args.items():
            setattr(config, key, value)
        extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        try:
            model, info = AutoModel.from_pretrained(source, config=config, attn_implementation="sdpa",
                                                    output_loading_info=True, **extra)
        except RuntimeError as err:  # transformers refuses mis-shaped weights
            raise ConfigError(f"text encoder {source}: weights do not fit its config "
                              f"(check text_encoder_args): {str(err).splitlines()[0]}") from err
        # Missing weights would be initialised at random with only a warning: a "pretrained"
        # encoder that is partly random must not pass silently.
        if info["missing_keys"]:
            raise ConfigError(f"text encoder {source}: {len(info['missing_keys'])} weights missing, "
                              f"e.g. {sorted(info['missing_keys'])[0]}")
        return model
    _check_text_name(cfg)
    if cfg.pretrained:
        return AutoModel.from_pretrained(cfg.text_encoder, attn_implementation="sdpa")
    config = BertConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(512, cfg.max_len),
        **{**TEXT_CONFIGS[cfg.text_encoder], **cfg.text_encoder_args},
    )
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False)


class Tower(nn.Module):
    """One image encoder and one text encoder, each projected to the shared unit sphere."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_proj = nn.Linear(image_encoder.num_features, embed_dim)
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, embed_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = self.text_attention_mask(attention_mask)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=mask)
        return F.normalize(self.text_proj(hidden.last_hidden_state[:, 0]), dim=-1)

    def text_attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The [n, L] padding mask in the form the text encoder's attention takes without a host sync.

        Given a 2-D mask, transformers' mask builder (sdpa and eager alike) asks ``mask.all()`` in
        Python, to drop an all-ones mask: a device-to-host sync in every text forward. A 4-D mask
        is passed through unchanged instead, so it is built here in each implementation's form:
        boolean for SDPA, additive for eager (which adds it to the scores, where a boolean would
        add 0 or 1 and mask nothing). The implementation is read per call because
        ``MSDModel.set_attention`` can switch it after the tower is built.
        """
        keep = attention_mask.bool()[:, None, None, :]
        implementation = self.text_encoder.config._attn_implementation
        if implementation == "sdpa":
            return keep
        if implementation == "eager":
            # transformers' own fill: 0 where attended, the dtype's minimum where padded; the
            # encoder's dtype keeps the scores in it (a wider mask would promote them).
            dtype = self.text_encoder.dtype
            bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
            return bias.masked_fill_(~keep, torch.finfo(dtype).min)
        # Others (flash attention unpads by the 2-D mask) keep the form transformers expects.
        return attention_mask


class MSDModel(nn.Module):
    """Student tower, its momentum teacher, and the learnable temperature."""

    def __init__(self, student: Tower, tau_init: float, ema_decay: float):
        super().__init__()
        self.student = student
        self.momentum = MomentumTeacher(student, ema_decay)
        self.tau = nn.Parameter(torch.tensor(float(tau_init)))

    def set_checkpointing(self, image_every: int, text_every: int) -> None:
        """Recompute the activations of every k-th block of each student encoder in backward
        (0: none, 1: all); the teacher keeps no activations."""
        set_block_checkpointing(self.student.image_encoder, image_every)
        set_block_checkpointing(self.student.text_encoder, text_every)

    def set_attention(self, sdpa: bool) -> None:
        """Fused scaled-dot-product attention in every encoder (the teacher's bf16 shadow too),
        or the eager matmul-softmax."""
        for tower in (self.student, *self.momentum.towers()):
            for module in tower.image_encoder.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = sdpa
            if hasattr(tower.text_encoder, "set_attn_implementation"):
                tower.text_encoder.set_attn_implementation("sdpa" if sdpa else "eager")


def checkpoint_units(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's repeated blocks, in order: the children of each outermost container whose
    children are composite modules of one class (ViT ``blocks``, ConvNeXt ``stages``, ResNet
    ``layer1`` .. ``layer4``, BERT ``encoder.layer``)."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) \
                    and len({_base_class(c) for c in child}) == 1 and any(True for _ in child[0].children()):
                units.extend(child)
            else:
                visit(child)

    visit(encoder)
    return units


_CHECKPOINTED: dict[type, type] = {}


def _base_class(module: nn.Module) -> type:
    return next(c for c in type(module).__mro__ if c not in _CHECKPOINTED.values())


def _checkpointed_class(cls: type) -> type:
    # A subclass swapped in as the block's class keeps its parameter names (so checkpoints
    # and the flat buffers are unaffected) and survives deepcopy, unlike a patched attribute.
    if cls not in _CHECKPOINTED:
        def forward(self, *args, **kwargs):
            if self.training and torch.is_grad_enabled():
                return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)
            return cls.forward(self, *args, **kwargs)

        name = f"Checkpointed{cls.__name__}"
        # A module-level name, so that pickle (torch.save of a module, spawned workers) finds it.
        sub = type(name, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": name})
        globals()[name] = _CHECKPOINTED[cls] = sub
    return _CHECKPOINTED[cls]


def set_block_checkpointing(encoder: nn.Module, every: int) -> None:
    """Checkpoint blocks 0, k, 2k, ... of ``encoder`` (every == k; 0 turns it off)."""
    if every < 0:
        raise ValueError(f"checkpointing interval must be >= 0, got {every}")
    # The libraries' own all-or-nothing switches stay off: this policy replaces them.
    if hasattr(encoder, "set_grad_checkpointing"):  # timm
        encoder.set_grad_checkpointing(False)
    # transformers 5 renamed the switch; older releases only have gradient_checkpointing_*.
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        if hasattr(encoder, name):
            getattr(encoder, name)()
            break
    for i, unit in enumerate(checkpoint_units(encoder)):
        base = _base_class(unit)
        unit.__class__ = _checkpointed_class(base) if every and i % every == 0 else base


def checkpointed_blocks(encoder: nn.Module) -> list[bool]:
    return [type(unit) in _CHECKPOINTED.values() for unit in checkpoint_units(encoder)]


def build_model(cfg: ModelConfig, vocab_size: int) -> MSDModel:
    tower = Tower(build_image_encoder(cfg), build_text_encoder(cfg, vocab_size), cfg.embed_dim)
    return MSDModel(tower, cfg.tau_init, cfg.ema_decay)
