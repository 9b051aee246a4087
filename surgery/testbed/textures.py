"""Concept textures: real scikit-image photographs (colourized) and procedural ones.

Every concept is a ``(ATLAS, ATLAS, 3)`` float32 RGB atlas in ``[0, 1]``, built once per process
from a fixed seed (it is part of the testbed's definition, not of a scene). A scene shows an
``S x S`` crop of it at a per-scene offset. Each concept belongs to one region: floors
(``grass``, ``gravel``, ``sand``, ``water``, ``tiles``) or backdrops (``brick``, ``sky``,
``foliage``, ``curtain``, ``wallpaper``). ``grass``, ``gravel`` and ``brick`` are real photographs
from ``skimage.data``; the others are procedural. No concept looks like a transformation style
(no snow, wood, fur, graffiti, autumn or grey concept).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["ATLAS", "REGIONS", "CONCEPTS", "CONCEPT_REGION", "concept_atlases"]

logger = logging.getLogger(__name__)

ATLAS = 256
"""Side of every texture atlas, in pixels (a power of two so that periodic patterns tile)."""

REGIONS: tuple[str, ...] = ("backdrop", "floor")
"""Concept regions of a scene, top to bottom; segmentation value ``1 + i`` is ``REGIONS[i]``."""

CONCEPT_REGION: dict[str, str] = {
    "grass": "floor",
    "gravel": "floor",
    "sand": "floor",
    "water": "floor",
    "tiles": "floor",
    "brick": "backdrop",
    "sky": "backdrop",
    "foliage": "backdrop",
    "curtain": "backdrop",
    "wallpaper": "backdrop",
}
CONCEPTS: tuple[str, ...] = tuple(CONCEPT_REGION)
"""All concepts; a concept id is an index into this tuple."""

Colour = Sequence[float]


# ----------------------------------------------------------------------------- helpers
def noise(
    rng: np.random.Generator, sigma: float | tuple[float, float], n: int = ATLAS
) -> np.ndarray:
    """Tileable smooth Gaussian noise, zero mean and unit variance."""
    x = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma, mode="wrap")
    return ((x - x.mean()) / (x.std() + 1e-8)).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    """Rescale to ``[0, 1]``."""
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo + 1e-8)).astype(np.float32)


def smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)


def ramp(level: np.ndarray, stops: Sequence[Colour]) -> np.ndarray:
    """Map levels in ``[0, 1]`` to colours, linearly between equally spaced ``stops``."""
    s = np.asarray(stops, dtype=np.float32)
    t = np.clip(level, 0.0, 1.0) * (len(s) - 1)
    i = np.minimum(t.astype(np.int64), len(s) - 2)
    f = (t - i)[..., None]
    return (s[i] * (1 - f) + s[i + 1] * f).astype(np.float32)


def grid(n: int = ATLAS) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(y, x)`` of an ``n x n`` atlas."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return y, x


def warp(image: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Sample ``image`` (H, W) at ``(y + dy, x + dx)``, wrapping around the edges."""
    y, x = grid(image.shape[0])
    return ndimage.map_coordinates(image, [y + dy, x + dx], order=1, mode="grid-wrap").astype(
        np.float32
    )


def stamp_ellipses(
    canvas: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    angles: np.ndarray,
    colours: np.ndarray,
) -> np.ndarray:
    """Paint antialiased filled ellipses (in order, wrapping around) on an ``(n, n, 3)`` canvas."""
    n = canvas.shape[0]
    r = int(np.ceil(np.max(radii))) + 1
    base = np.floor(centres).astype(np.int64) - r  # window corners, (count, 2)
    off = np.arange(2 * r + 2, dtype=np.float32)
    yy = (base[:, 0, None, None] + off[None, :, None]) - centres[:, 0, None, None]
    xx = (base[:, 1, None, None] + off[None, None, :]) - centres[:, 1, None, None]
    c, s = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    ra, rb = radii[:, 0, None, None], radii[:, 1, None, None]
    d = np.hypot((xx * c + yy * s) / ra, (-xx * s + yy * c) / rb)
    alpha = np.clip((1.0 - d) * np.minimum(ra, rb) + 0.5, 0.0, 1.0).astype(np.float32)[..., None]
    cols = np.asarray(colours, dtype=np.float32)
    w = 2 * r + 2
    for (y0, x0), a, col in zip(base, alpha, cols, strict=True):
        iy, ix = np.ix_(np.arange(y0, y0 + w) % n, np.arange(x0, x0 + w) % n)
        canvas[iy, ix] = canvas[iy, ix] * (1 - a) + a * col
    return canvas


# ----------------------------------------------------------------------------- real textures
def _photo(name: str, stops: Sequence[Colour], spread: float, rotate: bool = False) -> np.ndarray:
    import skimage.data

    g = getattr(skimage.data, name)().astype(np.float32) / 255.0
    if rotate:
        g = np.rot90(g)
    n = g.shape[0] // ATLAS
    g = g[: n * ATLAS, : n * ATLAS].reshape(ATLAS, n, ATLAS, n).mean(axis=(1, 3))
    z = (g - g.mean()) / (g.std() + 1e-8)
    return ramp(0.5 + spread * z, stops)


def _grass(rng: np.random.Generator) -> np.ndarray:
    return _photo("grass", [(0.05, 0.14, 0.02), (0.2, 0.42, 0.08), (0.62, 0.84, 0.3)], 0.24)


def _gravel(rng: np.random.Generator) -> np.ndarray:
    return _photo("gravel", [(0.14, 0.13, 0.12), (0.5, 0.47, 0.43), (0.9, 0.87, 0.82)], 0.24)


def _brick(rng: np.random.Generator) -> np.ndarray:
    # scikit-image's bricks stand upright: turn them into a wall; dark = brick, light = mortar.
    stops = [(0.32, 0.07, 0.04), (0.62, 0.2, 0.12), (0.72, 0.3, 0.2), (0.9, 0.86, 0.78)]
    return _photo("brick", stops, 0.2, rotate=True)


# ----------------------------------------------------------------------------- procedural
def _sand(rng: np.random.Generator) -> np.ndarray:
    y, _ = grid()
    ripples = np.sin(2 * np.pi * (y + 3.0 * noise(rng, (4, 16))) / 8.0)
    level = 0.5 + 0.1 * ripples + 0.1 * noise(rng, 0.7) + 0.08 * noise(rng, 10)
    return ramp(level, [(0.5, 0.4, 0.24), (0.85, 0.74, 0.52), (0.98, 0.93, 0.78)])


def _water(rng: np.random.Generator) -> np.ndarray:
    waves = unit(noise(rng, (1.2, 7)) + 0.6 * noise(rng, (3, 14)))
    glint = smoothstep(0.72, 0.9, waves)
    base = ramp(0.3 + 0.35 * waves + 0.1 * noise(rng, 20), [(0.02, 0.13, 0.32), (0.08, 0.34, 0.58)])
    return base * (1 - glint[..., None]) + glint[..., None] * np.float32([0.7, 0.88, 0.98])


def _tiles(rng: np.random.Generator, size: int = 16, grout: int = 2) -> np.ndarray:
    y, x = grid()
    ty, tx = (y // size).astype(int), (x // size).astype(int)
    checker = (ty + tx) % 2
    jitter = rng.normal(0, 0.05, (ATLAS // size, ATLAS // size)).astype(np.float32)[ty, tx]
    colours = np.where(
        checker[..., None] == 1, np.float32([0.72, 0.36, 0.22]), np.float32([0.9, 0.84, 0.7])
    )
    img = colours * (1 + jitter[..., None] + 0.03 * noise(rng, 0.8)[..., None])
    is_grout = ((y % size) < grout) | ((x % size) < grout)
    return np.where(is_grout[..., None], np.float32([0.4, 0.39, 0.37]), img).astype(np.float32)


def _sky(rng: np.random.Generator) -> np.ndarray:
    clouds = unit(noise(rng, 14) + 0.5 * noise(rng, 5) + 0.25 * noise(rng, 2))
    cover = smoothstep(0.5, 0.75, clouds)[..., None]
    blue = ramp(0.5 + 0.15 * noise(rng, 30), [(0.25, 0.45, 0.85), (0.55, 0.75, 0.97)])
    white = np.float32([0.97, 0.97, 1.0]) * (0.85 + 0.15 * unit(noise(rng, 3)))[..., None]
    return (blue * (1 - cover) + white * cover).astype(np.float32)


def _foliage(rng: np.random.Generator, count: int = 4000) -> np.ndarray:
    canvas = np.zeros((ATLAS, ATLAS, 3), np.float32) + np.float32([0.03, 0.12, 0.03])
    centres = rng.uniform(0, ATLAS, (count, 2))
    radii = np.stack([rng.uniform(3, 5.5, count), rng.uniform(1.5, 2.6, count)], axis=1)
    shade = rng.uniform(0, 1, count)[:, None]
    colours = (1 - shade) * np.float32([0.1, 0.3, 0.06]) + shade * np.float32([0.45, 0.68, 0.2])
    return stamp_ellipses(canvas, centres, radii, rng.uniform(0, np.pi, count), colours)


def _curtain(rng: np.random.Generator, period: float = 16.0) -> np.ndarray:
    _, x = grid()
    folds = np.sin(2 * np.pi * (x + 2.5 * noise(rng, (20, 4))) / period)
    shade = 0.35 + 0.65 * (0.5 + 0.5 * folds) ** 0.7 + 0.05 * noise(rng, (5, 0.5))
    return (np.float32([0.68, 0.08, 0.16]) * shade[..., None]).clip(0, 1).astype(np.float32)


def _wallpaper(rng: np.random.Generator, period: int = 16) -> np.ndarray:
    y, x = grid()
    d1, d2 = (x + y) % period, (x - y) % period
    line = np.minimum(np.minimum(d1, period - d1), np.minimum(d2, period - d2))
    lattice = smoothstep(1.6, 0.6, line)[..., None]
    cy, cx = (y % period) - period / 2, (x % period) - period / 2
    dot = smoothstep(2.6, 1.6, np.sqrt(cx * cx + cy * cy))[..., None]
    paper = np.float32([0.12, 0.42, 0.44]) * (1 + 0.04 * noise(rng, 1.0))[..., None]
    gold = np.float32([0.88, 0.74, 0.38])
    img = paper * (1 - lattice) + gold * lattice
    return (img * (1 - dot) + np.float32([0.95, 0.9, 0.78]) * dot).astype(np.float32)


_BUILDERS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "grass": _grass,
    "gravel": _gravel,
    "sand": _sand,
    "water": _water,
    "tiles": _tiles,
    "brick": _brick,
    "sky": _sky,
    "foliage": _foliage,
    "curtain": _curtain,
    "wallpaper": _wallpaper,
}


@functools.lru_cache(maxsize=1)
def concept_atlases() -> np.ndarray:
    """All concept atlases, ``(len(CONCEPTS), ATLAS, ATLAS, 3)`` float32 in ``[0, 1]``."""
    out = np.empty((len(CONCEPTS), ATLAS, ATLAS, 3), np.float32)
    for i, name in enumerate(CONCEPTS):
        out[i] = np.clip(_BUILDERS[name](np.random.default_rng([0xC0C0, i])), 0.0, 1.0)
    logger.debug("built %d concept atlases", len(CONCEPTS))
    out.setflags(write=False)
    return out
