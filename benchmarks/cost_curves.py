"""Cost curves: how the time of key statistics, of preparing an edit and of the fast solve grows with the
number of images, the image size and the layer's width (issue 16, item 5).

    OMP_NUM_THREADS=1 python -m benchmarks.cost_curves            # ~10 minutes on one core
    python -m benchmarks.cost_curves --quick                       # seconds (tests)

Three sweeps, each changing one thing from VGG16-BN ``features.40`` at 224 px with one exemplar:

- **images** (1-100): the exemplars of the edit, and as many images for the statistics;
- **size** (64-448 px): one exemplar, 16 images for the statistics;
- **width** (64-3072 channels): a conv-BN-ReLU-max-pool block whose edited 3x3 conv maps ``w`` to
  ``w`` channels on a 14x14 map (a stem brings 224 px images there), one exemplar, 16 images.

Per point: ``stats`` = :func:`collect_key_stats` plus the whitening the direction needs (what a first
edit pays), ``prepare`` = keys, values and direction of the exemplars with those statistics,
``solve`` = the fast solver and one evaluation of the objective (the limit a solver cannot beat), each
the median of 3 after a warm-up, timed in alternation. Weights are random; BN statistics randomized. Writes
``benchmarks/results/cost_curves[_quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import surgery
from surgery.models.random_init import randomize_batchnorm
from surgery.problems import prepare_problem
from surgery.solvers import solve_fast
from surgery.stats.collect import collect_key_stats

from .speed import exemplar, timed_side_by_side

logger = logging.getLogger("benchmarks.cost_curves")

RESULTS = Path(__file__).parent / "results"
FULL = {"images": (1, 3, 10, 30, 100), "size": (64, 112, 224, 336, 448), "width": (64, 256, 512, 1024, 2048, 3072)}
QUICK = {"images": (1, 3), "size": (32, 48), "width": (8, 16)}
BASE_SIZE, BASE_STATS_IMAGES = 224, 16


def vgg_case() -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.vgg16_bn()).eval(), "features.40"


def width_case(width: int) -> tuple[nn.Module, str]:
    """A stem to a 14x14 map (from 224 px), then the measured block: conv 3x3 ``width -> width``, BN, ReLU,
    max-pool, and a classifier."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 16, stride=16), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )
    return randomize_batchnorm(model).eval(), "2"


def measure(
    model: nn.Module, layer_name: str, *, n_exemplars: int, n_stats: int, size: int, repeats: int = 3
) -> dict:
    """The times of one point (see the module docstring)."""
    layer = surgery.get_layer(model, layer_name)
    data = torch.randn(n_stats, 3, size, size, generator=torch.Generator().manual_seed(2))
    x, x2 = exemplar(size, torch.device("cpu"), n_exemplars)
    start = time.perf_counter()
    key_stats = collect_key_stats(model, layer, data, batch_size=8, progress=False)
    key_stats.whitening()
    stats_s = time.perf_counter() - start
    start = time.perf_counter()
    problem = prepare_problem(model, layer, x, x2, stats=key_stats, loss="l1")
    prepare_s = time.perf_counter() - start
    lam0 = torch.zeros(problem.lam_shape, dtype=problem.weight0.dtype)

    def objective():
        with torch.no_grad():
            return problem.objective(lam0)

    t = timed_side_by_side({"solve": lambda: solve_fast(problem), "objective": objective}, torch.device("cpu"), repeats=repeats)
    solve_s, eval_s = t["solve"], t["objective"]
    return {
        "channels": layer.weight.shape[1], "size": size, "exemplars": n_exemplars, "stats_images": n_stats,
        "stats_seconds": stats_s, "prepare_seconds": prepare_s, "solve_seconds": solve_s,
        "objective_eval_seconds": eval_s, "solve_in_objective_evals": solve_s / eval_s,
    }


def run(quick: bool) -> dict:
    grid = QUICK if quick else FULL
    base_size = 32 if quick else BASE_SIZE
    base_stats = 4 if quick else BASE_STATS_IMAGES
    repeats = 1 if quick else 3
    out: dict = {"mode": "quick" if quick else "full", "torch": torch.__version__, "threads": torch.get_num_threads()}
    model, layer = vgg_case()
    out["images"] = []
    for n in grid["images"]:
        logger.info("images: %d", n)
        out["images"].append(measure(model, layer, n_exemplars=n, n_stats=n, size=base_size, repeats=repeats))
    out["size"] = []
    for size in grid["size"]:
        logger.info("size: %d px", size)
        out["size"].append(measure(model, layer, n_exemplars=1, n_stats=base_stats, size=size, repeats=repeats))
    out["width"] = []
    for width in grid["width"]:
        logger.info("width: %d channels", width)
        wmodel, wlayer = width_case(width)
        out["width"].append(measure(wmodel, wlayer, n_exemplars=1, n_stats=base_stats, size=base_size, repeats=repeats))
    return out


AXES = {"images": ("exemplars", "exemplars (and statistics images)"), "size": ("size", "image size (px)"),
        "width": ("channels", "layer width (channels)")}
TIMES = ("stats_seconds", "prepare_seconds", "solve_seconds", "objective_eval_seconds")


def markdown(result: dict) -> str:
    lines = [f"Cost curves ({result['mode']} run, torch {result['torch']}, {result['threads']} thread(s)); seconds", ""]
    for sweep, (key, label) in AXES.items():
        lines += [f"| {label} | statistics | prepare | fast solve | one objective evaluation | solve / evaluation |",
                  "|---|---|---|---|---|---|"]
        for p in result[sweep]:
            lines.append(
                f"| {p[key]} | {p['stats_seconds']:.3g} | {p['prepare_seconds']:.3g} | {p['solve_seconds']:.3g} | "
                f"{p['objective_eval_seconds']:.3g} | {p['solve_in_objective_evals']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (sweep, (key, label)) in zip(axes, AXES.items()):
        xs = [p[key] for p in result[sweep]]
        for t in TIMES:
            ax.plot(xs, [p[t] for p in result[sweep]], marker="o", label=t.replace("_seconds", "").replace("_", " "))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Cost of an edit: VGG16-BN features.40 (images, size) and a conv block (width), one thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grids (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("surgery").setLevel(logging.WARNING)  # not a line per solve
    result = run(args.quick)
    result["command"] = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python -m benchmarks.cost_curves" + (
        " --quick" if args.quick else ""
    )
    stem = "cost_curves" + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    print(table)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    figure(result, args.out / f"{stem}.png")
    return result


if __name__ == "__main__":
    main()
