"""Input checks shared by the library's entry points: eval mode, devices, labels, logits, sizes.

Images have their one check in :func:`surgery.inputs.images.check_images`.

Each raises a :class:`SurgeryError` that names the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgery.errors import SurgeryError

__all__ = [
    "as_hw",
    "require_eval",
    "model_device",
    "resolve_device",
    "check_labels",
    "check_logits",
    "check_label_range",
]


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as ``(H, W)``: an int is a square side; of a longer sequence (``(3, H, W)``) the last two."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise SurgeryError(f"size must be positive, got {size}")
        return size, size
    try:
        dims = tuple(int(s) for s in size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise SurgeryError(f"size must be an int or (H, W), got {size!r}") from None
    if len(dims) == 1:
        dims = (dims[0], dims[0])
    if len(dims) < 2 or min(dims[-2:]) <= 0:
        raise SurgeryError(f"size must be an int or (H, W) with positive entries, got {size!r}")
    return dims[-2], dims[-1]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without tensors)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def require_eval(model: nn.Module, what: str = "this operation") -> None:
    """Raise unless every module of ``model`` is in eval mode."""
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:3]) + (" ..." if len(training) > 3 else "")
        raise SurgeryError(
            f"{what} needs the model in eval mode (BatchNorm must use its running statistics and "
            f"dropout must be off), but {len(training)} module(s) are in training mode ({shown}); "
            "call model.eval() first"
        )


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to compute on: ``device`` when given (the model must live there), else the model's."""
    tensors = [*model.parameters(), *model.buffers()]
    model_devices = {t.device for t in tensors}
    if device is None:
        return next(iter(model_devices)) if len(model_devices) == 1 else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if any(d != dev for d in model_devices):
        raise SurgeryError(
            f"the model is on {', '.join(sorted(map(str, model_devices)))} but device={str(dev)!r} was "
            "asked for; move the model first with model.to(device), or leave device=None"
        )
    return dev


def check_labels(
    labels: int | Sequence[int] | torch.Tensor, n: int, what: str = "labels"
) -> torch.Tensor:
    """Labels as an int64 tensor ``(n,)``; a single int is broadcast to all ``n`` images."""
    if isinstance(labels, bool):
        raise SurgeryError(f"{what} must be class indices, got a bool")
    if isinstance(labels, int):
        return torch.full((n,), labels, dtype=torch.long)
    t = torch.as_tensor(labels)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise SurgeryError(f"{what} must be integer class indices; got dtype {t.dtype}")
    if t.ndim == 0:
        return t.reshape(1).expand(n).to(torch.long).cpu()
    if t.ndim != 1 or t.shape[0] != n:
        raise SurgeryError(
            f"{what} must be one int or a tensor of shape ({n},); got shape {tuple(t.shape)}"
        )
    return t.to(torch.long).cpu()


def check_logits(out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        what = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SurgeryError(
            f"the model must return logits of shape (N, classes); it returned {what}. Wrap it in a "
            "module that returns class scores"
        )
    return out


def check_label_range(labels: torch.Tensor, num_classes: int, what: str = "labels") -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise SurgeryError(
            f"{what} must lie in [0, {num_classes - 1}] (the model has {num_classes} classes); "
            f"got {labels[bad].unique().tolist()[:5]}"
        )
