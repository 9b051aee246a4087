"""Values after the residual add (the default) vs the branch alone (the value the adapters read before
issue 17), on the same layers: ``python -m benchmarks.breadth --branch-only``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import surgery
from surgery import collect_key_stats
from surgery.rank_one import rank_one_delta
from surgery.problems import prepare_problem
from surgery.solvers import solve_fast

from .concept import Data, make_data
from .measure import batch_logits, logit_ratios, measure_layer
from .models import MODELS
from .report import fmt
from .weights import prepare_model

__all__ = ["BRANCH_CASES", "branch_only_row", "run_branch_comparison", "branch_markdown"]


BRANCH_CASES = (
    ("vit_tiny_patch16_224", "blocks.11.mlp.fc2"),
    ("vit_tiny_patch16_224", "blocks.11.attn.proj"),
    ("vit_tiny_reg4_gap", "blocks.3.mlp.fc2"),
    ("convnext_atto", "stages.1.blocks.1.mlp.fc2"),
    ("tv_convnext_tiny", "features.3.1.block.5"),
    ("swin_tiny_patch4_window7_224", "layers.1.blocks.1.mlp.fc2"),
    ("efficientnet_b0", "blocks.5.3.conv_pwl"),
    ("mixer_s16_224", "blocks.7.mlp_channels.fc2"),
)


def branch_only_row(model: nn.Module, layer, data: Data, base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The same edit solved against the branch's value before the add (the old adapters' value).

    The branch value is the block computed with a zero skip; keys, direction and solver are the
    library's; the solved factors are applied to the weight and the logits measured as for the
    default (after-the-add) edit.
    """

    stats = collect_key_stats(model, layer, data.calibration, batch_size=16, progress=False)
    problem = prepare_problem(model, layer, data.x, data.x2, data.masks, stats=stats)
    io_o = layer.capture(model, data.x)
    zero = {k: torch.zeros_like(v) for k, v in problem.context.items()}
    with torch.no_grad():
        problem.values = layer.block_forward(io_o.keys, layer.weight, {k: torch.zeros_like(v) for k, v in io_o.context.items()})
    problem.context = zero
    lam, info = solve_fast(problem)
    w = layer.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(rank_one_delta(lam.to(w.dtype), problem.u.to(w.dtype)))
        after = {k: batch_logits(model, getattr(data, k)) for k in ("x2", "h2", "clean")}
    finally:
        with torch.no_grad():
            w.copy_(saved)
    return {
        **logit_ratios(after, base),
        "branch_objective_ratio": info["objective"] / max(info["objective_before"], 1e-30),
    }


def run_branch_comparison(cases: Sequence[tuple[str, str]] = BRANCH_CASES) -> dict[str, Any]:
    """After-the-add values (the default) vs branch-only values, on the same layers."""
    specs = {s.id: s for s in MODELS}
    rows = []
    built: dict[str, tuple] = {}
    for model_id, layer_name in cases:

        if model_id not in built:
            spec = specs[model_id]
            data = make_data(spec.size)
            torch.manual_seed(0)
            model = prepare_model(spec.build().eval(), data.calibration)
            base = {k: batch_logits(model, getattr(data, k)) for k in ("x", "x2", "h", "h2", "clean")}
            built = {model_id: (model, data, base)}
        model, data, base = built[model_id]
        layer = surgery.get_layer(model, layer_name)
        after_add = measure_layer(model, layer, data, base)
        branch = branch_only_row(model, layer, data, base)
        rows.append({"model": model_id, "layer": layer_name, "after_add": after_add, "branch_only": branch})
        print(
            f"  {model_id} {layer_name}: held-out after the add {after_add['heldout_ratio']:.3f}, "
            f"branch only {branch['heldout_ratio']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return {"cases": rows}


def branch_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Values after the residual add vs the branch alone",
        "",
        f"Command: `{res.get('command', 'python -m benchmarks.breadth --branch-only')}`. Same models, images and "
        "`rewrite` settings as `breadth.md`; the branch-only edit is solved against the block computed with a zero "
        "skip (the value the adapters read before issue 17), then measured the same way.",
        "",
        "| model | layer | exemplars: after the add / branch only | held-out: after the add / branch only | clean: after the add / branch only |",
        "|---|---|---|---|---|",
    ]
    for r in res["cases"]:
        a, b = r["after_add"], r["branch_only"]
        lines.append(
            f"| {r['model']} | `{r['layer']}` | {fmt(a['exemplar_ratio'])} / {fmt(b['exemplar_ratio'])} | "
            f"{fmt(a['heldout_ratio'])} / {fmt(b['heldout_ratio'])} | {fmt(a['clean_change'])} / {fmt(b['clean_change'])} |"
        )
    return "\n".join(lines) + "\n"
