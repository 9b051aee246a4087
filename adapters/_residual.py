"""Building blocks for layers valued after a residual add (DESIGN.md section 3, "The layer block").

The last conv/linear of a residual branch is valued at the block output *after* the add, as the paper
does (its Appendix A.4: a rewrite inside a residual block is attenuated or cancelled by the skip, so
the skip belongs in the value). Its block is a list of :class:`Step` objects applied to the edited
layer's output: the rest of the branch (BN/norm, layer-scale, drop-path in eval, permutes), the add of
the skip tensor (a context tensor captured from the transformed image, like ResNet's identity), and
whatever follows the add inside the block (an activation, a reshape). :func:`branch_layer` turns them
into an :class:`EditableLayer` whose ``block`` string names every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.editable import EditableLayer, Site
from surgery.layout import Layout

from ._base import join

__all__ = [
    "Step",
    "module_step",
    "scale_step",
    "add_skip",
    "permute_step",
    "flatten_tokens",
    "reshape_like",
    "transpose_step",
    "branch_layer",
]

Ctx = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Step:
    """One operation of a block tail: ``fn(x, context) -> x``, a name for the block description, and
    the modules whose train/eval mode matters."""

    fn: Callable[[torch.Tensor, Ctx], torch.Tensor]
    name: str
    modules: tuple[nn.Module, ...] = field(default=())
    channelwise: bool = True


def _is_identity(m: object) -> bool:
    """``None``, ``nn.Identity`` and dropout with ``p == 0`` (the identity in any mode)."""
    if isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0:
        return True
    return m is None or isinstance(m, nn.Identity)


def module_step(module: nn.Module | None, name: str, *, channelwise: bool = True) -> Step | None:
    """Apply ``module`` (``None`` and ``nn.Identity`` give no step)."""
    if _is_identity(module):
        return None
    assert module is not None
    return Step(lambda x, ctx: module(x), name, (module,), channelwise)


def scale_step(param: torch.Tensor | None, name: str, shape: Sequence[int] | None = None) -> Step | None:
    """Multiply by a per-channel parameter (a layer-scale ``gamma``), reshaped to ``shape`` if given."""
    if param is None:
        return None
    if shape is None:
        return Step(lambda x, ctx: x * param, name)
    return Step(lambda x, ctx: x * param.reshape(tuple(shape)), name)


def add_skip(
    key: str = "skip", name: str = "+skip", transform: nn.Module | None = None
) -> Step:
    """Add the context tensor ``key`` (through ``transform``, e.g. MetaFormer's res-scale, if given)."""
    if _is_identity(transform):
        return Step(lambda x, ctx: x + ctx[key], name)
    assert transform is not None
    return Step(lambda x, ctx: x + transform(ctx[key]), name, (transform,))


def permute_step(*dims: int) -> Step:
    """``x.permute(*dims)``."""
    return Step(lambda x, ctx: x.permute(*dims), "permute")


def transpose_step(a: int, b: int) -> Step:
    """``x.transpose(a, b)``."""
    return Step(lambda x, ctx: x.transpose(a, b), "transpose")


def flatten_tokens() -> Step:
    """``(N, H, W, C) -> (N, H*W, C)``."""
    return Step(lambda x, ctx: x.flatten(1, 2), "reshape")


def reshape_like(key: str) -> Step:
    """Reshape to the shape of the context tensor ``key`` (``(N, H*W, C) -> (N, H, W, C)``)."""
    return Step(lambda x, ctx: x.reshape(ctx[key].shape), "reshape")


def branch_layer(
    block_name: str,
    layer_path: str,
    module: nn.Module,
    *,
    steps: Sequence[Step | None],
    value_site: Site,
    context_sites: Mapping[str, Site],
    family: str,
    key_layout: Layout,
    value_layout: Layout,
    key_site: Site | None = None,
    kind: str | None = None,
    channelwise: bool = True,
    extra_eval: Sequence[nn.Module | None] = (),
) -> EditableLayer:
    """An editable layer for ``join(block_name, layer_path)`` whose block is ``steps``.

    ``key_site`` defaults to the module's input. ``channelwise`` is ANDed with every step's own flag.
    ``extra_eval`` are modules that run between the layer and the value but are not steps (dropout
    inside a functionally read attention); they must be in eval mode too.
    """
    live = [s for s in steps if s is not None]
    name = join(block_name, layer_path)

    def post(x: torch.Tensor, context: Ctx) -> torch.Tensor:
        for step in live:
            x = step.fn(x, context)
        return x

    if kind is None:
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
    modules: list[nn.Module] = []
    for s in live:
        modules.extend(s.modules)
    modules.extend(m for m in extra_eval if m is not None and not isinstance(m, nn.Identity))
    return EditableLayer(
        name=name,
        module=module,
        kind=kind,  # type: ignore[arg-type]
        key_site=key_site or Site(name, "input"),
        value_site=value_site,
        context_sites=dict(context_sites),
        post=post,
        block=" -> ".join([kind, *(s.name for s in live)]),
        family=family,
        eval_modules=tuple(dict.fromkeys(modules)),
        channelwise=channelwise and all(s.channelwise for s in live),
        key_layout=key_layout,
        value_layout=value_layout,
    )
