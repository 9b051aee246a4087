"""EfficientNet / MobileNet blocks (timm): the projection conv valued after its BN, before the add.

``InvertedResidual.conv_pwl -> bn3``, ``EdgeResidual.conv_pwl -> bn2`` and
``DepthwiseSeparableConv.conv_pw -> bn2``. The BN carries no activation in these blocks, so the
block is affine in the edited weight (the fast solver's closed form applies).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site

from ._base import chain, class_from, join

__all__ = ["efficientnet_block_rule"]

_ORIGIN = "timm.models._efficientnet_blocks"
_PROJECTIONS = {
    "InvertedResidual": ("conv_pwl", "bn3"),
    "EdgeResidual": ("conv_pwl", "bn2"),
    "DepthwiseSeparableConv": ("conv_pw", "bn2"),
}


def efficientnet_block_rule(name: str, block: nn.Module) -> Iterator[EditableLayer]:
    """The projection conv of a timm EfficientNet/MobileNet block, valued at its BN output."""
    cls = type(block).__name__
    if cls not in _PROJECTIONS or not class_from(block, _ORIGIN, cls):
        return
    conv_attr, bn_attr = _PROJECTIONS[cls]
    conv = getattr(block, conv_attr, None)
    bn = getattr(block, bn_attr, None)
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or bn is None:
        return
    conv_name = join(name, conv_attr)
    yield EditableLayer(
        name=conv_name,
        module=conv,
        kind="conv",
        key_site=Site(conv_name, "input"),
        value_site=Site(join(name, bn_attr), "output"),
        post=chain(bn),
        block=f"conv -> {bn_attr}",
        family="efficientnet",
        eval_modules=(bn,),
    )
