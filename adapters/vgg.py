"""VGG family, torchvision and timm, with and without BatchNorm.

Each conv of ``features`` is edited with the value read where its block ends:
conv -> BN (when present) -> ReLU [-> MaxPool when one follows].
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site

from ._base import Adapter, chain, class_from, join
from ._registry import register_adapter

__all__ = ["VGGAdapter", "vgg_features_rule"]

_VGG_ORIGINS = ("torchvision.models.vgg", "timm.models.vgg")


def _is_vgg(module: nn.Module) -> bool:
    return any(class_from(module, o, "VGG") for o in _VGG_ORIGINS)


def vgg_features_rule(name: str, model: nn.Module) -> Iterator[EditableLayer]:
    """The convs of a VGG's ``features`` Sequential, each valued after its BN, ReLU and pool."""
    if not _is_vgg(model):
        return
    features = model.features
    children = list(features.children())
    for i, conv in enumerate(children):
        if not isinstance(conv, nn.Conv2d):
            continue
        tail: list[nn.Module] = []
        j = i + 1
        for kinds in ((nn.BatchNorm2d,), (nn.ReLU,), (nn.MaxPool2d,)):
            if j < len(children) and isinstance(children[j], kinds):
                tail.append(children[j])
                j += 1
        end = i + len(tail)
        conv_name = join(name, "features", str(i))
        yield EditableLayer(
            name=conv_name,
            module=conv,
            kind="conv",
            key_site=Site(conv_name, "input"),
            value_site=Site(join(name, "features", str(end)), "output"),
            post=chain(*tail) if tail else None,
            block=" -> ".join(["conv", *(type(m).__name__.lower() for m in tail)]),
            family="vgg",
            eval_modules=tuple(tail),
        )


@register_adapter
class VGGAdapter(Adapter):
    """torchvision and timm ``VGG`` models."""

    family = "vgg"
    priority = 20
    rules = (vgg_features_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_vgg(model)
