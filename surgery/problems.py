"""Exemplars to an edit problem: load the originals, transformed copies and masks, capture the layer's keys
and values, weigh them, and compute the direction ``u`` (:func:`prepare_problem`); what :func:`surgery.rewrite`
and the span edits of :mod:`surgery.span` hand to a solver.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from surgery._guards import model_device, require_eval
from surgery.adapters import get_adapter
from surgery.editable import EditableLayer
from surgery.errors import SurgeryError
from surgery.inputs.images import ImageLike, Transform, check_images, load_images
from surgery.inputs.masks import load_masks
from surgery.inputs.preprocess import Preprocess
from surgery.layers import get_layer
from surgery.layout import channels_last_rows
from surgery.solvers import EditProblem, value_weights
from surgery.solvers.direction import key_weights, rank_one_direction
from surgery.stats.keystats import KeyStats

__all__ = ["prepare_problem", "load_exemplars", "auto_prefix_weight", "Images", "PrefixWeight"]

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


def load_exemplars(
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
    :func:`auto_prefix_weight`. The value used is ``problem.prefix_weight``; see :func:`surgery.rewrite`.

    ``shift`` (values-shaped, one per exemplar): the targets become the transformed exemplars' own values
    moved by ``shift`` instead of the originals' values (a span edit's share of the gap, ``surgery.span``).
    """
    layer = get_layer(model, layer)
    require_eval(model, "rewrite")
    x, x2, m = load_exemplars(model, originals, transformed, masks, transform)
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
