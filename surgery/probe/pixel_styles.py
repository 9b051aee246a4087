"""Ways to transform a concept for the probe: pixel styles kept inside the concept's mask.

A style is ``fn(images, masks) -> images``; :func:`masked_transform` keeps its output inside each
concept's mask only (``where(mask, fn(x, m), x)``), so nothing else in the image changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from surgery.errors import SurgeryError

__all__ = ["StyleFn", "Transform", "PIXEL_STYLES", "masked_transform"]


StyleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(images (M, 3, H, W), masks (M, H, W) bool) -> images (M, 3, H, W)``."""

Transform = Callable[[str, str, torch.Tensor], torch.Tensor]
"""``transform(concept, style, index) -> images[index]`` with ``concept`` transformed by ``style``."""


def _gray(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Luminance in every channel (removes colour, keeps texture)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True).expand_as(images)


def _flat(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The region's mean colour everywhere (removes texture, keeps colour)."""
    m = masks[:, None].to(images.dtype)
    mean = (images * m).sum((2, 3), keepdim=True) / m.sum((2, 3), keepdim=True).clamp_min(1.0)
    return mean.expand_as(images)


def _blur(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A 7x7 box blur (removes fine texture)."""
    return F.avg_pool2d(images, 7, stride=1, padding=3, count_include_pad=False)


PIXEL_STYLES: dict[str, StyleFn] = {"gray": _gray, "flat": _flat, "blur": _blur}
"""Generic pixel styles for :func:`~surgery.probe.probe`: ``gray`` (no colour), ``flat`` (no texture),
``blur``. They work on float images in any linear pixel scale (they are channel-wise affine-equivariant
except ``gray``, whose weights assume RGB order), and on uint8 images."""


def masked_transform(images: torch.Tensor, masks: Mapping[str, torch.Tensor], styles: Mapping[str, StyleFn]) -> Transform:
    """The :data:`Transform` that applies ``styles[style]`` to ``images[index]`` inside ``masks[concept]``.

    Style functions see float images (uint8 images are converted to float in 0..255 and back,
    rounded and clipped); only pixels inside the mask change.
    """

    def transform(concept: str, style: str, index: torch.Tensor) -> torch.Tensor:
        x = images[index]
        m = masks[concept][index].to(x.device)
        xf = x if x.is_floating_point() else x.float()
        out = styles[style](xf, m)
        if not isinstance(out, torch.Tensor) or out.shape != xf.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SurgeryError(
                f"style {style!r} must return a tensor of the shape of its input images "
                f"{tuple(xf.shape)}; it returned {got}"
            )
        out = torch.where(m[:, None], out.to(xf.dtype), xf)
        if not x.is_floating_point():
            info = torch.iinfo(x.dtype)
            out = out.round().clamp(info.min, info.max).to(x.dtype)
        return out

    return transform
