"""Evaluating many candidate edits of one layer on the same images, with what does not change done once.

:class:`CachedImages` holds the unedited model's logits of a set of images and, per edited layer (on
first use), their keys and block context and the network after the block
(:func:`surgery.suffix.network_suffix`): a candidate edit then runs only its block and the rest of the
network. Every edit that changes only parameters after the keys (rank-one rewrites, local and most
global fine-tuning) is evaluated this way; other edits, and models ``torch.fx`` cannot split, fall back
to full forward passes with the edit applied. A strength grid runs the edited layer once per edit
(the block is linear in the update up to the layer's output).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery._guards import require_eval
from surgery.editable import EditableLayer
from surgery.edits.apply import edited
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError, UnsupportedModelError
from surgery.inputs.images import check_images
from surgery.layers import get_layer
from surgery.suffix import network_suffix, parameters_after_keys, suffix_logits

__all__ = ["CachedImages", "Candidate"]

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One candidate: an edit applied with strength ``alpha``, with a display name."""

    edit: Edit
    alpha: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            hp = {k: v for k, v in self.edit.hparams.items() if k in ("solver", "ridge", "use_mask", "scope", "lr", "steps")}
            desc = ",".join(f"{k}={v}" for k, v in hp.items())
            self.name = f"{self.edit.method}[{self.edit.layer}{',' + desc if desc else ''}]@{self.alpha:g}"


def _single_layer(edit: Edit) -> bool:
    return set(edit.parameter_deltas()) == {edit.param}


@dataclass
class _LayerCache:
    """Keys and block context of a set of images at one layer, with the network after the block."""

    layer: EditableLayer
    suffix: Any  # NetworkSuffix
    keys: torch.Tensor
    context: dict[str, torch.Tensor]
    downstream: frozenset[str]  # parameters an edit may change and still be evaluated from these keys
    output: torch.Tensor | None = None  # the layer's own output with its current weight, when computed


class CachedImages:
    """Images evaluated under many candidate edits, with what does not change computed once.

    Holds the unedited model's logits of ``images`` and, per edited layer (on first use), their keys and
    block context (on CPU) and the network after the block (:func:`surgery.suffix.network_suffix`).
    A candidate edit is then evaluated by running only its block and the rest of the network, when
    every parameter it changes comes after the keys: a rank-one rewrite of the layer, local
    fine-tuning, and global fine-tuning unless it changes a module the block's context comes from
    (e.g. a ResNet shortcut's downsample). Other edits, and models ``torch.fx`` cannot split, are
    evaluated with full forward passes (same numbers, slower).

    Pass instances to :func:`select_strength` / :func:`select_by_concept_match` instead of image
    tensors to reuse the work across calls; :meth:`subset` shares it with a subset of the images.
    The model's weights must not change while an instance is in use (edits are applied only
    temporarily, inside :meth:`logits`).

    Args:
        model: the classifier, in eval mode.
        images: ``(N, 3, H, W)`` images preprocessed for the model.
        batch_size: images per forward.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, *, batch_size: int = 128, name: str = "images") -> None:
        require_eval(model, "CachedImages")
        self.model = model
        self.images = check_images(images, name)
        self.batch_size = batch_size
        self._parent: CachedImages | None = None
        self._index: torch.Tensor | None = None
        self._logits0: torch.Tensor | None = None
        self._layers: dict[str, _LayerCache | None] = {}
        self._delta_out: tuple[Edit, torch.Tensor] | None = None  # the last edit's layer-output change
        self.device = next(model.parameters()).device

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Sequence[int] | torch.Tensor) -> CachedImages:
        """The images at ``index``, sharing this instance's cached logits, keys and context."""
        idx = torch.as_tensor(index, dtype=torch.long).flatten()
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise SurgeryError(f"subset index out of range for {len(self)} images")
        sub = CachedImages.__new__(CachedImages)
        sub.model, sub.batch_size, sub.device = self.model, self.batch_size, self.device
        sub.images = self.images[idx]
        sub._parent, sub._index = self, idx
        sub._logits0, sub._layers, sub._delta_out = None, {}, None
        return sub

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.batch_size):
                outs.append(self.model(x[i : i + self.batch_size].to(self.device)).float().cpu())
        return torch.cat(outs) if outs else torch.empty(0)

    @property
    def logits0(self) -> torch.Tensor:
        """Logits of the unedited model."""
        if self._logits0 is None:
            if self._parent is not None:
                self._logits0 = self._parent.logits0[self._index]
            else:
                self._logits0 = self._full(self.images)
        return self._logits0

    def layer_cache(self, layer_name: str) -> _LayerCache | None:
        """Keys, context and suffix at ``layer_name``; ``None`` when the network cannot be split there."""
        if layer_name not in self._layers:
            if self._parent is not None:
                parent = self._parent.layer_cache(layer_name)
                entry = None if parent is None else _LayerCache(
                    parent.layer, parent.suffix, parent.keys[self._index],
                    {k: v[self._index] for k, v in parent.context.items()}, parent.downstream,
                )
            else:
                entry = self._capture(layer_name)
            self._layers[layer_name] = entry
        return self._layers[layer_name]

    def _capture(self, layer_name: str) -> _LayerCache | None:

        layer = get_layer(self.model, layer_name)
        try:
            suffix = network_suffix(self.model, layer)
        except UnsupportedModelError as e:
            logger.info("CachedImages: full forward passes for %s (%s)", layer_name, e)
            return None
        with torch.no_grad():
            keys, context = layer.capture_keys(
                self.model, self.images, batch_size=self.batch_size, device=self.device, store="cpu"
            )
        downstream = parameters_after_keys(self.model, layer, self.images[:1].to(self.device))
        return _LayerCache(layer, suffix, keys, context, downstream)

    def _batches(self, entry: _LayerCache) -> Iterator[tuple[slice, torch.Tensor, dict[str, torch.Tensor]]]:
        """``(slice, keys, context)`` of each batch of the cached keys, on the model's device."""
        for i in range(0, len(self), self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield sl, entry.keys[sl].to(self.device), {k: v[sl].to(self.device) for k, v in entry.context.items()}

    def _suffix_logits(self, entry: _LayerCache, weight: torch.Tensor) -> torch.Tensor:

        with torch.no_grad():
            return torch.cat([
                suffix_logits(entry.suffix, entry.layer, keys, weight, ctx).float().cpu()
                for _, keys, ctx in self._batches(entry)
            ])

    def _layer_output(self, entry: _LayerCache) -> torch.Tensor:
        """The edited conv/linear's own output with its current weight (cached)."""
        if entry.output is None:
            if self._parent is not None:
                parent = self._parent.layer_cache(entry.layer.name)
                assert parent is not None
                entry.output = self._parent._layer_output(parent)[self._index]
            else:
                with torch.no_grad():
                    entry.output = torch.cat([
                        entry.layer.layer_forward(keys, entry.layer.weight).cpu() for _, keys, _ in self._batches(entry)
                    ])
        return entry.output

    def _strength_logits(self, entry: _LayerCache, edit: Edit, alpha: float) -> torch.Tensor:
        """Logits of a single-layer edit at strength ``alpha`` from the layer output's linearity in the weight.

        ``conv(k, W + a D) = conv(k, W) + a (conv(k, D) - bias)``: the edited layer runs once per edit,
        not once per strength; only the rest of the block and the suffix run per strength.
        """
        base = self._layer_output(entry)
        if self._delta_out is None or self._delta_out[0] is not edit:
            d = edit.delta().to(device=self.device, dtype=entry.layer.weight.dtype)
            with torch.no_grad():
                parts = [entry.layer.update_response(keys, d).cpu() for _, keys, _ in self._batches(entry)]
            self._delta_out = (edit, torch.cat(parts))
        delta_out = self._delta_out[1]
        post = entry.layer.post
        outs = []
        with torch.no_grad():
            for sl, _, ctx in self._batches(entry):
                out = (base[sl] + alpha * delta_out[sl]).to(self.device)
                outs.append(entry.suffix(out if post is None else post(out, ctx)).float().cpu())
        return torch.cat(outs)

    def path(self, candidate: Candidate, *, use_suffix: bool = True) -> str:
        """``"suffix"`` when ``candidate`` is evaluated from the cached keys, else ``"full"``."""
        edit = candidate.edit
        entry = self.layer_cache(edit.layer) if use_suffix else None
        if entry is None:
            return "full"
        if _single_layer(edit) or set(edit.parameter_deltas()) <= entry.downstream:
            return "suffix"
        return "full"

    def logits(self, candidate: Candidate | None = None, *, use_suffix: bool = True) -> torch.Tensor:
        """Logits with ``candidate`` applied (``None``: the unedited model's, cached)."""
        if candidate is None:
            return self.logits0
        edit = candidate.edit
        if self.path(candidate, use_suffix=use_suffix) == "suffix":
            entry = self.layer_cache(edit.layer)
            assert entry is not None
            if _single_layer(edit):
                # affine in the weight: the layer runs once per edit, not per strength; in half precision that
                # would score logits apart from those of the weight apply writes, so it runs per strength there
                if entry.layer.plain and entry.layer.weight.dtype in (torch.float32, torch.float64):
                    return self._strength_logits(entry, edit, candidate.alpha)
                return self._suffix_logits(entry, edit.new_weight(entry.layer.weight, candidate.alpha))
            with edited(self.model, edit, alpha=candidate.alpha):
                return self._suffix_logits(entry, entry.layer.weight)
        with edited(self.model, edit, alpha=candidate.alpha):
            return self._full(self.images)

    def values(self, candidate: Candidate) -> torch.Tensor:
        """The edited layer's block output under ``candidate`` (a single-layer edit), or a span edit's at its
        last layer, through the model carrying the whole span."""
        edit = candidate.edit
        if edit.span:
            layer = get_layer(self.model, edit.layers[-1])
            with edited(self.model, edit, alpha=candidate.alpha), torch.no_grad():
                keys, context = layer.capture_keys(
                    self.model, self.images, batch_size=self.batch_size, device=self.device, store="cpu"
                )
                entry = _LayerCache(layer, None, keys, context, frozenset())
                return torch.cat([layer.block_forward(k, layer.weight, c).float().cpu() for _, k, c in self._batches(entry)])
        if not _single_layer(edit):
            raise SurgeryError(f"{candidate.name} changes more than one parameter; it has no single edited layer")
        layer = get_layer(self.model, edit.layer)
        w = edit.new_weight(layer.weight, candidate.alpha)
        entry = self.layer_cache(edit.layer)
        with torch.no_grad():
            if entry is None:  # the network cannot be split there: keys and context for this call only
                keys, context = layer.capture_keys(
                    self.model, self.images, batch_size=self.batch_size, device=self.device, store="cpu"
                )
                entry = _LayerCache(layer, None, keys, context, frozenset())
            return torch.cat([layer.block_forward(k, w, c).float().cpu() for _, k, c in self._batches(entry)])
