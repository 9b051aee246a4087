"""One (pair, N, draw) unit of the efficacy benchmark: its exemplars, every method's candidates, the
selection on validation and the report on test."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from surgery import errors_corrected, finetune, rewrite
from surgery.evaluation import CachedImages, Candidate, NoCandidateError, select_by_concept_match, select_strength
from surgery.testbed import CLASS_NAMES, STYLES
from surgery.testbed.protocol import SPAN, choose_target, edit_candidates

from .settings import RANK_VARIANTS, SCHEDULE_VARIANTS, TOKEN_VARIANTS, VARIANTS, Settings

__all__ = ["PairData", "prepare_pair", "draw_unit", "run_unit", "evaluate_on_test", "errors_by_group", "group_masks"]

logger = logging.getLogger("benchmarks.efficacy")


# --------------------------------------------------------------------------- candidates
def single_layers(layers: list[str]) -> list[str]:
    """The candidates that are one layer (spans "A+B" are an edit's candidates only)."""
    return [layer for layer in layers if SPAN not in layer]


def reference_candidates(model, layers, stats, ex, s: Settings) -> list[Candidate]:
    return [
        Candidate(rewrite(model, layer, ex["x"], ex["x2"], ex["m"], stats=stats[layer], solver="reference", steps=steps))
        for layer in single_layers(layers)[-1:]
        for steps in s.reference_steps
    ]


def finetune_candidates(model, layers, ex, s: Settings, scope: str) -> list[Candidate]:
    singles = single_layers(layers)
    return [
        Candidate(finetune(model, layer, ex["x2"], ex["y"], scope=scope, lr=lr, steps=steps))
        for layer in (singles[-1:] if s.ft_last_layer_only else singles)
        for lr, steps in s.ft_grid
    ]


# --------------------------------------------------------------------------- one pair
@dataclass
class PairData:
    """One concept-style pair's evaluation pool, cached for every candidate of every unit."""

    concept: str
    style: str
    v_ex: int  # the exemplars' style variant
    held: list[int]  # held-out variants
    pool: torch.Tensor  # indices of test-split scenes showing the concept
    y: torch.Tensor
    x0: CachedImages  # clean pool scenes
    xv: dict[int, CachedImages]  # pool scenes with the concept restyled, per variant
    masks: torch.Tensor
    prefer: torch.Tensor  # whether each pool scene's class prefers the concept
    correct0: torch.Tensor  # the unedited model is right on the clean original
    target: int


def prepare_pair(model, tb, prep, pair, clean_test, s: Settings, rng: np.random.Generator) -> PairData:
    concept, style = pair["concept"], pair["style"]
    variants = list(range(len(STYLES[style])))
    v_ex = int(rng.integers(len(variants)))
    pool = clean_test.has_concept(concept).nonzero().flatten()
    specs = [clean_test.specs[i] for i in pool.tolist()]
    y = clean_test.labels[pool]
    xv = {}
    for v in variants:
        imgs, _ = tb.render_batch(specs, restyle={concept: (style, v)})
        xv[v] = CachedImages(model, prep(imgs), batch_size=256)
    x0 = CachedImages(model, prep(clean_test.images[pool]), batch_size=256)
    return PairData(
        concept=concept, style=style, v_ex=v_ex, held=[v for v in variants if v != v_ex], pool=pool, y=y,
        x0=x0, xv=xv, masks=clean_test.mask(concept)[pool].float()[:, None],
        prefer=torch.tensor([tb.prefers(int(c), concept) for c in y]),
        correct0=x0.logits0.argmax(1) == y, target=choose_target(pair, y, max(s.ns) + 2, rng),
    )


def draw_unit(pd: PairData, n: int, s: Settings, rng: np.random.Generator) -> dict:
    """Exemplar indices (target class, and several classes) and the 30/70 validation/test split."""
    y = pd.y
    tidx = (y == pd.target).nonzero().flatten().numpy()
    ex_idx = rng.choice(tidx, size=min(n, len(tidx)), replace=False)
    multi_ex = None
    counts = torch.bincount(y, minlength=len(CLASS_NAMES))
    present = [c for c in range(len(CLASS_NAMES)) if counts[c] >= 2]
    if n > 1 and "edit multi-class" in s.methods:
        classes = rng.choice(present, size=min(3, len(present), n), replace=False)
        chosen: list[int] = []
        for i in range(n):
            cand = [j for j in (y == int(classes[i % len(classes)])).nonzero().flatten().tolist() if j not in chosen]
            chosen.append(int(rng.choice(cand)))
        multi_ex = np.array(chosen)
    used = set(ex_idx.tolist()) | (set(multi_ex.tolist()) if multi_ex is not None else set())
    perm = rng.permutation(np.array([i for i in range(len(y)) if i not in used]))
    n_val = round(s.val_fraction * len(perm))
    return {"ex_idx": ex_idx, "multi_ex": multi_ex, "val_idx": np.sort(perm[:n_val]), "test_idx": np.sort(perm[n_val:])}


def run_unit(model, pd: PairData, n: int, d: int, stats, layers, clean_val, clean_val_y, clean_test_c, clean_test,
             concept_ref, s: Settings, rng: np.random.Generator, ref_ok: bool, pair_index: int) -> dict:
    """Every method on one (pair, N, draw) unit: candidates, selection on validation, report on test."""
    split = draw_unit(pd, n, s, rng)
    ex_idx, multi_ex, val_idx, test_idx = split["ex_idx"], split["multi_ex"], split["val_idx"], split["test_idx"]

    def exemplars(idx):
        t = torch.as_tensor(idx)
        return {"x": pd.x0.images[t], "x2": pd.xv[pd.v_ex].images[t], "m": pd.masks[t], "y": pd.y[t]}

    ex = exemplars(ex_idx)
    val_x, val_orig = pd.xv[pd.v_ex].subset(val_idx), pd.x0.subset(val_idx)
    val_y = pd.y[torch.as_tensor(val_idx)]
    test_sets = {v: pd.xv[v].subset(test_idx) for v in pd.xv}  # shared by every method's evaluation
    unit = {
        "pair": pair_index, "concept": pd.concept, "style": pd.style,
        "variant": STYLES[pd.style][pd.v_ex],
        "held_out_variants": [STYLES[pd.style][v] for v in pd.held],
        "target": pd.target, "n": n, "draw": d, "exemplar_idx": ex_idx.tolist(),
        "val_idx": val_idx.tolist(), "test_idx": test_idx.tolist(), "pool_idx": pd.pool.tolist(), "methods": {},
    }
    cache_cands: dict[str, list[Candidate]] = {}
    by_rank: dict[int, list[Candidate]] = {}  # edit's and the rank variants' candidates, per rank
    for method in s.methods:
        t0 = time.perf_counter()
        if method == "reference" and not (ref_ok and n == (3 if 3 in s.ns else s.ns[0]) and d == 0):
            continue
        if method == "edit multi-class" and multi_ex is None:
            continue
        if method in (*VARIANTS, *TOKEN_VARIANTS, *SCHEDULE_VARIANTS) and not (n in s.variant_ns and d < s.variant_draws):
            continue
        mex = exemplars(multi_ex) if method == "edit multi-class" else ex
        lays = {
            "edit high-res": layers["high_res"], "edit span": layers.get("span", []),
            **{v: layers.get("long_span", []) for v in SCHEDULE_VARIANTS},
        }.get(method, layers["deep"])
        if not lays:  # no span candidates for this model
            continue
        if method in ("edit mlp only", "edit attn only"):
            lays = [l for l in lays if (".mlp." in l) == (method == "edit mlp only")]
        if method == "edit label-free" and "edit" in cache_cands:
            cands = cache_cands["edit"]  # the same candidates; only the selection differs
        elif method == "edit" or method in RANK_VARIANTS:  # each rank solved once per unit; edit's are rank one's
            ranks = (1, *RANK_VARIANTS.get(method, ()))
            for r in ranks:
                if r not in by_rank:
                    by_rank[r] = edit_candidates(
                        model, lays, stats, mex["x"], mex["x2"], mex["m"], alphas=s.alphas, steps=s.fast_steps, rank=r
                    )
            cands = [c for r in ranks for c in by_rank[r]]
        elif method in ("edit high-res", "edit multi-class", "edit label-free", "edit mlp only", "edit attn only", "edit span"):
            cands = edit_candidates(model, lays, stats, mex["x"], mex["x2"], mex["m"], alphas=s.alphas, steps=s.fast_steps)
        elif method in SCHEDULE_VARIANTS:
            cands = edit_candidates(
                model, lays, stats, mex["x"], mex["x2"], mex["m"], alphas=s.alphas, steps=s.fast_steps,
                schedule="first_last" if method.endswith("first-last") else "memit",
            )
        elif method == "edit prefix=1":
            cands = edit_candidates(
                model, lays, stats, mex["x"], mex["x2"], mex["m"], alphas=s.alphas, steps=s.fast_steps, prefix_weight=1.0
            )
        elif method == "edit +mask":
            cands = edit_candidates(
                model, lays, stats, mex["x"], mex["x2"], mex["m"], alphas=s.alphas, steps=s.fast_steps, use_mask=True
            )
        elif method == "reference":
            cands = reference_candidates(model, lays, stats, mex, s)
        else:
            cands = finetune_candidates(model, lays, mex, s, method.split()[1])
        cache_cands[method] = cands
        try:
            if method == "edit label-free":
                ref = concept_ref[pd.concept]
                sel = select_by_concept_match(
                    model, cands, val_x, pd.masks[torch.as_tensor(val_idx)], ref["x"], ref["m"],
                    clean_images=clean_val, clean_labels=clean_val_y, max_clean_drop=s.max_clean_drop,
                    check_every_candidate=False,
                )
            else:
                sel = select_strength(
                    model, cands, val_x, val_y, clean_images=clean_val, clean_labels=clean_val_y,
                    max_clean_drop=s.max_clean_drop, val_originals=val_orig, check_every_candidate=False,
                )
            chosen_c: Candidate | None = sel.candidate
            table = [r.to_dict() for r in sel.table]
        except NoCandidateError as e:
            chosen_c, table = None, [r.to_dict() for r in e.table]
        targets = {pd.target} if method != "edit multi-class" else {int(c) for c in pd.y[torch.as_tensor(multi_ex)]}
        res = evaluate_on_test(chosen_c, pd, test_idx, test_sets, targets, clean_test_c, clean_test)
        res["chosen"] = None if chosen_c is None else chosen_c.name
        res["layer"] = None if chosen_c is None else SPAN.join(chosen_c.edit.layers)
        res["alpha"] = None if chosen_c is None else chosen_c.alpha
        res["rank"] = None if chosen_c is None else chosen_c.edit.hparams.get("rank", 1)
        res["n_candidates"] = len(cands)
        res["selection_table"] = table
        res["seconds"] = round(time.perf_counter() - t0, 2)
        unit["methods"][method] = res
        logger.info(
            "%s/%s N=%d draw %d %-18s %s  target %s other %s clean %+.2f (%.1fs)",
            pd.concept, pd.style, n, d, method, res["chosen"], fmt(res["pct"]["target/same"]),
            fmt(res["pct"]["other/same"]), res["clean_acc_change_pp"], res["seconds"],
        )
    return unit


def fmt(x):
    return "n/a" if x is None else f"{x:+.0f}%"


def group_masks(pd: PairData, targets: set[int]) -> dict[str, torch.Tensor]:
    """The pool scenes of each reported group: the target class(es), other classes, and those of them that
    prefer the concept or not."""
    is_target = torch.tensor([int(c) in targets for c in pd.y])
    return {
        "target": is_target, "other": ~is_target,
        "other-prefer": ~is_target & pd.prefer, "other-nonprefer": ~is_target & ~pd.prefer,
    }


def errors_by_group(pd: PairData, test_idx, logit0: dict[int, torch.Tensor], logit1: dict[int, torch.Tensor],
                    targets: set[int]) -> dict[str, Any]:
    """``{"pct": {group/variant: % errors corrected}, "counts": {group/variant: [before, after]}}`` on the
    TEST indices, from the logits of each style variant's test scenes before and after (``logit0/1[v]``),
    counting only scenes whose clean original the unedited model gets right."""
    yt = pd.y[torch.as_tensor(test_idx)]
    out: dict[str, Any] = {"pct": {}, "counts": {}}
    t = torch.as_tensor(test_idx)
    for g, gm in group_masks(pd, targets).items():
        keep = (gm & pd.correct0)[t]
        for which, vs in (("same", [pd.v_ex]), ("held-out", pd.held)):
            e0 = sum(int((logit0[v].argmax(1) != yt)[keep].sum()) for v in vs)
            e1 = sum(int((logit1[v].argmax(1) != yt)[keep].sum()) for v in vs)
            pct = errors_corrected(e0, e1)
            out["pct"][f"{g}/{which}"] = None if math.isnan(pct) else pct
            out["counts"][f"{g}/{which}"] = [e0, e1]
    return out


def evaluate_on_test(cand: Candidate | None, pd: PairData, test_idx, test_sets: dict[int, CachedImages],
                     targets: set[int], clean_test_c: CachedImages, clean_test) -> dict:
    """% errors corrected per group on the TEST indices (``test_sets``: each variant's test scenes),
    clean accuracy change, and logit shifts."""
    t = torch.as_tensor(test_idx)
    yt = pd.y[t]
    logit0 = {v: test_sets[v].logits0 for v in [pd.v_ex, *pd.held]}
    logit1 = {v: test_sets[v].logits(cand) for v in [pd.v_ex, *pd.held]}
    out: dict[str, Any] = errors_by_group(pd, test_idx, logit0, logit1, targets)
    base_masks = group_masks(pd, targets)
    shifts = {}
    clean_y = clean_test.labels
    if cand is None:
        out["clean_acc_change_pp"] = 0.0
    else:
        clean0, clean1 = clean_test_c.logits0, clean_test_c.logits(cand)
        out["clean_acc_change_pp"] = 100.0 * (
            (clean1.argmax(1) == clean_y).double().mean() - (clean0.argmax(1) == clean_y).double().mean()
        ).item()
        # clean test scenes WITHOUT the concept: how much of the true class's logit the edit removes
        # (absolute, and relative to the true logit's margin over the runner-up before the edit)
        no = ~clean_test.has_concept(pd.concept)
        d = (clean1[no] - clean0[no]).gather(1, clean_y[no][:, None])[:, 0]
        top2 = clean0[no].topk(2, dim=1).values
        shifts["clean-no-concept"] = {
            "true_logit_change": d.mean().item(),
            "margin_before": (top2[:, 0] - top2[:, 1]).mean().item(),
        }
    # logit shifts on test images (exemplar variant) of other classes: the true class's logit
    l0, l1 = logit0[pd.v_ex], logit1[pd.v_ex]
    for g in ("other-prefer", "other-nonprefer"):
        gm = base_masks[g][t]
        if gm.any():
            d_true = (l1 - l0)[gm].gather(1, yt[gm][:, None]).mean().item()
            top2 = l0[gm].topk(2, dim=1).values
            shifts[g] = {"true_logit_change": d_true, "margin_before": (top2[:, 0] - top2[:, 1]).mean().item()}
    out["logit_shifts"] = shifts
    return out
