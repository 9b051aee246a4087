"""MetaFormer / PoolFormer / ConvFormer / CAFormer (timm ``metaformer``).

``MetaFormerBlock``: ``x = res_scale1(x) + layer_scale1(drop_path1(token_mixer(norm1(x))))``, then the
same with the MLP. Both branch ends are valued after their adds: the token mixer's last layer
(``SepConv.pwconv2`` of ConvFormer, ``Attention.proj`` of CAFormer; PoolFormer's pooling mixer has no
weights) at the intermediate stream, ``mlp.fc2`` at the block output. The skip goes through the
block's ``res_scale``. Stages run NCHW maps, except attention stages, which run ``(N, L, C)`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site
from surgery.layout import Layout

from ._base import Adapter, NotEditable, class_from, join
from ._registry import register_adapter
from ._residual import add_skip, branch_layer, module_step

__all__ = ["MetaFormerAdapter", "metaformer_block_rule"]

_FAMILY = "metaformer"
_ORIGIN = "timm.models.metaformer"
_Found = Iterator["EditableLayer | NotEditable"]


def metaformer_block_rule(name: str, block: nn.Module) -> _Found:
    """The token mixer's last layer and ``mlp.fc2`` of a timm ``MetaFormerBlock``."""
    if not class_from(block, _ORIGIN, "MetaFormerBlock"):
        return
    mixer, mlp = block.token_mixer, block.mlp
    tokens = class_from(mixer, _ORIGIN, "Attention")
    layout = Layout("tokens", prefix=0) if tokens else Layout("nchw")
    last = None
    if class_from(mixer, _ORIGIN, "SepConv"):
        last, drop = "pwconv2", None
    elif tokens:
        last, drop = "proj", getattr(mixer, "proj_drop", None)
    if last is not None:
        yield branch_layer(
            name,
            f"token_mixer.{last}",
            getattr(mixer, last),
            steps=[
                module_step(drop, "proj_drop"),
                module_step(block.drop_path1, "drop_path1"),
                module_step(block.layer_scale1, "layer_scale1"),
                add_skip(name="+res_scale1(skip)", transform=block.res_scale1),
            ],
            value_site=Site(join(name, "norm2"), "input"),
            context_sites={"skip": Site(name, "input")},
            family=_FAMILY,
            key_layout=layout,
            value_layout=layout,
        )
    yield branch_layer(
        name,
        "mlp.fc2",
        mlp.fc2,
        steps=[
            module_step(getattr(mlp, "drop2", None), "drop2"),
            module_step(block.drop_path2, "drop_path2"),
            module_step(block.layer_scale2, "layer_scale2"),
            add_skip(name="+res_scale2(skip)", transform=block.res_scale2),
        ],
        value_site=Site(name, "output"),
        context_sites={"skip": Site(join(name, "norm2"), "input")},
        family=_FAMILY,
        key_layout=layout,
        value_layout=layout,
    )


@register_adapter
class MetaFormerAdapter(Adapter):
    """timm ``MetaFormer`` models (PoolFormer v1/v2, ConvFormer, CAFormer)."""

    family = _FAMILY
    priority = 20
    # breadth sweep: MLP outputs of the early stages (ConvFormer held-out 0.80, CAFormer 0.86; token
    # mixer outputs 0.95-0.97); PoolFormer barely moves there (0.99-1.0), but does at the first stage
    # transition, a skip-free `downsample` conv (issue 26: PoolFormer 0.93, ConvFormer 0.81, CAFormer 0.87)
    preference = (("skip-free", 0.0), ("mlp", 0.25), ("mlp", 0.5))
    rules = (metaformer_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_from(model, _ORIGIN, "MetaFormer")
