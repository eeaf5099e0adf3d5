"""``--task segment``: an encoder-decoder on the image encoder, trained on the cache's masks, scored by Dice.

segmentation_models_pytorch builds the decoder around the timm encoder (its ``tu-`` encoders):
- a hierarchical encoder (ConvNeXt, ResNet: features at 1/4 .. 1/32) gets a U-Net over its stages;
- a plain ViT (one 1/16 scale throughout) gets DPT, which reassembles tokens of four intermediate blocks
  into a multi-scale pyramid and fuses it, the role UNETR's decoder plays for 3-D ViTs.
Each output channel is one finding's mask (sigmoid, so findings may overlap); the loss is BCE plus soft Dice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmsd.config import ConfigError
from fastmsd.data.cache import Cache
from fastmsd.data.loader import (
    DiskImages,
    augment_with_masks,
    load_images,
    normalize_,
    split_images,
    to_device,
)
from fastmsd.eval import metrics
from fastmsd.finetune.fit import Settings, Trained, fit, infer
from fastmsd.finetune.start import Start


@dataclass
class MaskSplit:
    images: torch.Tensor | DiskImages  # uint8 [n, 1, size, size]
    masks: torch.Tensor  # bool [n, findings, size, size]

    @property
    def present(self) -> np.ndarray:
        """{0, 1} [n, findings]: which items show each finding (the labels the fractions are drawn by)."""
        return self.masks.flatten(2).any(dim=2).numpy().astype(np.float32)


def load_mask_split(cache: Cache, split: str, findings: tuple[str, ...], size: int) -> MaskSplit:
    indices = cache.indices(split)
    images = split_images(cache.image_paths(indices), size, f"decode {split}")
    # Masks go through the images' resize; thresholding at half way makes them binary again. They stay in
    # memory: a byte a pixel and finding (SIIM's 12,000 at 224 px: 0.6 GB).
    masks = [load_images(cache.mask_paths(indices, f), size, f"decode {split} {f} masks") > 127
             for f in findings]
    return MaskSplit(images, torch.cat(masks, dim=1))


def _copy_encoder(weights: dict[str, torch.Tensor], target: nn.Module) -> None:
    """The timm encoder's weights into the segmentation model's copy of it. timm's feature wrapper renames
    the modules it flattens (``stem.0`` becomes ``stem_0``), so names are matched with ``_`` and ``.`` as one;
    every tensor of ``target`` must find exactly one of its shape."""
    by_name: dict[str, list[str]] = {}
    for name in weights:
        by_name.setdefault(name.replace("_", "."), []).append(name)
    state = {}
    for name, tensor in target.state_dict().items():
        found = by_name.get(name.replace("_", "."), [])
        if len(found) != 1 or weights[found[0]].shape != tensor.shape:
            raise ConfigError(f"the segmentation encoder's tensor {name} has no single match of shape "
                              f"{tuple(tensor.shape)} in the image encoder's weights")
        state[name] = weights[found[0]]
    target.load_state_dict(state)


def _is_plain_vit(encoder: nn.Module) -> bool:
    return len({f["reduction"] for f in encoder.feature_info}) == 1


def build_segmenter(start: Start, n_findings: int, seed: int) -> nn.Module:
    """A U-Net (hierarchical encoders) or DPT (plain ViTs) whose encoder holds ``start``'s weights."""
    import segmentation_models_pytorch as smp

    cfg = start.cfg
    encoder = start.encoder(seed)
    kwargs = {"encoder_name": f"tu-{cfg.image_encoder}", "encoder_weights": None, "in_channels": cfg.in_chans,
              "classes": n_findings, **cfg.image_encoder_args}
    torch.manual_seed(seed)
    if _is_plain_vit(encoder):
        from segmentation_models_pytorch.encoders.timm_vit import sample_block_indices_uniformly

        width = encoder.feature_info[-1]["num_chs"]
        # smp's ViT encoder keeps the name `depth` for its number of taps, so a ViT's own depth cannot be
        # passed through: it is built at timm's default depth, then replaced by ``encoder`` itself, with
        # DPT's four taps spread over its blocks the way smp spreads them.
        kwargs.pop("depth", None)
        # DPT's widths for ViT-B (96, 192, 384, 768; fusion 256), scaled with the encoder's width.
        model = smp.DPT(**kwargs, num_classes=0, decoder_fusion_channels=min(256, width // 2),
                        decoder_intermediate_channels=[width // 8, width // 4, width // 2, width])
        model.encoder.model = encoder
        model.encoder._output_indices = sample_block_indices_uniformly(4, len(encoder.feature_info))
        return model
    widest = max(f["num_chs"] for f in encoder.feature_info)
    # smp's default (256, 128, ..., 16), narrowed for encoders narrower than 256 channels.
    decoder = [max(16, min(256, widest) >> i) for i in range(5)]
    model = smp.Unet(**kwargs, decoder_channels=decoder)
    _copy_encoder(encoder.state_dict(), model.encoder.model)
    return model


def predict_masks(model: nn.Module, images: torch.Tensor, in_chans: int,
                  device: torch.device) -> torch.Tensor:
    """bool [n, findings, H, W]: probability above one half."""
    return infer(model, images, in_chans, device, post=lambda logits: logits > 0)


def score(model: nn.Module, split: MaskSplit, in_chans: int,
          device: torch.device) -> tuple[float, list[float]]:
    """Mean Dice over the findings, and each finding's (NaN where the split shows none and none is found)."""
    return metrics.dice(predict_masks(model, split.images, in_chans, device).numpy(), split.masks.numpy())


def mask_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """BCE per pixel plus soft Dice per finding (1 - Dice of the probabilities over the batch)."""
    from segmentation_models_pytorch.losses import DiceLoss

    return F.binary_cross_entropy_with_logits(logits, masks) + DiceLoss("multilabel")(logits, masks)


def train_segmenter(start: Start, train: MaskSplit, idx: np.ndarray, val: MaskSplit, seed: int,
                    settings: Settings, device: torch.device, progress: bool = True,
                    desc: str = "finetune") -> Trained:
    """Encoder + decoder trained with :func:`mask_loss` on ``train``'s rows ``idx``; the weights of the
    epoch with the best validation Dice are returned."""
    model = build_segmenter(start, train.masks.shape[1], seed)
    in_chans = start.cfg.in_chans

    def batch(rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = augment_with_masks(to_device(train.images[rows], device),
                                           to_device(train.masks[rows], device), generator)
        return normalize_(images, in_chans), masks.float()

    return fit(model, model.encoder, idx, batch, mask_loss, lambda m: score(m, val, in_chans, device)[0],
               seed, settings, device, progress, desc)
