"""The results as Markdown: the command, one row per model and layer, the summary (why an edit barely
moves), and for the sweep its analyses."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .concept import IMAGES
from .measure import ok_rows
from .sweep import summarize_sweep

__all__ = ["fmt", "diagnose", "markdown"]


def fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{nd}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{nd}f}"
    return str(v)


def diagnose(row: dict[str, Any]) -> str:
    """Why an edit barely moved the held-out logits (held-out ratio above 0.9), from the measurements."""
    if "error" in row or row["heldout_ratio"] <= 0.9:
        return ""
    reasons = []
    if row["value_ratio"] > 0.8:
        reasons.append(
            f"the rank-one edit removes only {100 * (1 - row['value_ratio']):.0f}% of the value difference at this layer"
        )
    elif row["exemplar_ratio"] > 0.9:
        reasons.append(
            f"the value moves ({100 * (1 - row['value_ratio']):.0f}% closer) but the logits do not follow"
        )
    else:
        reasons.append(f"fits the exemplars (logits {row['exemplar_ratio']:.2f}) but does not generalize")
    if row["clean_change"] > 1.5 * max(1e-9, 1 - row["heldout_ratio"]) and row["clean_change"] > 0.1:
        reasons.append(f"and moves clean images as much ({row['clean_change']:.2f})")
    if "StdConv" in row.get("module_type", "") or row.get("weight_standardized"):
        reasons.append("(weight standardization: the stored rank-one update is re-standardized per output channel)")
    return "; ".join(reasons)


def _acceptance(res: dict[str, Any]) -> list[str]:
    """Per model: does the edit at the first recommended layer reduce the exemplars' and the held-out
    images' logit distance; which models barely move (held-out ratio above 0.9), and why."""
    ok_ex = ok_ho = total = 0
    weak = []
    best = []
    for m in res["models"]:
        rows = ok_rows(m)
        if not rows:
            continue
        total += 1
        first = rows[0]
        ok_ex += first["exemplar_ratio"] < 1
        ok_ho += first["heldout_ratio"] < 1
        b = min(rows, key=lambda r: r["heldout_ratio"])
        best.append(b["heldout_ratio"])
        if first["heldout_ratio"] > 0.9:
            weak.append((m["model"], first, b))
    lines = [
        "",
        "## Summary",
        "",
        f"At the first recommended layer the edit reduces the exemplars' logit distance in {ok_ex}/{total} models "
        f"and the held-out images' in {ok_ho}/{total}; median held-out ratio "
        f"{fmt(float(np.median([r['heldout_ratio'] for m in res['models'] for r in ok_rows(m)[:1]])) if best else float('nan'))}"
        f" (best of the {res.get('k', 3)} recommended layers: median {fmt(float(np.median(best)) if best else float('nan'))}).",
        "",
    ]
    if weak:
        lines += ["Models where the edit at the first recommended layer barely moves the held-out logits (ratio > 0.9):", ""]
        for model_id, first, b in weak:
            alt = f"; best recommended layer `{b['layer']}` {fmt(b['heldout_ratio'])}" if b is not first else ""
            lines.append(f"- {model_id} (`{first['layer']}`, held-out {fmt(first['heldout_ratio'])}): {diagnose(first)}{alt}")
    return lines


def _n(res: dict[str, Any], key: str) -> int:
    return (res.get("images") or {}).get(key, IMAGES[key])


def markdown(res: dict[str, Any]) -> str:
    """The results as Markdown: the command, one row per model and layer, and (sweep) the analyses."""
    lines = [
        f"# Breadth: edits on {len(res['models'])} architectures ({res['mode']})",
        "",
        f"Command: `{res.get('command', 'python -m benchmarks.breadth')}`  ",
        f"torch {res['torch']}, {res['threads']} thread(s), {res['platform']}. Random weights (norms, layer-scales "
        "re-randomized, BatchNorm recalibrated on smooth images); the concept is one fixed texture "
        + ("(a 2x2 tile of random colors, the same in every even-sized patch)" if res.get("texture_period", 2) else "(5 px stripes and 7 px checks: its phase changes from patch to patch)")
        + " pasted as a square (1/3 of the side) into smooth images; "
        f"{_n(res, 'exemplars')} exemplars, {_n(res, 'held_out')} held-out images with the texture elsewhere, "
        f"{_n(res, 'clean')} clean images, key statistics from {_n(res, 'calibration')} clean images. Default "
        "`rewrite` (fast solver, L1, no loss mask; the mask weighs the direction; `prefix_weight=\"auto\"`).",
        "",
        "Ratios are after/before: **value** = distance of the transformed exemplars' value to the originals'; "
        "**exemplars** / **held-out** = mean logit distance of transformed images to their originals (1 = no effect, "
        "0 = the originals' logits); **improved** = fraction of held-out images moved closer; **clean** = mean logit "
        "change on clean images divided by the held-out distance before the edit. **bf err** = `block_forward` "
        "relative error against the hooked value. **site** = `skip-free` (no skip around the layer: its value is the "
        "whole representation) or `residual` (a skip carries the input past it).",
        "",
        "| model | source | adapter | layer | site | block | bf err | value | exemplars (before) | held-out (before) | improved | clean | solver | why it barely moves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in res["models"]:
        if "error" in m:
            lines.append(f"| {m['model']} | | | error: {m['error']} | | | | | | | | | | |")
            continue
        auto_one = {r["layer"] for r in ok_rows(m) if r.get("prefix_weight_setting", "auto") == "auto" and r["prefix_weight"] == 1.0}
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"| {m['model']} | {m['source']} | {m['adapter']} | {r['layer']} | {r.get('site', '')} | error: {r['error']} | | | | | | | |")
                continue
            if r.get("prefix_weight_setting") == 1.0 and r["layer"] in auto_one:
                continue  # "auto" resolved to 1 as well: the same edit
            pw = f" (prefix weight {r['prefix_weight']:g})" if r.get("prefix_weight", 1.0) != 1.0 or r.get("prefix_weight_setting") == 1.0 else ""
            lines.append(
                f"| {m['model']} | {m['source']} | {m['adapter']} | `{r['layer']}`{pw} | {r.get('site', '')} | {r['block']} | "
                f"{r['block_forward_rel_err']:.1e} | {fmt(r['value_ratio'])} | "
                f"{fmt(r['exemplar_ratio'])} ({fmt(r['exemplar_before'])}) | {fmt(r['heldout_ratio'])} "
                f"({fmt(r['heldout_before'])}) | {fmt(r['heldout_improved_frac'], 2)} | {fmt(r['clean_change'])} | "
                f"{r['solver']} |"
            )
    if res["mode"] in ("recommended", "measured"):
        lines += _acceptance(res)
    if res["mode"] == "sweep":
        s = summarize_sweep(res)
        lines += ["", "## Best layer per model (lowest held-out ratio)", "", "Depth: position among all the model's editable layers (0 first, 1 last). The sweep edits each branch end at a quarter, half, three quarters and all of the depth.", "", "| family | model | layer | branch | depth | held-out | exemplars |", "|---|---|---|---|---|---|---|"]
        for f, picks in s["best_per_family"].items():
            for p in picks:
                lines.append(f"| {f} | {p['model']} | `{p['layer']}` | {p['branch']} | {p['depth']} | {fmt(p['heldout_ratio'])} | {fmt(p['exemplar_ratio'])} |")
        lines += ["", "## Attention output vs MLP (transformer families)", "", "| model | best attn | exemplars | held-out | best MLP | exemplars | held-out | mean held-out attn / MLP |", "|---|---|---|---|---|---|---|---|"]
        for a in s["attn_vs_mlp"]:
            lines.append(
                f"| {a['model']} | `{a['attn_best']}` | {fmt(a['attn_exemplar'])} | {fmt(a['attn_heldout'])} | `{a['mlp_best']}` | "
                f"{fmt(a['mlp_exemplar'])} | {fmt(a['mlp_heldout'])} | {fmt(a['attn_mean_heldout'])} / {fmt(a['mlp_mean_heldout'])} |"
            )
        lines += [
            "",
            "## Choosing the layer: attribution scores vs measuring the edit",
            "",
            "Per model, candidates ranked by each score against their measured held-out ratio. `grad_x_act`: "
            "gradient of the exemplars' squared logit distance at the value site times the value difference (first "
            "order, the activation patch); `masked_patch`: the distance removed by patching the value with the "
            "originals' inside the concept mask only; `value_objective_ratio`: how much of the value loss the edit "
            "removes; `exemplar_ratio`: the edit's own logit ratio on the exemplars (what `surgery.evaluation.rank_layers` "
            "measures, there with a left-out exemplar). Regret: held-out ratio of the pick minus the best's.",
            "",
            "| score | models | mean Spearman (score vs held-out ratio) | top-1 hits | mean regret |",
            "|---|---|---|---|---|",
        ]
        for key, items in s["ranking"].items():
            if not items:
                continue
            sp = [i["spearman"] for i in items if not math.isnan(i["spearman"])]
            lines.append(
                f"| {key} | {len(items)} | {fmt(sum(sp) / max(len(sp), 1))} | {sum(i['top1_hit'] for i in items)}/{len(items)} | "
                f"{fmt(sum(i['regret'] for i in items) / len(items))} |"
            )
        if s["prefix_weight"]:
            lines += ["", "## Prefix (class/register) token weight", "", "| model | layer | auto weight w | exemplars 1 -> w | held-out 1 -> w | clean 1 -> w |", "|---|---|---|---|---|---|"]
            for p in s["prefix_weight"]:
                lines.append(
                    f"| {p['model']} | `{p['layer']}` | {p['prefix_weight']:g} | {fmt(p['exemplar_pw1'])} -> {fmt(p['exemplar_pw'])} | "
                    f"{fmt(p['heldout_pw1'])} -> {fmt(p['heldout_pw'])} | {fmt(p['clean_pw1'])} -> {fmt(p['clean_pw'])} |"
                )
    if res.get("note"):
        lines += ["", f"Note: {res['note']}."]
    return "\n".join(lines) + "\n"


def figure(res: dict[str, Any], path: Any) -> None:
    """The held-out logit ratio at each model's first recommended layer, one bar per model, coloured by the
    site's kind (skip-free: no skip around the layer; residual: a skip carries the input past it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    bars = []
    for m in res["models"]:
        rows = [r for r in m.get("rows", []) if "error" not in r]
        if rows:
            bars.append((m["model"], rows[0].get("site", "residual"), float(rows[0]["heldout_ratio"])))
    colors = {"skip-free": "tab:green", "residual": "tab:blue"}
    fig, ax = plt.subplots(figsize=(7.5, 0.2 * len(bars) + 1.6))
    y = range(len(bars))
    ax.barh(list(y), [b[2] for b in bars], color=[colors.get(b[1], "gray") for b in bars])
    ax.set_yticks(list(y), [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("held-out logit distance, after / before the edit\n(1 = no effect, 0 = the originals')", fontsize=8)
    ax.set_title("One rank-one edit at the first recommended layer\n(random weights, a pasted texture)", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=kind) for kind, c in colors.items()], loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

