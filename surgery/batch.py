"""Several rules in one edit of one layer: a joint solve that keeps each rule's keys, and protected ones.

Stacking edits made one at a time adds rule ``j``'s update ``lam_j (x) u_j`` to every key, rule ``i``'s
included: where ``u_j . k_i`` is not zero, rule ``j`` moves the values rule ``i`` had fixed. A batch
rewrite keeps one direction per rule (``u_i``, from its own transformed exemplars, whitened by the keys'
second moment as in :func:`surgery.rewrite`) and solves every ``lam_i`` at once, in one problem whose
exemplars are all the rules' (each transformed key mapped onto its original's value) and, optionally,
protected clean images whose values must stay as they are. The result is one rank-``R`` :class:`Edit`
(``R`` rules), one file, applied and reverted as a whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from surgery.edits.edit import Edit
from surgery.errors import SurgeryError
from surgery.identity import architecture_id
from surgery.inputs.images import Transform
from surgery.layers import get_layer
from surgery.problems import Images, PrefixWeight, prepare_problem
from surgery.solvers import EditProblem, SolverConfig, solver_config
from surgery.stats.keystats import KeyStats

__all__ = ["Rule", "rewrite_rules"]

logger = logging.getLogger(__name__)


@dataclass
class Rule:
    """One rule of a batch: originals, their copies with the concept transformed, optional masks."""

    originals: Images
    transformed: Images
    masks: Any = None
    description: str = ""


def _weights(problem: EditProblem, scale: float) -> torch.Tensor:
    """The problem's loss weights (ones where it has none) in the shape of its values, times ``scale``."""
    w = torch.ones_like(problem.values) if problem.weights is None else problem.weights.expand_as(problem.values)
    return w * scale


def rewrite_rules(
    model: nn.Module,
    layer: str,
    rules: Sequence[Rule],
    *,
    stats: KeyStats | torch.Tensor,
    protect: Images | None = None,
    protect_weight: float = 1.0,
    solver: str | SolverConfig = "fast",
    loss: Literal["l1", "l2"] = "l1",
    use_mask: bool = False,
    transform: Transform | None = None,
    prefix_weight: PrefixWeight = "auto",
) -> Edit:
    """One edit of ``layer`` that makes every rule of ``rules`` at once (see the module docstring).

    Args:
        model: the classifier, in eval mode.
        layer: the editable layer's name.
        rules: two or more :class:`Rule`; each gives its own direction ``u_i``.
        stats: the second moment of the layer's keys (``surgery.collect_key_stats``).
        protect: clean images whose values at the layer the edit should leave as they are (for
            example images of classes that must stay untouched), or ``None``.
        protect_weight: the weight of each protected position in the loss, against 1 for an exemplar's.
        solver, loss, use_mask, transform, prefix_weight: as :func:`surgery.rewrite` (``"fast"`` or a
            :class:`~surgery.solvers.FastConfig`; the reference solver is not offered for batches).

    Returns:
        An :class:`Edit` with ``lam`` of rank ``len(rules)`` and ``u`` one row per rule, in order.
    """
    if len(rules) < 2:
        raise SurgeryError(f"a batch rewrite takes two or more rules, got {len(rules)}: use surgery.rewrite for one")
    if not all(isinstance(rule, Rule) for rule in rules):
        raise SurgeryError("rules must be surgery.batch.Rule(originals, transformed, masks) objects")
    if protect_weight < 0:
        raise SurgeryError(f"protect_weight must be >= 0, got {protect_weight}")
    config = solver_config(solver)
    if config.name != "fast":
        raise SurgeryError(f"a batch rewrite uses the fast solver; got solver {config.name!r}")
    start = time.perf_counter()
    lay = get_layer(model, layer)
    options: dict[str, Any] = dict(
        stats=stats, loss=loss, ridge=config.problem_ridge, transform=transform, prefix_weight=prefix_weight
    )
    problems = [
        prepare_problem(model, lay, r.originals, r.transformed, r.masks, use_mask=use_mask, **options) for r in rules
    ]
    parts = list(problems)
    if protect is not None:
        parts.append(prepare_problem(model, lay, protect, protect, None, **options))
    weights = None
    if protect is not None or any(p.weights is not None for p in parts):
        scales = [1.0] * len(problems) + ([protect_weight] if protect is not None else [])
        weights = torch.cat([_weights(p, s) for p, s in zip(parts, scales)])
    context = {name: torch.cat([p.context[name] for p in parts]) for name in parts[0].context}
    joint = EditProblem(
        layer=lay,
        keys=torch.cat([p.keys for p in parts]),
        values=torch.cat([p.values for p in parts]),
        context=context,
        u=torch.cat([p.u for p in problems]),  # one direction per rule; protected images add none
        weights=weights,
        loss=loss,
        ridge=config.problem_ridge,
        prefix_weight=problems[0].prefix_weight,
    )
    lam, info = config.solve(joint)
    with torch.no_grad():
        zero = torch.zeros(joint.lam_shape, dtype=joint.u.dtype, device=joint.u.device)
        info["objective_before"] = float(joint.objective(zero))
    info["seconds_total"] = time.perf_counter() - start
    hparams: dict[str, Any] = {
        "solver": info["solver"], "loss": loss, "use_mask": use_mask, "rules": len(rules),
        "protected_images": 0 if protect is None else int(parts[-1].keys.shape[0]),
        "protect_weight": protect_weight, **config.hparams(),
    }
    description = "; ".join(r.description for r in rules if r.description)
    edit = Edit(
        layer=lay.name, method="rewrite", lam=lam.detach().cpu(), u=joint.u.detach().cpu(), hparams=hparams,
        architecture=architecture_id(model), info=info, description=description,
    )
    logger.info("batch rewrite of %s: %d rules, objective %.4g -> %.4g", lay.name, len(rules), info["objective_before"], info["objective"])
    return edit.made_on({lay.param_name: lay.weight})
