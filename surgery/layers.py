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

__all__ = ["editable_layers", "get_layer", "recommended_layers", "LayerInfo", "describe_layers"]


def editable_layers(model: nn.Module) -> list[EditableLayer]:
    """Every editable layer of ``model``, found by the adapter of its family, in module order."""
    from surgery.adapters import get_adapter

    return get_adapter(model).layers(model)


def recommended_layers(model: nn.Module, k: int = 3) -> list[EditableLayer]:
    """Where to edit ``model``: its family's ``k`` best candidate layers, best first.

    Candidates are layers valued after a residual add (or at a block end), ranked by the adapter
    (``Adapter.candidates``) in the order the breadth benchmark (``benchmarks/breadth.py``) measured
    to move a concept's logits most for that family. Fewer than ``k`` come back when the model has
    fewer candidates.
    """
    from surgery.adapters import get_adapter

    if k < 1:
        raise LayerNotFoundError(f"k must be at least 1, got {k}")
    return get_adapter(model).candidates(model)[:k]


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
