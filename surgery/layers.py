"""Finding a model's editable layers, and describing them."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .editable import EditableLayer
from .errors import LayerNotFoundError
from .hooks import trace_dict

__all__ = ["editable_layers", "get_layer", "recommended_layers", "rank_layers", "LayerInfo", "describe_layers"]


def editable_layers(model: nn.Module) -> list[EditableLayer]:
    """Every editable layer of ``model``, found by the adapter of its family, in module order."""
    from surgery.adapters import get_adapter

    return get_adapter(model).layers(model)


def recommended_layers(
    model: nn.Module,
    k: int = 3,
    *,
    originals: torch.Tensor | None = None,
    transformed: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    pool: int = 12,
) -> list[EditableLayer]:
    """Where to edit ``model``: its ``k`` best candidate layers, best first.

    Candidates are layers valued after a residual add (or at a block end), ordered by the adapter
    (``Adapter.candidates``) as the breadth benchmark (``benchmarks/breadth.py --sweep``) measured for
    the family, or, for ResNets and VGGs, as the paper found on trained models (the deepest first).

    With exemplars (``originals`` and ``transformed`` image tensors, optionally ``masks``), the first
    ``pool`` candidates are measured instead on this model: :func:`rank_layers` edits each one and
    keeps those that move a left-out exemplar's logits furthest toward its original's.
    """
    from surgery.adapters import get_adapter

    if k < 1:
        raise LayerNotFoundError(f"k must be at least 1, got {k}")
    candidates = get_adapter(model).candidates(model)
    if originals is None and transformed is None:
        return candidates[:k]
    if originals is None or transformed is None:
        raise LayerNotFoundError("measured recommendations need both originals and transformed exemplars")
    ranked = rank_layers(model, originals, transformed, masks, layers=candidates[:pool])
    return [layer for layer, _ in ranked[:k]]


def rank_layers(
    model: nn.Module,
    originals: torch.Tensor,
    transformed: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    layers: Sequence[EditableLayer | str] | None = None,
) -> list[tuple[EditableLayer, float]]:
    """Edit each of ``layers`` on the exemplars and rank them by the logit distance they leave.

    For each layer a quick edit (``rewrite`` with L2 loss, a few solver iterations, and the
    exemplars' own key second moment plus a ridge in place of dataset statistics) is fitted on all
    exemplars but the last, and scored on the last: the mean logit distance between the transformed
    and the original image after the edit, divided by the distance before (lower is better; with one
    exemplar it is fitted and scored on the same one). Returns ``(layer, ratio)`` best first.

    This is a measurement on the user's model, not an attribution proxy: in the breadth benchmark
    the exemplars' logit ratio ranked layers like the held-out ratio better than the two scores
    computed before editing (gradient x activation at the value site, a masked value patch).
    """
    from surgery.apply import edited
    from surgery.direction import flatten_keys
    from surgery.rewrite import rewrite

    layers = [get_layer(model, l) for l in (layers if layers is not None else recommended_layers(model, k=12))]
    x, x2 = originals, transformed
    if x.shape != x2.shape or x.ndim != 4:
        raise LayerNotFoundError("originals and transformed must be image batches (N, 3, H, W) of one shape")
    n = x.shape[0]
    ntrain = max(1, n - 1)
    score = slice(ntrain, n) if n > 1 else slice(0, 1)
    with torch.no_grad():
        target = model(x[score]).float()
        before = (model(x2[score]).float() - target).norm(dim=-1).mean()
    ranked = []
    for layer in layers:
        keys = torch.cat([layer.capture(model, x2).keys, layer.capture(model, x).keys])
        k_rows = flatten_keys(keys, layer.key_channel_dim).to(torch.float64)
        moment = k_rows.T @ k_rows / len(k_rows)
        moment = moment + 1e-2 * torch.trace(moment) / moment.shape[0] * torch.eye(
            moment.shape[0], dtype=moment.dtype, device=moment.device
        )
        edit = rewrite(model, layer, x, x2, masks, stats=moment, loss="l2", steps=10, ntrain=ntrain)
        with torch.no_grad(), edited(model, edit):
            after = (model(x2[score]).float() - target).norm(dim=-1).mean()
        ranked.append((layer, float(after / before.clamp_min(1e-30))))
    return sorted(ranked, key=lambda t: t[1])


def get_layer(model: nn.Module, name: str | EditableLayer) -> EditableLayer:
    """The editable layer called ``name`` (the module name of its conv/linear)."""
    if isinstance(name, EditableLayer):
        return name
    layers = editable_layers(model)
    for layer in layers:
        if layer.name == name:
            return layer
    names = [l.name for l in layers]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6) or [
        n for n in names if name.split(".")[0] in n
    ][-5:]
    hint = f" Editable layers near it: {', '.join(close)}." if close else ""
    raise LayerNotFoundError(
        f"{name!r} is not an editable layer of {type(model).__name__}.{hint} "
        "List them with surgery.editable_layers(model) or `surgery layers MODEL`."
    )


@dataclass(frozen=True)
class LayerInfo:
    """One row of the layer table: an editable layer and the shapes its sites take for one input."""

    layer: EditableLayer
    key_shape: tuple[int, ...] | None
    value_shape: tuple[int, ...] | None


def describe_layers(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    *,
    layers: Sequence[EditableLayer] | None = None,
    device: torch.device | str | None = None,
) -> list[LayerInfo]:
    """Run one forward pass on a zero image of ``input_size`` and report each layer's key/value shape.

    Shapes are ``None`` for layers whose modules did not run in the forward pass.
    """
    layers = list(editable_layers(model) if layers is None else layers)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    names = sorted({s.module for l in layers for s in (l.key_site, l.value_site)})
    x = torch.zeros(1, *input_size, device=device)
    with torch.no_grad(), trace_dict(
        model, names, retain_input=True, retain_output=True, clone=False
    ) as traces:
        model(x)

    def shape(site) -> tuple[int, ...] | None:
        t = traces[site.module]
        if not t.fired:
            return None
        value = site.read(t)  # "call" sites derive their tensor from the module's call
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    return [LayerInfo(l, shape(l.key_site), shape(l.value_site)) for l in layers]
