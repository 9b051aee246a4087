"""Edit one layer with the library's default rewrite and measure how far the edit moves the value, the
exemplars' logits, the held-out images' logits and the clean images' logits (ratios after/before)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from surgery import collect_key_stats, rewrite
from surgery.edits.apply import edited
from surgery.layers import site_kind
from surgery.solvers.problem import value_weights

from .concept import Data

__all__ = ["batch_logits", "mean_distance", "logit_ratios", "current_ratios", "attribution_scores", "measure_layer", "ok_rows"]


def batch_logits(model: nn.Module, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch]).float() for i in range(0, len(images), batch)])


def mean_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the L2 distance between rows (logits) or flattened maps (values)."""
    return float((a.flatten(1) - b.flatten(1)).norm(dim=1).mean())


def logit_ratios(after: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, float]:
    """The breadth table's logit ratios, from the edited model's logits ``after`` and the unedited ``base``
    (keyed by image set): the transformed exemplars' (``x2``) and held-out images' (``h2``) distance to their
    originals' after/before (and before), and, where ``after`` has the clean images, their change over the held-out
    distance before."""
    exemplar_before, heldout_before = mean_distance(base["x2"], base["x"]), mean_distance(base["h2"], base["h"])
    out = {
        "exemplar_before": exemplar_before,
        "heldout_before": heldout_before,
        "exemplar_ratio": mean_distance(after["x2"], base["x"]) / max(exemplar_before, 1e-30),
        "heldout_ratio": mean_distance(after["h2"], base["h"]) / max(heldout_before, 1e-30),
    }
    if "clean" in after:
        out["clean_change"] = mean_distance(after["clean"], base["clean"]) / max(heldout_before, 1e-30)
    return out


def current_ratios(model: nn.Module, data: Data, base: dict[str, torch.Tensor]) -> dict[str, float]:
    """:func:`logit_ratios` of the model as it is now (carrying an edit), on the exemplars, held-out and clean
    images."""
    return logit_ratios({k: batch_logits(model, getattr(data, k)) for k in ("x2", "h2", "clean")}, base)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inject(model: nn.Module, site, value: torch.Tensor):
    """A hook that replaces the tensor at ``site`` (an input or output site) by ``value``."""
    module = model.get_submodule(site.module) if site.module else model
    if site.port == "output":
        return module.register_forward_hook(lambda m, a, out: value)
    return module.register_forward_pre_hook(lambda m, a: (value, *a[1:]))


def attribution_scores(model: nn.Module, layer, data: Data, base: dict[str, torch.Tensor]) -> dict[str, float]:
    """Two layer-choice scores computed before editing (the "attribution-guided" idea).

    ``grad_x_act``: the first-order fraction of the exemplars' squared logit distance removed by moving
    the transformed exemplars' value to the originals' (gradient of the distance at the value site
    times the value difference, the activation patch).
    ``masked_patch``: the exact fraction removed by replacing the value only at the concept's positions
    (the mask pooled to value resolution) with the originals' value.
    """

    io_t = layer.capture(model, data.x2)
    io_o = layer.capture(model, data.x)
    target = base["x"]
    d0 = float((base["x2"] - target).square().sum())
    v = io_t.values.clone().requires_grad_(True)
    handle = _inject(model, layer.value_site, v)
    try:
        loss = (model(data.x2).float() - target).square().sum()
        (grad,) = torch.autograd.grad(loss, v)
    finally:
        handle.remove()
    delta = io_o.values - io_t.values
    gxa = float(-(grad * delta).sum()) / max(d0, 1e-30)
    lay = layer.value_layout.resolve(io_t.values)
    masked = float("nan")
    if lay.spatial:
        try:
            pooled, prefix = lay.pool_mask(data.masks, io_t.values)
            m = (pooled > 0.5).to(io_t.values.dtype)
            patched = io_t.values + m * delta
            handle = _inject(model, layer.value_site, patched)
            try:
                with torch.no_grad():
                    d1 = float((model(data.x2).float() - target).square().sum())
            finally:
                handle.remove()
            masked = 1 - d1 / max(d0, 1e-30)
        except Exception:  # noqa: BLE001 - a layout the mask does not map onto
            pass
    return {"grad_x_act": gxa, "masked_patch": masked}


def measure_layer(
    model: nn.Module,
    layer,
    data: Data,
    base: dict[str, torch.Tensor],
    *,
    stats=None,
    prefix_weight: float | str = "auto",
    scores: bool = False,
    rank: int = 1,
    schedule: str = "memit",
    use_mask: bool = False,
) -> dict[str, Any]:
    """Edit ``layer`` with the library's default rewrite (of ``rank`` directions; ``use_mask``: the loss
    weighted by the concept masks) and measure (a)-(d).

    ``layer`` may be a span (a list of layers in forward order, edited with ``schedule``); the value is
    then the stream after its last layer. ``stats`` (the layer's ``KeyStats``, a span's ``{layer:
    KeyStats}``) are collected from the calibration images when not given.
    """

    t0 = time.perf_counter()
    span = list(layer) if isinstance(layer, Sequence) else None
    target = [l.name for l in span] if span else layer
    if span:
        layer = span[-1]
    row: dict[str, Any] = {
        "layer": "+".join(target) if span else layer.name,
        "site": "span" if span else site_kind(layer),
        "block": layer.block,
        "channelwise": layer.channelwise,
        "module_type": type(layer.module).__name__,
    }
    if span:
        row["schedule"] = schedule
    io_t = layer.capture(model, data.x2)
    with torch.no_grad():
        row["block_forward_rel_err"] = _rel_err(layer.block_forward(io_t.keys, layer.weight, io_t.context), io_t.values)
    v_orig = layer.capture(model, data.x).values
    if scores:
        row.update(attribution_scores(model, layer, data, base))
    if stats is None:
        stats = collect_key_stats(model, target, data.calibration, batch_size=16, progress=False)
    edit = rewrite(
        model, target, data.x, data.x2, data.masks, stats=stats, prefix_weight=prefix_weight, rank=rank, schedule=schedule,
        use_mask=use_mask,
    )
    row["rank"] = rank
    row["use_mask"] = use_mask
    row["solver"] = edit.info.get("solver", "fast")
    row["prefix_weight"] = float(edit.hparams.get("prefix_weight", 1.0))
    row["prefix_weight_setting"] = prefix_weight
    if span:  # the share each layer's solve removed of its own objective, and the gap left at the end
        row["value_objective_ratio"] = [p["objective"] / max(p["objective_before"], 1e-30) for p in edit.info["layers"]]
        row["gap_at_last"] = edit.info["gap_at_last"]
    else:
        row["value_objective_ratio"] = edit.info["objective"] / max(edit.info["objective_before"], 1e-30)
    with edited(model, edit):
        v_after = layer.capture(model, data.x2).values
        after = {k: batch_logits(model, getattr(data, k)) for k in ("x2", "h2", "clean")}
    row["value_before"] = mean_distance(io_t.values, v_orig)
    if data.masks is not None:  # the share of the exemplars' value change that a masked loss discounts
        change = (io_t.values - v_orig).abs()
        seen = value_weights(data.masks, v_orig, layer.value_layout, prefix_weight=row["prefix_weight"]).clamp(max=1.0)
        row["value_change_off_mask"] = 1.0 - float((seen * change).sum() / change.sum().clamp_min(1e-30))
    row["value_ratio"] = mean_distance(v_after, v_orig) / max(row["value_before"], 1e-30)
    row.update(logit_ratios(after, base))
    # per held-out image: does the edit move each one toward its original?
    per = (after["h2"] - base["h"]).norm(dim=1) / (base["h2"] - base["h"]).norm(dim=1).clamp_min(1e-30)
    row["heldout_improved_frac"] = float((per < 1).float().mean())
    row["seconds"] = time.perf_counter() - t0
    return row


def ok_rows(m: dict) -> list[dict]:
    return [r for r in m.get("rows", []) if "error" not in r]
