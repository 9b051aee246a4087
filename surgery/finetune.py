"""Fine-tuning baselines: cross-entropy and plain SGD on the exemplars, returned as a dense :class:`Edit`.

The paper compares its rank-one rewrite with two fine-tuning baselines (docs/method.md section 7): train the
edited layer's weight alone (``scope="local"``), or every parameter from the edited layer to the output
(``scope="global"``), on the transformed exemplars with the target label. Plain SGD, no momentum, no
weight decay, 400 steps at lr 1e-4 by default; the model stays in eval mode, so BN uses its running
statistics.

:func:`finetune` never modifies the model: it trains copies of the chosen parameters through
:func:`torch.func.functional_call` and returns their change as an edit, which
:func:`surgery.edits.apply.apply_edit` puts into the model and reverts exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from surgery._guards import (
    check_label_range,
    check_labels,
    check_logits,
    require_eval,
    resolve_device,
)
from surgery.editable import EditableLayer
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError, UnsupportedModelError
from surgery.identity import architecture_id
from surgery.inputs.images import check_images
from surgery.layers import get_layer
from surgery.suffix import feeds_context, network_suffix, suffix_parameters

__all__ = ["finetune", "SCOPES"]

logger = logging.getLogger(__name__)

SCOPES = ("local", "global")


class _FromKeys(nn.Module):
    """``model`` run from a layer's keys and block context: the block, then the network suffix.

    Registers ``model`` as its only submodule, so ``torch.func.functional_call`` on this module with
    ``"model.<name>"`` overrides swaps the model's parameters, which the suffix shares.
    """

    def __init__(self, model: nn.Module, layer: EditableLayer, suffix: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._layer = layer
        self._suffix = (suffix,)  # hidden: not a submodule

    def forward(self, keys: torch.Tensor, context: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._suffix[0](self._layer.block_forward(keys, self._layer.weight, context))


def _forward_fn(
    model: nn.Module, layer: EditableLayer, images: torch.Tensor, names: list[str], chunk: int
) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None:
    """``forward(overrides, idx)`` from the keys of ``images`` captured once, or ``None`` when it cannot."""

    try:
        suffix = network_suffix(model, layer)
    except UnsupportedModelError as e:
        logger.info("finetune: full forward passes (%s)", e)
        return None
    # `names` are the layer's weight or suffix_parameters: all after the keys, unless they feed the context
    if any(feeds_context(layer, n) for n in names):
        logger.info("finetune: full forward passes (a trained parameter feeds the block's context)")
        return None
    keys, context = layer.capture_keys(model, images, batch_size=chunk)
    wrapper = _FromKeys(model, layer, suffix)

    def from_keys(overrides: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        ctx = {k: v[idx] for k, v in context.items()}
        return torch.func.functional_call(
            wrapper, {f"model.{k}": v for k, v in overrides.items()}, (keys[idx], ctx)
        )

    return from_keys


def _batches(n: int, batch_size: int | None, steps: int):
    """Index tensors of the minibatch of each step: everything, or ``batch_size`` cycling in order."""
    if batch_size is None or batch_size >= n:
        full = torch.arange(n)
        for _ in range(steps):
            yield full
        return
    for step in range(steps):
        start = (step * batch_size) % n
        yield torch.arange(start, start + batch_size) % n


def finetune(
    model: nn.Module,
    layer: str | EditableLayer,
    images: torch.Tensor,
    labels: int | Sequence[int] | torch.Tensor,
    *,
    scope: str = "local",
    steps: int = 400,
    lr: float = 1e-4,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    use_suffix: bool = True,
) -> Edit:
    """Fine-tune on ``images`` with cross-entropy and plain SGD; return the change as a dense edit.

    The model must be in eval mode (BN uses running statistics) and is not modified: copies of the
    trained parameters go through :func:`torch.func.functional_call`, every other parameter and every
    buffer is read from the model. Each step is ``p -= lr * grad`` (SGD without momentum or weight
    decay) on the mean cross-entropy of one batch.

    Args:
        model: a classifier returning logits ``(N, classes)``, in eval mode.
        layer: the edited layer or its module name.
        images: transformed exemplars, a float tensor ``(N, 3, H, W)`` already preprocessed for the
            model (paths are not accepted yet).
        labels: target class of each image, ``(N,)``, or one int for all of them.
        scope: ``"local"`` trains only the layer's weight; ``"global"`` every parameter from the layer
            to the output (see :func:`suffix_parameters`).
        steps: number of SGD steps.
        lr: learning rate.
        batch_size: ``None`` for full-batch steps; otherwise minibatches of this size taken in order,
            cycling over the images.
        device: where to compute; the model must already be there. Defaults to the model's device.
        progress: show a tqdm progress bar over the steps.
        use_suffix: run the network only from the layer on: the layer's keys (and block context) are
            captured once, since nothing trained comes before them. Same result as full forward passes
            (up to float rounding), much faster at deep layers. Falls back to full forward passes
            when ``torch.fx`` cannot split the model or a trained parameter feeds the block's context.

    Returns:
        An :class:`Edit` with method ``"finetune"``, ``deltas`` (trained minus original, in each
        parameter's dtype, on CPU), ``base`` (shapes, dtypes, fingerprints) and ``info["loss_before"/"loss_after"]``
        (mean cross-entropy over all images).

    Raises:
        SurgeryError: on a bad scope, steps, lr or batch size, a model in training mode, empty or
            non-finite images, labels out of range, or a loss that becomes non-finite.
    """
    if scope not in SCOPES:
        raise SurgeryError(f"scope must be one of {', '.join(map(repr, SCOPES))}; got {scope!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise SurgeryError(f"steps must be a non-negative int; got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and lr != float("inf")):
        raise SurgeryError(f"lr must be a positive finite number; got {lr!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise SurgeryError(f"batch_size must be a positive int or None; got {batch_size!r}")
    require_eval(model, "finetune")
    layer = get_layer(model, layer)
    dev = resolve_device(model, device)
    images = check_images(images).to(dev)
    n = images.shape[0]
    y = check_labels(labels, n).to(dev)

    eval_size = batch_size or n
    if scope == "local":
        names = [layer.param_name]
    else:
        names = suffix_parameters(model, layer, images[:1])
    forward = _forward_fn(model, layer, images, names, eval_size) if use_suffix else None
    via = "from cached keys" if forward is not None else "full forward passes"
    if forward is None:
        def forward(overrides: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, overrides, (images[idx],))

    def loss_over_all(overrides: dict[str, torch.Tensor]) -> float:
        total = 0.0
        with torch.no_grad():
            for i in range(0, n, eval_size):
                idx = torch.arange(i, min(i + eval_size, n), device=dev)
                logits = check_logits(forward(overrides, idx))
                if i == 0:
                    check_label_range(y, logits.shape[1])
                total += F.cross_entropy(logits, y[idx], reduction="sum").item()
        return total / n

    loss_before = loss_over_all({})
    params = dict(model.named_parameters())
    originals = {name: params[name].detach() for name in names}
    trainable = {name: p.clone().requires_grad_(True) for name, p in originals.items()}
    # every other parameter enters detached: no graph through them, no .grad written into the model
    frozen = {name: p.detach() for name, p in params.items() if name not in trainable}
    logger.info(
        "finetune %s (%s): %d parameter tensor(s), %d values, %d step(s) at lr %g, %s",
        layer.name, scope, len(names), sum(p.numel() for p in originals.values()), steps, lr, via,
    )

    batches = _batches(n, batch_size, steps)
    if progress:
        batches = tqdm(batches, total=steps, desc=f"finetune {layer.name} ({scope})", unit="step")
    leaves = list(trainable.values())
    with torch.enable_grad():
        for step, idx in enumerate(batches):
            idx = idx.to(dev)
            logits = forward({**frozen, **trainable}, idx)
            loss = F.cross_entropy(check_logits(logits), y[idx])
            if not torch.isfinite(loss):
                raise SurgeryError(
                    f"the fine-tuning loss became {loss.item()} at step {step}; lower lr (now {lr:g})"
                )
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(leaves, grads):
                    if g is not None:
                        p.add_(g, alpha=-lr)
    for name, p in trainable.items():
        if not torch.isfinite(p).all():
            raise SurgeryError(f"fine-tuning made {name!r} non-finite; lower lr (now {lr:g})")

    loss_after = loss_over_all({**frozen, **{k: v.detach() for k, v in trainable.items()}})
    deltas = {
        name: (trainable[name].detach().to(torch.float64) - originals[name].to(torch.float64))
        .to(originals[name].dtype)
        .cpu()
        for name in names
    }
    logger.info("finetune %s: loss %.4g -> %.4g", layer.name, loss_before, loss_after)
    return Edit(
        layer=layer.name,
        method="finetune",
        hparams={
            "scope": scope,
            "steps": steps,
            "lr": float(lr),
            "batch_size": batch_size,
            "loss": "cross_entropy",
        },
        deltas=deltas,
        architecture=architecture_id(model),
        info={"loss_before": loss_before, "loss_after": loss_after, "n_images": n, "from_cached_keys": via == "from cached keys"},
    ).made_on(originals)
