"""Does measuring layers on the exemplars pick the layer whose edit moves held-out images most?

``recommended_layers(model, originals=..., transformed=..., masks=..., data=...)`` ranks a model's first
12 candidates with :func:`surgery.evaluation.rank_layers`. Here, per model, with the breadth benchmark's
data and weights: each candidate's real default edit (statistics of the 48 calibration images, all 4
exemplars) and its held-out logit ratio, against three ranking scores computed from the exemplars only:

- ``former``: the quick proxy ``rank_layers`` used before (L2 loss, 10 iterations, the key moment of the
  transformed and original exemplars plus a 1% ridge, fitted on 3 exemplars, scored on the 4th);
- ``own moment``: today's ranking without ``data`` (the default edit, the originals' key moment plus a
  1% ridge, each of 4 exemplars left out in turn);
- ``with data``: today's ranking with the calibration images' key statistics.

Reported: the Spearman rank correlation, over the candidates, between each score and the held-out ratio,
and the held-out ratio at each score's first choice, beside the family's first candidate and the best.

    OMP_NUM_THREADS=1 python -m benchmarks.breadth.ranking [--models a,b]

Writes ``benchmarks/results/breadth-ranking.{md,json}``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from surgery.edits.apply import edited
from surgery.evaluation import rank_layers
from surgery.stats.keystats import ridged_moment

import surgery

from .driver import model_specs, prepare_run, study_command, study_models, study_parser, write_study
from .measure import measure_layer

__all__ = ["main", "markdown", "former_scores", "spearman", "MODELS_PROBED", "SCORES"]

MODELS_PROBED = (
    "vit_tiny_reg4_gap", "tv_resnet50", "convnext_atto", "tv_mobilenet_v3_small", "vit_tiny_patch16_224",
    "eva02_tiny_patch14_224", "swin_tiny_patch4_window7_224", "tv_convnext_tiny", "efficientnet_b0",
    "deit_tiny_distilled_patch16_224",
)
SCORES = ("former", "own moment", "with data")
POOL = 12


def former_scores(model: torch.nn.Module, layers: list, x: torch.Tensor, x2: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """The former ``rank_layers`` proxy, kept here as the baseline it is measured against."""
    n = x.shape[0]
    scored = slice(n - 1, n)
    with torch.no_grad():
        target = model(x[scored]).float()
        before = (model(x2[scored]).float() - target).norm(dim=-1).mean()
    out = {}
    for layer in layers:
        keys = torch.cat([layer.capture(model, x2).keys, layer.capture(model, x).keys])
        moment = ridged_moment(keys, layer.key_channel_dim)
        edit = surgery.rewrite(model, layer, x, x2, masks, stats=moment, loss="l2", steps=10, ntrain=n - 1)
        with torch.no_grad(), edited(model, edit):
            out[layer.name] = float((model(x2[scored]).float() - target).norm(dim=-1).mean() / before)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among real-valued ratios)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def run_model(model_id: str) -> dict[str, Any]:
    data, model, base = prepare_run(model_specs([model_id])[model_id])
    pool = surgery.recommended_layers(model, k=POOL)
    stats = surgery.collect_key_stats(model, [l.name for l in pool], data.calibration, batch_size=16, progress=False)
    real = {l.name: measure_layer(model, l, data, base, stats=stats[l.name])["heldout_ratio"] for l in pool}
    scores = {
        "former": former_scores(model, pool, data.x, data.x2, data.masks),
        "own moment": {l.name: s for l, s in rank_layers(model, data.x, data.x2, data.masks, layers=pool)},
        "with data": {
            l.name: s for l, s in rank_layers(model, data.x, data.x2, data.masks, layers=pool, data=data.calibration)
        },
    }
    names = list(real)
    out: dict[str, Any] = {"model": model_id, "heldout": real, "scores": scores, "family_first": names[0]}
    for key, score in scores.items():
        pick = min(score, key=score.get)
        out[key] = {"rho": spearman([score[n] for n in names], [real[n] for n in names]), "pick": pick}
    print(f"  {model_id}: " + ", ".join(f"{k} rho {out[k]['rho']:+.2f}" for k in scores), file=sys.stderr, flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Breadth: ranking layers on the exemplars",
        "",
        f"Command: `{result['command']}`.",
        "",
        f"Per model, its first {POOL} candidates: the Spearman correlation between each ranking score (exemplars "
        "only) and the real default edit's held-out logit ratio (1 = the score orders the layers as the held-out "
        "images do), and the held-out ratio at the score's first choice. **former**: the quick proxy used before "
        "(L2, 10 iterations, transformed keys in the moment, one exemplar left out); **own moment**: `rank_layers` "
        "without data; **with data**: `rank_layers(..., data=clean images)`.",
        "",
        "| model | " + " | ".join(f"{k}: rho | {k}: held-out at its choice" for k in SCORES)
        + " | family's first: held-out | best: held-out |",
        "|---|" + "---|" * (2 * len(SCORES) + 2),
    ]
    rhos: dict[str, list[float]] = {k: [] for k in SCORES}
    for m in result["models"]:
        if "error" in m:
            lines.append(f"| {m['model']} | {m['error']} |")
            continue
        held = m["heldout"]
        cells = []
        for k in SCORES:
            rhos[k].append(m[k]["rho"])
            cells += [f"{m[k]['rho']:+.2f}", f"{held[m[k]['pick']]:.3f}"]
        lines.append(
            f"| {m['model']} | " + " | ".join(cells) + f" | {held[m['family_first']]:.3f} | {min(held.values()):.3f} |"
        )
    lines += ["", "Median correlation: " + ", ".join(f"{k} {np.median(v):+.2f}" for k, v in rhos.items() if v) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = study_parser("benchmarks.breadth.ranking", __doc__, name="breadth-ranking", models=MODELS_PROBED)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = []
    for i, model_id in enumerate(study_models(args.models)):
        print(f"[{i + 1}] {model_id}", file=sys.stderr, flush=True)
        try:
            models.append(run_model(model_id))
        except Exception as e:  # noqa: BLE001 - report, keep going
            models.append({"model": model_id, "error": f"{type(e).__name__}: {e}"})
    result = {"command": study_command("benchmarks.breadth.ranking", argv), "models": models}
    write_study(args.out, args.name, result, markdown)
    return result


if __name__ == "__main__":
    main()
