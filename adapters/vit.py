"""Vision transformers (timm ``Block``): ``attn.proj`` and ``mlp.fc2`` valued after layer-scale.

Values are the residual branch output ``ls(drop(proj(k)))`` just before the add, on tokens
``(N, L, C)``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site

from ._base import chain, class_from, join

__all__ = ["vit_block_rule"]

_VIT_ORIGINS = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.eva")


def vit_block_rule(name: str, block: nn.Module) -> Iterator[EditableLayer]:
    """``attn.proj`` and ``mlp.fc2`` of a timm transformer ``Block`` with ``ls1``/``ls2``."""
    if not any(class_from(block, o, "Block") for o in _VIT_ORIGINS):
        return
    if not all(hasattr(block, a) for a in ("attn", "mlp", "ls1", "ls2")):
        return
    branches = (
        ("attn", "proj", getattr(block.attn, "proj_drop", None), "ls1"),
        ("mlp", "fc2", getattr(block.mlp, "drop2", None), "ls2"),
    )
    for parent, child, drop, ls_name in branches:
        module = getattr(getattr(block, parent), child, None)
        if not isinstance(module, nn.Linear):
            continue
        ls = getattr(block, ls_name)
        layer_name = join(name, parent, child)
        yield EditableLayer(
            name=layer_name,
            module=module,
            kind="linear",
            key_site=Site(layer_name, "input"),
            value_site=Site(join(name, ls_name), "output"),
            post=chain(drop, ls),
            block="linear -> layer-scale" if not isinstance(ls, nn.Identity) else "linear",
            family="vit",
            key_channel_dim=-1,
            value_channel_dim=-1,
            eval_modules=tuple(m for m in (drop, ls) if m is not None),
        )
