"""Architecture adapters: where the editable layers of each model family are, and how their blocks compute.

Installed as ``surgery.adapters``. Adapters recognize models by class name and origin, so using them
never imports timm or open_clip.
"""

from ._base import Adapter, Rule, chain, class_from, is_editable_module, plain_layer
from ._registry import get_adapter, list_adapters, register_adapter
from .clip import CLIPAdapter, ZeroShotClassifier
from .generic import GenericAdapter, TimmAdapter
from .resnet import ResNetAdapter
from .vgg import VGGAdapter

__all__ = [
    "Adapter",
    "Rule",
    "register_adapter",
    "get_adapter",
    "list_adapters",
    "chain",
    "class_from",
    "is_editable_module",
    "plain_layer",
    "CLIPAdapter",
    "GenericAdapter",
    "ResNetAdapter",
    "TimmAdapter",
    "VGGAdapter",
    "ZeroShotClassifier",
]
