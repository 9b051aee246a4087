"""The sweep: candidate layers at several depths (both branch ends of two-branch blocks), and what the
sweep says (best layer per family, attention output vs MLP, layer-choice scores against the measured
held-out ratio, prefix-token weights)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from surgery.adapters import branch_of, get_adapter
from torch import nn

from .measure import ok_rows

__all__ = ["sweep_layers", "layer_branch", "summarize_sweep"]


def _depth_positions(n: int, fractions: Sequence[float]) -> list[int]:
    return sorted({min(n - 1, max(0, round(f * (n - 1)))) for f in fractions})


def sweep_layers(model: nn.Module) -> list:
    """Candidate layers at several depths: for two-branch blocks both branch ends at each depth."""

    adapter = get_adapter(model)
    blocks = [l for l in adapter.layers(model) if l.post is not None and l.context_sites]
    if not blocks:
        blocks = [l for l in adapter.layers(model) if l.post is not None]
    groups: dict[str, list] = {}
    for l in blocks:
        groups.setdefault(layer_branch(l), []).append(l)
    chosen = []
    for branch, ls in groups.items():
        for i in _depth_positions(len(ls), (0.25, 0.5, 0.75, 1.0)):
            chosen.append(ls[i])
    order = {l.name: i for i, l in enumerate(adapter.layers(model))}
    return sorted(chosen, key=lambda l: order[l.name])


def layer_branch(layer) -> str:
    """``"attn"`` for attention/token-mixer outputs, ``"mlp"`` for MLP outputs, ``"conv"`` otherwise."""

    return branch_of(layer)


def summarize_sweep(res: dict[str, Any]) -> dict[str, Any]:
    """What the sweep says: best branch/depth per family, attention vs MLP, the scores' rankings."""
    fam: dict[str, list] = {}
    attn_vs_mlp = []
    ranking = {"grad_x_act": [], "masked_patch": [], "value_objective_ratio": [], "exemplar_ratio": []}
    prefix = []
    for m in res["models"]:
        rows = [r for r in ok_rows(m) if r.get("prefix_weight_setting", "auto") == "auto"]
        if not rows:
            continue
        fam.setdefault(m["family"], []).append((m["model"], rows))
        by = {}
        for r in rows:
            by.setdefault(r["branch"], []).append(r)
        if "attn" in by and "mlp" in by and m["family"] in ("vit", "swin", "clip", "maxxvit"):
            a = min(by["attn"], key=lambda r: r["exemplar_ratio"])
            b = min(by["mlp"], key=lambda r: r["exemplar_ratio"])
            attn_vs_mlp.append(
                {
                    "model": m["model"],
                    "attn_best": a["layer"], "attn_exemplar": a["exemplar_ratio"], "attn_heldout": a["heldout_ratio"],
                    "mlp_best": b["layer"], "mlp_exemplar": b["exemplar_ratio"], "mlp_heldout": b["heldout_ratio"],
                    "attn_mean_heldout": sum(r["heldout_ratio"] for r in by["attn"]) / len(by["attn"]),
                    "mlp_mean_heldout": sum(r["heldout_ratio"] for r in by["mlp"]) / len(by["mlp"]),
                }
            )
        if len(rows) >= 3:
            truth = [r["heldout_ratio"] for r in rows]  # lower is better
            best = min(range(len(rows)), key=lambda i: truth[i])
            for key in ranking:
                score = [r.get(key, float("nan")) for r in rows]
                if any(isinstance(v, float) and math.isnan(v) for v in score):
                    continue
                # higher attribution = better; the ratios: lower = better
                sign = 1 if key in ("value_objective_ratio", "exemplar_ratio") else -1
                pick = min(range(len(rows)), key=lambda i: sign * score[i])
                ranking[key].append(
                    {"model": m["model"], "spearman": _spearman([sign * v for v in score], truth),
                     "top1_hit": pick == best, "regret": truth[pick] - truth[best]}
                )
        for r in ok_rows(m):
            if r.get("prefix_weight_setting") == 1.0:
                same = next((q for q in rows if q["layer"] == r["layer"]), None)
                if same and same["prefix_weight"] != 1.0:  # "auto" chose another weight: compare
                    prefix.append({"model": m["model"], "layer": r["layer"], "prefix_weight": same["prefix_weight"],
                                   "exemplar_pw1": r["exemplar_ratio"], "exemplar_pw": same["exemplar_ratio"],
                                   "heldout_pw1": r["heldout_ratio"], "heldout_pw": same["heldout_ratio"],
                                   "clean_pw1": r["clean_change"], "clean_pw": same["clean_change"]})
    best = {}
    for f, items in fam.items():
        picks = []
        for model_id, rows in items:
            r = min(rows, key=lambda r: r["heldout_ratio"])
            picks.append({"model": model_id, "layer": r["layer"], "branch": r["branch"], "depth": r["depth"],
                          "heldout_ratio": r["heldout_ratio"], "exemplar_ratio": r["exemplar_ratio"]})
        best[f] = picks
    return {"best_per_family": best, "attn_vs_mlp": attn_vs_mlp, "ranking": ranking, "prefix_weight": prefix}


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")
