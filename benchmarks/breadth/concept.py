"""The synthetic concept (one fixed texture pasted as a square) and the benchmark's images: smooth
random images, exemplars and held-out images with the concept, clean images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["smooth_images", "concept_texture", "paste_concept", "Data", "make_data", "IMAGES"]


def smooth_images(n: int, size: int | tuple[int, int], seed: int) -> torch.Tensor:
    """``n`` smooth random images ``(n, 3, H, W)``, about zero mean and unit variance (normalized
    pixel space): low-frequency noise upsampled from 4x4 and 8x8 grids."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    x = coarse + 0.5 * fine
    return (x - x.mean()) / x.std()


def concept_texture(size: int, seed: int = 1234, *, period: int = 2) -> torch.Tensor:
    """The concept: one fixed texture ``(3, size, size)``, a ``period x period`` tile of random colors
    repeated over the image (high-contrast, zero mean).

    With ``period`` 2 the tile's phase is the same in every patch of every even patch size (4, 14, 16,
    32): each patch the pasted square covers looks the same to a patch embedding. A random-weight ViT
    has no phase-invariant texture features (trained ones learn them), so a texture whose phase changes
    from patch to patch is a different input to every token; ``period=0`` gives such a texture
    (stripes of 5 px and checks of 7 px), for comparison (``--aperiodic``).
    """
    g = torch.Generator().manual_seed(seed)
    if period:
        tile = torch.randn(3, period, period, generator=g)
        tile = tile - tile.mean(dim=(1, 2), keepdim=True)
        reps = -(-size // period)
        tex = tile.repeat(1, reps, reps)[:, :size, :size]
    else:
        yy, xx = torch.meshgrid(
            torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
        )
        stripes = torch.sin(2 * math.pi * (xx + 0.6 * yy) / 5.0)
        checks = torch.sign(torch.sin(2 * math.pi * xx / 7.0) * torch.sin(2 * math.pi * yy / 7.0))
        colors = torch.randn(3, 2, generator=g)
        tex = colors[:, :1, None] * stripes + colors[:, 1:, None] * checks
    return 1.5 * tex / tex.std()


def paste_concept(
    images: torch.Tensor, seed: int, *, side: float = 1 / 3, period: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images with the concept texture pasted as a square of ``side`` of the image at a random
    place each (the texture stays aligned to the image, so it is the same texture everywhere); returns
    ``(transformed, masks)``, masks ``(N, 1, H, W)`` in {0, 1}."""
    n, _, h, w = images.shape
    s = max(4, int(round(side * min(h, w))))
    tex = concept_texture(max(h, w), period=period)
    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    masks = torch.zeros(n, 1, h, w)
    for i in range(n):
        top = int(torch.randint(0, h - s + 1, (1,), generator=g))
        left = int(torch.randint(0, w - s + 1, (1,), generator=g))
        out[i, :, top : top + s, left : left + s] = tex[:, top : top + s, left : left + s]
        masks[i, :, top : top + s, left : left + s] = 1
    return out, masks


@dataclass
class Data:
    """The benchmark's images for one model size."""

    calibration: torch.Tensor  # BN recalibration and key statistics (clean)
    x: torch.Tensor  # exemplar originals
    x2: torch.Tensor  # exemplars with the concept
    masks: torch.Tensor
    h: torch.Tensor  # held-out originals
    h2: torch.Tensor  # held-out with the concept (other places)
    h_masks: torch.Tensor
    clean: torch.Tensor  # clean images for the cost


def make_data(
    size: int, *, exemplars: int = 4, held_out: int = 12, clean: int = 12, calibration: int = 48, period: int = 2
) -> Data:
    x = smooth_images(exemplars, size, seed=1)
    x2, masks = paste_concept(x, seed=2, period=period)
    h = smooth_images(held_out, size, seed=3)
    h2, h_masks = paste_concept(h, seed=4, period=period)
    return Data(
        calibration=smooth_images(calibration, size, seed=5),
        x=x, x2=x2, masks=masks, h=h, h2=h2, h_masks=h_masks,
        clean=smooth_images(clean, size, seed=6),
    )


# how many images make_data draws by default (the report and the JSON say them)
IMAGES = {"exemplars": 4, "held_out": 12, "clean": 12, "calibration": 48}
