"""Swin transformers: timm ``SwinTransformerBlock`` / ``SwinTransformerV2Block`` and torchvision
``SwinTransformerBlock`` / ``SwinTransformerBlockV2``.

Both residual branches' last linears are valued after their adds. The attention runs on shifted
windows; its output projection is read functionally: the block's windowed attention is rerun with
``attn.proj`` set to the identity, which returns the projection's input already un-windowed, as an
``(N, H, W, C)`` map (torchvision calls ``F.linear`` on ``proj.weight``, so its module never runs;
timm's runs, but its input is in window order). Keys are then spatial, and masks map onto them.

V1 blocks are pre-norm (``x + drop_path(attn(norm1(x)))``); V2 blocks are res-post-norm
(``x + drop_path(norm1(attn(x)))``): the LayerNorm on the branch mixes channels, so their layers are
not channelwise. The ``qkv`` projections are listed only where they run as modules (timm V1), with a
flat layout (their tokens are in window order); V2's continuous position-bias MLPs (``cpb_mlp``) read
constant coordinates, not the image, and are not listed. Patch merging's ``reduction`` is a skip-free
site between stages, with channels-last maps as keys and values.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site, call_with_identity
from surgery.layout import Layout

from ._base import Adapter, NotEditable, class_from, join, plain_layer
from ._registry import register_adapter
from ._residual import add_skip, branch_layer, flatten_tokens, module_step, reshape_like

__all__ = ["SwinAdapter", "swin_block_rule"]

_FAMILY = "swin"
_NHWC = Layout("nhwc")
_TOKENS = Layout("tokens", prefix=0)
_Found = Iterator["EditableLayer | NotEditable"]


def _attention_site(name: str, run, what: str) -> Site:
    def derive(blk: nn.Module, args: tuple, kwargs: dict):
        x = args[0] if args else next(iter(kwargs.values()))
        return call_with_identity(blk, "attn.proj", lambda t: run(blk, t), x)

    return Site(name, "call", derive=derive, what=what)


def _timm_block(name: str, block: nn.Module, v2: bool) -> _Found:
    attn, mlp = block.attn, block.mlp
    functional_qkv = getattr(attn, "q_bias", None) is not None and not getattr(attn, "qkv_bias_separate", False)
    if functional_qkv:
        yield NotEditable(join(name, "attn.qkv"), "used through F.linear with separate q/v biases")
    elif isinstance(getattr(attn, "qkv", None), nn.Linear):
        yield plain_layer(join(name, "attn.qkv"), attn.qkv, family=_FAMILY, layout=Layout("flat"))
    if isinstance(getattr(attn, "cpb_mlp", None), nn.Module):
        for i, m in enumerate(attn.cpb_mlp):
            if isinstance(m, nn.Linear):
                yield NotEditable(join(name, "attn.cpb_mlp", str(i)), "reads constant coordinates")
    run = (lambda b, t: b._attn(t)) if v2 else (lambda b, t: b._attn(b.norm1(t)))
    post_norm = [module_step(block.norm1, "norm1", channelwise=False)] if v2 else []
    yield branch_layer(
        name,
        "attn.proj",
        attn.proj,
        key_site=_attention_site(name, run, "windowed attention with proj = I"),
        steps=[*post_norm, module_step(block.drop_path1, "drop_path1"), add_skip(), flatten_tokens()],
        value_site=Site(join(name, "mlp") if v2 else join(name, "norm2"), "input"),
        context_sites={"skip": Site(name, "input")},
        family=_FAMILY,
        key_layout=_NHWC,
        value_layout=_TOKENS,
        extra_eval=(getattr(attn, "proj_drop", None), getattr(attn, "attn_drop", None)),
    )
    skip = Site(join(name, "mlp") if v2 else join(name, "norm2"), "input")
    post_norm2 = [module_step(block.norm2, "norm2", channelwise=False)] if v2 else []
    yield branch_layer(
        name,
        "mlp.fc2",
        mlp.fc2,
        steps=[
            module_step(getattr(mlp, "drop2", None), "drop2"),
            *post_norm2,
            module_step(block.drop_path2, "drop_path2"),
            add_skip(),
            reshape_like("block_input"),
        ],
        value_site=Site(name, "output"),
        context_sites={"skip": skip, "block_input": Site(name, "input")},
        family=_FAMILY,
        key_layout=_TOKENS,
        value_layout=_NHWC,
    )


def _torchvision_block(name: str, block: nn.Module, v2: bool) -> _Found:
    attn, mlp = block.attn, block.mlp
    yield NotEditable(join(name, "attn.qkv"), "used through F.linear in shifted_window_attention")
    if v2 and isinstance(getattr(attn, "cpb_mlp", None), nn.Module):
        for i, m in enumerate(attn.cpb_mlp):
            if isinstance(m, nn.Linear):
                yield NotEditable(join(name, "attn.cpb_mlp", str(i)), "reads constant coordinates")
    run = (lambda b, t: b.attn(t)) if v2 else (lambda b, t: b.attn(b.norm1(t)))
    post_norm = [module_step(block.norm1, "norm1", channelwise=False)] if v2 else []
    yield branch_layer(
        name,
        "attn.proj",
        attn.proj,
        key_site=_attention_site(name, run, "shifted_window_attention with proj = I"),
        steps=[*post_norm, module_step(block.stochastic_depth, "stochastic_depth"), add_skip()],
        value_site=Site(join(name, "mlp") if v2 else join(name, "norm2"), "input"),
        context_sites={"skip": Site(name, "input")},
        family=_FAMILY,
        key_layout=_NHWC,
        value_layout=_NHWC,
        extra_eval=(attn,),
    )
    # torchvision.ops.MLP: [Linear, GELU, Dropout, Linear, Dropout]
    linears = [i for i, m in enumerate(mlp) if isinstance(m, nn.Linear)]
    last = linears[-1]
    post_norm2 = [module_step(block.norm2, "norm2", channelwise=False)] if v2 else []
    tail = [module_step(m, type(m).__name__.lower()) for m in list(mlp)[last + 1 :]]
    yield branch_layer(
        name,
        f"mlp.{last}",
        mlp[last],
        steps=[*tail, *post_norm2, module_step(block.stochastic_depth, "stochastic_depth"), add_skip()],
        value_site=Site(name, "output"),
        context_sites={"skip": Site(join(name, "mlp") if v2 else join(name, "norm2"), "input")},
        family=_FAMILY,
        key_layout=_NHWC,
        value_layout=_NHWC,
    )


_PATCH_MERGING = (
    ("timm.models.swin_transformer", "PatchMerging"),
    ("timm.models.swin_transformer_v2", "PatchMerging"),
    ("torchvision.models.swin_transformer", "PatchMerging"),
    ("torchvision.models.swin_transformer", "PatchMergingV2"),
)


def swin_block_rule(name: str, block: nn.Module) -> _Found:
    """``attn.proj`` and the MLP output of timm / torchvision Swin blocks (v1 and v2), and the
    ``reduction`` of patch merging, a skip-free stage transition on ``(N, H/2, W/2, 4C)`` maps valued
    at its own output (V2 normalizes after it, across channels)."""
    if any(class_from(block, o, c) for o, c in _PATCH_MERGING):
        if isinstance(getattr(block, "reduction", None), nn.Linear):
            yield plain_layer(join(name, "reduction"), block.reduction, family=_FAMILY, layout=_NHWC)
    elif class_from(block, "timm.models.swin_transformer", "SwinTransformerBlock"):
        yield from _timm_block(name, block, v2=False)
    elif class_from(block, "timm.models.swin_transformer_v2", "SwinTransformerV2Block"):
        yield from _timm_block(name, block, v2=True)
    elif class_from(block, "torchvision.models.swin_transformer", "SwinTransformerBlockV2"):
        yield from _torchvision_block(name, block, v2=True)
    elif class_from(block, "torchvision.models.swin_transformer", "SwinTransformerBlock"):
        yield from _torchvision_block(name, block, v2=False)


@register_adapter
class SwinAdapter(Adapter):
    """timm ``SwinTransformer`` / ``SwinTransformerV2`` and torchvision ``SwinTransformer`` (v1, v2)."""

    family = _FAMILY
    priority = 20
    # breadth sweep: MLP outputs beat attention outputs, earlier stages best (timm Swin-T held-out
    # 0.76 at a quarter depth vs 0.83 last; torchvision Swin-T 0.80 vs 0.88; Swin-V2 0.88 vs 0.95); the
    # first patch merging is as good or better (issue 26: 0.79, 0.80, 0.82), the second close (0.77-0.87)
    preference = (("skip-free", 0.0), ("mlp", 0.25), ("skip-free", 0.5))
    rules = (swin_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            class_from(model, "timm.models.swin_transformer", "SwinTransformer")
            or class_from(model, "timm.models.swin_transformer_v2", "SwinTransformerV2")
            or class_from(model, "torchvision.models.swin_transformer", "SwinTransformer")
        )
