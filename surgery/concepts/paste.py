"""Paste a texture into a concept: the simplest way to make a transformed exemplar ``x'``.

:func:`paste_texture` fills a concept mask with a texture ("the road covered in snow"). Restyling with
a style-transfer model: :mod:`surgery.concepts.neural_style`; masks from a segmentation model:
:mod:`surgery.concepts.segmentation`; mask files: :mod:`surgery.inputs.masks`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from surgery.errors import SurgeryError
from surgery.inputs.images import pixels_to_float
from surgery.inputs.masks import load_masks

__all__ = ["paste_texture"]

logger = logging.getLogger(__name__)


def _masks(masks: Tensor, n: int, hw: tuple[int, int], what: str = "masks") -> Tensor:
    """Masks for ``n`` images of size ``hw`` (see :mod:`surgery.inputs.masks`), one for all or one each."""
    m = load_masks(masks)
    if m.shape[0] == 1 and n > 1:
        m = m.expand(n, -1, -1, -1)
    if m.shape[0] != n:
        raise SurgeryError(f"{what}: {m.shape[0]} masks for {n} images; pass one mask per image (or one for all)")
    if tuple(m.shape[-2:]) != hw:
        raise SurgeryError(
            f"{what} have size {tuple(m.shape[-2:])} but the images are {hw}; resize them "
            "(surgery.inputs.masks.load_masks(paths, size=(H, W)))"
        )
    return m.float()


def _texture_tensor(texture: Tensor | Image.Image) -> Tensor:
    """A texture as float ``(3, h, w)`` in ``[0, 1]``."""
    if isinstance(texture, Image.Image):
        arr = np.asarray(texture.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    if not isinstance(texture, Tensor):
        raise SurgeryError(f"texture must be a tensor (3, h, w) or a PIL image, got {type(texture).__name__}")
    t = texture
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 2:
        t = t[None].expand(3, -1, -1)
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise SurgeryError(f"texture has shape {tuple(texture.shape)}; expected (3, h, w), (1, h, w) or (h, w)")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():
        raise SurgeryError(f"texture has dtype {t.dtype}; pass float in [0, 1] or uint8")
    return t.float()


def _fit_texture(
    tex: Tensor,
    hw: tuple[int, int],
    mode: str,
    scale: float,
    offset: tuple[int, int],
) -> Tensor:
    """Texture ``(3, h, w)`` -> ``(3, H, W)``: tiled (after scaling by ``scale``) or resized."""
    H, W = hw
    if mode == "resize":
        return F.interpolate(tex[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
    if mode != "tile":
        raise SurgeryError(f"mode must be 'tile' or 'resize', got {mode!r}")
    if scale <= 0:
        raise SurgeryError(f"scale must be positive, got {scale}")
    if scale != 1.0:
        h = max(1, round(tex.shape[1] * scale))
        w = max(1, round(tex.shape[2] * scale))
        tex = F.interpolate(tex[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    h, w = tex.shape[1:]
    oy, ox = offset[0] % h, offset[1] % w
    reps_y = (H + oy) // h + 1
    reps_x = (W + ox) // w + 1
    tiled = tex.repeat(1, reps_y, reps_x)
    return tiled[:, oy : oy + H, ox : ox + W]


def paste_texture(
    images: Tensor,
    masks: Tensor,
    texture: Tensor | Image.Image,
    blend: float = 1.0,
    *,
    mode: str = "tile",
    scale: float = 1.0,
    seed: int | None = None,
    match_brightness: bool = False,
) -> Tensor:
    """Paste a texture into each image inside its mask: ``out = (1 - b*m) * x + b*m * tex``.

    Args:
        images: ``(N, 3, H, W)`` (or ``(3, H, W)``) float in ``[0, 1]`` or uint8 (returned as float).
        masks: ``(N, H, W)``, ``(N, 1, H, W)`` or ``(H, W)`` (one mask for all images); bool or
            float in ``[0, 1]`` (soft masks blend proportionally).
        texture: ``(3, h, w)`` / ``(h, w)`` tensor or a PIL image.
        blend: ``b`` in ``[0, 1]``: 0 returns the images unchanged, 1 puts the exact texture in the mask.
        mode: ``"tile"`` repeats the texture (scaled by ``scale``) over the image; ``"resize"``
            stretches it to the image size.
        scale: texture scale factor before tiling (``"tile"`` only).
        seed: when given, each image gets a random tiling offset drawn from this seed (so the
            pasted texture is not aligned identically in every image); ``None`` tiles from ``(0, 0)``.
        match_brightness: rescale the texture so its mean matches the masked region's mean
            (per image, per channel), keeping the scene's lighting.

    Returns:
        Float tensor of the images' shape, values in ``[0, 1]``.

    Raises:
        SurgeryError: bad shapes, dtypes or values.
    """
    x, single = pixels_to_float(images)
    n, _, H, W = x.shape
    m = _masks(masks, n, (H, W)).to(x.device)
    if not 0.0 <= float(blend) <= 1.0:
        raise SurgeryError(f"blend must lie in [0, 1], got {blend}")
    tex = _texture_tensor(texture).to(x.device, x.dtype)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = torch.empty_like(x)
    for i in range(n):
        offset = (0, 0)
        if gen is not None:
            offset = (int(torch.randint(0, 1 << 16, (1,), generator=gen)), int(torch.randint(0, 1 << 16, (1,), generator=gen)))
        t = _fit_texture(tex, (H, W), mode, scale, offset)
        mi = m[i]
        if match_brightness:
            area = mi.sum()
            if float(area) > 0:
                region_mean = (x[i] * mi).sum(dim=(1, 2)) / area
                tex_mean = (t * mi).sum(dim=(1, 2)) / area
                t = (t * (region_mean / tex_mean.clamp_min(1e-6))[:, None, None]).clamp(0.0, 1.0)
        bm = float(blend) * mi
        out[i] = (1.0 - bm) * x[i] + bm * t
    return out[0] if single else out


