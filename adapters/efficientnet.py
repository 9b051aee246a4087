"""EfficientNet / MobileNet blocks, timm and torchvision: the projection conv, valued after the add.

timm ``InvertedResidual.conv_pwl -> bn3``, ``EdgeResidual.conv_pwl -> bn2``,
``DepthwiseSeparableConv.conv_pw -> bn2`` and ``ConvBnAct.conv -> bn1`` (with its activation); torchvision ``MBConv`` / ``FusedMBConv`` (EfficientNet,
EfficientNetV2) and MobileNetV3 ``InvertedResidual`` (the last ``Conv2dNormActivation`` of ``block``)
and MobileNetV2 ``InvertedResidual`` (``conv[-2] -> conv[-1]``). With a skip connection (stride 1,
same channels) the value is the block output ``drop_path(bn(conv(k))) + x``; without one it is the BN
output, where the block ends: a skip-free site, the block's whole output (the blocks that change width
or stride, a stage's first). The BN carries no activation (except a fused block without expansion,
whose single conv keeps its SiLU), so most blocks are affine in the edited weight and the fast
solver's closed form applies. Squeeze-excite, where present, acts before the projection conv (on its
keys), so these blocks stay channelwise.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site
from surgery.layout import Layout

from ._base import Adapter, class_from, join
from ._registry import register_adapter
from ._residual import add_skip, branch_layer, module_step

__all__ = ["EfficientNetAdapter", "efficientnet_block_rule"]

_FAMILY = "efficientnet"
_NCHW = Layout("nchw")
_TIMM = "timm.models._efficientnet_blocks"
_PROJECTIONS = {
    "InvertedResidual": ("conv_pwl", "bn3"),
    "EdgeResidual": ("conv_pwl", "bn2"),
    "DepthwiseSeparableConv": ("conv_pw", "bn2"),
    "ConvBnAct": ("conv", "bn1"),
}
_TV_BLOCKS = (
    ("torchvision.models.efficientnet", "MBConv"),
    ("torchvision.models.efficientnet", "FusedMBConv"),
    ("torchvision.models.mobilenetv3", "InvertedResidual"),
)


def _projection(
    name: str,
    conv_path: str,
    conv: nn.Module,
    tail: list[tuple[str, nn.Module]],
    tail_path: str,
    skip: bool,
    drop=None,
) -> EditableLayer:
    steps = [module_step(m, label) for label, m in tail]
    if skip:
        steps += [module_step(drop, "drop_path"), add_skip()]
    return branch_layer(
        name,
        conv_path,
        conv,
        steps=steps,
        value_site=Site(name, "output") if skip else Site(tail_path, "output"),
        context_sites={"skip": Site(name, "input")} if skip else {},
        family=_FAMILY,
        key_layout=_NCHW,
        value_layout=_NCHW,
    )


def efficientnet_block_rule(name: str, block: nn.Module) -> Iterator[EditableLayer]:
    """The projection conv of a timm or torchvision EfficientNet/MobileNet block."""
    cls = type(block).__name__
    if cls in _PROJECTIONS and class_from(block, _TIMM, cls):
        conv_attr, bn_attr = _PROJECTIONS[cls]
        conv = getattr(block, conv_attr, None)
        bn = getattr(block, bn_attr, None)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or bn is None:
            return
        if cls == "ConvBnAct" and not isinstance(getattr(block, "aa", None), (nn.Identity, type(None))):
            return  # anti-aliasing after the norm: not a step of the value
        skip = bool(getattr(block, "has_skip", False))
        yield _projection(
            name, conv_attr, conv, [(bn_attr, bn)], join(name, bn_attr), skip, getattr(block, "drop_path", None)
        )
    elif any(class_from(block, o, c) for o, c in _TV_BLOCKS):
        seq = block.block
        last = len(seq) - 1
        proj = seq[last]  # Conv2dNormActivation: conv, bn[, activation]
        conv = proj[0]
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            return
        yield _projection(
            name,
            f"block.{last}.0",
            conv,
            [(type(m).__name__.lower(), m) for m in list(proj)[1:]],
            join(name, "block", str(last)),
            bool(block.use_res_connect),
            getattr(block, "stochastic_depth", None),
        )
    elif class_from(block, "torchvision.models.mobilenetv2", "InvertedResidual"):
        seq = block.conv
        i = len(seq) - 2
        conv, bn = seq[i], seq[i + 1]
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            return
        yield _projection(
            name, f"conv.{i}", conv, [("batchnorm2d", bn)], join(name, "conv", str(i + 1)), bool(block.use_res_connect)
        )


@register_adapter
class EfficientNetAdapter(Adapter):
    """timm ``EfficientNet`` / ``MobileNetV3`` and torchvision ``EfficientNet`` (v1, v2) /
    ``MobileNetV2`` / ``MobileNetV3`` models."""

    family = _FAMILY
    priority = 20
    # breadth protocol on skip-free sites (issue 26): the deepest skip-free site (the head conv) beats the
    # deepest residual projection (held-out: timm EfficientNet-B0 0.81 vs 0.87, torchvision 0.95 vs 1.0,
    # MobileNetV3-small timm 0.77 vs 0.88, torchvision 0.78 vs 0.79; MobileNetV2 1.0 vs 0.99); the
    # projections of width-changing blocks a quarter of the way in are next (0.74-0.94)
    preference = (("skip-free", 1.0), ("skip-free", 0.25), ("conv", 1.0))
    rules = (efficientnet_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            class_from(model, "timm.models.efficientnet", "EfficientNet")
            or class_from(model, "timm.models.mobilenetv3", "MobileNetV3")
            or class_from(model, "torchvision.models.efficientnet", "EfficientNet")
            or class_from(model, "torchvision.models.mobilenetv2", "MobileNetV2")
            or class_from(model, "torchvision.models.mobilenetv3", "MobileNetV3")
        )
