"""One edit spread over a span of residual blocks (MEMIT's schedule, Meng et al. 2023, for image classifiers).

In a residual stream most of the concept's change at a block's output arrives through the skip, and one
block's rank-one update removes little of it (docs/method.md, "When the skip carries the change"). A span
edit fixes the target on the stream after the span's last layer ``b_K`` (the originals' values there) and
visits the span's layers in forward order: at ``b_i`` it re-reads the transformed exemplars through the
model carrying the updates of ``b_1 .. b_(i-1)``, measures the gap left at ``b_K``, and gives ``b_i`` the
target "its own current value plus ``gap / (K - i + 1)``" (its share of what remains), solved as a
single-layer rewrite with ``b_i``'s own key statistics and direction. ``schedule="first_last"`` runs the
same schedule over the span's first and last layers only (BLUE, 2025). The result is one :class:`Edit`
with an update per layer, applied and reverted as a whole.

The gap is added where the stream is read, so every layer of a span must have values of the same shape
(blocks of one stage).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from surgery._guards import model_device
from surgery.edits.apply import edited
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError, SurgeryWarning
from surgery.identity import architecture_id
from surgery.layers import get_layer
from surgery.problems import load_exemplars, prepare_problem
from surgery.solvers import SolverConfig
from surgery.stats.keystats import KeyStats

__all__ = ["rewrite_span", "SCHEDULES"]

logger = logging.getLogger(__name__)

Schedule = Literal["memit", "first_last"]
SCHEDULES: tuple[str, ...] = ("memit", "first_last")


def _span_stats(stats: Any, layers: Sequence[str]) -> dict[str, KeyStats | torch.Tensor]:
    """``{layer: statistics}`` from a mapping or a sequence aligned with ``layers``."""
    if isinstance(stats, Mapping):
        missing = [name for name in layers if name not in stats]
        if missing:
            raise SurgeryError(
                f"no key statistics for {missing}: a span edit needs them for every layer, e.g. "
                "stats=surgery.collect_key_stats(model, layers, data) (one pass, a KeyStats per layer)"
            )
        return {name: stats[name] for name in layers}
    if isinstance(stats, Sequence) and not isinstance(stats, (str, bytes)) and len(stats) == len(layers):
        return dict(zip(layers, stats))
    raise SurgeryError(
        f"a span edit of {len(layers)} layers takes stats as a mapping {{layer: KeyStats}} or a list of "
        f"{len(layers)} KeyStats in the layers' order, got {type(stats).__name__}"
    )


def rewrite_span(
    model: nn.Module,
    layers: Sequence[str],
    originals: Any,
    transformed: Any,
    masks: Any = None,
    *,
    stats: Any,
    config: SolverConfig,
    schedule: Schedule = "memit",
    **problem_options: Any,
) -> Edit:
    """One edit of ``layers`` (forward order) with the share schedule above; ``problem_options`` are
    :func:`surgery.problems.prepare_problem`'s (loss, use_mask, ntrain, rank, transform, prefix_weight).

    Use it through :func:`surgery.rewrite` with a list of layers.
    """
    if schedule not in SCHEDULES:
        raise SurgeryError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    names = [get_layer(model, name).name for name in layers]
    if len(set(names)) != len(names) or len(names) < 2:
        raise SurgeryError(f"a span edit takes two or more distinct layers in forward order, got {list(layers)}")
    span = [get_layer(model, name) for name in names]
    stats_by_layer = _span_stats(stats, names)
    edited_layers = [span[0], span[-1]] if schedule == "first_last" else span
    base = {layer.param_name: layer.weight for layer in edited_layers}  # the unedited weights, for each partial edit
    start = time.perf_counter()
    x, x2, _ = load_exemplars(model, originals, transformed, None, problem_options.get("transform"))
    device, last = model_device(model), span[-1]
    dtype = last.weight.dtype
    with torch.no_grad():
        target = last.capture(model, x.to(device, dtype)).values  # the originals' stream after the span
        shapes = {lay.name: tuple(lay.capture(model, x2[:1].to(device, dtype)).values.shape[1:]) for lay in span}
    if len(set(shapes.values())) != 1:
        raise SurgeryError(
            f"the span's layers have values of different shapes ({shapes}): the gap at the last layer is shared "
            "out on the stream, so a span stays within blocks of one shape (one stage); edit a stage "
            "transition on its own instead"
        )

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    partial: list[dict[str, Any]] = []
    gaps: list[float] = []
    for i, layer in enumerate(edited_layers):
        carried = _partial_edit(factors, names, base) if factors else None
        with _carrying(model, carried):
            with torch.no_grad():
                current = last.capture(model, x2.to(device, dtype)).values
            gap = target - current
            gaps.append(float(gap.abs().mean()))
            share = gap / (len(edited_layers) - i)
            problem = prepare_problem(
                model, layer, originals, transformed, masks, stats=stats_by_layer[layer.name],
                ridge=config.problem_ridge, shift=share, **problem_options,
            )
            lam, info = config.solve(problem)
            with torch.no_grad():
                zero = torch.zeros(problem.lam_shape, dtype=problem.u.dtype, device=problem.u.device)
                before = float(problem.objective(zero))
        factors[layer.param_name] = (lam.detach().cpu(), problem.u.detach().cpu())
        partial.append(
            {"layer": layer.name, "solver": info["solver"], "objective_before": before, "objective": info["objective"],
             "seconds": info["seconds"]}
        )
        logger.info("span edit: %s takes 1/%d of the gap (mean |gap| %.4g)", layer.name, len(edited_layers) - i, gaps[-1])
    edit = _partial_edit(factors, names, base)
    with _carrying(model, edit), torch.no_grad():
        gaps.append(float((target - last.capture(model, x2.to(device, dtype)).values).abs().mean()))
    solvers = {p["solver"] for p in partial}
    hparams: dict[str, Any] = {
        "solver": solvers.pop() if len(solvers) == 1 else "+".join(sorted(solvers)),
        "span": [layer.name for layer in edited_layers],
        "schedule": schedule,
        **{k: v for k, v in problem_options.items() if k in ("loss", "use_mask", "rank", "ntrain")},
        **config.hparams(),
    }
    info = {
        "layers": partial, "gap_at_last": gaps, "seconds": sum(p["seconds"] for p in partial),
        "seconds_total": time.perf_counter() - start,
    }
    edit.hparams, edit.info, edit.architecture = hparams, info, architecture_id(model)
    return edit


def _partial_edit(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], order: Sequence[str], base: Mapping[str, torch.Tensor]
) -> Edit:
    """The factors so far as one edit made on ``base`` (a single-layer edit while there is one)."""
    names = [n for n in (f"{layer}.weight" for layer in order) if n in factors]
    first = names[0].removesuffix(".weight")
    if len(names) == 1:
        lam, u = factors[names[0]]
        edit = Edit(layer=first, method="rewrite", lam=lam, u=u)
    else:
        edit = Edit(layer=first, method="rewrite", span={n: factors[n] for n in names})
    return edit.made_on({n: base[n] for n in names})


@contextmanager
def _carrying(model: nn.Module, edit: Edit | None) -> Iterator[None]:
    """The model with the span's updates so far, quietly (their size is the solve's business, not a sign
    of a corrupted file), or as it is."""
    if edit is None:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryWarning)
        with edited(model, edit):
            yield
