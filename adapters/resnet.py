"""ResNet family: torchvision and timm BasicBlock / Bottleneck (and open_clip's, via ``clip``).

The edited weight is the block's last conv (``conv2`` of a BasicBlock, ``conv3`` of a Bottleneck);
its value is the block output ``act(bn(conv(k)) [-> se] + identity)``, where the identity is the
``downsample`` output when the block has one and the block input otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from surgery.editable import EditableLayer, Site

from ._base import Adapter, class_from, join
from ._registry import register_adapter

__all__ = ["ResNetAdapter", "residual_block_rule"]

_BLOCK_ORIGINS = ("torchvision.models.resnet", "timm.models.resnet", "open_clip.modified_resnet")


def _is_residual_block(module: nn.Module) -> bool:
    return any(class_from(module, o, "BasicBlock", "Bottleneck") for o in _BLOCK_ORIGINS)


def residual_block_rule(name: str, block: nn.Module) -> Iterator[EditableLayer]:
    """The last conv of a torchvision / timm / open_clip residual block, valued at the block output."""
    if not _is_residual_block(block):
        return
    last = "3" if hasattr(block, "conv3") else "2"
    conv: nn.Conv2d = getattr(block, f"conv{last}")
    bn: nn.Module = getattr(block, f"bn{last}")
    # timm adds squeeze-excite and drop-path before the add; torchvision names its activation `relu`.
    extras = [getattr(block, a, None) for a in ("se", "drop_path")]
    extras = [m for m in extras if isinstance(m, nn.Module)]
    act: nn.Module = getattr(block, f"act{last}", None) or block.relu
    has_down = getattr(block, "downsample", None) is not None
    identity = Site(join(name, "downsample"), "output") if has_down else Site(name, "input")

    def post(x: torch.Tensor, context: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = bn(x)
        for m in extras:
            x = m(x)
        return act(x + context["identity"])

    conv_name = join(name, f"conv{last}")
    se = getattr(block, "se", None)
    has_se = isinstance(se, nn.Module) and not isinstance(se, nn.Identity)
    steps = ["conv", f"bn{last}", *(["se"] if has_se else []), "+identity", type(act).__name__.lower()]
    yield EditableLayer(
        name=conv_name,
        module=conv,
        kind="conv",
        key_site=Site(conv_name, "input"),
        value_site=Site(name, "output"),
        context_sites={"identity": identity},
        post=post,
        block=" -> ".join(steps),
        family="resnet",
        eval_modules=(bn, *extras, *((block.downsample,) if has_down else ())),
        channelwise=not has_se,  # squeeze-excite mixes channels through its global pooling
    )


@register_adapter
class ResNetAdapter(Adapter):
    """torchvision and timm ``ResNet`` models."""

    family = "resnet"
    priority = 20
    rules = (residual_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_from(model, "torchvision.models.resnet", "ResNet") or class_from(
            model, "timm.models.resnet", "ResNet"
        )
