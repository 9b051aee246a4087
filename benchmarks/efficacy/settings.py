"""What defines an efficacy run: the groups reported, the methods and their grids, and the settings of
the full, quick and tiny modes (stored in the JSON)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgery.testbed.protocol import ALPHAS, MIN_DROP, MIN_HURT

__all__ = ["GROUPS", "VARIANTS", "TOKEN_VARIANTS", "SCHEDULE_VARIANTS", "RANK_VARIANTS", "METHODS", "PAPER_FT_GRID", "FT_GRID", "Settings", "settings_for"]


GROUPS = (
    "target/same", "target/held-out",
    "other/same", "other/held-out",
    "other-prefer/same", "other-prefer/held-out",
    "other-nonprefer/same", "other-nonprefer/held-out",
)


VARIANTS = ("edit multi-class", "edit high-res", "edit label-free", "edit span")
# Variants that matter for tokens (the ViT): the class token weighed like one grid token instead of
# "auto", and the deep candidates restricted to the MLP outputs or to the attention outputs.
TOKEN_VARIANTS = ("edit prefix=1", "edit mlp only", "edit attn only")
# A span of four blocks under each share schedule (surgery.span): not in the default run; chosen with
# --methods (benchmarks/results/span_schedules.md).
SCHEDULE_VARIANTS = ("edit long span", "edit long span first-last")
# The edit's candidates and the same layers edited with more directions (``rewrite(..., rank=r)``) for
# each rank r listed, one selection among all of them; on every unit, so that the lead over fine-tuning
# is measured like the edit's. Each variant's ranks contain the one before it, so its paired gain over
# that one is what the added rank brings. Not in the default run; chosen with --methods
# (benchmarks/results/efficacy_vit_rank_pooled.md; rank 8: efficacy_vit_rank_seed2.md).
RANK_VARIANTS: dict[str, tuple[int, ...]] = {"edit rank 4": (4,), "edit rank 8": (4, 8)}
METHODS = (
    "edit", "edit +mask", "reference", "finetune local", "finetune global", *VARIANTS, *TOKEN_VARIANTS,
    *SCHEDULE_VARIANTS, *RANK_VARIANTS,
)


PAPER_FT_GRID = ((1e-2, 500), (1e-3, 500), (1e-4, 500), (1e-5, 800), (1e-6, 800))


# The full run's grid: the paper's three largest learning rates, 200 full-batch steps each, at the deepest
# candidate layer. The paper's whole grid at every layer costs ~20x more on 2 CPU cores; its two smallest
# learning rates barely move the weights (at most +-0 errors corrected), so they never change a conclusion.
FT_GRID = ((1e-2, 200), (1e-3, 200), (1e-4, 200))


@dataclass
class Settings:
    """Everything that defines a run (stored in the JSON)."""

    arch: str = "vgg"
    mode: str = "full"
    seed: int = 0
    pairs: int = 8
    ns: tuple[int, ...] = (1, 3, 10)
    draws: int = 5
    alphas: tuple[float, ...] = ALPHAS
    ft_grid: tuple[tuple[float, int], ...] = FT_GRID
    reference_steps: tuple[int, ...] = (1000, 4000)
    reference_pairs: int = 2
    methods: tuple[str, ...] = (
        "edit", "edit +mask", "reference", "finetune local", "finetune global",
        "edit multi-class", "edit high-res", "edit label-free", "edit span",
    )
    variant_ns: tuple[int, ...] = (3,)  # the variants run on these N ...
    variant_draws: int = 1  # ... and this many draws (they cost as much as the main methods)
    concepts: tuple[str, ...] | None = None  # concepts screened for pairs (None: all)
    styles: tuple[str, ...] | None = None  # styles screened for pairs (None: all)
    ft_last_layer_only: bool = True  # fine-tune only at the deepest candidate layer
    fast_steps: int | None = None  # most Gauss-Newton iterations of the fast solver (None: library default)
    deadline: float | None = None  # time.time() after which no new unit starts (--max-minutes)
    max_clean_drop: float = 0.25
    min_drop: float = MIN_DROP
    min_hurt: int = MIN_HURT
    n_stats: int = 4000
    n_clean_val: int = 2000
    n_test: int = 3000
    n_concept_ref: int = 400
    val_fraction: float = 0.3
    bootstrap: int = 2000
    size: int = 80


def settings_for(mode: str, arch: str, **over: Any) -> Settings:
    s = Settings(arch=arch, mode=mode)
    if mode == "quick":
        s = Settings(
            arch=arch, mode=mode, pairs=3, ns=(3,), draws=2, alphas=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0),
            ft_grid=((1e-2, 200), (1e-3, 200), (1e-4, 200)), reference_steps=(1000, 4000),
            ft_last_layer_only=True, fast_steps=30,
            reference_pairs=1, n_stats=2000, n_clean_val=1000, n_test=2000, n_concept_ref=200,
        )
    elif mode == "tiny":
        s = Settings(
            arch="tiny", mode=mode, pairs=1, ns=(1,), draws=1, alphas=(0.25, 1.0),
            ft_grid=((1e-2, 5),), reference_steps=(20,), reference_pairs=1,
            methods=("edit", "reference", "finetune local", "finetune global", "edit label-free"),
            max_clean_drop=2.0, min_drop=15.0, min_hurt=3, n_stats=200, n_clean_val=200, n_test=400,
            n_concept_ref=40, bootstrap=200, size=48, fast_steps=5, variant_ns=(1,),
            concepts=("grass", "sand", "brick", "sky"), styles=("snow", "black-and-white"),
        )
    if arch == "vit" and mode != "tiny":
        s.methods = (*s.methods, *TOKEN_VARIANTS)
    for k, v in over.items():
        if v is not None:
            setattr(s, k, v)
    return s
