"""The multi-edit report: retained efficacy and clean accuracy against k, per model and method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from surgery._files import save_figure, write_text

__all__ = ["summarize", "markdown", "figure", "write_report", "MIN_SOLO"]

MIN_SOLO = 5.0  # a rule counts toward retained efficacy when its solo edit corrected at least this many % (other classes)
METHODS = ("stacked", "sequential", "batch")


def _median_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median and its bootstrap 95% interval."""
    a = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    meds = np.median(a[rng.integers(0, len(a), size=(reps, len(a)))], axis=1)
    return float(np.median(a)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def summarize(arch_result: dict) -> dict[str, dict[str, Any]]:
    """``{"k/method": {...}}``: median retained efficacy over rules (other classes, same style) with its
    interval, the rules counted, mean other/target % corrected, mean clean accuracy change, median overlap."""
    out: dict[str, dict[str, Any]] = {}
    ks = sorted({int(k) for d in arch_result["draws"] for k in d["k"]})
    for k in ks:
        for method in METHODS:
            retained, other, target, clean, overlaps, rules, skipped = [], [], [], [], [], 0, 0
            for d in arch_result["draws"]:
                row = d["k"].get(str(k), {}).get(method)
                if row is None:
                    continue
                clean.append(row["clean_change_pp"])
                overlaps += row["overlaps"]
                for solo, score in zip(d["solo"], row["scores"]):
                    rules += 1
                    if score["other/same"] is not None:
                        other.append(score["other/same"])
                    if score["target/same"] is not None:
                        target.append(score["target/same"])
                    if solo["other/same"] is None or solo["other/same"] < MIN_SOLO or score["other/same"] is None:
                        skipped += 1
                        continue
                    retained.append(score["other/same"] / solo["other/same"])
            if not clean:
                continue
            med = _median_ci(retained) if retained else (float("nan"),) * 3
            out[f"{k}/{method}"] = {
                "k": k, "method": method, "rules": rules, "rules_counted": len(retained),
                "retained_median": med[0], "retained_ci95": [med[1], med[2]],
                "other_same_mean": float(np.mean(other)) if other else None,
                "target_same_mean": float(np.mean(target)) if target else None,
                "clean_change_pp_mean": float(np.mean(clean)), "clean_change_pp_worst": float(np.min(clean)),
                "overlap_median": float(np.median(overlaps)) if overlaps else None,
            }
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.0f}"


def markdown(result: dict) -> str:
    lines = [
        "# Many rules in one model: stacked, sequential and batch edits",
        "",
        f"Command: `{result['command']}`.",
        "",
        "Per model and k (the draw's first k of 8 pairs, each pair's edit made as the efficacy benchmark "
        "makes it, N = 3): **retained** = a rule's other-class errors corrected (exemplars' style, test "
        "scenes) with the k-rule model, over its solo edit's; median over the rules whose solo edit corrected "
        f"at least {MIN_SOLO:g}% (bootstrap 95% interval), pooled over draws. **other** / **target**: mean % "
        "errors corrected; **clean**: mean (worst) clean test accuracy change of the model carrying all k; "
        "**overlap**: median |cos| between two edits' key directions on a shared layer.",
        "",
        "| model | k | method | rules (counted) | retained | other, same | target, same | clean (pp) | overlap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, a in result["archs"].items():
        for row in summarize(a).values():
            ret = "n/a" if np.isnan(row["retained_median"]) else (
                f"{row['retained_median']:.2f} [{row['retained_ci95'][0]:.2f}, {row['retained_ci95'][1]:.2f}]")
            ov = "-" if row["overlap_median"] is None else f"{row['overlap_median']:.2f}"
            lines.append(
                f"| {arch} | {row['k']} | {row['method']} | {row['rules']} ({row['rules_counted']}) | {ret} | "
                f"{_pct(row['other_same_mean'])} | {_pct(row['target_same_mean'])} | "
                f"{row['clean_change_pp_mean']:+.2f} ({row['clean_change_pp_worst']:+.2f}) | {ov} |"
            )
    for arch, a in result["archs"].items():
        n = len(a["draws"])
        lines += ["", f"{arch}: {n} draw(s), {a.get('seconds', 0) / 60:.0f} min; pairs: " + "; ".join(
            ", ".join(d["pairs"]) for d in a["draws"]) + "."]
    return "\n".join(lines) + "\n"


def figure(result: dict, path: Path) -> None:
    """Retained efficacy (median, interval) and clean accuracy change against k, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(result["archs"])
    fig, axes = plt.subplots(2, len(archs), figsize=(3.4 * len(archs), 5.2), squeeze=False, sharex=True)
    colours = {"stacked": "tab:blue", "sequential": "tab:orange", "batch": "tab:green"}
    for c, arch in enumerate(archs):
        summ = summarize(result["archs"][arch])
        for m in METHODS:
            rows = [r for r in summ.values() if r["method"] == m and not np.isnan(r["retained_median"])]
            if not rows:
                continue
            ks = [r["k"] for r in rows]
            med = np.array([r["retained_median"] for r in rows])
            lo = np.array([r["retained_ci95"][0] for r in rows])
            hi = np.array([r["retained_ci95"][1] for r in rows])
            axes[0][c].errorbar(ks, med, yerr=[med - lo, hi - med], marker="o", ms=4, capsize=2, color=colours[m], label=m)
            axes[1][c].plot(ks, [r["clean_change_pp_mean"] for r in rows], marker="o", ms=4, color=colours[m], label=m)
        axes[0][c].axhline(0.8, color="0.5", lw=0.6, ls="--")
        axes[0][c].set_title(arch, fontsize=10)
        axes[1][c].axhline(-0.5, color="0.5", lw=0.6, ls="--")
        axes[1][c].set_xscale("log", base=2)
        axes[1][c].set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        axes[1][c].set_xlabel("rules in the model (k)")
    axes[0][0].set_ylabel("retained efficacy (median)")
    axes[1][0].set_ylabel("clean accuracy change (pp)")
    axes[0][0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_report(result: dict, out: Path, stem: str) -> None:
    write_text(out / f"{stem}.md", markdown(result) + f"\n![figure]({stem}.png)\n")
    figure(result, out / f"{stem}.png")
    print(markdown(result))
