"""Probe the trained testbed classifiers and check that the probe recovers the generator's preferences.

Each testbed class was generated with one preferred backdrop and one preferred floor concept (70% of
its scenes each). A probe that works should find, per class, that transforming those two concepts
hurts accuracy more than transforming the other eight.

    python -m benchmarks.probe_testbed [--arch vgg|resnet|vit|convnext|all] [--n 5000] [--styles snow,wood]

Writes ``benchmarks/results/probe_<arch>.{csv,json,md,png}`` and ``probe_<arch>_bars.png``.
Restyling re-renders the scenes exactly (:meth:`Testbed.render_batch` with ``restyle``), so only the
transformed concept's pixels change.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.probe.run import ProbeResult
from surgery.testbed import CONCEPT_REGION, REGIONS, STYLES, Testbed, TestbedConfig
from surgery.testbed.models import ARCHS
from surgery.testbed.probing import preferred_cells, probe_testbed

__all__ = ["main", "recovery", "recovery_markdown", "run"]

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results"


def recovery(result: ProbeResult, tb: Testbed, *, centered: bool = False) -> dict[str, Any]:
    """How well the probe's per-class ranking of concepts (mean drop over styles) recovers the
    generator's preferred concepts.

    ``centered``: rank by the drop minus the concept's mean drop over classes instead (what is
    specific to the class, without the effect that restyling a concept has on every class).

    Per class, among its measured concepts: whether the top-ranked concept is preferred, the ranks of
    the preferred ones (1 = most harmful), the AUC (probability that a preferred concept outranks a
    non-preferred one; ties count half), and per region whether the preferred concept ranks first
    among that region's concepts. Chance levels assume a random ranking of all measured concepts.
    """
    m = result.drop_matrix()
    if centered:
        m = m - np.nanmean(m, axis=0, keepdims=True)
    per_class = []
    for k, name in enumerate(result.class_names):
        ok = [j for j, c in enumerate(result.concepts) if np.isfinite(m[k, j])]
        pref = [j for j in ok if tb.prefers(k, result.concepts[j])]
        other = [j for j in ok if j not in pref]
        if not pref or not other:
            continue
        order = sorted(ok, key=lambda j: -m[k, j])
        ranks = [order.index(j) + 1 for j in pref]
        auc = float(np.mean([(m[k, p] > m[k, o]) + 0.5 * (m[k, p] == m[k, o]) for p in pref for o in other]))
        region_top = {}
        for r in REGIONS:
            in_r = [j for j in ok if CONCEPT_REGION[result.concepts[j]] == r]
            p_r = [j for j in pref if j in in_r]
            if p_r and len(in_r) > 1:
                region_top[r] = bool(max(in_r, key=lambda j: m[k, j]) in p_r)
        per_class.append(
            {
                "label": k,
                "class": name,
                "preferred": [result.concepts[j] for j in pref],
                "preferred_drops": [float(m[k, j]) for j in pref],
                "ranking": [result.concepts[j] for j in order],
                "drops": [float(m[k, j]) for j in order],
                "n_measured": len(ok),
                "top1_preferred": order[0] in pref,
                "preferred_ranks": ranks,
                "auc": auc,
                "region_top1": region_top,
            }
        )
    if not per_class:
        return {"n_classes": 0}
    n_meas = np.array([d["n_measured"] for d in per_class])
    n_pref = np.array([len(d["preferred"]) for d in per_class])
    region_hits = [v for d in per_class for v in d["region_top1"].values()]
    return {
        "n_classes": len(per_class),
        "top1_preferred": float(np.mean([d["top1_preferred"] for d in per_class])),
        "top1_chance": float(np.mean(n_pref / n_meas)),
        "both_in_top2": float(np.mean([sorted(d["preferred_ranks"]) == [1, 2] for d in per_class if len(d["preferred"]) == 2])),
        "mean_auc": float(np.mean([d["auc"] for d in per_class])),
        "mean_preferred_rank": float(np.mean([r for d in per_class for r in d["preferred_ranks"]])),
        "mean_preferred_rank_chance": float(np.mean((n_meas + 1) / 2)),
        "region_top1": float(np.mean(region_hits)) if region_hits else float("nan"),
        "mean_drop_preferred": float(np.mean([x for d in per_class for x in d["preferred_drops"]])),
        "mean_drop_other": float(np.nanmean([m[d["label"], j] for d in per_class for j, c in enumerate(result.concepts) if c not in d["preferred"]])),
        "centered": centered,
        "per_class": per_class,
    }


def recovery_markdown(rec: dict[str, Any]) -> str:
    """The recovery summary and per-class table as markdown."""
    if not rec.get("n_classes"):
        return "No class had both preferred and other concepts measured."
    lines = [
        (f"- classes whose most harmful concept is a preferred one: **{100 * rec['top1_preferred']:.0f}%** "
        f"(chance {100 * rec['top1_chance']:.0f}%); both preferred concepts ranked 1-2: {100 * rec['both_in_top2']:.0f}%"),
        f"- per region, preferred concept ranked first among the region's concepts: {100 * rec['region_top1']:.0f}% (chance 20%)",
        (f"- mean AUC preferred vs other concepts: **{rec['mean_auc']:.2f}** (chance 0.50); mean rank of preferred "
        f"concepts {rec['mean_preferred_rank']:.1f} (chance {rec['mean_preferred_rank_chance']:.1f})"),
        f"- mean drop: preferred concepts {rec['mean_drop_preferred']:+.1f} pp, other concepts {rec['mean_drop_other']:+.1f} pp",
        "",
        "| class | preferred (drop pp, rank) | probe's top 3 (drop pp) | AUC |",
        "|---|---|---|---|",
    ]
    for d in rec["per_class"]:
        pref = ", ".join(f"{c} ({x:+.0f}, #{r})" for c, x, r in zip(d["preferred"], d["preferred_drops"], d["preferred_ranks"]))
        top = ", ".join(f"{c} ({x:+.0f})" for c, x in zip(d["ranking"][:3], d["drops"][:3]))
        lines.append(f"| {d['class']} | {pref} | {top} | {d['auc']:.2f} |")
    return "\n".join(lines)


def run(arch: str, n: int, styles: Sequence[str] | None, out: Path, *, n_boot: int = 1000, split: str = "test",
        variant: int = 0, min_images: int = 5, progress: bool = True, reuse: bool = False,
        threads: int | None = None) -> tuple[ProbeResult, dict[str, Any]]:
    """Probe the trained ``arch`` classifier and write its results; returns them and :func:`recovery`.

    ``reuse``: read the probe's numbers back from ``out/probe_<arch>.json`` and only rewrite the
    reports and figures. ``threads``: torch threads (default: at most 2).
    """
    from surgery.testbed.train import load_trained

    tb = Testbed(TestbedConfig(), seed=0)
    stem = out / f"probe_{arch}"
    if reuse:
        result = ProbeResult.from_json(f"{stem}.json")
        n, n_boot, min_images, split = (result.meta[k] for k in ("n_images", "n_boot", "min_images", "split"))
        seconds = result.meta["seconds"]
    else:
        torch.set_num_threads(threads or min(2, torch.get_num_threads()))
        model, _info = load_trained(arch, train_if_missing=False)
        t0 = time.perf_counter()
        result = probe_testbed(model, tb, n, split=split, styles=styles, variant=variant, n_boot=n_boot,
                               min_images=min_images, progress=progress)
        seconds = time.perf_counter() - t0
        result.meta.update({"arch": arch, "seconds": round(seconds, 1)})
    rec, rec_c = recovery(result, tb), recovery(result, tb, centered=True)
    hl = preferred_cells(tb)
    out.mkdir(parents=True, exist_ok=True)
    result.to_csv(f"{stem}.csv")
    result.to_json(f"{stem}.json")
    with open(f"{stem}_recovery.json", "w") as f:
        json.dump({"raw": rec, "centered": rec_c}, f, indent=1)
    result.heatmap(f"{stem}.png", highlight=hl, title=f"testbed {arch}: accuracy drop (pp) when one concept is restyled\n"
                   f"(mean over {', '.join(result.styles)}; boxes: the class's generated preferences)")
    result.bar_charts(f"{stem}_bars.png", highlight=hl)
    variant_names = {s: STYLES[s][result.meta.get("variant", variant)] for s in result.styles}
    md = [
        f"# Probe: testbed {arch}",
        "",
        (f"`python -m benchmarks.probe_testbed --arch {arch} --n {n}`: {n} {split} scenes (clean accuracy "
        f"{result.meta['clean_accuracy']:.1f}%), every concept restyled by {len(result.styles)} styles "
        f"({', '.join(f'{s}/{v}' for s, v in variant_names.items())}), exact re-rendering; "
        f"{n_boot} bootstrap resamples; cells with < {min_images} scenes skipped "
        f"({sum(c.skipped for c in result.cells)} of {len(result.cells)}); {seconds:.0f} s on a shared 2-core CPU."),
        "",
        "## Recovery of the generator's preferences",
        "",
        recovery_markdown(rec),
        "",
        "### The same, per class relative to each concept's mean drop over all classes",
        "",
        ("A post-hoc diagnostic (not a tuned setting): ranking by `drop(class, concept) - mean over classes of "
        "drop(., concept)` removes what restyling a concept does to every class (a large region, an "
        "unfamiliar texture) and keeps what is specific to the class."),
        "",
        recovery_markdown(rec_c).split("\n\n")[0],
        "",
        "## Rules found by the probe",
        "",
        result.to_markdown(top_k=3),
        "",
    ]
    Path(f"{stem}.md").write_text("\n".join(md))
    print(f"{arch}: {seconds:.0f} s; " + recovery_markdown(rec).split("\n\n")[0].replace("\n", "; "))
    return result, rec


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe_testbed", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=(*ARCHS, "all"), default="all",
                   help="a testbed classifier, or all of them (default)")
    p.add_argument("--n", type=int, default=5000, help="test scenes (default 5000: 250 per class)")
    p.add_argument("--styles", help="comma-separated styles (default: all six)")
    p.add_argument("--variant", type=int, default=0, help="variant of each style (default 0)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--reuse", action="store_true", help="rewrite reports and figures from the saved JSON")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: at most 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    styles = args.styles.split(",") if args.styles else None
    for arch in ARCHS if args.arch == "all" else (args.arch,):
        run(arch, args.n, styles, args.out, n_boot=args.n_boot, variant=args.variant, reuse=args.reuse,
            threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
