"""Any timm model, and any other ``nn.Module``.

Every dense Conv2d and Linear is editable with its own output as the value; inside the blocks the
family rules recognize (ResNet, VGG, ConvNeXt, ViT/DeiT/EVA/CaiT/BEiT, Swin, MaxViT, Mixer/ResMLP,
MetaFormer, EfficientNet/MobileNet, RegNet, ResNetV2, CLIP), the value is read at the end of the
block, after its residual add, instead. Models of those families get their own adapter; these two
serve other timm models and wrapped or custom models that contain such blocks. The rules match by class name and origin, so they
are safe to run on any model, including one that wraps a torchvision or timm network.
"""

from __future__ import annotations

from torch import nn

from ._base import Adapter
from ._registry import register_adapter
from .convnext import convnext_block_rule
from .efficientnet import efficientnet_block_rule
from .maxxvit import maxxvit_block_rule
from .metaformer import metaformer_block_rule
from .mixer import mixer_block_rule
from .regnet import regnet_block_rule, resnetv2_block_rule
from .resnet import residual_block_rule
from .swin import swin_block_rule
from .vgg import vgg_features_rule
from .vit import clip_vit_block_rule, vit_block_rule

__all__ = ["TimmAdapter", "GenericAdapter", "ALL_RULES"]

ALL_RULES = (
    residual_block_rule,
    vgg_features_rule,
    convnext_block_rule,
    vit_block_rule,
    clip_vit_block_rule,
    swin_block_rule,
    maxxvit_block_rule,
    mixer_block_rule,
    metaformer_block_rule,
    efficientnet_block_rule,
    regnet_block_rule,
    resnetv2_block_rule,
)


@register_adapter
class TimmAdapter(Adapter):
    """Any model built by timm."""

    family = "timm"
    priority = 10
    rules = ALL_RULES

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.")


@register_adapter
class GenericAdapter(Adapter):
    """Fallback for any ``nn.Module``."""

    family = "generic"
    priority = -100
    rules = ALL_RULES

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True
