"""Architecture adapters: where the editable layers of each model family are, and how their blocks compute.

Installed as ``surgery.adapters``. Adapters recognize models by class name and origin, so using them
never imports timm or open_clip.
"""

from ._base import (
    Adapter,
    NotEditable,
    Rule,
    branch_of,
    chain,
    class_from,
    is_editable_module,
    plain_layer,
    site_branch,
)
from ._registry import get_adapter, list_adapters, register_adapter
from .clip import CLIPAdapter, ZeroShotClassifier
from .convnext import ConvNeXtAdapter
from .efficientnet import EfficientNetAdapter
from .generic import GenericAdapter, TimmAdapter
from .maxxvit import MaxxVitAdapter
from .metaformer import MetaFormerAdapter
from .mixer import MixerAdapter
from .regnet import RegNetAdapter, ResNetV2Adapter
from .resnet import ResNetAdapter
from .swin import SwinAdapter
from .vgg import VGGAdapter
from .vit import ViTAdapter

__all__ = [
    "Adapter",
    "NotEditable",
    "Rule",
    "branch_of",
    "site_branch",
    "register_adapter",
    "get_adapter",
    "list_adapters",
    "chain",
    "class_from",
    "is_editable_module",
    "plain_layer",
    "CLIPAdapter",
    "ConvNeXtAdapter",
    "EfficientNetAdapter",
    "GenericAdapter",
    "MaxxVitAdapter",
    "MetaFormerAdapter",
    "MixerAdapter",
    "RegNetAdapter",
    "ResNetAdapter",
    "ResNetV2Adapter",
    "SwinAdapter",
    "TimmAdapter",
    "VGGAdapter",
    "ViTAdapter",
    "ZeroShotClassifier",
]
