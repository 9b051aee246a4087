"""``rewrite``: compute the rank-one edit that maps a transformed concept onto the original one.

Keys are read from the transformed exemplars just before the layer, values from the originals at the
end of the layer's block; the direction ``u`` comes from the key statistics and the exemplar keys
inside the concept mask; a solver finds the coefficients ``lam`` of ``W' = W + lam (x) u``. The model
is not modified: apply the returned :class:`Edit` with :func:`surgery.apply_edit`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from surgery.editable import EditableLayer
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError, SurgeryWarning
from surgery.identity import architecture_id
from surgery.inputs.images import Transform
from surgery.problems import Images, PrefixWeight, prepare_problem
from surgery.solvers import ReferenceConfig, SolverConfig, solver_config
from surgery.span import rewrite_span
from surgery.stats.keystats import KeyStats

__all__ = ["rewrite"]

logger = logging.getLogger(__name__)

def rewrite(
    model: nn.Module,
    layer: str | EditableLayer | Sequence[str],
    originals: Images,
    transformed: Images,
    masks: Any = None,
    *,
    stats: KeyStats | torch.Tensor,
    solver: Literal["fast", "reference"] | SolverConfig = "fast",
    loss: Literal["l1", "l2"] = "l1",
    use_mask: bool = False,
    ntrain: int | None = None,
    rank: int = 1,
    transform: Transform | None = None,
    prefix_weight: PrefixWeight = "auto",
    ridge: float | None = None,
    max_iter: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    restrict_rank: bool | None = None,
    progress: bool | None = None,
    schedule: Literal["memit", "first_last"] = "memit",
) -> Edit:
    """Compute the edit of ``layer`` that makes ``model`` see ``transformed`` as it sees ``originals``.

    The model is not modified.

    Args:
        model: the classifier, in eval mode.
        layer: the editable layer's module name (see ``surgery.editable_layers``), or a list of layers of
            consecutive residual blocks in forward order: one span edit, an update per layer made with
            ``schedule`` (:mod:`surgery.span`); ``stats`` is then ``{layer: KeyStats}``, e.g.
            ``surgery.collect_key_stats(model, layers, data)`` (one pass over ``data`` for them all).
        originals: images ``(N, 3, H, W)``, or paths / PIL images (preprocessed with ``transform``,
            by default the model's own preprocessing).
        transformed: the same images with the concept transformed.
        masks: ``(N, 1, H, W)`` in ``[0, 1]`` (or PNG paths): where the concept is. They weight the
            exemplar keys that define the direction (on maps and token grids; a layer whose keys are
            not positions, like a token-mixing MLP, ignores them there) and, with ``use_mask``, the loss.
        stats: second moment of the layer's keys (``surgery.collect_key_stats``).
        solver: a :class:`~surgery.solvers.FastConfig` (per-channel Gauss-Newton; the default, as
            ``"fast"``: ``ridge=0``, at most 100 iterations) or a :class:`~surgery.solvers.ReferenceConfig`
            (Adam as the paper; ``"reference"``: 20,000 steps at lr 1e-4).
        loss: ``"l1"`` (the paper's) or ``"l2"``.
        use_mask: weight the loss by the mask; the paper found editing without it works better.
        ntrain: use only the first ``ntrain`` exemplars as key/value pairs (all define the direction).
        rank: number of directions.
        transform: preprocessing for path / PIL inputs.
        prefix_weight: on token layers (ViT, DeiT, EVA, CLIP ViT), each class/register/distillation
            token counts as ``prefix_weight`` grid tokens fully inside the concept: in the direction
            when masks are given, in the masked loss, and in the unmasked loss (where every grid token
            weighs 1). ``"auto"`` (the default): where the head reads the class token, the prefix
            tokens together weigh as much as the grid, else 1 (see :func:`surgery.problems.auto_prefix_weight`);
            1.0 treats them like any fully masked grid token.
        ridge, max_iter, steps, lr, restrict_rank, progress: a solver's own options beside a solver *name*
            (``solver="fast", ridge=1e-3`` is ``solver=FastConfig(ridge=1e-3)``; ``steps`` of the fast
            solver is its ``max_iter``); an option the named solver does not have raises
            :class:`SurgeryError` (:func:`~surgery.solvers.solver_config`).
        schedule: a span edit's share of the gap per layer: ``"memit"`` (each layer in turn takes the gap
            left at the span's end over the layers left) or ``"first_last"`` (the same over the first and
            last layers only).

    Returns:
        An :class:`Edit` with factors ``lam``, ``u`` (or a dense delta when ``restrict_rank=False``); its
        ``hparams`` record the solver that ran (``"joint"`` where the fast solver handed the block to the
        joint solver) and its settings.
    """
    config = solver_config(
        solver, ridge=ridge, max_iter=max_iter, steps=steps, lr=lr, restrict_rank=restrict_rank, progress=progress
    )
    if not isinstance(layer, (str, EditableLayer)):
        if isinstance(config, ReferenceConfig) and not config.restrict_rank:
            raise SurgeryError("a span edit is made of rank-one updates: restrict_rank=False is for one layer")
        return rewrite_span(
            model, list(layer), originals, transformed, masks, stats=stats, config=config, schedule=schedule,
            loss=loss, use_mask=use_mask, ntrain=ntrain, rank=rank, transform=transform, prefix_weight=prefix_weight,
        )
    start = time.perf_counter()
    problem = prepare_problem(
        model,
        layer,
        originals,
        transformed,
        masks,
        stats=stats,
        loss=loss,
        use_mask=use_mask,
        ridge=config.problem_ridge,
        ntrain=ntrain,
        rank=rank,
        transform=transform,
        prefix_weight=prefix_weight,
    )
    layer = problem.layer
    result, info = config.solve(problem)
    hparams: dict[str, Any] = {
        "solver": info["solver"],
        "loss": loss,
        "use_mask": use_mask,
        "rank": rank,
        "ntrain": int(problem.keys.shape[0]),
        **config.hparams(),
    }
    if problem.prefix_weight != 1.0 or prefix_weight != "auto":
        hparams["prefix_weight"] = problem.prefix_weight
    with torch.no_grad():
        zero = torch.zeros(problem.lam_shape, dtype=problem.u.dtype, device=problem.u.device)
        info["objective_before"] = float(problem.objective(zero))
    info["seconds_total"] = time.perf_counter() - start
    provenance = dict(
        layer=layer.name,
        method="rewrite",
        hparams=hparams,
        architecture=architecture_id(model),
        info=info,
    )
    base = {layer.param_name: layer.weight}
    if isinstance(config, ReferenceConfig) and not config.restrict_rank:
        return Edit(deltas={layer.param_name: result.detach().cpu()}, **provenance).made_on(base)
    edit = Edit(lam=result.detach().cpu(), u=problem.u.detach().cpu(), **provenance).made_on(base)
    if not bool(edit.lam.abs().max() > 0):
        warnings.warn(
            f"the edit of {layer.name!r} is zero: the block's value does not depend on this layer's weight "
            "along the edit direction (for example a zero-initialised BatchNorm after it, as in timm ResNets "
            "with random weights), so applying it would change nothing",
            SurgeryWarning,
            stacklevel=2,
        )
    return edit
