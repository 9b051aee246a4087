"""Finding a model's editable layers, and describing them."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery.adapters import get_adapter
from surgery.editable import EditableLayer
from surgery.errors import LayerNotFoundError
from surgery.hooks import TraceDict

__all__ = [
    "editable_layers",
    "get_layer",
    "LayerInfo",
    "describe_layers",
    "format_layer_table",
    "format_table",
    "site_kind",
]


def editable_layers(model: nn.Module) -> list[EditableLayer]:
    """Every editable layer of ``model``, found by the adapter of its family, in module order."""
    return get_adapter(model).layers(model)


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
    with torch.no_grad(), TraceDict(
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


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "x".join(str(d) for d in shape)


def site_kind(layer: EditableLayer) -> str:
    """``"residual"`` when a skip connection bypasses the layer (:attr:`EditableLayer.skip`), else
    ``"skip-free"``."""
    return "residual" if layer.skip else "skip-free"


def format_layer_table(infos: Sequence[LayerInfo]) -> str:
    """A plain-text table of :class:`LayerInfo` rows; the ``site`` column is :func:`site_kind`."""
    header = ("layer", "kind", "site", "weight", "key", "value", "block")
    rows = [
        (
            i.layer.name,
            i.layer.kind,
            site_kind(i.layer),
            _shape(tuple(i.layer.weight.shape)),
            _shape(i.key_shape),
            _shape(i.value_shape),
            i.layer.block,
        )
        for i in infos
    ]
    return format_table(header, rows)


def format_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: left-aligned columns two spaces apart, a dashed line under ``header``."""
    widths = [max(len(str(r[c])) for r in (header, *rows)) for c in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
