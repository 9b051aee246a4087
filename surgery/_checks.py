"""Input checks shared by the library's entry points: eval mode, devices, images, labels, logits.

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
    "check_images",
    "pixel_images",
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


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Validate an image batch ``(N, C, H, W)``: a non-empty, finite floating-point tensor."""
    if not isinstance(images, torch.Tensor):
        raise SurgeryError(
            f"{what} must be a tensor (N, 3, H, W); got {type(images).__name__}. Load image files "
            "first (e.g. with the model's preprocessing) and stack them"
        )
    if images.ndim != 4:
        raise SurgeryError(f"{what} must have shape (N, 3, H, W); got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise SurgeryError(f"{what} is empty: give at least one image")
    if not images.is_floating_point():
        raise SurgeryError(f"{what} must be a floating-point tensor (preprocessed); got {images.dtype}")
    if not torch.isfinite(images).all():
        raise SurgeryError(f"{what} contain NaN or infinite values")
    return images


def pixel_images(images: torch.Tensor, what: str = "images") -> tuple[torch.Tensor, bool]:
    """Validate pixel images ``(N, 3, H, W)`` or ``(3, H, W)``, float in ``[0, 1]`` or uint8.

    Returns the batch as float in ``[0, 1]`` and whether the input was a single ``(3, H, W)`` image.
    """
    if not isinstance(images, torch.Tensor):
        raise SurgeryError(f"{what} must be a tensor (N, 3, H, W), got {type(images).__name__}")
    single = images.ndim == 3
    x = images[None] if single else images
    if x.ndim != 4 or x.shape[1] != 3:
        hint = " It looks channels-last: use x.permute(0, 3, 1, 2)." if x.ndim == 4 and x.shape[-1] == 3 else ""
        raise SurgeryError(f"{what} has shape {tuple(images.shape)}; expected (N, 3, H, W) or (3, H, W).{hint}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise SurgeryError(f"{what} has dtype {x.dtype}; pass float images in [0, 1] or uint8")
    if not bool(torch.isfinite(x).all()):
        raise SurgeryError(f"{what} contains NaN or infinite values")
    return x, single


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
