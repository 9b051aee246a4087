"""Transformation styles: snow, wood, graffiti, fall colours, fur, black-and-white; 4 variants each.

A style variant turns a concept's pixels into transformed ones, and is only ever applied inside a
region's mask. It has up to two parts:

* a colour map of the texture's luminance (fall colours, black-and-white), which keeps the
  concept's structure;
* an overlay: a tileable ``(ATLAS, ATLAS)`` pattern with an opacity map (snow cover, wood grain,
  paint strokes, fur), shaded by the texture's luminance (``detail``) so that the concept still
  shows through a little, as in a style transfer.

Overlays are built once per process from fixed seeds; a scene shows them at an offset derived from
its seed, the region and the variant, so a restyle is deterministic and varies between scenes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .textures import ATLAS, grid, noise, ramp, smoothstep, stamp_ellipses, unit, warp

__all__ = ["STYLES", "StyleVariant", "style_variant", "style_atlases", "apply_style", "luminance"]

logger = logging.getLogger(__name__)

Overlay = tuple[np.ndarray, np.ndarray]  # pattern (A, A, 3), opacity (A, A)


@dataclass(frozen=True)
class StyleVariant:
    """One variant of a style.

    Attributes:
        style, name: e.g. ``"snow"``, ``"patchy"``.
        palette: colour stops for the texture's luminance, or None to keep the texture's colours.
        contrast: luminance contrast before the palette; ``centred`` stretches around the region's
            mean luminance (else the raw luminance is scaled).
        gamma: exponent on the stretched luminance.
        overlay: builds ``(pattern, opacity)`` from a generator, or None.
        detail: how much the texture's luminance shades the overlay (0: flat paint).
    """

    style: str
    name: str
    palette: tuple[tuple[float, float, float], ...] | None = None
    contrast: float = 1.0
    centred: bool = False
    gamma: float = 1.0
    overlay: Callable[[np.random.Generator], Overlay] | None = field(default=None, compare=False)
    detail: float = 0.0


# ----------------------------------------------------------------------------- overlays
def _flat(colour: Sequence[float], shade: np.ndarray) -> np.ndarray:
    return (np.float32(colour) * shade[..., None]).astype(np.float32)


def _snow(kind: str) -> Callable[[np.random.Generator], Overlay]:
    def build(rng: np.random.Generator) -> Overlay:
        shade = 0.9 + 0.1 * unit(noise(rng, 2))
        if kind == "fresh":
            return _flat((0.95, 0.97, 1.0), shade), 0.88 + 0.12 * unit(noise(rng, 4))
        if kind == "patchy":
            cover = smoothstep(0.42, 0.58, unit(noise(rng, 9) + 0.4 * noise(rng, 3)))
            return _flat((0.96, 0.97, 1.0), shade), 0.15 + 0.85 * cover
        if kind == "blizzard":
            pattern = _flat((0.8, 0.86, 0.96), shade)
            flakes = np.zeros((ATLAS, ATLAS, 3), np.float32)
            count = 900
            r = rng.uniform(0.6, 1.4, count)
            flakes = stamp_ellipses(
                flakes,
                rng.uniform(0, ATLAS, (count, 2)),
                np.stack([r, r], 1),
                np.zeros(count),
                np.ones((count, 3), np.float32),
            )[..., 0]
            pattern = pattern * (1 - flakes[..., None]) + flakes[..., None]
            return pattern.astype(np.float32), np.maximum(0.8, flakes)
        # dusting: a fine speckle of snow, the texture still visible
        speck = smoothstep(0.45, 0.7, unit(noise(rng, 0.7) + 0.5 * noise(rng, 6)))
        return _flat((1.0, 1.0, 1.0), shade), 0.25 + 0.7 * speck

    return build


def _wood(
    dark: Sequence[float], light: Sequence[float], plank: int, vertical: bool, rings: float
) -> Callable[[np.random.Generator], Overlay]:
    def build(rng: np.random.Generator) -> Overlay:
        y, x = grid()
        along, across = (y, x) if vertical else (x, y)
        sigma = (40, 2) if vertical else (2, 40)
        index = (across // plank).astype(np.int64)
        phase = rng.uniform(0, rings, ATLAS // plank + 1).astype(np.float32)[index]
        bend = 5.0 * noise(rng, sigma) + 1.5 * noise(rng, (sigma[0] / 4, sigma[1] / 4))
        grain = 0.5 + 0.5 * np.sin(2 * np.pi * (across + phase + bend) / rings)
        fibre = noise(rng, (6, 0.5) if vertical else (0.5, 6))
        level = 0.25 + 0.5 * grain**1.5 + 0.08 * fibre
        seam = (across % plank) < 1
        level = np.where(seam, 0.05, level)
        return ramp(level, [dark, light]), np.full((ATLAS, ATLAS), 0.92, np.float32)

    return build


def _strokes(
    palette: Sequence[Sequence[float]],
    count: int,
    radius: tuple[float, float],
    outline: float,
    length: tuple[int, int] = (25, 70),
) -> Callable[[np.random.Generator], Overlay]:
    def build(rng: np.random.Generator) -> Overlay:
        pattern = np.zeros((ATLAS, ATLAS, 3), np.float32)
        opacity = np.zeros((ATLAS, ATLAS), np.float32)
        for _ in range(count):
            steps = int(rng.integers(*length))
            turn = rng.normal(0, 0.18, steps).cumsum() + rng.uniform(0, 2 * np.pi)
            pts = rng.uniform(0, ATLAS, 2) + np.stack([np.sin(turn), np.cos(turn)], 1).cumsum(0)
            r = rng.uniform(*radius)
            col = np.asarray(palette[int(rng.integers(len(palette)))], np.float32)
            # distance of every pixel of the stroke's window to the stroke's centre line
            pad = r + outline + 2
            lo = np.floor(pts.min(0) - pad).astype(np.int64)
            hi = np.ceil(pts.max(0) + pad).astype(np.int64)
            ys, xs = np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1])
            dy = (ys[:, None] + 0.5)[:, :, None] - pts[None, None, :, 0]
            dx = (xs[:, None] + 0.5)[:, :, None] - pts[None, None, :, 1]
            d = np.sqrt((dy[:, :, None, :] ** 2 + dx[None, :, :, :] ** 2).min(-1))[:, :, 0]
            iy, ix = np.ix_(ys % ATLAS, xs % ATLAS)
            win, alpha = pattern[iy, ix], opacity[iy, ix]
            if outline:
                a = np.clip(r + outline + 0.5 - d, 0, 1).astype(np.float32)
                win = win * (1 - a[..., None])
                alpha = np.maximum(alpha, a)
            a = np.clip(r + 0.5 - d, 0, 1).astype(np.float32)
            win = win * (1 - a[..., None]) + a[..., None] * col
            pattern[iy, ix], opacity[iy, ix] = win, np.maximum(alpha, a)
        pattern = pattern * (0.92 + 0.08 * unit(noise(rng, 1.0)))[..., None]
        return pattern.astype(np.float32), opacity

    return build


def _fur(
    dark: Sequence[float], light: Sequence[float], tabby: bool = False
) -> Callable[..., Overlay]:
    def build(rng: np.random.Generator) -> Overlay:
        strands = noise(rng, (5, 0.6)) + 0.5 * noise(rng, (2, 0.4))
        flow = 7.0 * noise(rng, 18)
        strands = warp(strands, np.zeros_like(flow), flow)
        level = unit(strands) ** 1.2
        if tabby:
            y, _ = grid()
            bands = 0.5 + 0.5 * np.sin(2 * np.pi * (y + 6 * noise(rng, 12)) / 32)
            level = level * (0.35 + 0.65 * smoothstep(0.2, 0.6, bands))
        return ramp(level, [dark, light]), np.full((ATLAS, ATLAS), 0.9, np.float32)

    return build


def _fall_patches(colour: Sequence[float]) -> Callable[[np.random.Generator], Overlay]:
    def build(rng: np.random.Generator) -> Overlay:
        cover = smoothstep(0.5, 0.65, unit(noise(rng, 6) + 0.3 * noise(rng, 2)))
        return _flat(colour, np.ones((ATLAS, ATLAS), np.float32)), 0.85 * cover

    return build


_ORANGE = ((0.3, 0.08, 0.02), (0.8, 0.3, 0.04), (1.0, 0.62, 0.15), (1.0, 0.86, 0.45))
_RED = ((0.25, 0.02, 0.03), (0.65, 0.06, 0.06), (0.92, 0.25, 0.12), (1.0, 0.55, 0.35))
_GOLD = ((0.35, 0.22, 0.02), (0.75, 0.55, 0.05), (0.98, 0.82, 0.2), (1.0, 0.95, 0.6))
_GREY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

_VARIANTS: tuple[StyleVariant, ...] = (
    StyleVariant("snow", "fresh", overlay=_snow("fresh"), detail=0.35),
    StyleVariant("snow", "patchy", overlay=_snow("patchy"), detail=0.3),
    StyleVariant("snow", "blizzard", overlay=_snow("blizzard"), detail=0.2),
    StyleVariant("snow", "dusting", overlay=_snow("dusting"), detail=0.5),
    StyleVariant(
        "wood", "oak", overlay=_wood((0.5, 0.3, 0.13), (0.85, 0.64, 0.4), 32, False, 8), detail=0.3
    ),
    StyleVariant(
        "wood",
        "walnut",
        overlay=_wood((0.18, 0.09, 0.04), (0.45, 0.28, 0.15), 16, False, 8),
        detail=0.3,
    ),
    StyleVariant(
        "wood",
        "cherry",
        overlay=_wood((0.4, 0.12, 0.06), (0.78, 0.4, 0.24), 32, True, 16),
        detail=0.3,
    ),
    StyleVariant(
        "wood",
        "pine",
        overlay=_wood((0.68, 0.5, 0.25), (0.96, 0.86, 0.62), 16, True, 8),
        detail=0.3,
    ),
    StyleVariant(
        "graffiti",
        "neon",
        overlay=_strokes(
            [(1, 0.1, 0.7), (0.2, 1, 0.2), (0.1, 0.9, 1), (1, 0.95, 0.1)], 160, (2.2, 3.5), 1.2
        ),
        detail=0.1,
    ),
    StyleVariant(
        "graffiti",
        "primary",
        overlay=_strokes(
            [(0.9, 0.1, 0.1), (0.1, 0.2, 0.9), (1, 0.85, 0), (1, 1, 1)], 220, (1.8, 3.0), 0.0
        ),
        detail=0.1,
    ),
    StyleVariant(
        "graffiti",
        "bubble",
        overlay=_strokes(
            [(1, 0.6, 0.8), (0.6, 0.8, 1), (0.7, 1, 0.7), (1, 0.85, 0.6)], 80, (4.5, 6.5), 1.5
        ),
        detail=0.1,
    ),
    StyleVariant(
        "graffiti",
        "tags",
        overlay=_strokes(
            [(0.03, 0.03, 0.03), (0.97, 0.97, 0.97), (0.75, 0.75, 0.8)], 400, (0.9, 1.6), 0.0
        ),
        detail=0.1,
    ),
    StyleVariant("fall", "orange", palette=_ORANGE, contrast=1.8, centred=True),
    StyleVariant("fall", "red", palette=_RED, contrast=1.8, centred=True),
    StyleVariant("fall", "golden", palette=_GOLD, contrast=1.8, centred=True),
    StyleVariant(
        "fall",
        "mixed",
        palette=_ORANGE,
        contrast=1.8,
        centred=True,
        overlay=_fall_patches((0.62, 0.1, 0.04)),
        detail=0.6,
    ),
    StyleVariant("fur", "brown", overlay=_fur((0.2, 0.11, 0.05), (0.68, 0.47, 0.3)), detail=0.25),
    StyleVariant("fur", "cream", overlay=_fur((0.55, 0.5, 0.42), (1.0, 0.98, 0.92)), detail=0.25),
    StyleVariant("fur", "black", overlay=_fur((0.02, 0.02, 0.03), (0.4, 0.4, 0.44)), detail=0.25),
    StyleVariant(
        "fur", "tabby", overlay=_fur((0.15, 0.07, 0.02), (0.95, 0.6, 0.25), tabby=True), detail=0.25
    ),
    StyleVariant("black-and-white", "grey", palette=_GREY),
    StyleVariant("black-and-white", "contrast", palette=_GREY, contrast=2.5, centred=True),
    StyleVariant("black-and-white", "dark", palette=_GREY, contrast=0.9, gamma=1.8),
    StyleVariant("black-and-white", "binary", palette=_GREY, contrast=12.0, centred=True),
)

STYLES: dict[str, tuple[str, ...]] = {}
for _v in _VARIANTS:
    STYLES.setdefault(_v.style, ())
    STYLES[_v.style] += (_v.name,)
"""Style name -> its variant names, in order (a variant is named or indexed in that order)."""

STYLE_IDS: dict[tuple[str, int], int] = {}


def style_variant(style: str, variant: int | str) -> tuple[int, StyleVariant]:
    """``(global index, StyleVariant)`` of a style's variant, given by index or name."""
    if style not in STYLES:
        raise KeyError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    names = STYLES[style]
    if isinstance(variant, str):
        if variant not in names:
            raise KeyError(
                f"style {style!r} has no variant {variant!r}; variants: {', '.join(names)}"
            )
        variant = names.index(variant)
    if not 0 <= int(variant) < len(names):
        raise KeyError(f"style {style!r} has variants 0..{len(names) - 1}, not {variant}")
    index = next(i for i, v in enumerate(_VARIANTS) if v.style == style) + int(variant)
    return index, _VARIANTS[index]


@functools.cache
def style_atlases(index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The overlay of variant ``index`` as tensors ``(A, A, 3)`` and ``(A, A)``, or None."""
    variant = _VARIANTS[index]
    if variant.overlay is None:
        return None
    pattern, opacity = variant.overlay(np.random.default_rng([0x57E1, index]))
    logger.debug("built overlay of %s/%s", variant.style, variant.name)
    return (
        torch.from_numpy(np.clip(pattern, 0, 1).astype(np.float32)),
        torch.from_numpy(np.clip(opacity, 0, 1).astype(np.float32)),
    )


_LUMA = torch.tensor([0.299, 0.587, 0.114])


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Luma of ``(..., 3)`` RGB in ``[0, 1]``."""
    return rgb @ _LUMA.to(rgb)


def _palette(level: torch.Tensor, stops: Sequence[Sequence[float]]) -> torch.Tensor:
    s = torch.tensor(stops, dtype=level.dtype)
    t = level.clamp(0, 1) * (len(s) - 1)
    i = t.long().clamp(max=len(s) - 2)
    f = (t - i)[..., None]
    return s[i] * (1 - f) + s[i + 1] * f


def apply_style(
    texture: torch.Tensor,
    region: torch.Tensor,
    variant: StyleVariant,
    overlay: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Transform ``texture`` ``(n, S, S, 3)``; ``region`` ``(n, S, S)`` bool, the mean luminance.

    ``overlay`` is the variant's pattern and opacity already cropped to ``(n, S, S, 3)`` and
    ``(n, S, S)``. The caller keeps the result only inside the region.
    """
    lum = luminance(texture)
    w = region.to(texture.dtype)
    mean = ((lum * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1))[:, None, None]
    out = texture
    if variant.palette is not None:
        level = 0.5 + variant.contrast * (lum - mean) if variant.centred else variant.contrast * lum
        out = _palette(level.clamp(0, 1) ** variant.gamma, variant.palette)
    if overlay is not None:
        pattern, opacity = overlay
        shade = (1 + 2 * variant.detail * (lum - mean)).clamp(0.5, 1.5)[..., None]
        a = opacity[..., None]
        out = out * (1 - a) + a * (pattern * shade).clamp(0, 1)
    return out
