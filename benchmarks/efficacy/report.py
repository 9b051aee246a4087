"""The efficacy report: means and bootstrap intervals over units, the compact headline table (the README quotes its lead), the
markdown report and the Figure-5-style figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from surgery._files import save_figure, write_text

from .settings import GROUPS, RANK_VARIANTS, SCHEDULE_VARIANTS, Settings

__all__ = [
    "bootstrap_ci", "summarize", "edit_lead", "chosen_layers", "headline", "markdown", "figure", "write_report",
    "lead_lines", "pooled_markdown", "HEADLINE_METHODS",
]


# --------------------------------------------------------------------------- aggregate
def bootstrap_ci(vals: list[float], reps: int, rng: np.random.Generator) -> tuple[float, float]:
    a = np.asarray(vals, float)
    if len(a) < 2:
        return (float(a.mean()), float(a.mean())) if len(a) else (math.nan, math.nan)
    means = a[rng.integers(0, len(a), size=(reps, len(a)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(units: list[dict], s: Settings) -> dict:
    rng = np.random.default_rng(s.seed + 7)
    out: dict[str, Any] = {}
    for n in s.ns:
        for method in s.methods:
            rs = [u["methods"][method] for u in units if u["n"] == n and method in u["methods"]]
            if not rs:
                continue
            row: dict[str, Any] = {"units": len(rs), "no_edit": sum(r["chosen"] is None for r in rs)}
            for g in GROUPS:
                vals = [r["pct"][g] for r in rs if r["pct"][g] is not None]
                lo, hi = bootstrap_ci(vals, s.bootstrap, rng)
                row[g] = {"mean": float(np.mean(vals)) if vals else None, "ci95": [lo, hi] if vals else None, "n": len(vals)}
            cl = [r["clean_acc_change_pp"] for r in rs]
            row["clean_acc_change_pp"] = {"mean": float(np.mean(cl)), "ci95": list(bootstrap_ci(cl, s.bootstrap, rng))}
            for g in ("other-prefer", "other-nonprefer", "clean-no-concept"):
                v = [r["logit_shifts"][g]["true_logit_change"] for r in rs if g in r["logit_shifts"]]
                mb = [r["logit_shifts"][g]["margin_before"] for r in rs if g in r["logit_shifts"]]
                row[f"true_logit_change/{g}"] = float(np.mean(v)) if v else None
                row[f"margin_before/{g}"] = float(np.mean(mb)) if mb else None
            out[f"N={n}/{method}"] = row
    return out


def edit_lead(
    units: list[dict], ns, reps: int, seed: int, group: str = "other/same", method: str = "edit",
    over: str | None = None,
) -> dict[int, dict]:
    """Per N: ``method``'s lead over ``over``, by default the better fine-tuning (the one with the higher
    mean), in ``group``, paired per unit (units where both have a number), with a bootstrap 95% interval."""
    rng = np.random.default_rng(seed + 11)
    out = {}
    for n in ns:
        us = [u for u in units if u["n"] == n and method in u["methods"]]
        means = {}
        for other in (over,) if over is not None else ("finetune local", "finetune global"):
            v = [u["methods"][other]["pct"][group] for u in us if other in u["methods"] and u["methods"][other]["pct"][group] is not None]
            if v:
                means[other] = float(np.mean(v))
        if not means:
            continue
        best = max(means, key=means.get)
        d = [u["methods"][method]["pct"][group] - u["methods"][best]["pct"][group] for u in us
             if best in u["methods"] and None not in (u["methods"][method]["pct"][group], u["methods"][best]["pct"][group])]
        if d:
            out[n] = {"vs": best, "mean": float(np.mean(d)), "ci95": list(bootstrap_ci(d, reps, rng)), "units": len(d)}
    return out


def lead_lines(units: list[dict], ns, reps: int, seed: int) -> list[str]:
    """The report's paired leads, one paragraph each: the edit's over the better fine-tuning, and each rank
    variant run, over the better fine-tuning and over the variant below it (whose candidates it extends)."""
    leads = [("edit", "Edit's lead over the better fine-tuning", None)]
    previous = "edit"
    for method in (m for m in RANK_VARIANTS if any(m in u["methods"] for u in units)):
        below = "its rank-one candidates alone" if previous == "edit" else (
            f"what its rank-{RANK_VARIANTS[method][-1]} candidates add"
        )
        leads += [
            (method, f"`{method}`'s lead over the better fine-tuning", None),
            (method, f"`{method}`'s lead over `{previous}` ({below})", previous),
        ]
        previous = method
    lines = []
    for method, label, over in leads:
        lead = edit_lead(units, ns, reps, seed, method=method, over=over)
        if lead:
            lines += ["", f"{label}, other classes / same style, paired per unit: " + "; ".join(
                f"N={n} {r['mean']:+.1f} [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}] points vs {r['vs']} ({r['units']} units)"
                for n, r in lead.items()) + "."]
    return lines


def pooled_markdown(results: list[dict], names: list[str], command: str) -> str:
    """The leads of several runs of one protocol that differ only in seed (other pairs and draws), pooled
    over all their units, per model; each run's own leads follow for comparison."""
    first = results[0]["settings"]
    lines = [
        "# Efficacy leads pooled over seeds", "",
        f"Command: `{command}`", "",
        "Runs: " + "; ".join(f"`{n}` (seed {r['settings']['seed']})" for n, r in zip(names, results)) + ".", "",
        "Their commands: " + " ; ".join(f"`{r['command']}`" for r in results) + ".", "",
        "Each run draws its own concept-style pairs, targets and exemplars; the units of all runs are pooled "
        "(a pair drawn by two seeds counts once per draw) and bootstrapped as in each run's report. A method "
        "counts only in the runs that measured it.", "",
    ]
    for arch in dict.fromkeys(a for r in results for a in r["archs"]):
        units = [u for r in results if arch in r["archs"] for u in r["archs"][arch]["units"]]
        lines += [f"## {arch}, pooled ({len(units)} (pair, N, draw) units)"]
        lines += lead_lines(units, first["ns"], first["bootstrap"], first["seed"])
        for n, r in zip(names, results):
            if arch in r["archs"]:
                lines += ["", f"### `{n}` (seed {r['settings']['seed']})"]
                lines += lead_lines(r["archs"][arch]["units"], first["ns"], first["bootstrap"], r["settings"]["seed"])
        lines.append("")
    return "\n".join(lines)


HEADLINE_METHODS = ("edit", "edit +mask", "finetune local", "finetune global")


def chosen_layers(units: list[dict], method: str, key: str = "layer") -> dict[int, dict[str, int]]:
    """Per N: how many units' selection took each candidate layer (or span, ``"A+B"``; ``"no edit"`` where
    none was within the budget), most often first; ``key="rank"``: each rank instead."""
    counts: dict[int, dict[str, int]] = {}
    for u in units:
        res = u["methods"].get(method)
        if res is None:
            continue
        per_n = counts.setdefault(u["n"], {})
        choice = "no edit" if res.get(key) is None else str(res[key])
        per_n[choice] = per_n.get(choice, 0) + 1
    return {n: dict(sorted(c.items(), key=lambda kv: -kv[1])) for n, c in sorted(counts.items())}


def headline(result: dict) -> str:
    """The compact table of the README: mean % errors corrected [95% interval], main methods, per N."""
    def cell(row: dict, g: str) -> str:
        m = row[g]["mean"]
        return "n/a" if m is None else f"{m:+.0f} [{row[g]['ci95'][0]:+.0f}, {row[g]['ci95'][1]:+.0f}]"

    lines = [
        "| model | N | method | units (no edit) | target, same | other, same | other, held-out | other preferring the concept | other not preferring | clean acc. (pp) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, a in result["archs"].items():
        for key, row in a["summary"].items():
            n, method = key.split("/", 1)
            if method not in HEADLINE_METHODS:
                continue
            lines.append(
                f"| {arch} | {n[2:]} | {method} | {row['units']} ({row['no_edit']}) | {cell(row, 'target/same')} | "
                f"{cell(row, 'other/same')} | {cell(row, 'other/held-out')} | {cell(row, 'other-prefer/same')} | "
                f"{cell(row, 'other-nonprefer/same')} | {row['clean_acc_change_pp']['mean']:+.2f} |"
            )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    lines = [
        f"# Efficacy benchmark ({result['mode']} run)",
        "",
        f"Command: `{result['command']}`",
        "",
        ("% errors corrected on TEST images (mean over (pair, draw) units [bootstrap 95% interval]); counted only "
        "on images whose clean original the unedited model classifies correctly. Hyperparameters chosen on "
        f"validation among settings with clean-accuracy drop <= {result['settings']['max_clean_drop']} pp; "
        "'no edit' = no setting qualified. 'same' = the exemplars' style variant, 'held-out' = the other variants."),
        "",
    ]
    lines += ["## Headline (main methods)", "", headline(result), ""]
    for arch, a in result["archs"].items():
        lines += [f"## {arch}", ""]
        n_units = len(a["units"])
        planned = len(a["pairs"]) * len(result["settings"]["ns"]) * result["settings"]["draws"]
        if a.get("truncated_by_time_budget") or n_units < planned:
            lines += [(f"**Only {n_units} of {planned} planned (pair, N, draw) units ran (time budget, --max-minutes): "
                      "intervals over so few units mean nothing.**"), ""]
        took = f" This model's run took {a['seconds'] / 60:.0f} min on {result.get('processes', 1)} process(es)." if "seconds" in a else ""
        lines += [f"Clean test accuracy of the unedited model: {a['clean_test_acc']:.1f}%.{took}", ""]
        lines += ["Pairs: " + ", ".join(
            f"{p['concept']}->{p['style']} ({p['n_hurt']} classes hurt{'' if p['qualifies'] else ', DOES NOT QUALIFY'})"
            for p in a["pairs"]), ""]
        cols = ["target/same", "target/held-out", "other/same", "other/held-out", "other-prefer/same", "other-nonprefer/same"]
        lines.append("| N | method | units (no edit) | " + " | ".join(cols) + " | clean acc change (pp) | true-logit change: other non-prefer (margin) | true-logit change: clean, no concept (margin) |")
        lines.append("|---" * (len(cols) + 6) + "|")
        for key, row in a["summary"].items():
            n, method = key.split("/", 1)
            cells = []
            for c in cols:
                m = row[c]["mean"]
                cells.append("n/a" if m is None else f"{m:+.0f} [{row[c]['ci95'][0]:+.0f}, {row[c]['ci95'][1]:+.0f}]")
            def shift(g, row=row):
                tl, mb = row[f"true_logit_change/{g}"], row[f"margin_before/{g}"]
                return "n/a" if tl is None else f"{tl:+.2f} ({mb:.2f})"

            lines.append(
                f"| {n[2:]} | {method} | {row['units']} ({row['no_edit']}) | " + " | ".join(cells)
                + f" | {row['clean_acc_change_pp']['mean']:+.2f} | {shift('other-nonprefer')} | {shift('clean-no-concept')} |"
            )
        for method in ("edit", "edit span", *SCHEDULE_VARIANTS, *RANK_VARIANTS):
            counts = chosen_layers(a["units"], method)
            if counts:
                lines += ["", f"Candidates the selection took for `{method}` (units per layer, by N): " + "; ".join(
                    f"N={n}: " + ", ".join(f"{layer} {k}" for layer, k in per_n.items()) for n, per_n in counts.items()
                ) + "."]
        for method in RANK_VARIANTS:
            ranks = chosen_layers(a["units"], method, key="rank")
            if ranks:
                lines += ["", f"Ranks the selection took for `{method}` (units per rank, by N): " + "; ".join(
                    f"N={n}: " + ", ".join(f"rank {r} {k}" for r, k in per_n.items()) for n, per_n in ranks.items()
                ) + "."]
        lines += lead_lines(a["units"], result["settings"]["ns"], result["settings"]["bootstrap"], result["settings"]["seed"])
        lines.append("")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    """Bars in the style of the paper's Figure 5: % errors corrected per group and method; one row per
    model, one column per N, 95% bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(result["archs"])
    ns = list(dict.fromkeys(k.split("/", 1)[0] for a in result["archs"].values() for k in a["summary"]))
    methods = list(dict.fromkeys(
        k.split("/", 1)[1] for a in result["archs"].values() for k in a["summary"]
    ))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")  # one distinct colour per method
    colors = {m: cmap(i) for i, m in enumerate(methods)}
    groups = ["target/same", "target/held-out", "other/same", "other/held-out"]
    fig, axes = plt.subplots(len(archs), len(ns), figsize=(4.6 * len(ns), 3.2 * len(archs) + 0.8), squeeze=False)
    lo_all = 0.0
    for r, arch in enumerate(archs):
        summ = result["archs"][arch]["summary"]
        for c, nkey in enumerate(ns):
            ax = axes[r][c]
            present = [m for m in methods if f"{nkey}/{m}" in summ]
            w = 0.84 / max(len(present), 1)
            for j, m in enumerate(present):
                row = summ[f"{nkey}/{m}"]
                means = [row[g]["mean"] if row[g]["mean"] is not None else 0.0 for g in groups]
                err = [
                    [max(0.0, mu - row[g]["ci95"][0]) if row[g]["ci95"] else 0.0 for mu, g in zip(means, groups)],
                    [max(0.0, row[g]["ci95"][1] - mu) if row[g]["ci95"] else 0.0 for mu, g in zip(means, groups)],
                ]
                lo_all = min(lo_all, *(mu - e for mu, e in zip(means, err[0])))
                ax.bar(np.arange(len(groups)) + (j - (len(present) - 1) / 2) * w, means, w, yerr=err, capsize=1.5,
                       color=colors[m], label=m, error_kw={"lw": 0.7})
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(range(len(groups)), ["target\nsame", "target\nheld-out", "other\nsame", "other\nheld-out"])
            ax.set_title(f"{arch}, N={nkey[2:]} exemplars", fontsize=10)
            if c == 0:
                ax.set_ylabel("% errors corrected")
    for ax in axes.flat:
        ax.set_ylim(min(-25.0, lo_all - 5), 100)
        ax.grid(axis="y", lw=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[m]) for m in methods]
    fig.legend(handles, methods, loc="lower center", ncol=min(len(methods), 8), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path, dpi=110)


def write_report(result: dict, out: Path, stem: str) -> None:
    """``<stem>.md`` and ``<stem>.png`` next to the JSON, and the markdown on stdout."""
    write_text(out / f"{stem}.md", markdown(result) + f"\n![figure]({stem}.png)\n")
    figure(result, out / f"{stem}.png")
    print(markdown(result))
