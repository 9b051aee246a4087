"""Concept masks: the one loader, with one semantics for files, PIL images and tensors.

A mask says where the concept is: float values in ``[0, 1]`` (1 = the concept), ``(N, 1, H, W)``.

- **Files and PIL images** are read by :func:`mask_array`: the alpha channel when the image has
  transparency (opaque = concept), else the gray level (white = concept); 16-bit images are divided
  by 65535, 8-bit ones by 255.
- **Tensors and arrays** ``(N, 1, H, W)``, ``(N, H, W)`` or ``(H, W)``: float in ``[0, 1]``, bool, or
  uint8 (gray levels 0-255, or 0/1).
- **Size:** with ``size``, every mask is resized to it bilinearly (antialiased, so edges stay soft),
  but only when its aspect ratio agrees with the target's within 2%: a mask is drawn on its image, and
  one of another shape is an error rather than a silent stretch.

Callers that need a hard mask threshold it at 0.5. Masks drawn on photos that then go through a
model's resize and crop are aligned with :meth:`surgery.inputs.preprocess.Preprocess.mask_pixels`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from surgery._guards import as_hw
from surgery._files import PathLike
from surgery.errors import SurgeryError

__all__ = ["mask_array", "load_masks", "MaskLike"]

MaskLike = torch.Tensor | np.ndarray | PathLike | Image.Image
_ASPECT_TOLERANCE = 0.02


def mask_array(image: Image.Image) -> np.ndarray:
    """A PIL mask as a float array ``(H, W)`` in ``[0, 1]`` (see the module docstring)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba, dtype=np.float64)[..., 3] / 255.0
        if alpha.min() < 1.0:
            return alpha
        return np.asarray(rgba.convert("L"), dtype=np.float64) / 255.0
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float64) / 65535.0
    if image.mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        return arr / 65535.0 if arr.max() > 255 else arr / 255.0
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if image.mode == "1":
        return np.asarray(image, dtype=np.float64)
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def _read(path: PathLike) -> torch.Tensor:
    p = Path(path)
    if p.is_dir():
        raise SurgeryError(f"mask {str(p)!r} is a folder, not an image file")
    if not p.is_file():
        raise SurgeryError(f"mask file {str(p)!r} does not exist; check the path")
    try:
        with Image.open(p) as im:
            im.load()
            arr = mask_array(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SurgeryError(f"cannot read mask {str(p)!r} as an image ({e}); save it as a grayscale PNG") from None
    return torch.from_numpy(arr).float()[None, None]


def _check(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise SurgeryError(f"{what} has shape {tuple(t.shape)}; expected (N, 1, H, W), (N, H, W) or (H, W)")
    if t.dtype == torch.bool:
        t = t.float()
    elif t.dtype == torch.uint8:  # 8-bit gray levels, or 0/1
        t = t.float() / 255.0 if int(t.max()) > 1 else t.float()
    if not t.is_floating_point():
        raise SurgeryError(f"{what} has dtype {t.dtype}; pass float masks in [0, 1] (or bool, or uint8)")
    if bool(torch.isnan(t).any()):
        raise SurgeryError(f"{what} contains NaN; masks must be finite values in [0, 1]")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        hint = " Divide by 255 if it holds 8-bit values." if 1.0 < hi <= 255.0 and lo >= 0.0 else ""
        raise SurgeryError(f"{what} has values in [{lo:g}, {hi:g}]; masks must lie in [0, 1].{hint}")
    return t


def _resize(t: torch.Tensor, hw: tuple[int, int], what: str) -> torch.Tensor:
    h, w = t.shape[-2:]
    if (h, w) == hw:
        return t
    if abs((h / w) / (hw[0] / hw[1]) - 1.0) > _ASPECT_TOLERANCE:
        raise SurgeryError(
            f"{what} is {w}x{h} (WxH) but its image is {hw[1]}x{hw[0]}, another shape; draw the mask on the "
            "image it belongs to, at its size"
        )
    out = F.interpolate(t.float(), size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0).to(t.dtype)


def load_masks(masks: MaskLike | Sequence[MaskLike], size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Concept masks as one float batch ``(N, 1, H, W)`` in ``[0, 1]`` (semantics: module docstring).

    Args:
        masks: a tensor or array, a file path or PIL image, or a sequence of any of these.
        size: ``int`` (square) or ``(H, W)``, usually the images' size; ``None`` keeps the masks' own
            size, which must then agree.

    Raises:
        SurgeryError: a missing or unreadable file, NaN or values outside ``[0, 1]``, a bad shape, an
            aspect ratio other than ``size``'s, or different sizes with ``size=None``.
    """
    hw = None if size is None else as_hw(size)
    if isinstance(masks, (torch.Tensor, np.ndarray, str, os.PathLike, Image.Image)):
        items: list[Any] = [masks]
    else:
        items = list(masks)
    if not items:
        raise SurgeryError("no masks given")
    out: list[torch.Tensor] = []
    for i, item in enumerate(items):
        what = f"masks[{i}]" if len(items) > 1 else "the mask"
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        if isinstance(item, torch.Tensor):
            t = _check(item, what)
        elif isinstance(item, Image.Image):
            t = _check(torch.from_numpy(mask_array(item)).float(), what)
        elif isinstance(item, (str, os.PathLike)):
            what = f"mask {str(item)!r}"
            t = _check(_read(item), what)
        else:
            raise SurgeryError(f"{what} is a {type(item).__name__}; pass tensors, paths or PIL images")
        out.append(t if hw is None else _resize(t, hw, what))
    sizes = {tuple(t.shape[-2:]) for t in out}
    if len(sizes) > 1:
        raise SurgeryError(f"masks have different sizes {sorted(sizes)}; pass size=(H, W) (the images' size)")
    dtypes = {t.dtype for t in out}
    dtype = torch.float32 if len(dtypes) > 1 else dtypes.pop()
    return torch.cat([t.to(dtype) for t in out])
