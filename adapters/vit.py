"""Vision transformers: timm ViT/DeiT (``Block``, ``ResPostBlock``), EVA, CaiT, BEiT, torchvision ViT
(``EncoderBlock``) and open_clip's ``ResidualAttentionBlock``.

Each block has two residual branches; both last linears are editable, valued after their add:

- the attention output projection: ``x + drop_path(ls1(proj(k)))``, the intermediate stream (timm ViT:
  the input of ``norm2``), with the block input as the skip;
- the MLP's last linear (``mlp.fc2``, ``mlp.c_proj``, torchvision ``mlp.3``): the block output
  ``x + drop_path(ls2(fc2(k)))``, with the intermediate stream as the skip.

Post-norm blocks (``ResPostBlock``, ``EvaBlockPostNorm``) apply a LayerNorm to the branch before the
add, which mixes channels: they are valued the same way and marked not channelwise.

``nn.MultiheadAttention`` (torchvision ViT, open_clip) computes its ``out_proj`` through
``F.multi_head_attention_forward`` on the weight, so that module never runs: its keys are read
functionally, by rerunning the block's attention with ``out_proj`` set to the identity (a ``"call"``
site on the block). EVA/BEiT ``attn.qkv`` layers used through ``F.linear`` with separate q/v biases
are not listed.

Keys and values are tokens ``(N, L, C)``; the number of prefix (class/register/distillation) tokens is
the model's (``num_prefix_tokens``; 1 for torchvision and open_clip ViTs), except in CaiT, whose patch
blocks see no class token and whose class-attention blocks see only it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site, call_with_identity
from surgery.layout import Layout

from ._base import Adapter, NotEditable, class_from, join, plain_layer
from ._registry import register_adapter
from ._residual import add_skip, branch_layer, module_step, scale_step

__all__ = ["ViTAdapter", "vit_block_rule", "clip_vit_block_rule", "TOKENS"]

TOKENS = Layout("tokens")  # prefix filled in by the adapter from the model
_FAMILY = "vit"
_Found = Iterator["EditableLayer | NotEditable"]


def _input(name: str) -> Site:
    return Site(name, "input")


def _functional_qkv(name: str, attn: nn.Module) -> _Found:
    """EVA/BEiT-style attention that calls ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``."""
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear) and getattr(attn, "q_bias", None) is not None:
        if not getattr(attn, "qkv_bias_separate", False):
            yield NotEditable(join(name, "attn.qkv"), "used through F.linear with separate q/v biases")


def _pre_norm_block(
    name: str,
    block: nn.Module,
    *,
    gamma1: object = None,
    gamma2: object = None,
    ls1: str | None = "ls1",
    ls2: str | None = "ls2",
    drop1: str = "drop_path1",
    drop2: str = "drop_path2",
    layout: Layout = TOKENS,
) -> _Found:
    """``x = x + dp1(ls1(attn(norm1(x)))); x = x + dp2(ls2(mlp(norm2(x))))`` with ``attn.proj`` and
    ``mlp.fc2`` Linear (timm ViT ``Block``, EVA ``EvaBlock``, BEiT ``Block``, CaiT ``LayerScaleBlock``).

    Layer-scale is a module (``ls1``/``ls2``) or a raw parameter (``gamma1``/``gamma2``, BEiT/EVA/CaiT).
    """
    attn, mlp = block.attn, block.mlp
    proj = getattr(attn, "proj", None)
    if isinstance(proj, nn.Linear):
        yield branch_layer(
            name,
            "attn.proj",
            proj,
            steps=[
                module_step(getattr(attn, "proj_drop", None), "proj_drop"),
                module_step(getattr(block, ls1, None), ls1) if ls1 else scale_step(gamma1, "gamma_1"),  # type: ignore[arg-type]
                module_step(getattr(block, drop1, None), drop1),
                add_skip(),
            ],
            value_site=_input(join(name, "norm2")),
            context_sites={"skip": _input(name)},
            family=_FAMILY,
            key_layout=layout,
            value_layout=layout,
        )
    fc2 = getattr(mlp, "fc2", None)
    if isinstance(fc2, nn.Linear):
        yield branch_layer(
            name,
            "mlp.fc2",
            fc2,
            steps=[
                module_step(getattr(mlp, "drop2", None), "drop2"),
                module_step(getattr(block, ls2, None), ls2) if ls2 else scale_step(gamma2, "gamma_2"),  # type: ignore[arg-type]
                module_step(getattr(block, drop2, None), drop2),
                add_skip(),
            ],
            value_site=Site(name, "output"),
            context_sites={"skip": _input(join(name, "norm2"))},
            family=_FAMILY,
            key_layout=layout,
            value_layout=layout,
        )


def _post_norm_block(name: str, block: nn.Module) -> _Found:
    """``x = x + dp1(norm1(attn(x))); x = x + dp2(norm2(mlp(x)))`` (timm ``ResPostBlock``,
    ``EvaBlockPostNorm``): the LayerNorm on the branch mixes channels."""
    attn, mlp = block.attn, block.mlp
    proj = getattr(attn, "proj", None)
    if isinstance(proj, nn.Linear):
        yield branch_layer(
            name,
            "attn.proj",
            proj,
            steps=[
                module_step(getattr(attn, "proj_drop", None), "proj_drop"),
                module_step(block.norm1, "norm1", channelwise=False),
                module_step(block.drop_path1, "drop_path1"),
                add_skip(),
            ],
            value_site=_input(join(name, "mlp")),
            context_sites={"skip": _input(name)},
            family=_FAMILY,
            key_layout=TOKENS,
            value_layout=TOKENS,
        )
    fc2 = getattr(mlp, "fc2", None)
    if isinstance(fc2, nn.Linear):
        yield branch_layer(
            name,
            "mlp.fc2",
            fc2,
            steps=[
                module_step(getattr(mlp, "drop2", None), "drop2"),
                module_step(block.norm2, "norm2", channelwise=False),
                module_step(block.drop_path2, "drop_path2"),
                add_skip(),
            ],
            value_site=Site(name, "output"),
            context_sites={"skip": _input(join(name, "mlp"))},
            family=_FAMILY,
            key_layout=TOKENS,
            value_layout=TOKENS,
        )


def _cait_class_block(name: str, block: nn.Module) -> _Found:
    """CaiT ``LayerScaleBlockClassAttn.forward(x, x_cls)``: only the class token is updated."""
    cls_only = Layout("tokens", prefix=1)
    x_cls = Site(name, "call", derive=lambda m, args, kwargs: args[1] if len(args) > 1 else kwargs["x_cls"], what="x_cls")
    attn, mlp = block.attn, block.mlp
    yield branch_layer(
        name,
        "attn.proj",
        attn.proj,
        steps=[
            module_step(getattr(attn, "proj_drop", None), "proj_drop"),
            scale_step(block.gamma_1, "gamma_1"),
            module_step(block.drop_path, "drop_path"),
            add_skip(name="+x_cls"),
        ],
        value_site=_input(join(name, "norm2")),
        context_sites={"skip": x_cls},
        family=_FAMILY,
        key_layout=cls_only,
        value_layout=cls_only,
    )
    yield branch_layer(
        name,
        "mlp.fc2",
        mlp.fc2,
        steps=[
            module_step(getattr(mlp, "drop2", None), "drop2"),
            scale_step(block.gamma_2, "gamma_2"),
            module_step(block.drop_path, "drop_path"),
            add_skip(),
        ],
        value_site=Site(name, "output"),
        context_sites={"skip": _input(join(name, "norm2"))},
        family=_FAMILY,
        key_layout=cls_only,
        value_layout=cls_only,
    )
    # the class token attends to [cls, patches]: k and v see both, q only the class token (2-D)
    for child in ("k", "v"):
        yield plain_layer(join(name, "attn", child), getattr(attn, child), family=_FAMILY, layout=Layout("tokens", prefix=1))
    yield plain_layer(join(name, "mlp.fc1"), mlp.fc1, family=_FAMILY, layout=cls_only)


def _cait_patch_extras(name: str, block: nn.Module) -> _Found:
    """CaiT patch blocks see no class token; talking-heads projections mix heads, not positions."""
    no_prefix = Layout("tokens", prefix=0)
    attn = block.attn
    for child in ("qkv",):
        if isinstance(getattr(attn, child, None), nn.Linear):
            yield plain_layer(join(name, "attn", child), getattr(attn, child), family=_FAMILY, layout=no_prefix)
    for child in ("proj_l", "proj_w"):
        if isinstance(getattr(attn, child, None), nn.Linear):
            yield plain_layer(join(name, "attn", child), getattr(attn, child), family=_FAMILY, layout=Layout("flat"))
    yield plain_layer(join(name, "mlp.fc1"), block.mlp.fc1, family=_FAMILY, layout=no_prefix)


def _torchvision_encoder_block(name: str, block: nn.Module) -> _Found:
    """torchvision ``EncoderBlock``: ``x = dropout(mha(ln_1(input))) + input; out = x + mlp(ln_2(x))``."""

    def attention_input(blk: nn.Module, args: tuple, kwargs: dict):
        x = args[0] if args else kwargs["input"]
        y = blk.ln_1(x)
        return call_with_identity(
            blk, "self_attention.out_proj", lambda t: blk.self_attention(t, t, t, need_weights=False)[0], y
        )

    mha = block.self_attention
    layout = TOKENS if getattr(mha, "batch_first", False) else Layout("flat")
    yield branch_layer(
        name,
        "self_attention.out_proj",
        mha.out_proj,
        kind="linear",
        key_site=Site(name, "call", derive=attention_input, what="self_attention with out_proj = I"),
        steps=[module_step(block.dropout, "dropout"), add_skip()],
        value_site=_input(join(name, "ln_2")),
        context_sites={"skip": _input(name)},
        family=_FAMILY,
        key_layout=layout,
        value_layout=layout,
        extra_eval=(mha,),
    )
    mlp = block.mlp
    yield branch_layer(
        name,
        "mlp.3",
        mlp[3],
        steps=[module_step(mlp[4], "dropout"), add_skip()],
        value_site=Site(name, "output"),
        context_sites={"skip": _input(join(name, "ln_2"))},
        family=_FAMILY,
        key_layout=layout,
        value_layout=layout,
    )


def vit_block_rule(name: str, block: nn.Module) -> _Found:
    """The attention output projection and MLP output of timm / torchvision transformer blocks."""
    if class_from(block, "timm.models.vision_transformer", "Block"):
        if all(hasattr(block, a) for a in ("attn", "mlp", "ls1", "ls2")):
            yield from _pre_norm_block(name, block)
    elif class_from(block, "timm.models.vision_transformer", "ResPostBlock"):
        yield from _post_norm_block(name, block)
    elif class_from(block, "timm.models.eva", "EvaBlock"):
        yield from _functional_qkv(name, block.attn)
        yield from _pre_norm_block(
            name, block, gamma1=block.gamma_1, gamma2=block.gamma_2, ls1=None, ls2=None
        )
    elif class_from(block, "timm.models.eva", "EvaBlockPostNorm"):
        yield from _functional_qkv(name, block.attn)
        yield from _post_norm_block(name, block)
    elif class_from(block, "timm.models.beit", "Block"):
        yield from _functional_qkv(name, block.attn)
        yield from _pre_norm_block(
            name, block, gamma1=block.gamma_1, gamma2=block.gamma_2, ls1=None, ls2=None
        )
    elif class_from(block, "timm.models.cait", "LayerScaleBlock"):
        yield from _cait_patch_extras(name, block)
        yield from _pre_norm_block(
            name,
            block,
            gamma1=block.gamma_1,
            gamma2=block.gamma_2,
            ls1=None,
            ls2=None,
            drop1="drop_path",
            drop2="drop_path",
            layout=Layout("tokens", prefix=0),
        )
    elif class_from(block, "timm.models.cait", "LayerScaleBlockClassAttn"):
        yield from _cait_class_block(name, block)
    elif class_from(block, "torchvision.models.vision_transformer", "EncoderBlock"):
        yield from _torchvision_encoder_block(name, block)


def clip_vit_block_rule(name: str, block: nn.Module) -> _Found:
    """open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) and
    ``CustomResidualAttentionBlock`` (its own ``Attention`` with an ``out_proj`` module)."""
    if class_from(block, "open_clip.transformer", "ResidualAttentionBlock"):
        if hasattr(block, "ln_1_kv"):  # cross-attention: keys and values from another stream
            return
        mha = block.attn

        def attention_input(blk: nn.Module, args: tuple, kwargs: dict):
            x = args[0] if args else kwargs["q_x"]
            mask = kwargs.get("attn_mask")
            return call_with_identity(
                blk, "attn.out_proj", lambda t: blk.attention(q_x=blk.ln_1(t), attn_mask=mask), x
            )

        layout = TOKENS if getattr(mha, "batch_first", False) else Layout("flat")
        yield branch_layer(
            name,
            "attn.out_proj",
            mha.out_proj,
            kind="linear",
            key_site=Site(name, "call", derive=attention_input, what="attention with out_proj = I"),
            steps=[module_step(block.ls_1, "ls_1"), add_skip()],
            value_site=_input(join(name, "ln_2")),
            context_sites={"skip": _input(name)},
            family="clip",
            key_layout=layout,
            value_layout=layout,
            extra_eval=(mha,),
        )
    elif class_from(block, "open_clip.transformer", "CustomResidualAttentionBlock"):
        attn = block.attn
        yield branch_layer(
            name,
            "attn.out_proj",
            attn.out_proj,
            steps=[
                module_step(getattr(attn, "out_drop", None), "out_drop"),
                module_step(block.ln_attn, "ln_attn", channelwise=False),
                module_step(block.ls_1, "ls_1"),
                add_skip(),
            ],
            value_site=_input(join(name, "ln_2")),
            context_sites={"skip": _input(name)},
            family="clip",
            key_layout=TOKENS,
            value_layout=TOKENS,
        )
        layout = TOKENS
    else:
        return
    yield branch_layer(
        name,
        "mlp.c_proj",
        block.mlp.c_proj,
        steps=[module_step(block.ls_2, "ls_2"), add_skip()],
        value_site=Site(name, "output"),
        context_sites={"skip": _input(join(name, "ln_2"))},
        family="clip",
        key_layout=layout,
        value_layout=layout,
    )


_MODELS = (
    ("timm.models.vision_transformer", "VisionTransformer"),
    ("timm.models.deit", "VisionTransformerDistilled"),
    ("timm.models.eva", "Eva"),
    ("timm.models.cait", "Cait"),
    ("timm.models.beit", "Beit"),
    ("torchvision.models.vision_transformer", "VisionTransformer"),
)


@register_adapter
class ViTAdapter(Adapter):
    """timm ViT / DeiT / EVA / CaiT / BEiT and torchvision ``VisionTransformer`` models."""

    family = _FAMILY
    priority = 20
    # breadth sweep (random weights, class-token heads with prefix_weight="auto"): MLP outputs move the
    # held-out logits further than attention outputs (vit_tiny 0.70 vs 0.77, DeiT 0.72 vs 0.73, EVA-02
    # 0.57 vs 0.99, a GAP ViT 0.48 vs 0.94); depth matters little, the last block slightly best
    preference = (("mlp", 1.0), ("mlp", 0.25), ("attn", 1.0))
    rules = (vit_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(class_from(model, origin, name) for origin, name in _MODELS)
