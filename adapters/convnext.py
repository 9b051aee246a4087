"""ConvNeXt (timm v1 and v2, torchvision): the last pointwise layer of each block, valued after the add.

timm's ``ConvNeXtBlock`` runs its MLP on channels-last maps ``(N, H, W, C)`` (``mlp.fc2`` is a Linear)
or, with ``conv_mlp``, on NCHW maps (a 1x1 conv); v2's MLP has a global response norm before
``fc2`` (on the key side). The value is the block output
``drop_path(gamma * fc2(k) [permuted to NCHW]) + shortcut(x)``. torchvision's ``CNBlock`` edits
``block.5`` (a Linear on NHWC maps): ``stochastic_depth(layer_scale * permute(block.5(k))) + x``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site
from surgery.layout import Layout

from ._base import Adapter, class_from, join
from ._registry import register_adapter
from ._residual import add_skip, branch_layer, module_step, permute_step, scale_step

__all__ = ["ConvNeXtAdapter", "convnext_block_rule"]

_FAMILY = "convnext"


def convnext_block_rule(name: str, block: nn.Module) -> Iterator[EditableLayer]:
    """``mlp.fc2`` of a timm ``ConvNeXtBlock``; ``block.5`` of a torchvision ``CNBlock``."""
    if class_from(block, "timm.models.convnext", "ConvNeXtBlock"):
        mlp = block.mlp
        tokens = not block.use_conv_mlp
        yield branch_layer(
            name,
            "mlp.fc2",
            mlp.fc2,
            steps=[
                module_step(getattr(mlp, "drop2", None), "drop2"),
                permute_step(0, 3, 1, 2) if tokens else None,
                scale_step(block.gamma, "gamma", (1, -1, 1, 1)),
                module_step(block.drop_path, "drop_path"),
                add_skip(name="+shortcut"),
            ],
            value_site=Site(name, "output"),
            context_sites={"skip": Site(join(name, "shortcut"), "output")},
            family=_FAMILY,
            key_layout=Layout("nhwc") if tokens else Layout("nchw"),
            value_layout=Layout("nchw"),
        )
    elif class_from(block, "torchvision.models.convnext", "CNBlock"):
        seq = block.block
        yield branch_layer(
            name,
            "block.5",
            seq[5],
            steps=[
                module_step(seq[6], "permute"),
                scale_step(block.layer_scale, "layer_scale"),
                module_step(block.stochastic_depth, "stochastic_depth"),
                add_skip(),
            ],
            value_site=Site(name, "output"),
            context_sites={"skip": Site(name, "input")},
            family=_FAMILY,
            key_layout=Layout("nhwc"),
            value_layout=Layout("nchw"),
        )


@register_adapter
class ConvNeXtAdapter(Adapter):
    """timm ``ConvNeXt`` (v1, v2) and torchvision ``ConvNeXt`` models."""

    family = _FAMILY
    priority = 20
    # breadth protocol on skip-free sites (issue 26): the stage transitions (`downsample` convs) beat every
    # block's fc2 (held-out, middle / first / last transition: convnext_atto 0.79 / 0.88 / 0.85,
    # convnextv2_atto 0.85 / 0.87 / 0.93, torchvision tiny 0.84 / 0.88 / 0.93; fc2 at any depth 0.90-1.0)
    preference = (("skip-free", 0.5), ("skip-free", 0.0), ("skip-free", 1.0))
    rules = (convnext_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_from(model, "timm.models.convnext", "ConvNeXt") or class_from(
            model, "torchvision.models.convnext", "ConvNeXt"
        )
