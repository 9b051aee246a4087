"""ConvNeXt (timm): ``mlp.fc2`` is valued at the end of the residual branch, after layer-scale ``gamma``.

timm's block runs its MLP on channels-last tokens ``(N, H, W, C)`` (``fc2`` is a Linear) or, with
``conv_mlp``, on NCHW maps (``fc2`` is a 1x1 conv). Either way the value is the branch output in NCHW,
read at the input of ``drop_path``, just before the add.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from surgery.editable import EditableLayer, Site

from ._base import class_from, join

__all__ = ["convnext_block_rule"]


def convnext_block_rule(name: str, block: nn.Module) -> Iterator[EditableLayer]:
    """``mlp.fc2`` of a timm ``ConvNeXtBlock``."""
    if not class_from(block, "timm.models.convnext", "ConvNeXtBlock"):
        return
    fc2 = block.mlp.fc2
    tokens = not block.use_conv_mlp
    drop = getattr(block.mlp, "drop2", None)
    gamma = block.gamma

    def post(x: torch.Tensor, context: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if drop is not None:
            x = drop(x)
        if tokens:
            x = x.permute(0, 3, 1, 2)
        if gamma is not None:
            x = x.mul(gamma.reshape(1, -1, 1, 1))
        return x

    fc2_name = join(name, "mlp", "fc2")
    steps = ["linear" if tokens else "conv", *(("permute",) if tokens else ()), *(("gamma",) if gamma is not None else ())]
    yield EditableLayer(
        name=fc2_name,
        module=fc2,
        kind="linear" if tokens else "conv",
        key_site=Site(fc2_name, "input"),
        value_site=Site(join(name, "drop_path"), "input"),
        post=post,
        block=" -> ".join(steps),
        family="convnext",
        key_channel_dim=-1 if tokens else 1,
        value_channel_dim=1,
        eval_modules=(drop,) if drop is not None else (),
    )
