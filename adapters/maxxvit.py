"""MaxViT / CoAtNet (timm ``maxxvit``): MBConv, ConvNeXt, 2-D transformer and partition-attention blocks.

Every block's last conv/linear is valued after its residual add:

- ``MbConvBlock.conv3_1x1``: ``drop_path(conv3_1x1(k)) + shortcut(x)``, the block output;
- ``ConvNeXtBlock.mlp.fc2``: ``drop_path(ls(fc2(k)) [permuted to NCHW]) + shortcut(x)``;
- ``TransformerBlock2d`` (CoAtNet, NCHW): ``attn.proj`` (a 1x1 conv) at ``shortcut(x) + ls1(...)``,
  ``mlp.fc2`` at the block output;
- ``PartitionAttentionCl`` (NHWC) / ``PartitionAttention2d`` (NCHW), the window and grid attention of
  MaxViT: ``attn.proj`` is read functionally (the partitioned attention rerun with the projection
  set to the identity returns its input un-partitioned), so keys are spatial maps; ``mlp.fc2`` at
  the block output.

Layers that see partitioned windows (``qkv``) are listed with a flat layout; relative-position MLPs
read constant coordinates and are not listed.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site, call_with_identity
from surgery.layout import Layout

from ._base import Adapter, NotEditable, class_from, join, plain_layer
from ._registry import register_adapter
from ._residual import add_skip, branch_layer, module_step, permute_step

__all__ = ["MaxxVitAdapter", "maxxvit_block_rule"]

_FAMILY = "maxxvit"
_ORIGIN = "timm.models.maxxvit"
_NCHW, _NHWC = Layout("nchw"), Layout("nhwc")
_Found = Iterator["EditableLayer | NotEditable"]


def _shortcut(name: str) -> Site:
    return Site(join(name, "shortcut"), "output")


def _partition_attention(name: str, block: nn.Module, layout: Layout) -> _Found:
    attn, mlp = block.attn, block.mlp
    if isinstance(getattr(attn, "qkv", None), (nn.Linear, nn.Conv2d)):
        yield plain_layer(join(name, "attn.qkv"), attn.qkv, family=_FAMILY, layout=Layout("flat"))

    def derive(blk: nn.Module, args: tuple, kwargs: dict):
        x = args[0] if args else next(iter(kwargs.values()))
        return call_with_identity(blk, "attn.proj", lambda t: blk._partition_attn(blk.norm1(t)), x)

    yield branch_layer(
        name,
        "attn.proj",
        attn.proj,
        key_site=Site(name, "call", derive=derive, what="partitioned attention with proj = I"),
        steps=[module_step(block.ls1, "ls1"), module_step(block.drop_path1, "drop_path1"), add_skip()],
        value_site=Site(join(name, "norm2"), "input"),
        context_sites={"skip": Site(name, "input")},
        family=_FAMILY,
        key_layout=layout,
        value_layout=layout,
        extra_eval=(getattr(attn, "proj_drop", None), getattr(attn, "attn_drop", None)),
    )
    yield branch_layer(
        name,
        "mlp.fc2",
        mlp.fc2,
        steps=[
            module_step(getattr(mlp, "drop2", None), "drop2"),
            module_step(block.ls2, "ls2"),
            module_step(block.drop_path2, "drop_path2"),
            add_skip(),
        ],
        value_site=Site(name, "output"),
        context_sites={"skip": Site(join(name, "norm2"), "input")},
        family=_FAMILY,
        key_layout=layout,
        value_layout=layout,
    )


def maxxvit_block_rule(name: str, block: nn.Module) -> _Found:
    """The last conv/linear of each residual branch of a timm MaxxVit model's blocks."""
    if class_from(block, "timm.layers.pos_embed_rel", "RelPosMlp"):
        for child, m in block.named_modules():
            if isinstance(m, nn.Linear):
                yield NotEditable(join(name, child), "reads constant relative coordinates")
    elif class_from(block, _ORIGIN, "MbConvBlock"):
        yield branch_layer(
            name,
            "conv3_1x1",
            block.conv3_1x1,
            steps=[module_step(block.drop_path, "drop_path"), add_skip(name="+shortcut")],
            value_site=Site(name, "output"),
            context_sites={"skip": _shortcut(name)},
            family=_FAMILY,
            key_layout=_NCHW,
            value_layout=_NCHW,
        )
    elif class_from(block, _ORIGIN, "ConvNeXtBlock"):
        mlp = block.mlp
        tokens = not block.use_conv_mlp
        yield branch_layer(
            name,
            "mlp.fc2",
            mlp.fc2,
            steps=[
                module_step(getattr(mlp, "drop2", None), "drop2"),
                module_step(block.ls, "ls"),
                permute_step(0, 3, 1, 2) if tokens else None,
                module_step(block.drop_path, "drop_path"),
                add_skip(name="+shortcut"),
            ],
            value_site=Site(name, "output"),
            context_sites={"skip": _shortcut(name)},
            family=_FAMILY,
            key_layout=_NHWC if tokens else _NCHW,
            value_layout=_NCHW,
        )
    elif class_from(block, _ORIGIN, "TransformerBlock2d"):
        attn, mlp = block.attn, block.mlp
        yield branch_layer(
            name,
            "attn.proj",
            attn.proj,
            steps=[
                module_step(getattr(attn, "proj_drop", None), "proj_drop"),
                module_step(block.ls1, "ls1"),
                module_step(block.drop_path1, "drop_path1"),
                add_skip(name="+shortcut"),
            ],
            value_site=Site(join(name, "norm2"), "input"),
            context_sites={"skip": _shortcut(name)},
            family=_FAMILY,
            key_layout=_NCHW,
            value_layout=_NCHW,
        )
        yield branch_layer(
            name,
            "mlp.fc2",
            mlp.fc2,
            steps=[
                module_step(getattr(mlp, "drop2", None), "drop2"),
                module_step(block.ls2, "ls2"),
                module_step(block.drop_path2, "drop_path2"),
                add_skip(),
            ],
            value_site=Site(name, "output"),
            context_sites={"skip": Site(join(name, "norm2"), "input")},
            family=_FAMILY,
            key_layout=_NCHW,
            value_layout=_NCHW,
        )
    elif class_from(block, _ORIGIN, "PartitionAttentionCl"):
        yield from _partition_attention(name, block, _NHWC)
    elif class_from(block, _ORIGIN, "PartitionAttention2d"):
        yield from _partition_attention(name, block, _NCHW)
    elif class_from(block, _ORIGIN, "ParallelPartitionAttention"):
        # window and grid attention side by side, each projecting half the channels: listed plain
        for part in ("attn_block", "attn_grid"):
            for child in ("qkv", "proj"):
                m = getattr(getattr(block, part), child, None)
                if isinstance(m, nn.Linear):
                    yield plain_layer(join(name, part, child), m, family=_FAMILY, layout=Layout("flat"))
        mlp = block.mlp
        yield branch_layer(
            name,
            "mlp.fc2",
            mlp.fc2,
            steps=[
                module_step(getattr(mlp, "drop2", None), "drop2"),
                module_step(block.ls2, "ls2"),
                module_step(block.drop_path2, "drop_path2"),
                add_skip(),
            ],
            value_site=Site(name, "output"),
            context_sites={"skip": Site(join(name, "norm2"), "input")},
            family=_FAMILY,
            key_layout=_NHWC,
            value_layout=_NHWC,
        )


@register_adapter
class MaxxVitAdapter(Adapter):
    """timm ``MaxxVit`` models (MaxViT, CoAtNet, MaxxViT)."""

    family = _FAMILY
    priority = 20
    # breadth sweep: CoAtNet's last attention output (held-out 0.61; its last MLP 0.68), MaxViT's
    # early MBConv (0.69) and last MLP (0.75) outputs
    preference = (("attn", 1.0), ("conv", 0.25), ("mlp", 1.0))
    rules = (maxxvit_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_from(model, _ORIGIN, "MaxxVit")
