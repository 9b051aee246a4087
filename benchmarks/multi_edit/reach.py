"""How much the rules' directions share in the whitened key space: what one rule does to another's concept.

Issue 28 names one batch design the variants did not measure: each rule's rank-one direction projected onto
the null space of the other rules' keys, in the whitened key space. For the joint solve that changes nothing
(the projected directions span the same space; docs/method.md 6c); for rules solved one at a time it would,
as much as the rules' directions share. A rule's direction is ``u = C^-1/2 s``
(:func:`surgery.solvers.direction.rank_one_direction`: ``s`` the top direction of its whitened transformed
keys), so in the whitened space it is ``s = C^1/2 u``. For each pair of rules, the **cosine** of their ``s``
(``u_i^T C u_j`` over the norms): what rule ``j``'s update does to rule ``i``'s concept, per unit of what it
does to its own. For each rule, **kept**: the norm of its ``s`` left after projecting out the span of the
other rules' (1: the projection changes nothing; near 0: it takes the direction away).

On the variants' draws (10 and up; the main run uses 0-2), for each model's deep candidate layers:

    OMP_NUM_THREADS=1 python -m benchmarks.multi_edit.reach [--arch vgg resnet vit] [--draws 10 11 12]

Writes ``benchmarks/results/multi_edit_reach.{md,json}``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from surgery.problems import prepare_problem
from surgery.testbed.protocol import select_pairs

from benchmarks.efficacy.settings import settings_for

from .run import RESULTS, load_bench, make_rule, run_archs, write_result

__all__ = ["whitened_cosines", "kept_after_projection", "main"]

logger = logging.getLogger("benchmarks.multi_edit.reach")


def whitened_cosines(directions: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """``K[i, j]``: the cosine of ``C^1/2 u_i`` and ``C^1/2 u_j``, for directions ``u`` as rows."""
    u = directions.to(torch.float64)
    gram = u @ moment.to(torch.float64) @ u.T
    norms = gram.diagonal().sqrt()
    return gram / torch.outer(norms, norms)


def kept_after_projection(cosines: torch.Tensor) -> torch.Tensor:
    """For each row's unit vector, the norm left after projecting out the span of the others, from their
    cosines (the Gram matrix of unit vectors): ``sqrt(1 - K[i,o] K[o,o]^-1 K[o,i])``."""
    n = cosines.shape[0]
    kept = []
    for i in range(n):
        o = [j for j in range(n) if j != i]
        along = cosines[i, o] @ torch.linalg.pinv(cosines[o][:, o]) @ cosines[o, i]
        kept.append(float((1.0 - along).clamp(min=0.0).sqrt()))
    return torch.tensor(kept, dtype=torch.float64)


def measure_arch(arch: str, draws: Sequence[int], k: int) -> dict:
    s = settings_for("full", arch)
    b = load_bench(arch, s)
    out: dict = {"draws": []}
    for d in draws:
        pairs, _ = select_pairs(b.model, b.tb, b.prep, b.clean_val, k=k, rng=np.random.default_rng([s.seed, 100 + d]))
        rules = [make_rule(b.model, b.tb, b.prep, p, b.clean_test, s, [s.seed, d, i]) for i, p in enumerate(pairs)]
        row: dict = {"pairs": [f"{p['concept']}->{p['style']}" for p in pairs], "layers": {}}
        for layer in b.layers:
            u = torch.stack([
                prepare_problem(b.model, layer, r.ex["x"], r.ex["x2"], r.ex["m"], stats=b.stats[layer]).u.reshape(-1)
                for r in rules
            ])
            row["layers"][layer] = whitened_cosines(u, b.stats[layer].moment()).tolist()
        out["draws"].append(row)
        logger.info("%s draw %d: the directions of %d rules at %d layers", arch, d, len(rules), len(b.layers))
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Many rules: how much their directions share in the whitened key space",
        "",
        f"Command: `{result['command']}`.",
        "",
        "**cosine** (absolute) of two rules' whitened directions (`C^1/2 u`), over the pairs of one draw's rules, pooled "
        "over draws: what one rule's update does to the other's concept, per unit of what it does to its own. "
        "**shared style**: among the 10% of pairs with the largest cosines, the share whose two concepts are "
        "restyled alike (all pairs: in brackets). **kept**: per rule, the norm of its whitened direction left "
        "after projecting out the other rules' (what a null-space projection of the others' keys leaves it).",
        "",
        "| model | layer | pairs | median abs. cosine | 90th percentile | max | shared style, top 10% (all) | kept: median | kept: min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, a in result["archs"].items():
        for layer in a["draws"][0]["layers"]:
            cos, same, kept = [], [], []
            for d in a["draws"]:
                k = torch.tensor(d["layers"][layer], dtype=torch.float64)
                styles = [p.split("->")[1] for p in d["pairs"]]
                for i in range(len(styles)):
                    for j in range(i + 1, len(styles)):
                        cos.append(abs(float(k[i, j])))
                        same.append(styles[i] == styles[j])
                kept += kept_after_projection(k).tolist()
            top = np.argsort(cos)[::-1][: max(1, len(cos) // 10)]
            lines.append(
                f"| {arch} | `{layer}` | {len(cos)} | {np.median(cos):.2f} | {np.percentile(cos, 90):.2f} | "
                f"{max(cos):.2f} | {np.mean([same[t] for t in top]):.0%} ({np.mean(same):.0%}) | "
                f"{np.median(kept):.2f} | {min(kept):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multi_edit.reach", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["vgg", "resnet", "vit"])
    p.add_argument("--draws", type=int, nargs="+", default=[10, 11, 12])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="multi_edit_reach")
    args = p.parse_args(argv)
    result = run_archs("benchmarks.multi_edit.reach", args.arch, lambda arch: measure_arch(arch, args.draws, args.k), argv)
    write_result(result, args.out, args.name, markdown)
    return result


if __name__ == "__main__":
    main()
