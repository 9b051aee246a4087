"""Scenes: a real object in front of two concept regions, rendered exactly from their parameters.

Layout of an ``S x S`` scene (``S = 80`` by default): a ``backdrop`` above a gently wavy horizon at
55-65% of the height, a ``floor`` below it, and one object of 28-32 px near the centre, tinted and
outlined so that it is clearly visible on any texture. At a deep layer's 5x5 or 10x10 map, the outer
ring of cells holds only concept pixels and the object stays in the middle cells.

Each class prefers one floor concept and one backdrop concept (:func:`preference_table`); a scene
takes the preferred concept of each region with probability ``p_prefer`` (0.7), else one of the
region's other concepts uniformly. Every concept is preferred by 4 classes.

A :class:`SceneSpec` holds every render parameter, so a scene can be re-rendered exactly: without
its object, with another concept, or with a region restyled (see :mod:`.styles`).

This module is long because sampling a spec, rendering it (regions, object, masks, restyles) and
batching the renders into a dataset must change together: a re-render is exact only if every step
reads the same spec the same way, and the generator version covers them all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from surgery._files import atomic_write
from surgery.identity import digest

from .objects import (
    CLASS_NAMES,
    FASHION_CLASSES,
    SPLITS,
    ObjectBank,
    TestbedError,
    load_object_bank,
)
from .procedural_styles import STYLES, apply_style, style_atlases, style_variant
from .textures import ATLAS, CONCEPT_REGION, CONCEPTS, REGIONS, concept_atlases

__all__ = [
    "GENERATOR_VERSION",
    "TestbedConfig",
    "SceneSpec",
    "Testbed",
    "TestbedData",
    "Restyle",
    "preference_table",
    "make_dataset",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bumped whenever the same spec would render differently; part of every cache key."""

Restyle = Mapping[str, tuple[str, int | str]]
"""``{region or concept: (style, variant)}``: restyle a region in every scene, or a concept's region
in the scenes that show that concept. Later entries win where two apply to the same region."""

assert REGIONS == ("backdrop", "floor")  # the renderer's region map is a boolean "floor"

_BLOCK = 1024  # scenes drawn per generator: sample(n) is always a prefix of sample(m > n)


@dataclass(frozen=True)
class TestbedConfig:
    """What the scenes look like. Everything but ``fashion_dir`` is part of the cache key.

    Attributes:
        size: canvas side ``S`` in pixels (48..256).
        object_size: range of the object's side in pixels (its content box: the whole 28x28 item,
            the central 20x20 of a digit).
        object_jitter: largest ``(dx, dy)`` of the object's centre from the canvas centre, pixels.
        object_angle: largest rotation of the object, degrees.
        horizon: range of the horizon's height, as fractions of ``S`` from the top.
        wave: largest amplitude of the horizon's wave, as a fraction of ``S``.
        p_prefer: probability that a region shows the class's preferred concept.
        table_seed: seed of the class -> preferred concepts table.
        brightness: range of a per-region brightness factor of the texture (one of 9 evenly
            spaced levels, so that textures are gathered from pre-quantized atlases).
        outline: how much a 1-px outline around the object darkens the background (0: none).
        fashion_dir: where the Fashion-MNIST IDX files are (None: the usual places).
    """

    __test__ = False

    size: int = 80
    object_size: tuple[float, float] = (28.0, 32.0)
    object_jitter: tuple[float, float] = (4.0, 3.0)
    object_angle: float = 10.0
    horizon: tuple[float, float] = (0.55, 0.65)
    wave: float = 0.04
    p_prefer: float = 0.7
    table_seed: int = 0
    brightness: tuple[float, float] = (0.85, 1.15)
    outline: float = 0.55
    fashion_dir: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 48 <= self.size <= ATLAS:
            raise TestbedError(f"size must be in 48..{ATLAS}, not {self.size}")
        if not 0.0 <= self.p_prefer <= 1.0:
            raise TestbedError(f"p_prefer must be a probability, not {self.p_prefer}")

    def key(self) -> str:
        """A short hash of everything that changes the rendered pixels."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
        blob = json.dumps({"v": GENERATOR_VERSION, **fields}, sort_keys=True)
        return digest(blob, 16)


@dataclass(frozen=True)
class SceneSpec:
    """Every parameter of one scene; :meth:`Testbed.render` draws it exactly.

    Positions and sizes are in canvas pixels (continuous, origin at the top-left corner).
    Per-region tuples follow :data:`REGIONS` (``backdrop``, ``floor``).
    """

    split: str
    index: int
    seed: int
    label: int
    source: str
    source_index: int
    object_size: float
    object_x: float
    object_y: float
    object_angle: float
    object_flip: bool
    tint: tuple[float, float, float]
    horizon: float
    wave_amplitude: float
    wave_period: float
    wave_phase: float
    concepts: tuple[str, ...]
    texture_offsets: tuple[tuple[int, int], ...]
    texture_flips: tuple[bool, ...]
    brightness: tuple[float, ...]

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]

    def concept(self, region: str) -> str:
        """The concept shown in ``region``."""
        return self.concepts[REGIONS.index(region)]

    def with_concept(self, concept: str) -> SceneSpec:
        """The same scene with ``concept`` in its region (every other parameter unchanged)."""
        if concept not in CONCEPT_REGION:
            raise KeyError(f"unknown concept {concept!r}; concepts: {', '.join(CONCEPTS)}")
        concepts = list(self.concepts)
        concepts[REGIONS.index(CONCEPT_REGION[concept])] = concept
        return dataclasses.replace(self, concepts=tuple(concepts))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SceneSpec:
        def tup(x: Any) -> Any:
            return tuple(tup(v) for v in x) if isinstance(x, (list, tuple)) else x

        return cls(**{k: tup(v) for k, v in data.items()})


def preference_table(table_seed: int = 0) -> dict[int, dict[str, str]]:
    """Class -> ``{region: preferred concept}``, seeded; each concept is preferred by 4 classes.

    Classes are shuffled into ranks ``j = 5a + b``; rank ``j`` prefers floor ``b`` and backdrop
    ``(a + b) mod 5`` (of seeded concept orders), so no two classes share both preferences.
    """
    rng = np.random.default_rng([0x7AB1E, table_seed])
    order = rng.permutation(len(CLASS_NAMES))
    per_region = [
        [
            CONCEPTS[i]
            for i in rng.permutation([i for i, c in enumerate(CONCEPTS) if CONCEPT_REGION[c] == r])
        ]
        for r in REGIONS
    ]
    backdrops, floors = per_region
    table: dict[int, dict[str, str]] = {}
    for j, c in enumerate(order):
        a, b = divmod(j, len(floors))
        table[int(c)] = {"backdrop": backdrops[(a + b) % len(backdrops)], "floor": floors[b]}
    return dict(sorted(table.items()))


def _hash(*keys: np.ndarray) -> np.ndarray:
    """splitmix64 of a combination of integer arrays (uint64)."""
    h = np.zeros(np.broadcast(*keys).shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = h ^ np.asarray(k).astype(np.uint64)
            h = h + np.uint64(0x9E3779B97F4A7C15)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return h


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.stack([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


@dataclass
class TestbedData:
    """A rendered dataset.

    Attributes:
        images: ``(N, 3, S, S)`` uint8 RGB.
        labels: ``(N,)`` int64 class ids (:data:`CLASS_NAMES`).
        segmentation: ``(N, S, S)`` uint8: 0 where the object (and its outline) is, ``1 + i`` where
            region ``REGIONS[i]`` is visible.
        concepts: ``(N, len(REGIONS))`` int64 ids (:data:`CONCEPTS`) of each region's concept.
        specs: the scenes, to re-render them (without object, restyled...).
    """

    __test__ = False

    images: torch.Tensor
    labels: torch.Tensor
    segmentation: torch.Tensor
    concepts: torch.Tensor
    specs: list[SceneSpec]

    def __len__(self) -> int:
        return len(self.labels)

    def has_concept(self, concept: str) -> torch.Tensor:
        """``(N,)`` bool: which scenes show ``concept``."""
        r = REGIONS.index(CONCEPT_REGION[concept])
        return self.concepts[:, r] == CONCEPTS.index(concept)

    def mask(self, name: str) -> torch.Tensor:
        """``(N, S, S)`` bool mask of ``"object"``, a region, or a concept (empty where absent)."""
        if name == "object":
            return self.segmentation == 0
        if name in REGIONS:
            return self.segmentation == 1 + REGIONS.index(name)
        if name in CONCEPT_REGION:
            return self.mask(CONCEPT_REGION[name]) & self.has_concept(name)[:, None, None]
        raise KeyError(f"{name!r} is neither 'object', a region {REGIONS} nor a concept {CONCEPTS}")

    def float_images(self) -> torch.Tensor:
        """Images as float32 in ``[0, 1]``."""
        return self.images.float() / 255.0


class Testbed:
    """Samples and renders scenes. ``seed`` fixes the scenes; ``config.table_seed`` the preferences.

    Example::

        tb = Testbed(TestbedConfig(), seed=0)
        specs = tb.sample(1000, "train")
        images, segmentation = tb.render_batch(specs)
        snowy, _ = tb.render_batch(specs, restyle={"grass": ("snow", "fresh")})
    """

    __test__ = False

    def __init__(self, config: TestbedConfig | None = None, seed: int = 0) -> None:
        self.config = config or TestbedConfig()
        self.seed = int(seed)
        self.table = preference_table(self.config.table_seed)

    # ------------------------------------------------------------------ metadata
    @property
    def bank(self) -> ObjectBank:
        return load_object_bank(self.config.fashion_dir)

    @property
    def size(self) -> int:
        return self.config.size

    def prefers(self, label: int, concept: str) -> bool:
        """Whether class ``label`` prefers ``concept``."""
        return self.table[label][CONCEPT_REGION[concept]] == concept

    def classes_preferring(self, concept: str) -> list[int]:
        return [c for c in self.table if self.prefers(c, concept)]

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, split: str = "train", start: int = 0) -> list[SceneSpec]:
        """Scenes ``start .. start + n - 1`` of ``split``; scene ``i`` depends on (seed, split, i).

        Labels cycle through the 20 classes (scene ``i`` has class ``i mod 20``), so any 20
        consecutive scenes hold one of each class.
        """
        if split not in SPLITS:
            raise TestbedError(f"split must be one of {SPLITS}, not {split!r}")
        if n < 0 or start < 0:
            raise TestbedError("n and start must be non-negative")
        specs: list[SceneSpec] = []
        for b in range(start // _BLOCK, (start + n + _BLOCK - 1) // _BLOCK):
            block = self._block(split, b)
            lo = max(start - b * _BLOCK, 0)
            hi = min(start + n - b * _BLOCK, _BLOCK)
            specs += block[lo:hi]
        return specs

    def _block(self, split: str, b: int) -> list[SceneSpec]:
        cfg, bank, m, S = self.config, self.bank, _BLOCK, self.config.size
        rng = np.random.default_rng([self.seed, SPLITS.index(split), b, 0x5CE7E])
        index = b * m + np.arange(m)
        label = index % len(CLASS_NAMES)
        seeds = rng.integers(0, 2**31, m)
        pick = rng.random(m)
        pools = bank.pools[split]
        source_index = np.array(
            [pools[k][int(u * len(pools[k]))] for k, u in zip(label, pick, strict=True)]
        )
        size = rng.uniform(*cfg.object_size, m)
        ox = S / 2 + rng.uniform(-1, 1, m) * cfg.object_jitter[0]
        oy = S / 2 + rng.uniform(-1, 1, m) * cfg.object_jitter[1]
        angle = rng.uniform(-1, 1, m) * cfg.object_angle
        flip = (rng.random(m) < 0.5) & (label < len(FASHION_CLASSES))  # items only, never digits
        tint = _hsv_to_rgb(rng.random(m), rng.uniform(0.5, 0.9, m), rng.uniform(0.85, 1.0, m))
        horizon = rng.uniform(*cfg.horizon, m) * S
        amp = rng.uniform(0, cfg.wave, m) * S
        period = rng.uniform(0.5, 1.5, m) * S
        phase = rng.uniform(0, 2 * np.pi, m)
        concepts, offsets, tflip, bright = [], [], [], []
        for region in REGIONS:
            names = [c for c in CONCEPTS if CONCEPT_REGION[c] == region]
            preferred = np.array([names.index(self.table[k][region]) for k in label])
            other = rng.integers(0, len(names) - 1, m)
            other = other + (other >= preferred)
            concepts.append(np.where(rng.random(m) < cfg.p_prefer, preferred, other))
            concepts[-1] = [names[i] for i in concepts[-1]]
            offsets.append(rng.integers(0, ATLAS - S + 1, (m, 2)))
            tflip.append(rng.random(m) < 0.5)
            bright.append(_levels(cfg.brightness)[rng.integers(0, BRIGHTNESS_LEVELS, m)])
        out = []
        for i in range(m):
            k = int(label[i])
            out.append(
                SceneSpec(
                    split=split,
                    index=int(index[i]),
                    seed=int(seeds[i]),
                    label=k,
                    source=bank.source_of(k),
                    source_index=int(source_index[i]),
                    object_size=float(size[i]),
                    object_x=float(ox[i]),
                    object_y=float(oy[i]),
                    object_angle=float(angle[i]),
                    object_flip=bool(flip[i]),
                    tint=(float(tint[i, 0]), float(tint[i, 1]), float(tint[i, 2])),
                    horizon=float(horizon[i]),
                    wave_amplitude=float(amp[i]),
                    wave_period=float(period[i]),
                    wave_phase=float(phase[i]),
                    concepts=tuple(c[i] for c in concepts),
                    texture_offsets=tuple((int(o[i, 0]), int(o[i, 1])) for o in offsets),
                    texture_flips=tuple(bool(f[i]) for f in tflip),
                    brightness=tuple(float(x[i]) for x in bright),
                )
            )
        return out

    # ------------------------------------------------------------------ rendering
    def render(
        self, spec: SceneSpec, *, object: bool = True, restyle: Restyle | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One scene as ``(image (S, S, 3) uint8, masks)``.

        ``masks`` holds ``"object"`` (every pixel the object and its outline change) and each region
        (its visible pixels); together they partition the canvas. With ``object=False`` the object
        mask is empty and the regions cover everything. Restyling a region changes pixels only
        inside that region's mask and, where the object's soft edge blends with it, the object's.
        """
        images, seg = self.render_batch([spec], object=object, restyle=restyle)
        s = seg[0].numpy()
        masks = {"object": s == 0}
        masks.update({r: s == 1 + i for i, r in enumerate(REGIONS)})
        return images[0].permute(1, 2, 0).numpy(), masks

    def render_batch(
        self,
        specs: Sequence[SceneSpec],
        *,
        object: bool = True,
        restyle: Restyle | None = None,
        batch_size: int = 256,
        num_threads: int | None = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scenes as ``(images (N, 3, S, S) uint8, segmentation (N, S, S) uint8)``.

        See :class:`TestbedData` for the segmentation's values.

        Rendering is many small memory-bound tensor operations: it runs with ``num_threads``
        intra-op threads (restored afterwards; None keeps torch's setting). One thread measured
        1-5x faster than two on a busy 2-core machine, and about as fast on an idle one.
        """
        plan = _restyle_plan(restyle)
        S = self.config.size
        images = torch.empty((len(specs), 3, S, S), dtype=torch.uint8)
        seg = torch.empty((len(specs), S, S), dtype=torch.uint8)
        previous = torch.get_num_threads()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            for lo in range(0, len(specs), batch_size):
                chunk = specs[lo : lo + batch_size]
                images[lo : lo + len(chunk)], seg[lo : lo + len(chunk)] = self._render(
                    chunk, object, plan
                )
        finally:
            if num_threads is not None:
                torch.set_num_threads(previous)
        return images, seg

    def _render(
        self, specs: Sequence[SceneSpec], with_object: bool, plan: list[tuple[str, str, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        S, n = self.config.size, len(specs)
        ar = torch.arange(S, dtype=torch.int32)
        centres = torch.arange(S, dtype=torch.float32) + 0.5
        # regions: the floor lies below a wavy horizon
        wave = torch.tensor(
            [[s.horizon, s.wave_amplitude, s.wave_period, s.wave_phase] for s in specs]
        )
        h, amp, period, phase = wave.T[..., None]
        line = h + amp * torch.sin(2 * math.pi * centres[None] / period + phase)  # (n, S) over x
        region = centres[None, :, None] >= line[:, None, :]  # (n, S, S): True on the floor
        # textures: one gather of RGBA words from the quantized atlases, at each pixel's crop
        table, levels = self._table
        cids = torch.tensor(
            [[CONCEPTS.index(c) for c in s.concepts] for s in specs], dtype=torch.int32
        )
        offs = torch.tensor([s.texture_offsets for s in specs], dtype=torch.int32)  # (n, R, 2)
        flips = torch.tensor([s.texture_flips for s in specs])  # (n, R)
        level = torch.tensor(
            [[_level(b, levels) for b in s.brightness] for s in specs], dtype=torch.int32
        )
        index = []
        for r in range(len(REGIONS)):
            rows = offs[:, r, 0, None] + ar
            cols = torch.where(
                flips[:, r, None], offs[:, r, 1, None] + (S - 1 - ar), offs[:, r, 1, None] + ar
            )
            base = (cids[:, r] * len(levels) + level[:, r]) * ATLAS
            index.append((base[:, None, None] + rows[:, :, None]) * ATLAS + cols[:, None, :])
        words = table.index_select(0, torch.where(region, index[1], index[0]).view(-1))
        out = words.view(torch.uint8).view(n, S, S, 4)
        if plan:
            self._restyle(out, region, index, table, cids, specs, plan)
        seg = region.to(torch.uint8).add_(1)
        if with_object:
            self._paste(out, seg, specs)
        return out[..., :3].permute(0, 3, 1, 2).contiguous(), seg

    def _restyle(
        self,
        out: torch.Tensor,
        region: torch.Tensor,
        index: list[torch.Tensor],
        table: torch.Tensor,
        cids: torch.Tensor,
        specs: Sequence[SceneSpec],
        plan: list[tuple[str, str, int]],
    ) -> None:
        """Restyle regions of ``out`` (``(n, S, S, 4)`` uint8) in place, inside their masks only."""
        n, S = out.shape[:2]
        seeds = np.array([s.seed for s in specs], dtype=np.int64)
        for r, name in enumerate(REGIONS):
            chosen = torch.full((n,), -1, dtype=torch.long)  # which plan entry restyles each scene
            for e, (key, _, _) in enumerate(plan):
                if key == name:
                    chosen[:] = e
                elif CONCEPT_REGION.get(key) == name:
                    chosen[cids[:, r] == CONCEPTS.index(key)] = e
            for e in chosen.unique().tolist():
                if e < 0:
                    continue
                sel = torch.nonzero(chosen == e)[:, 0]
                words = table.index_select(0, index[r].index_select(0, sel).view(-1))
                tex = words.view(torch.uint8).view(len(sel), S, S, 4)[..., :3].float().div_(255.0)
                inside = region.index_select(0, sel) if r == 1 else ~region.index_select(0, sel)
                _, style, variant = plan[e]
                styled = self._style(tex, inside, seeds[sel.numpy()], r, style, variant)
                styled = _quantize(styled.clamp_(_FLOOR, 1.0))
                view = out.index_select(0, sel)
                view[..., :3] = torch.where(inside[..., None], styled, view[..., :3])
                out.index_copy_(0, sel, view)

    @functools.cached_property
    def _table(self) -> tuple[torch.Tensor, np.ndarray]:
        """Quantized atlases at every brightness level as int32 RGBA words, and the levels."""
        levels = _levels(self.config.brightness)
        return _atlas_table(tuple(levels.tolist())), levels

    @functools.cached_property
    def _window(self) -> tuple[int, int]:
        """Pixel range ``[lo, hi)`` (both axes) that holds every object and its outline."""
        cfg, S = self.config, self.config.size
        content = min(self.bank.content.values())
        side = cfg.object_size[1] * 28.0 / content  # the whole 28x28 source, scaled
        a = math.radians(min(cfg.object_angle, 45.0))
        half = max(cfg.object_jitter) + side / 2 * (math.cos(a) + math.sin(a)) + 3
        return max(0, int(S / 2 - half)), min(S, int(math.ceil(S / 2 + half)))

    def _style(
        self,
        tex: torch.Tensor,
        inside: torch.Tensor,
        seeds: np.ndarray,
        r: int,
        style: str,
        variant: int,
    ) -> torch.Tensor:
        index, var = style_variant(style, variant)
        atl = style_atlases(index)
        overlay = None
        if atl is not None:
            S = tex.shape[1]
            ar = torch.arange(S)
            h = _hash(seeds, np.full_like(seeds, r), np.full_like(seeds, index))
            oy = torch.from_numpy((h % np.uint64(ATLAS)).astype(np.int64))
            ox = torch.from_numpy(((h >> np.uint64(16)) % np.uint64(ATLAS)).astype(np.int64))
            rows = (oy[:, None] + ar) % ATLAS
            cols = (ox[:, None] + ar) % ATLAS
            pattern, opacity = atl
            overlay = (
                pattern[rows[:, :, None], cols[:, None, :]],
                opacity[rows[:, :, None], cols[:, None, :]],
            )
        return apply_style(tex, inside, var, overlay)

    def _paste(self, out: torch.Tensor, seg: torch.Tensor, specs: Sequence[SceneSpec]) -> None:
        """Composite each scene's object onto ``out`` (``(n, S, S, 4)`` uint8), mark it in ``seg``.

        The object's mask is its support grown by a 1-px outline; only those pixels change, and
        every one of them does.
        """
        bank, S = self.bank, self.config.size
        lo, hi = self._window
        idx = np.array([bank.offsets[s.source] + s.source_index for s in specs])
        src = torch.from_numpy(bank.images[idx]).float().div_(255.0)[:, None]
        p = torch.tensor(
            [
                [
                    s.object_x,
                    s.object_y,
                    s.object_angle,
                    s.object_size,
                    bank.content[s.source],
                    s.object_flip,
                ]
                for s in specs
            ],
            dtype=torch.float32,
        )
        x, y, ang, size, content, flip = (v[:, None, None] for v in p.T)
        # source (normalized) = k * Flip * R(-angle) * (canvas (normalized) - centre)
        k = (content / size) * (S / 28.0)
        a = torch.deg2rad(ang)
        cos, sin = torch.cos(a) * k, torch.sin(a) * k
        sx = torch.where(flip > 0, -1.0, 1.0)
        coords = 2.0 * (torch.arange(lo, hi, dtype=torch.float32) + 0.5) / S - 1.0
        u = coords[None, None, :] - (2 * x / S - 1)  # (n, 1, W)
        v = coords[None, :, None] - (2 * y / S - 1)  # (n, W, 1)
        grid = torch.stack([sx * (cos * u + sin * v), -sin * u + cos * v], dim=-1)
        inten = F.grid_sample(
            src, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[:, 0]
        # alpha = min(3 * intensity, 1), cut to 0 below 0.05; the ring adds a 1-px outline
        support = inten >= _ALPHA_CUT / 3.0
        ring = support.clone()
        ring[:, :, 1:] |= support[:, :, :-1]
        ring[:, :, :-1] |= support[:, :, 1:]
        grown = ring.clone()
        ring[:, 1:] |= grown[:, :-1]
        ring[:, :-1] |= grown[:, 1:]
        b, i, j = torch.nonzero(ring, as_tuple=True)
        t = inten[b, i, j, None]
        a = torch.where(t >= _ALPHA_CUT / 3.0, (3.0 * t).clamp_(max=1.0), 0.0)
        tint = torch.tensor([s.tint for s in specs], dtype=torch.float32)
        before = out[b, i + lo, j + lo, :3]
        value = before.float() * ((1.0 - self.config.outline) / 255.0) * (1 - a) + a * tint[b] * (
            0.35 + 0.65 * t
        )
        after = _quantize(value)
        # nudge the rare pixel the object leaves unchanged: the mask is exactly what changes
        same = (after == before).all(-1)
        if same.any():
            logger.debug("nudged %d object pixels equal to the background", int(same.sum()))
            bs = before[same]
            after[same] = torch.where(bs >= 128, bs - 3, bs + 3)
        out[b, i + lo, j + lo, :3] = after
        seg[b, i + lo, j + lo] = 0

    # ------------------------------------------------------------------ datasets
    def make_dataset(
        self,
        n: int,
        split: str = "train",
        *,
        start: int = 0,
        restyle: Restyle | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> TestbedData:
        """Sample and render ``n`` scenes; with ``cache_dir``, reuse the same call's rendering."""
        specs = self.sample(n, split, start)
        path = None
        if cache_dir is not None:
            req = json.dumps(
                [self.config.key(), self.seed, split, n, start, sorted((restyle or {}).items())],
                default=str,
            )
            path = Path(cache_dir) / f"scenes-{digest(req, 20)}.npz"
            if path.is_file():
                with np.load(path) as z:
                    logger.info("testbed: loaded %d %s scenes from %s", n, split, path)
                    return self._data(
                        specs, torch.from_numpy(z["images"]), torch.from_numpy(z["seg"])
                    )
        t0 = time.perf_counter()
        images, seg = self.render_batch(specs, restyle=restyle)
        logger.info("testbed: rendered %d %s scenes in %.1f s", n, split, time.perf_counter() - t0)
        if path is not None:

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
                    np.savez(f, images=images.numpy(), seg=seg.numpy())

            atomic_write(path, write)
        return self._data(specs, images, seg)

    @staticmethod
    def _data(specs: list[SceneSpec], images: torch.Tensor, seg: torch.Tensor) -> TestbedData:
        return TestbedData(
            images=images,
            labels=torch.tensor([s.label for s in specs], dtype=torch.int64),
            segmentation=seg,
            concepts=torch.tensor(
                [[CONCEPTS.index(c) for c in s.concepts] for s in specs], dtype=torch.int64
            ).reshape(len(specs), len(REGIONS)),
            specs=specs,
        )


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round_().to(torch.uint8)  # x is in [0, 1]


_ALPHA_CUT = 0.05  # object alpha below this is 0
_FLOOR = 0.02  # darkest background value: the object's outline always shows
BRIGHTNESS_LEVELS = 9


def _levels(brightness: tuple[float, float]) -> np.ndarray:
    """The discrete brightness factors a texture can take (exact float32 values)."""
    return np.linspace(*brightness, BRIGHTNESS_LEVELS).astype(np.float32)


def _level(b: float, levels: np.ndarray) -> int:
    return int(np.abs(levels - np.float32(b)).argmin())


@functools.lru_cache(maxsize=4)
def _atlas_table(levels: tuple[float, ...]) -> torch.Tensor:
    """Concept atlases times each brightness level, quantized, ``(C * L * A * A,)`` RGBA words."""
    atlases = concept_atlases()[:, None] * np.asarray(levels, np.float32)[None, :, None, None, None]
    rgb = np.round(np.clip(atlases, _FLOOR, 1.0) * 255.0).astype(np.uint8)
    rgba = np.concatenate([rgb, np.zeros(rgb.shape[:-1] + (1,), np.uint8)], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(rgba).view(np.int32).reshape(-1))


def _restyle_plan(restyle: Restyle | None) -> list[tuple[str, str, int]]:
    """Validate a restyle mapping into ``[(region or concept, style, variant index)]``."""
    plan = []
    for key, value in (restyle or {}).items():
        if key not in REGIONS and key not in CONCEPT_REGION:
            raise KeyError(
                f"restyle key {key!r} is neither a region {REGIONS} nor a concept {CONCEPTS}"
            )
        style, variant = value
        index, _ = style_variant(style, variant)
        plan.append((key, style, STYLES[style].index(_.name)))
    return plan


@functools.lru_cache(maxsize=8)
def _testbed(config: TestbedConfig, seed: int) -> Testbed:
    return Testbed(config, seed)


def make_dataset(
    n: int,
    split: str = "train",
    seed: int = 0,
    config: TestbedConfig | None = None,
    *,
    start: int = 0,
    restyle: Restyle | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TestbedData:
    """``Testbed(config, seed).make_dataset(n, split, ...)``: images, labels, masks, specs..."""
    return _testbed(config or TestbedConfig(), seed).make_dataset(
        n, split, start=start, restyle=restyle, cache_dir=cache_dir
    )


def preference_markdown(table_seed: int = 0) -> str:
    """The class -> preferred concepts table as markdown."""
    table = preference_table(table_seed)
    lines = ["| label | class | preferred backdrop | preferred floor |", "|---|---|---|---|"]
    lines += [
        f"| {k} | {CLASS_NAMES[k]} | {v['backdrop']} | {v['floor']} |" for k, v in table.items()
    ]
    return "\n".join(lines)


def cell_overlap(segmentation: torch.Tensor, cells: int) -> dict[str, float]:
    """How separate object and concepts are on a ``cells x cells`` feature map (e.g. 5 or 10).

    Returns the mean fraction of cells that hold any object pixel (``object_cells``) and, per
    region, the fraction of its visible pixels that lie in cells free of object pixels.
    """
    S = segmentation.shape[-1]
    obj = (segmentation == 0).float()[:, None]
    touched = F.adaptive_max_pool2d(obj, cells)[:, 0] > 0  # (n, cells, cells)
    cell = (torch.arange(S) * cells) // S  # the cell of each pixel row/column
    up = touched[:, cell][:, :, cell]
    out = {"object_cells": float(touched.float().mean())}
    for i, r in enumerate(REGIONS):
        m = segmentation == 1 + i
        out[f"{r}_pixels_in_clean_cells"] = float((m & ~up).sum() / m.sum().clamp(min=1))
    return out
