"""MLP-Mixer, ResMLP and gMLP (timm ``mlp_mixer``).

Tokens are ``(N, L, C)`` without a class token. Each block's last linears are valued after their adds:

- the channel MLP (``mlp_channels.fc2``): the block output ``x + drop_path([ls2 *] fc2(k))``;
- the token-mixing MLP of ``MixerBlock`` (``mlp_tokens.fc2``) and ResMLP's ``linear_tokens``: they
  act on the transposed ``(N, C, L)`` stream, so their output channels are *tokens*: the value is
  the intermediate stream ``x + drop_path([ls1 *] fc(k)^T)`` ``(N, L, C)``, whose axis 1 their
  output channels index (``value_layout.channel_dim = 1``). Their keys are per channel, not per
  position, so masks weigh only their loss, not their direction.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from surgery.editable import EditableLayer, Site
from surgery.layout import Layout

from ._base import Adapter, NotEditable, class_from, join, plain_layer
from ._registry import register_adapter
from ._residual import add_skip, branch_layer, module_step, scale_step, transpose_step

__all__ = ["MixerAdapter", "mixer_block_rule"]

_FAMILY = "mixer"
_ORIGIN = "timm.models.mlp_mixer"
_TOKENS = Layout("tokens", prefix=0)
_TOKEN_OUT = Layout("tokens", prefix=0, channel_dim=1)
_FLAT = Layout("flat")
_Found = Iterator["EditableLayer | NotEditable"]


def _channel_mlp(name: str, block: nn.Module, skip: Site, ls: object = None) -> EditableLayer:
    mlp = block.mlp_channels
    return branch_layer(
        name,
        "mlp_channels.fc2",
        mlp.fc2,
        steps=[
            module_step(getattr(mlp, "drop2", None), "drop2"),
            scale_step(ls, "ls2"),  # type: ignore[arg-type]
            module_step(block.drop_path, "drop_path"),
            add_skip(),
        ],
        value_site=Site(name, "output"),
        context_sites={"skip": skip},
        family=_FAMILY,
        key_layout=_TOKENS,
        value_layout=_TOKENS,
    )


def mixer_block_rule(name: str, block: nn.Module) -> _Found:
    """Mixer ``MixerBlock``, ResMLP ``ResBlock`` and gMLP ``SpatialGatingBlock``."""
    if class_from(block, _ORIGIN, "MixerBlock"):
        tok = block.mlp_tokens
        yield plain_layer(join(name, "mlp_tokens.fc1"), tok.fc1, family=_FAMILY, layout=_FLAT)
        yield branch_layer(
            name,
            "mlp_tokens.fc2",
            tok.fc2,
            steps=[
                module_step(getattr(tok, "drop2", None), "drop2"),
                transpose_step(1, 2),
                module_step(block.drop_path, "drop_path"),
                add_skip(),
            ],
            value_site=Site(join(name, "norm2"), "input"),
            context_sites={"skip": Site(name, "input")},
            family=_FAMILY,
            key_layout=_FLAT,
            value_layout=_TOKEN_OUT,
        )
        yield _channel_mlp(name, block, Site(join(name, "norm2"), "input"))
    elif class_from(block, _ORIGIN, "ResBlock"):
        yield branch_layer(
            name,
            "linear_tokens",
            block.linear_tokens,
            steps=[
                transpose_step(1, 2),
                scale_step(block.ls1, "ls1"),
                module_step(block.drop_path, "drop_path"),
                add_skip(),
            ],
            value_site=Site(join(name, "norm2"), "input"),
            context_sites={"skip": Site(name, "input")},
            family=_FAMILY,
            key_layout=_FLAT,
            value_layout=_TOKEN_OUT,
        )
        yield _channel_mlp(name, block, Site(join(name, "norm2"), "input"), ls=block.ls2)
    elif class_from(block, _ORIGIN, "SpatialGatingBlock"):
        gate = getattr(block.mlp_channels, "gate", None)
        if isinstance(getattr(gate, "proj", None), nn.Linear):
            yield plain_layer(join(name, "mlp_channels.gate.proj"), gate.proj, family=_FAMILY, layout=_FLAT)
        yield _channel_mlp(name, block, Site(name, "input"))


@register_adapter
class MixerAdapter(Adapter):
    """timm ``MlpMixer`` models (MLP-Mixer, ResMLP, gMLP)."""

    family = _FAMILY
    priority = 20
    # breadth sweep: channel MLP outputs, early (ResMLP 0.85 at a quarter depth vs 0.99 later; gMLP
    # 0.69; Mixer flat at 0.69-0.71)
    preference = (("mlp", 0.25), ("mlp", 1.0), ("mlp", 0.5))
    rules = (mixer_block_rule,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_from(model, _ORIGIN, "MlpMixer")
