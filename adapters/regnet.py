"""RegNet (timm and torchvision) and ResNetV2 / BiT (timm): the last conv of each block, after the add.

- timm ``regnet.Bottleneck``: ``act3(drop_path(bn(conv3.conv(k))) + downsample(x))``;
  ``PreBottleneck``: ``drop_path(conv3(k)) + downsample(norm1(x))``. Without a shortcut
  (``downsample is None``) the value is the branch alone, where the block ends.
- torchvision ``ResBottleneckBlock``: ``activation(bn(f.c(k)) + proj(x) or x)``.
- timm ResNetV2 ``PreActBasic`` (``conv2``) / ``PreActBottleneck`` (``conv3``):
  ``drop_path(conv(k)) + shortcut``, where the shortcut is ``downsample(preact)`` or the block input;
  ``Bottleneck`` (non-pre-activation): ``act3(drop_path(norm3(conv3(k))) + shortcut)``.

RegNetY's squeeze-excite acts before ``conv3`` (on its keys), so the blocks are channelwise. BiT's
``StdConv2d`` standardizes its weight inside the forward, so the block is not linear in the edited
weight; the solvers check that (see ``surgery.solvers``).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site
from surgery.layout import Layout

from ._base import Adapter, class_from, join
from ._registry import register_adapter
from ._residual import add_skip, branch_layer, module_step

__all__ = ["RegNetAdapter", "ResNetV2Adapter", "regnet_block_rule", "resnetv2_block_rule"]

_NCHW = Layout("nchw")


def _layer(name, path, module, steps, skip_site, family) -> EditableLayer:
    return branch_layer(
        name,
        path,
        module,
        steps=steps,
        value_site=Site(name, "output"),
        context_sites={"skip": skip_site} if skip_site is not None else {},
        family=family,
        key_layout=_NCHW,
        value_layout=_NCHW,
    )


def regnet_block_rule(name: str, block: nn.Module) -> Iterator[EditableLayer]:
    """The last conv of a timm RegNet ``Bottleneck`` / ``PreBottleneck`` or torchvision
    ``ResBottleneckBlock``."""
    if class_from(block, "timm.models.regnet", "Bottleneck"):
        down = block.downsample
        conv3 = block.conv3  # ConvNormAct(apply_act=False)
        steps = [module_step(conv3.bn, "bn"), module_step(getattr(conv3, "aa", None), "aa")]
        if down is not None:
            steps += [module_step(block.drop_path, "drop_path"), add_skip(name="+shortcut")]
        steps.append(module_step(block.act3, "act3"))
        skip = Site(join(name, "downsample"), "output") if down is not None else None
        yield _layer(name, "conv3.conv", conv3.conv, steps, skip, "regnet")
    elif class_from(block, "timm.models.regnet", "PreBottleneck"):
        down = block.downsample
        steps = [module_step(block.drop_path, "drop_path"), add_skip(name="+shortcut")] if down is not None else []
        skip = Site(join(name, "downsample"), "output") if down is not None else None
        yield _layer(name, "conv3", block.conv3, steps, skip, "regnet")
    elif class_from(block, "torchvision.models.regnet", "ResBottleneckBlock"):
        c = block.f.c  # Conv2dNormActivation without activation
        proj = block.proj
        skip = Site(join(name, "proj"), "output") if proj is not None else Site(name, "input")
        steps = [module_step(m, type(m).__name__.lower()) for m in list(c)[1:]]
        steps += [add_skip(name="+proj(x)" if proj is not None else "+skip"), module_step(block.activation, "activation")]
        yield _layer(name, "f.c.0", c[0], steps, skip, "regnet")


def resnetv2_block_rule(name: str, block: nn.Module) -> Iterator[EditableLayer]:
    """The last conv of a timm ResNetV2 block."""
    origin = "timm.models.resnetv2"
    down = getattr(block, "downsample", None)
    skip = Site(join(name, "downsample"), "output") if down is not None else Site(name, "input")
    if class_from(block, origin, "PreActBasic", "PreActBottleneck"):
        path = "conv3" if hasattr(block, "conv3") else "conv2"
        steps = [module_step(block.drop_path, "drop_path"), add_skip(name="+shortcut")]
        yield _layer(name, path, getattr(block, path), steps, skip, "resnetv2")
    elif class_from(block, origin, "Bottleneck"):
        steps = [
            module_step(block.norm3, "norm3"),
            module_step(block.drop_path, "drop_path"),
            add_skip(name="+shortcut"),
            module_step(block.act3, "act3"),
        ]
        yield _layer(name, "conv3", block.conv3, steps, skip, "resnetv2")


@register_adapter
class RegNetAdapter(Adapter):
    """timm and torchvision ``RegNet`` models (RegNetX, RegNetY, RegNetZ in timm)."""

    family = "regnet"
    priority = 20
    # breadth sweep: a quarter of the depth (timm RegNetY-200MF held-out 0.11, torchvision RegNetY-400MF
    # 0.04) beats the last stage (0.21, 0.30)
    preference = (("conv", 0.25), ("conv", 0.5), ("conv", 1.0))
    rules = (regnet_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_from(model, "timm.models.regnet", "RegNet") or class_from(
            model, "torchvision.models.regnet", "RegNet"
        )


@register_adapter
class ResNetV2Adapter(Adapter):
    """timm ``ResNetV2`` models (pre-activation ResNets, BiT)."""

    family = "resnetv2"
    priority = 20
    # breadth sweep: ResNetV2-50 held-out 0.75 at a quarter depth, 1.00 at the last block
    preference = (("conv", 0.25), ("conv", 0.5), ("conv", 1.0))
    rules = (resnetv2_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_from(model, "timm.models.resnetv2", "ResNetV2")
