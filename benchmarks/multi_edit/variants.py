"""Which batch rewrite: design variants for 8 rules, measured on draws the main run does not use.

The main run (``python -m benchmarks.multi_edit``) uses draws 0, 1, 2; the variants here are compared on
draws 10 and up, so the choice of the batch's design is not made on the draws that report it. Every
variant starts from the same 8 rules and solo edits (``run.solo_edit``) and, except the last, has one
strength chosen on the union of the rules' validation scenes within the clean budget, as the main run's
batch:

- **joint**: :func:`surgery.batch.rewrite_rules` at the layer most solo edits chose (the main run's batch);
- **joint, protected**: the same with clean training images as protected keys (``protect=``);
- **joint, clean-key null space** (AlphaEdit's lever, Fang et al., ICLR 2025, for one rank-one direction
  per rule): the joint rewrite with each direction whitened within the near-null space of the clean keys'
  second moment ``C`` (the eigen-directions holding 1% of their energy, :func:`null_space_moment`), so
  that clean keys barely reach it;
- **joint, 0.5-point budget**: the joint rewrite with its strength chosen within the acceptance's 0.5-point
  cost (issue 28) instead of the protocol's 0.25, from a grid extended to 4 (as the ViT efficacy run's);
- **joint per layer**: one joint rewrite per layer the solo edits chose, each rule at its own layer;
- **joint, solo strengths**: the joint rewrite with each rule's factors scaled by its solo strength;
- **stacked, one strength**: the solo edits (at their strengths) scaled together;
- **stacked, budget/k**: each solo edit chosen anew within budget / k, applied together;
- **stacked** (the reference, the main run's stacking): the solo edits at their strengths, applied together.

``--variants`` runs a subset (the solo edits are always made). ``--curve`` also measures the joint rewrite at
every strength of the extended grid, on validation (score, clean drop) and on test (clean change, each
rule's scores): the strength-cost curve the choice is made on, and whether any strength reaches a target. For the two stacked variants the report
also sets the clean test cost of the rules together against the sum of their costs one at a time: whether
a budget can be shared out among rules.

Writes ``benchmarks/results/multi_edit_variants.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from surgery import select_strength, strength_grid
from surgery.batch import Rule, rewrite_rules
from surgery.edits.edit import Edit
from surgery.evaluation import Candidate
from surgery.solvers import solver_config
from surgery.testbed.protocol import ALPHAS, select_pairs

from benchmarks.efficacy.settings import Settings, settings_for

from .report import MIN_SOLO, _median_ci
from .run import (
    RESULTS, RuleData, carrying, choose, join_runs, load_bench, make_rule, rule_scores, run_archs, solo_edit,
    write_result,
)

__all__ = ["main", "VARIANTS"]

logger = logging.getLogger("benchmarks.multi_edit.variants")

VARIANTS = (
    "stacked", "joint", "joint, protected", "joint per layer", "joint, solo strengths", "stacked, one strength",
    "stacked, budget/k", "joint, clean-key null space", "joint, 0.5-point budget",
)
N_PROTECT = 64  # clean training images protected by the "joint, protected" variant
WIDE_BUDGET = "joint, 0.5-point budget"
WIDE_BUDGET_PP = 0.5  # issue 28's clean cost ceiling for 8 rules
WIDE_ALPHAS = (*ALPHAS, 1.5, 2.0, 3.0, 4.0)
NULL_ENERGY = 0.01  # the clean keys' near-null space: the eigen-directions of C holding this share of their energy
NULL_INFLATE = 1e3  # how much the other eigenvalues are raised, so the whitened direction avoids them


def null_space_moment(moment: torch.Tensor, energy: float = NULL_ENERGY, inflate: float = NULL_INFLATE) -> tuple[torch.Tensor, float]:
    """``C`` with its main eigenvalues multiplied by ``inflate``, and the share of dimensions left out of them.

    The near-null space is spanned by the eigen-directions of smallest eigenvalue that together hold at
    most ``energy`` of the clean keys' energy (trace); every other eigenvalue is raised. A direction
    whitened with the result (``u = C'^{-1/2} s``) has its components along the clean keys' main
    directions shrunk ``inflate``-fold: it lies in their near-null space, where AlphaEdit projects updates,
    and within it is whitened as :func:`surgery.rewrite` whitens. (A threshold on the eigenvalues, as
    AlphaEdit's, finds no null space at the testbed VGG's and ResNet's 64- and 96-channel keys.)
    """
    c = moment.detach().to(torch.float64)
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)  # ascending
    null = torch.cumsum(evals.clamp_min(0), 0) <= energy * float(evals.clamp_min(0).sum())
    raised = torch.where(null, evals, evals * inflate)
    return (evecs * raised) @ evecs.T, float(null.double().mean())


def factored_edit(model: nn.Module, parts: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> Edit:
    """One edit holding every ``(layer, lam, u)`` part: factors of one layer concatenated along the rank (their
    updates add), several layers as a span in forward order."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    by_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for layer, lam, u in parts:
        by_layer[layer].append((lam, u))
    layers = sorted(by_layer, key=order.__getitem__)
    factors = {f"{name}.weight": tuple(torch.cat(t) for t in zip(*by_layer[name])) for name in layers}
    if len(layers) == 1:
        lam, u = factors[f"{layers[0]}.weight"]
        return Edit(layer=layers[0], method="rewrite", lam=lam, u=u)
    return Edit(layer=layers[0], method="rewrite", span=factors)


def _scaled(lam: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    return lam * torch.tensor(alphas, dtype=lam.dtype).view(-1, *[1] * (lam.dim() - 1))


def variant_edits(
    model, rules: list[RuleData], solos: list[Candidate], stats, protect_x, s: Settings, names: Sequence[str]
) -> tuple[dict[str, Edit], dict]:
    """The variants among ``names`` that are one edit, before their strength is chosen (rules whose solo
    edit qualified), and what was measured on the way (the null space's share of dimensions)."""
    config = solver_config("fast", max_iter=s.fast_steps)
    batch = [Rule(r.ex["x"], r.ex["x2"], r.ex["m"]) for r in rules]
    main_layer = Counter(c.edit.layer for c in solos).most_common(1)[0][0]
    notes: dict = {}

    @functools.cache  # "joint, solo strengths" rescales it
    def joint() -> Edit:
        return rewrite_rules(model, main_layer, batch, stats=stats[main_layer], solver=config)

    def null_space() -> Edit:
        moment, notes["null_space_share"] = null_space_moment(stats[main_layer].moment())
        return rewrite_rules(model, main_layer, batch, stats=moment, solver=config)

    def per_layer() -> Edit:
        parts = []
        for layer in dict.fromkeys(c.edit.layer for c in solos):
            idx = [i for i, c in enumerate(solos) if c.edit.layer == layer]
            if len(idx) == 1:
                parts.append((layer, solos[idx[0]].edit.lam, solos[idx[0]].edit.u))
            else:
                e = rewrite_rules(model, layer, [batch[i] for i in idx], stats=stats[layer], solver=config)
                parts.append((layer, e.lam, e.u))
        return factored_edit(model, parts)

    def solo_strengths() -> Edit:
        e = joint()
        return factored_edit(model, [(main_layer, _scaled(e.lam, [c.alpha for c in solos]), e.u)])

    makers = {
        "joint": joint,
        "joint, protected": lambda: rewrite_rules(
            model, main_layer, batch, stats=stats[main_layer], solver=config, protect=protect_x
        ),
        "joint per layer": per_layer,
        "joint, solo strengths": solo_strengths,
        "stacked, one strength": lambda: factored_edit(model, [(c.edit.layer, c.edit.lam * c.alpha, c.edit.u) for c in solos]),
        "joint, clean-key null space": null_space,
        WIDE_BUDGET: joint,
    }
    return {name: make() for name, make in makers.items() if name in names}, notes


def strength_choice(name: str, s: Settings) -> tuple[Sequence[float], Settings]:
    """The strength grid and the settings (clean budget) a one-edit variant's strength is chosen with."""
    if name == WIDE_BUDGET:
        return WIDE_ALPHAS, dataclasses.replace(s, max_clean_drop=WIDE_BUDGET_PP)
    return s.alphas, s


def joint_curve(b, model, edit: Edit, rules: list[RuleData], val: list[torch.Tensor], cv_x, cv_y) -> list[dict]:
    """The joint rewrite at every strength of ``WIDE_ALPHAS``: pooled validation score and clean validation
    drop (what the choice sees), clean test change and each rule's test score (what it gets)."""
    grid = strength_grid(edit, WIDE_ALPHAS)
    table = select_strength(
        model, grid, val[0], val[1], clean_images=cv_x, clean_labels=cv_y, max_clean_drop=float("inf"),
        val_originals=val[2], check_every_candidate=True,
    ).table
    points = []
    for cand, row in zip(grid, table):
        with carrying(model, [cand]):
            scores = [rule_scores(model, r)["other/same"] for r in rules]
        points.append({"alpha": cand.alpha, "val_score": row.score, "val_clean_drop_pp": row.clean_drop,
                       "clean_change_pp": b.clean_change([cand]), "scores": scores})
    return points


def measure_arch(arch: str, draws: Sequence[int], k: int, names: Sequence[str] = VARIANTS, curve: bool = False) -> dict:
    s = settings_for("full", arch)
    b = load_bench(arch, s)
    model, tb, prep, clean_test, stats, layers = b.model, b.tb, b.prep, b.clean_test, b.stats, b.layers
    protect_x = b.train_x[:N_PROTECT]
    cv_x, cv_y, clean_change = b.clean_val_cached, b.clean_val.labels, b.clean_change
    out: dict = {"draws": []}
    for d in draws:
        pairs, _ = select_pairs(model, tb, prep, b.clean_val, k=k, rng=np.random.default_rng([s.seed, 100 + d]))
        rules = [make_rule(model, tb, prep, p, clean_test, s, [s.seed, d, i]) for i, p in enumerate(pairs)]
        solos = [solo_edit(model, r, stats, layers, cv_x, cv_y, s) for r in rules]
        keep = [i for i, c in enumerate(solos) if c is not None]
        rules, solos = [rules[i] for i in keep], [solos[i] for i in keep]
        solo_scores = []
        for c, r in zip(solos, rules):
            with carrying(model, [c]):
                solo_scores.append(rule_scores(model, r)["other/same"])
        val = [torch.cat([getattr(r, key) for r in rules]) for key in ("val_x", "val_y", "val_orig")]
        edits, notes = variant_edits(model, rules, solos, stats, protect_x, s, names)
        chosen: dict[str, list[Candidate | None]] = {}
        for name, e in edits.items():
            grid, within = strength_choice(name, s)
            chosen[name] = [choose(model, strength_grid(e, grid), *val, cv_x, cv_y, within)]
        if "stacked, budget/k" in names:
            share = dataclasses.replace(s, max_clean_drop=s.max_clean_drop / len(rules))
            chosen["stacked, budget/k"] = [solo_edit(model, r, stats, layers, cv_x, cv_y, share) for r in rules]
        if "stacked" in names:
            chosen["stacked"] = list(solos)
        row = {"pairs": [f"{p['concept']}->{p['style']}" for i, p in enumerate(pairs) if i in keep], "solo": solo_scores,
               "variants": {}, **notes}
        for name, cands in chosen.items():
            with carrying(model, cands):
                scores = [rule_scores(model, r)["other/same"] for r in rules]
            row["variants"][name] = {"scores": scores, "clean_change_pp": clean_change(cands), "alphas": [None if c is None else c.alpha for c in cands]}
            logger.info("%s draw %d %s: clean %+.2f, strengths %s", arch, d, name, row["variants"][name]["clean_change_pp"], row["variants"][name]["alphas"])
        if curve:
            joint = edits["joint"] if "joint" in edits else variant_edits(model, rules, solos, stats, protect_x, s, ["joint"])[0]["joint"]
            row["joint_curve"] = joint_curve(b, model, joint, rules, val, cv_x, cv_y)
        for name in [n for n in ("stacked", "stacked, budget/k") if n in chosen]:  # does the clean cost of k edits add up?
            row["variants"][name]["solo_clean_pp"] = [clean_change([c]) for c in chosen[name]]
        out["draws"].append(row)
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Batch rewrite design: variants for 8 rules",
        "",
        f"Command: `{result['command']}`.",
        "",
        "Draws of the main run's pairs protocol that the main run does not use (its draws are 0, 1, 2). "
        "**retained**: a rule's other-class errors corrected (exemplars' style, test scenes) with all rules "
        f"in the model, over its solo edit's; median over rules whose solo edit corrected at least {MIN_SOLO:g}% "
        "(bootstrap 95% interval), pooled over draws. **clean**: mean (worst) clean test accuracy change. "
        "**strength**: the strength chosen on validation per draw.",
        "",
        "| model | variant | rules counted | retained | clean (pp) | strength |",
        "|---|---|---|---|---|---|",
    ]
    for arch, a in result["archs"].items():
        for name in [n for n in VARIANTS if n in a["draws"][0]["variants"]]:
            ret, clean, strengths = [], [], []
            for d in a["draws"]:
                v = d["variants"][name]
                clean.append(v["clean_change_pp"])
                strengths.append("/".join("-" if x is None else f"{x:g}" for x in v["alphas"]) if len(v["alphas"]) > 1 else f"{v['alphas'][0]}")
                ret += [sc / so for sc, so in zip(v["scores"], d["solo"]) if so is not None and so >= MIN_SOLO and sc is not None]
            med, lo, hi = _median_ci(ret) if ret else (float("nan"),) * 3
            lines.append(
                f"| {arch} | {name} | {len(ret)} | {med:.2f} [{lo:.2f}, {hi:.2f}] | {np.mean(clean):+.2f} ({min(clean):+.2f}) | "
                f"{'; '.join(strengths)} |"
            )
    shares = {arch: [d["null_space_share"] for d in a["draws"] if "null_space_share" in d] for arch, a in result["archs"].items()}
    if any(shares.values()):
        lines += ["", "Share of the key dimensions in the clean keys' near-null space (the eigen-directions holding "
                  f"{100 * NULL_ENERGY:g}% of their energy), per draw: " + "; ".join(
                      f"{arch} " + "/".join(f"{x:.2f}" for x in v) for arch, v in shares.items() if v) + "."]
    lines += _curve_lines(result)
    lines += [
        "",
        "Clean test cost of the stacked rules together against the sum of their costs one at a time (pp, "
        "mean over draws):",
        "",
        "| model | variant | one at a time, summed | together |",
        "|---|---|---|---|",
    ]
    for arch, a in result["archs"].items():
        for name in ("stacked", "stacked, budget/k"):
            rows = [d["variants"][name] for d in a["draws"] if "solo_clean_pp" in d["variants"].get(name, {})]
            if rows:
                summed = np.mean([sum(v["solo_clean_pp"]) for v in rows])
                together = np.mean([v["clean_change_pp"] for v in rows])
                lines.append(f"| {arch} | {name} | {summed:+.2f} | {together:+.2f} |")
    return "\n".join(lines) + "\n"


def _curve_lines(result: dict) -> list[str]:
    """The joint rewrite's strength-cost curve, pooled over draws (runs with ``--curve``)."""
    archs = {arch: a for arch, a in result["archs"].items() if any("joint_curve" in d for d in a["draws"])}
    if not archs:
        return []
    lines = [
        "",
        "The joint rewrite at every strength (`--curve`; choosing needs validation, the test columns only say "
        "what each strength gets): pooled validation score and clean validation drop, mean (worst) clean test "
        "change and retained (as above, median over rules, pooled over draws).",
        "",
        "| model | strength | validation score | validation clean drop (pp) | clean test (pp) | retained |",
        "|---|---|---|---|---|---|",
    ]
    for arch, a in archs.items():
        draws = [d for d in a["draws"] if "joint_curve" in d]
        for i, point in enumerate(draws[0]["joint_curve"]):
            at = [d["joint_curve"][i] for d in draws]
            ret = [sc / so for d, p in zip(draws, at) for sc, so in zip(p["scores"], d["solo"])
                   if so is not None and so >= MIN_SOLO and sc is not None]
            med, lo, hi = _median_ci(ret) if ret else (float("nan"),) * 3
            clean = [p["clean_change_pp"] for p in at]
            drops = "/".join(format(p["val_clean_drop_pp"], ".2f") for p in at)
            lines.append(
                f"| {arch} | {point['alpha']:g} | {np.mean([p['val_score'] for p in at]):+.1f} | "
                f"{drops} | {np.mean(clean):+.2f} ({min(clean):+.2f}) | "
                f"{med:.2f} [{lo:.2f}, {hi:.2f}] |"
            )
    return lines


def merge_variant_runs(paths: Sequence[Path]) -> dict:
    """Earlier runs joined into one result (:func:`join_runs`); where several measured one model, their
    variants are joined draw by draw. Those runs must have drawn the same pairs with the same solo scores,
    and a variant measured twice must agree exactly: the rules, edits and choices are deterministic."""
    runs = [json.loads(path.read_text()) for path in paths]
    merged = join_runs(runs)
    for arch in merged["archs"]:
        base, *others = [r["archs"][arch] for r in runs if arch in r["archs"]]  # base: joined into in place
        for other in others:
            if [(d["pairs"], d["solo"]) for d in other["draws"]] != [(d["pairs"], d["solo"]) for d in base["draws"]]:
                raise SystemExit(f"{arch}: the runs drew other pairs or solo edits; measure their variants in one run")
            for mine, theirs in zip(base["draws"], other["draws"]):
                for name, v in theirs["variants"].items():
                    if name in mine["variants"] and mine["variants"][name] != v:
                        raise SystemExit(f"{arch}: variant {name!r} measured twice with different results")
                    mine["variants"].setdefault(name, v)
                mine.update({k: v for k, v in theirs.items() if k not in ("pairs", "solo", "variants")})
            base["seconds"] = base.get("seconds", 0) + other.get("seconds", 0)
        merged["archs"][arch] = base
    return merged


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multi_edit.variants", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["vgg", "resnet", "vit"])
    p.add_argument("--draws", type=int, nargs="+", default=[10, 11])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--curve", action="store_true", help="also the joint rewrite at every strength of the extended grid")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="the variants to measure (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="multi_edit_variants")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="only join earlier runs into --name")
    args = p.parse_args(argv)
    if args.merge:
        result = merge_variant_runs(args.merge)
    else:
        result = run_archs("benchmarks.multi_edit.variants", args.arch, lambda arch: measure_arch(arch, args.draws, args.k, args.variants, args.curve), argv)
    write_result(result, args.out, args.name, markdown)
    return result


if __name__ == "__main__":
    main()
