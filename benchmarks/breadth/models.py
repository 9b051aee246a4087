"""The model zoo: ~40 architectures from torchvision, timm and open_clip, built with random weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import open_clip
import timm
import torchvision
from surgery.adapters import ZeroShotClassifier
from torch import nn

from .weights import randomize_norms, randomize_scales

__all__ = ["ModelSpec", "MODELS", "QUICK"]


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark architecture: ``build()`` returns an image classifier (random weights)."""

    id: str
    source: str  # torchvision / timm / open_clip
    family: str  # the adapter family this row exercises
    build: Callable[[], nn.Module]
    size: int = 96
    small: bool = False  # cheap enough for --quick


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:

        return getattr(torchvision.models, name)(weights=None, **kw)

    return build


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:

        return timm.create_model(name, pretrained=False, **kw)

    return build


def _clip(name: str, size: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:


        clip = open_clip.create_model(name, pretrained=None, force_image_size=size)
        randomize_norms(randomize_scales(clip))
        classes = [f"class {i}" for i in range(16)]
        return ZeroShotClassifier(clip, classes, templates=["a photo of a {}."])

    return build


MODELS: tuple[ModelSpec, ...] = (
    # the paper's families, as the reference rows
    ModelSpec("tv_resnet50", "torchvision", "resnet", _tv("resnet50")),
    ModelSpec("timm_vgg11_bn", "timm", "vgg", _timm("vgg11_bn"), small=True),
    # torchvision
    ModelSpec("tv_convnext_tiny", "torchvision", "convnext", _tv("convnext_tiny")),
    ModelSpec("tv_vit_b_16", "torchvision", "vit", _tv("vit_b_16", image_size=96)),
    ModelSpec("tv_swin_t", "torchvision", "swin", _tv("swin_t")),
    ModelSpec("tv_swin_v2_t", "torchvision", "swin", _tv("swin_v2_t")),
    ModelSpec("tv_efficientnet_b0", "torchvision", "efficientnet", _tv("efficientnet_b0")),
    ModelSpec("tv_efficientnet_v2_s", "torchvision", "efficientnet", _tv("efficientnet_v2_s")),
    ModelSpec("tv_mobilenet_v2", "torchvision", "efficientnet", _tv("mobilenet_v2"), small=True),
    ModelSpec("tv_mobilenet_v3_small", "torchvision", "efficientnet", _tv("mobilenet_v3_small"), small=True),
    ModelSpec("tv_regnet_y_400mf", "torchvision", "regnet", _tv("regnet_y_400mf")),
    # timm
    ModelSpec("timm_resnet50", "timm", "resnet", _timm("resnet50")),
    ModelSpec("timm_seresnext26d_32x4d", "timm", "resnet", _timm("seresnext26d_32x4d")),
    ModelSpec("vit_tiny_patch16_224", "timm", "vit", _timm("vit_tiny_patch16_224", img_size=96), small=True),
    ModelSpec(
        "vit_tiny_reg4_gap", "timm", "vit",
        _timm("vit_tiny_patch16_224", img_size=96, reg_tokens=4, class_token=False, global_pool="avg"),
    ),
    ModelSpec("deit_tiny_distilled_patch16_224", "timm", "vit", _timm("deit_tiny_distilled_patch16_224", img_size=96)),
    ModelSpec("eva02_tiny_patch14_224", "timm", "vit", _timm("eva02_tiny_patch14_224", img_size=98), size=98),
    ModelSpec("cait_xxs24_224", "timm", "vit", _timm("cait_xxs24_224", img_size=96)),
    ModelSpec("beit_base_patch16_224", "timm", "vit", _timm("beit_base_patch16_224", img_size=96)),
    ModelSpec("swin_tiny_patch4_window7_224", "timm", "swin", _timm("swin_tiny_patch4_window7_224", img_size=96, window_size=6)),
    ModelSpec("swinv2_tiny_window8_256", "timm", "swin", _timm("swinv2_tiny_window8_256", img_size=96, window_size=6)),
    ModelSpec("maxvit_tiny_tf_224", "timm", "maxxvit", _timm("maxvit_tiny_tf_224", img_size=96)),
    ModelSpec("coatnet_0_rw_224", "timm", "maxxvit", _timm("coatnet_0_rw_224", img_size=96)),
    ModelSpec("mixer_s16_224", "timm", "mixer", _timm("mixer_s16_224", img_size=96)),
    ModelSpec("resmlp_12_224", "timm", "mixer", _timm("resmlp_12_224", img_size=96), small=True),
    ModelSpec("gmlp_s16_224", "timm", "mixer", _timm("gmlp_s16_224", img_size=96)),
    ModelSpec("poolformer_s12", "timm", "metaformer", _timm("poolformer_s12")),
    ModelSpec("convformer_s18", "timm", "metaformer", _timm("convformer_s18")),
    ModelSpec("caformer_s18", "timm", "metaformer", _timm("caformer_s18")),
    ModelSpec("convnext_atto", "timm", "convnext", _timm("convnext_atto"), small=True),
    ModelSpec("convnextv2_atto", "timm", "convnext", _timm("convnextv2_atto")),
    ModelSpec("efficientnet_b0", "timm", "efficientnet", _timm("efficientnet_b0")),
    ModelSpec("mobilenetv3_small_100", "timm", "efficientnet", _timm("mobilenetv3_small_100")),
    ModelSpec("regnety_002", "timm", "regnet", _timm("regnety_002")),
    ModelSpec("regnetx_002", "timm", "regnet", _timm("regnetx_002")),
    ModelSpec("resnetv2_50", "timm", "resnetv2", _timm("resnetv2_50")),
    ModelSpec("resnetv2_50x1_bit", "timm", "resnetv2", _timm("resnetv2_50x1_bit")),
    # open_clip (zero-shot classifiers over 16 class names; random towers)
    ModelSpec("clip_ViT-B-32", "open_clip", "clip", _clip("ViT-B-32", 96)),
    ModelSpec("clip_RN50", "open_clip", "clip", _clip("RN50", 96)),
)
QUICK = (
    "timm_vgg11_bn",
    "vit_tiny_patch16_224",
    "convnext_atto",
    "resmlp_12_224",
    "tv_mobilenet_v3_small",
    "tv_mobilenet_v2",
)
