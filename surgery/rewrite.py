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

from surgery._guards import model_device, require_eval
from surgery.adapters import get_adapter
from surgery.editable import EditableLayer
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError, SurgeryWarning
from surgery.identity import architecture_id
from surgery.inputs.images import ImageLike, Transform, check_images, load_images
from surgery.inputs.masks import load_masks
from surgery.inputs.preprocess import Preprocess
from surgery.layers import get_layer
from surgery.layout import channels_last_rows
from surgery.solvers import EditProblem, ReferenceConfig, SolverConfig, solver_config, value_weights
from surgery.solvers.direction import key_weights, rank_one_direction
from surgery.span import rewrite_span
from surgery.stats.keystats import KeyStats

__all__ = ["rewrite", "prepare_problem", "auto_prefix_weight"]

logger = logging.getLogger(__name__)

Images = ImageLike | Sequence[ImageLike]


def _moment(stats: KeyStats | torch.Tensor, layer: EditableLayer) -> torch.Tensor:
    if isinstance(stats, KeyStats):
        if stats.layer != layer.name:
            raise SurgeryError(
                f"the key statistics were collected at {stats.layer!r}, not at {layer.name!r}; "
                f"collect them for this layer with surgery.collect_key_stats(model, {layer.name!r}, data)"
            )
        moment = stats.moment()
    elif isinstance(stats, torch.Tensor):
        moment = stats
    else:
        raise SurgeryError(
            "stats must be a KeyStats (surgery.collect_key_stats) or an (n, n) second-moment tensor, "
            f"got {type(stats).__name__}"
        )
    n = layer.weight.shape[1]
    if tuple(moment.shape) != (n, n):
        raise SurgeryError(
            f"the key statistics are {tuple(moment.shape)} but {layer.name!r} has {n} input channels"
        )
    return moment


def _load_exemplars(
    model: nn.Module,
    originals: Images,
    transformed: Images,
    masks: Any,
    transform: Transform | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    def load(images: Images, what: str) -> torch.Tensor:
        # a tensor is the model's input, held to the one image contract (check_images); paths and PIL
        # images go through the model's preprocessing (or ``transform``)
        if isinstance(images, torch.Tensor):
            return check_images(images, what)
        items = images if isinstance(images, Sequence) and not isinstance(images, str) else [images]
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                check_images(item[None] if item.ndim == 3 else item, f"{what}[{i}]")
        tf = transform if transform is not None else Preprocess.from_model(model).model_input()
        try:
            return load_images(images, tf)
        except SurgeryError as e:
            raise SurgeryError(f"{what}: {e}") from None

    x = load(originals, "originals")
    x2 = load(transformed, "transformed")
    if x.shape != x2.shape:
        raise SurgeryError(
            f"originals {tuple(x.shape)} and transformed images {tuple(x2.shape)} must have the same "
            "shape: one transformed copy per original, at the same size"
        )
    m = None if masks is None else load_masks(masks, size=tuple(x.shape[-2:]))
    if m is not None and m.shape[0] != x.shape[0]:
        raise SurgeryError(f"{m.shape[0]} masks for {x.shape[0]} exemplars: give one mask per exemplar")
    return x, x2, m


PrefixWeight = float | Literal["auto"]


def auto_prefix_weight(model: nn.Module, layer: EditableLayer, keys: torch.Tensor) -> float:
    """``prefix_weight="auto"``: when the model's head reads its class token(s) (class-token pooling),
    the prefix tokens together weigh as much as the whole grid (each ``grid / prefix`` grid tokens);
    otherwise (average-pooled heads, register tokens, layers without prefix tokens) 1.

    Measured (``python -m benchmarks.breadth --sweep``): with weight 1 an edit of a class-token ViT fits the
    grid tokens, which the head never reads, and barely moves the logits.
    """
    lay = layer.key_layout.resolve(keys) if layer.key_layout is not None else None
    if lay is None or lay.kind != "tokens" or not lay.prefix:
        return 1.0
    grid = keys.shape[1] - lay.prefix
    if grid <= 0 or not get_adapter(model).head_reads_prefix(model):
        return 1.0
    return grid / lay.prefix


def prepare_problem(
    model: nn.Module,
    layer: str | EditableLayer,
    originals: Images,
    transformed: Images,
    masks: Any = None,
    *,
    stats: KeyStats | torch.Tensor,
    loss: Literal["l1", "l2"] = "l1",
    use_mask: bool = False,
    ridge: float = 0.0,
    ntrain: int | None = None,
    rank: int = 1,
    transform: Transform | None = None,
    prefix_weight: PrefixWeight = "auto",
    shift: torch.Tensor | None = None,
) -> EditProblem:
    """Capture keys and values, compute the direction ``u``, and return the problem a solver takes.

    ``prefix_weight`` (token layers only): each class/register/distillation token counts as
    ``prefix_weight`` grid tokens fully inside the concept, in the masked direction, in the masked
    loss, and in the unmasked loss (where every grid token weighs 1); ``"auto"`` is
    :func:`auto_prefix_weight`. The value used is ``problem.prefix_weight``; see :func:`rewrite`.

    ``shift`` (values-shaped, one per exemplar): the targets become the transformed exemplars' own values
    moved by ``shift`` instead of the originals' values (a span edit's share of the gap, ``surgery.span``).
    """
    layer = get_layer(model, layer)
    require_eval(model, "rewrite")
    x, x2, m = _load_exemplars(model, originals, transformed, masks, transform)
    if use_mask:
        if m is None:
            raise SurgeryError("use_mask=True needs masks: pass one mask per exemplar, or use_mask=False")
        if not (m.flatten(1).sum(1) > 0).all():
            raise SurgeryError(
                "a mask is all zero, so with use_mask=True its exemplar would weigh nothing; "
                "check the masks cover the concept"
            )
    if prefix_weight != "auto" and not (
        isinstance(prefix_weight, (int, float)) and 0 <= prefix_weight < float("inf")
    ):
        raise SurgeryError(f"prefix_weight must be 'auto' or a finite number >= 0, got {prefix_weight!r}")
    n_ex = x.shape[0]
    if ntrain is None:
        ntrain = n_ex
    if not 1 <= ntrain <= n_ex:
        raise SurgeryError(f"ntrain must be between 1 and the number of exemplars ({n_ex}), got {ntrain}")
    moment = _moment(stats, layer)

    device = model_device(model)
    dtype = layer.weight.dtype
    io_t = layer.capture(model, x2.to(device, dtype))
    if shift is None:
        targets = layer.capture(model, x.to(device, dtype)).values
    elif tuple(shift.shape) != tuple(io_t.values.shape):
        raise SurgeryError(f"shift must have the values' shape {tuple(io_t.values.shape)}, got {tuple(shift.shape)}")
    else:
        targets = io_t.values + shift.to(io_t.values)

    if prefix_weight == "auto":
        prefix_weight = auto_prefix_weight(model, layer, io_t.keys)
    prefix_weight = float(prefix_weight)
    # The direction uses every concept exemplar; the key/value pairs only the first `ntrain`.
    direction_masks = None if m is None else m.to(device)
    if direction_masks is not None and not layer.key_layout.resolve(io_t.keys).spatial:
        # keys that are not positions (token-mixing MLPs: one key per channel): the mask can weigh
        # the loss (use_mask) but not the direction
        logger.info("keys of %s have no spatial layout: the masks do not weigh the direction", layer.name)
        direction_masks = None
    weights = key_weights(direction_masks, io_t.keys, layer.key_layout, prefix_weight=prefix_weight)
    whitening = stats.whitening().to(device) if isinstance(stats, KeyStats) else None  # kept with the stats
    u = rank_one_direction(
        moment.to(device),
        channels_last_rows(io_t.keys, layer.key_channel_dim),
        weights,
        rank=rank,
        whitening=whitening,
    )
    values = targets[:ntrain]
    loss_masks = m[:ntrain].to(device) if (use_mask and m is not None) else None
    loss_weights = value_weights(
        loss_masks, values, layer.value_layout, prefix_weight=prefix_weight, loss=loss
    )
    return EditProblem(
        layer=layer,
        keys=io_t.keys[:ntrain],
        values=values,
        context={k: v[:ntrain] for k, v in io_t.context.items()},
        u=u.to(dtype),
        weights=loss_weights,
        loss=loss,
        ridge=ridge,
        prefix_weight=prefix_weight,
    )


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
            ``schedule`` (:mod:`surgery.span`); ``stats`` is then ``{layer: KeyStats}``.
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
            tokens together weigh as much as the grid, else 1 (see :func:`auto_prefix_weight`);
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
