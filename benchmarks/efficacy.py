"""The paper's efficacy benchmark on the concept testbed (Santurkar et al. 2021, Sec. 4.1, Fig. 5, App. A.6).

Protocol (issue 5, point 3), per architecture:

1. **Concept-style pairs, the paper's way.** On clean ``val``-split scenes, every concept is restyled
   with every style (variant 0); a pair qualifies when the transformation lowers the accuracy of at
   least ``--min-hurt`` (3) classes by at least ``--min-drop`` (15) percentage points on their
   scenes that show the concept (classes with at least 5 such scenes). ``--pairs K`` of the
   qualifying pairs are drawn at random (seeded). If fewer qualify, the most harmful remaining pairs
   fill the list and are marked ``"qualifies": false`` in the JSON.
2. **Per pair**: one exemplar variant of the style (random); held-out = the other 3 variants. The
   evaluation pool is every ``test``-split scene that shows the concept. A random target class
   (among classes with enough scenes showing the concept); for each N in {1, 3, 10} and each draw,
   N exemplars of the target class from the pool, and the rest of the pool split 30/70 into
   validation / test at random (per draw). Exemplars are (clean scene, scene with the concept
   restyled, concept mask).
3. **Methods and grids** (each a list of candidate edits): ``edit`` (fast solver, L1, no mask: the
   paper's ``-mask``, the better one; one solve per candidate layer, then a strength grid ``alpha``
   applied at edit time), ``edit +mask``, ``reference`` (the Adam solver with a steps grid, on the
   first ``--reference-pairs`` pairs, N=3, first draw only), ``finetune local`` / ``finetune
   global`` (plain SGD; ``FT_GRID``: the paper's three largest learning rates, 200 steps, deepest
   candidate layer; ``--paper-ft-grid``: the paper's whole grid at every candidate layer). Variants: ``edit multi-class`` (exemplars
   drawn from up to 3 classes showing the concept; "target" = those classes), ``edit high-res``
   (the 10x10 candidate layers), ``edit label-free`` (the ``edit`` candidates, strength chosen
   without validation labels by :func:`surgery.select.select_by_concept_match`: edited activations
   of the unlabelled transformed validation images matched to the concept's mean activation on
   clean training scenes). The variants cost as much as the main methods, so they run on N=3, first
   draw of each pair only (``variant_ns``, ``variant_draws``).
4. **Selection on validation only**: :func:`surgery.select.select_strength` on the validation images
   (exemplar variant, counted on images whose clean original was right, as the paper's code),
   among candidates whose clean-accuracy drop on clean ``val``-split scenes is at most 0.25 pp.
   If none qualifies the method makes no edit (as the paper, App. A.6.3). Test images are never
   seen by the selection (the JSON records the indices; the tests check they are disjoint).
5. **Report** on test: % errors corrected (floored at -100; counted only on images whose clean
   original the unedited model classifies correctly) for target / other classes x same / held-out
   variants, "other" as the paper (all other classes) and split into classes that prefer the
   concept and classes that do not; the clean test accuracy change; the change of the true-class
   logit on other classes' images (the prototype's failure mode: an edit that rewrites the
   object's own evidence). Mean and bootstrap 95% interval over (pair, draw) units.

Key statistics come from clean ``train``-split scenes and are cached (``surgery.collect_key_stats``).

Usage::

    python -m benchmarks.efficacy --arch all              # the full run (hours on 2 cores)
    python -m benchmarks.efficacy --arch vgg --quick      # smoke run: 3 pairs, N=3, 2 draws
    python -m benchmarks.efficacy --tiny --out DIR        # seconds, a tiny classifier trained here
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import surgery
from surgery import collect_key_stats, errors_corrected, finetune, rewrite
from surgery.select import (
    CachedImages,
    Candidate,
    NoCandidateError,
    select_by_concept_match,
    select_strength,
    strength_grid,
)

from surgery.testbed import CLASS_NAMES, CONCEPTS, STYLES, Testbed, TestbedConfig

logger = logging.getLogger("benchmarks.efficacy")

RESULTS = Path(__file__).parent / "results"
GROUPS = (
    "target/same", "target/held-out",
    "other/same", "other/held-out",
    "other-prefer/same", "other-prefer/held-out",
    "other-nonprefer/same", "other-nonprefer/held-out",
)
VARIANTS = ("edit multi-class", "edit high-res", "edit label-free")
PAPER_FT_GRID = ((1e-2, 500), (1e-3, 500), (1e-4, 500), (1e-5, 800), (1e-6, 800))
# The full run's grid: the paper's three largest learning rates, 200 full-batch steps each, at the deepest
# candidate layer. The paper's whole grid at every layer costs ~20x more on 2 CPU cores; its two smallest
# learning rates barely move the weights (at most +-0 errors corrected), so they never change a conclusion.
FT_GRID = ((1e-2, 200), (1e-3, 200), (1e-4, 200))


@dataclass
class Settings:
    """Everything that defines a run (stored in the JSON)."""

    arch: str = "vgg"
    mode: str = "full"
    seed: int = 0
    pairs: int = 8
    ns: tuple[int, ...] = (1, 3, 10)
    draws: int = 5
    alphas: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
    ft_grid: tuple[tuple[float, int], ...] = FT_GRID
    reference_steps: tuple[int, ...] = (1000, 4000)
    reference_pairs: int = 2
    methods: tuple[str, ...] = (
        "edit", "edit +mask", "reference", "finetune local", "finetune global",
        "edit multi-class", "edit high-res", "edit label-free",
    )
    variant_ns: tuple[int, ...] = (3,)  # the variants run on these N ...
    variant_draws: int = 1  # ... and this many draws (they cost as much as the main methods)
    concepts: tuple[str, ...] | None = None  # concepts screened for pairs (None: all)
    styles: tuple[str, ...] | None = None  # styles screened for pairs (None: all)
    ft_last_layer_only: bool = True  # fine-tune only at the deepest candidate layer
    fast_steps: int | None = None  # most Gauss-Newton iterations of the fast solver (None: library default)
    deadline: float | None = None  # time.time() after which no new unit starts (--max-minutes)
    max_clean_drop: float = 0.25
    min_drop: float = 15.0
    min_hurt: int = 3
    n_stats: int = 4000
    n_clean_val: int = 2000
    n_test: int = 3000
    n_concept_ref: int = 400
    val_fraction: float = 0.3
    bootstrap: int = 2000
    size: int = 80


def settings_for(mode: str, arch: str, **over: Any) -> Settings:
    s = Settings(arch=arch, mode=mode)
    if mode == "quick":
        s = Settings(
            arch=arch, mode=mode, pairs=3, ns=(3,), draws=2, alphas=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0),
            ft_grid=((1e-2, 200), (1e-3, 200), (1e-4, 200)), reference_steps=(1000, 4000),
            ft_last_layer_only=True, fast_steps=30,
            reference_pairs=1, n_stats=2000, n_clean_val=1000, n_test=2000, n_concept_ref=200,
        )
    elif mode == "tiny":
        s = Settings(
            arch="tiny", mode=mode, pairs=1, ns=(1,), draws=1, alphas=(0.25, 1.0),
            ft_grid=((1e-2, 5),), reference_steps=(20,), reference_pairs=1,
            methods=("edit", "reference", "finetune local", "finetune global", "edit label-free"),
            max_clean_drop=2.0, min_drop=15.0, min_hurt=3, n_stats=200, n_clean_val=200, n_test=400,
            n_concept_ref=40, bootstrap=200, size=48, fast_steps=5, variant_ns=(1,),
            concepts=("grass", "sand", "brick", "sky"), styles=("snow", "black-and-white"),
        )
    for k, v in over.items():
        if v is not None:
            setattr(s, k, v)
    return s


# --------------------------------------------------------------------------- models
def tiny_classifier(tb: Testbed, seed: int = 0, n: int = 300, epochs: int = 2) -> tuple[nn.Module, dict]:
    """A tiny VGG-BN trained for a few seconds on ``n`` training scenes (for tests and --tiny)."""
    from torchvision.models.vgg import VGG, make_layers

    torch.manual_seed(seed)
    model = VGG(make_layers([8, "M", 16, "M", 16, "M", 32, 32], batch_norm=True), num_classes=20, init_weights=True)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(32, 20)
    data = tb.make_dataset(n, "train")
    x, y = data.float_images(), data.labels
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    layers = {"deep": ["features.15"], "high_res": ["features.12"]}
    return model, {"arch": "tiny", "candidate_layers": layers, "train_scenes": n, "epochs": epochs}


def load_model(arch: str) -> tuple[nn.Module, dict]:
    """The trained testbed classifier (``surgery/testbed/weights``), never retrained here."""
    from surgery.testbed.models import candidate_layers

    try:
        from surgery.testbed.train import load_trained

        model, info = load_trained(arch, train_if_missing=False)
    except (ImportError, FileNotFoundError) as e:
        raise SystemExit(
            f"no trained testbed {arch} classifier ({e}); train it with "
            f"`python -m surgery.testbed.train --arch {arch}`, or run with --tiny"
        ) from None
    info = dict(info or {})
    info.setdefault("candidate_layers", candidate_layers(arch))
    info["normalize"] = "surgery.testbed.train.normalize"
    return model.eval(), info


def preprocessor(info: dict):
    """uint8 images -> model inputs: the trained models' normalization, or [0, 1] floats (tiny model)."""
    if info.get("normalize") == "surgery.testbed.train.normalize":
        from surgery.testbed.train import normalize

        return normalize
    return lambda images: images.float() / 255.0


def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])


# --------------------------------------------------------------------------- pairs
def select_pairs(model, tb: Testbed, prep, clean_val, s: Settings, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Concept-style pairs the paper's way, measured on clean val-split scenes (never on test)."""
    pred0 = logits_of(model, prep(clean_val.images)).argmax(1)
    labels = clean_val.labels
    rows = []
    for concept in s.concepts or CONCEPTS:
        has = clean_val.has_concept(concept)
        idx = has.nonzero().flatten()
        if len(idx) == 0:
            continue
        specs = [clean_val.specs[i] for i in idx.tolist()]
        for style in s.styles or STYLES:
            imgs, _ = tb.render_batch(specs, restyle={concept: (style, 0)})
            pred1 = logits_of(model, prep(imgs)).argmax(1)
            hurt = []
            for c in range(len(CLASS_NAMES)):
                sel = labels[idx] == c
                if int(sel.sum()) < 5:
                    continue
                a0 = 100.0 * (pred0[idx][sel] == c).double().mean().item()
                a1 = 100.0 * (pred1[sel] == c).double().mean().item()
                if a0 - a1 >= s.min_drop:
                    hurt.append({"class": c, "drop_pp": round(a0 - a1, 1)})
            total = 100.0 * ((pred0[idx] == labels[idx]).double().mean() - (pred1 == labels[idx]).double().mean()).item()
            rows.append(
                {"concept": concept, "style": style, "hurt": hurt, "n_hurt": len(hurt), "overall_drop_pp": round(total, 2),
                     "qualifies": len(hurt) >= s.min_hurt, "n_scenes": len(idx)}
            )
    ok = [r for r in rows if r["qualifies"]]
    chosen = [ok[i] for i in sorted(rng.choice(len(ok), size=min(s.pairs, len(ok)), replace=False).tolist())] if ok else []
    if len(chosen) < s.pairs:
        rest = sorted((r for r in rows if not r["qualifies"]), key=lambda r: (-r["n_hurt"], -r["overall_drop_pp"]))
        chosen += rest[: s.pairs - len(chosen)]
    return chosen, rows


# --------------------------------------------------------------------------- candidates
def edit_candidates(model, layers, stats, ex, s: Settings, *, use_mask=False) -> list[Candidate]:
    out = []
    for layer in layers:
        e = rewrite(model, layer, ex["x"], ex["x2"], ex["m"], stats=stats[layer], solver="fast", use_mask=use_mask,
                    steps=s.fast_steps)
        out += strength_grid(e, s.alphas)
    return out


def reference_candidates(model, layers, stats, ex, s: Settings) -> list[Candidate]:
    return [
        Candidate(rewrite(model, layer, ex["x"], ex["x2"], ex["m"], stats=stats[layer], solver="reference", steps=steps))
        for layer in layers[-1:]
        for steps in s.reference_steps
    ]


def finetune_candidates(model, layers, ex, s: Settings, scope: str) -> list[Candidate]:
    return [
        Candidate(finetune(model, layer, ex["x2"], ex["y"], scope=scope, lr=lr, steps=steps))
        for layer in (layers[-1:] if s.ft_last_layer_only else layers)
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
    # the target class: one the transformation hurts (on clean val scenes), with enough pool scenes
    need = max(s.ns) + 2
    counts = torch.bincount(y, minlength=len(CLASS_NAMES))
    enough = [c for c in range(len(CLASS_NAMES)) if counts[c] >= need] or [int(counts.argmax())]
    hurt = [h["class"] for h in pair["hurt"] if h["class"] in enough]
    return PairData(
        concept=concept, style=style, v_ex=v_ex, held=[v for v in variants if v != v_ex], pool=pool, y=y,
        x0=x0, xv=xv, masks=clean_test.mask(concept)[pool].float()[:, None],
        prefer=torch.tensor([tb.prefers(int(c), concept) for c in y]),
        correct0=x0.logits0.argmax(1) == y, target=int(rng.choice(hurt or enough)),
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
        "variant": getattr(STYLES[pd.style][pd.v_ex], "name", str(pd.v_ex)),
        "held_out_variants": [getattr(STYLES[pd.style][v], "name", str(v)) for v in pd.held],
        "target": pd.target, "n": n, "draw": d, "exemplar_idx": ex_idx.tolist(),
        "val_idx": val_idx.tolist(), "test_idx": test_idx.tolist(), "pool_idx": pd.pool.tolist(), "methods": {},
    }
    cache_cands: dict[str, list[Candidate]] = {}
    for method in s.methods:
        t0 = time.perf_counter()
        if method == "reference" and not (ref_ok and n == (3 if 3 in s.ns else s.ns[0]) and d == 0):
            continue
        if method == "edit multi-class" and multi_ex is None:
            continue
        if method in VARIANTS and not (n in s.variant_ns and d < s.variant_draws):
            continue
        mex = exemplars(multi_ex) if method == "edit multi-class" else ex
        lays = layers["high_res"] if method == "edit high-res" else layers["deep"]
        if method == "edit label-free" and "edit" in cache_cands:
            cands = cache_cands["edit"]  # the same candidates; only the selection differs
        elif method in ("edit", "edit high-res", "edit multi-class", "edit label-free"):
            cands = edit_candidates(model, lays, stats, mex, s)
        elif method == "edit +mask":
            cands = edit_candidates(model, lays, stats, mex, s, use_mask=True)
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
                )
            else:
                sel = select_strength(
                    model, cands, val_x, val_y, clean_images=clean_val, clean_labels=clean_val_y,
                    max_clean_drop=s.max_clean_drop, val_originals=val_orig,
                )
            chosen_c: Candidate | None = sel.candidate
            table = [r.to_dict() for r in sel.table]
        except NoCandidateError as e:
            chosen_c, table = None, [r.to_dict() for r in e.table]
        targets = {pd.target} if method != "edit multi-class" else {int(c) for c in pd.y[torch.as_tensor(multi_ex)]}
        res = evaluate_on_test(chosen_c, pd, test_idx, test_sets, targets, clean_test_c, clean_test)
        res["chosen"] = None if chosen_c is None else chosen_c.name
        res["layer"] = None if chosen_c is None else chosen_c.edit.layer
        res["alpha"] = None if chosen_c is None else chosen_c.alpha
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


def evaluate_on_test(cand: Candidate | None, pd: PairData, test_idx, test_sets: dict[int, CachedImages],
                     targets: set[int], clean_test_c: CachedImages, clean_test) -> dict:
    """% errors corrected per group on the TEST indices (``test_sets``: each variant's test scenes),
    clean accuracy change, and logit shifts."""
    t = torch.as_tensor(test_idx)
    y = pd.y
    is_target = torch.tensor([int(c) in targets for c in y])
    out: dict[str, Any] = {"pct": {}, "counts": {}}
    logit0 = {v: test_sets[v].logits0 for v in [pd.v_ex, *pd.held]}
    logit1 = {v: test_sets[v].logits(cand) for v in [pd.v_ex, *pd.held]}
    base_masks = {
        "target": is_target, "other": ~is_target,
        "other-prefer": ~is_target & pd.prefer, "other-nonprefer": ~is_target & ~pd.prefer,
    }
    yt = y[t]
    for g, gm in base_masks.items():
        keep = (gm & pd.correct0)[t]
        for which, vs in (("same", [pd.v_ex]), ("held-out", pd.held)):
            e0 = sum(int((logit0[v].argmax(1) != yt)[keep].sum()) for v in vs)
            e1 = sum(int((logit1[v].argmax(1) != yt)[keep].sum()) for v in vs)
            pct = errors_corrected(e0, e1)
            out["pct"][f"{g}/{which}"] = None if math.isnan(pct) else pct
            out["counts"][f"{g}/{which}"] = [e0, e1]
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


HEADLINE_METHODS = ("edit", "edit +mask", "finetune local", "finetune global")


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
        lines += [f"Clean test accuracy of the unedited model: {a['clean_test_acc']:.1f}%.", ""]
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
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- driver
def dist_rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_units(units: list[dict], ns: tuple[int, ...]) -> list[dict]:
    """Every rank's units, in (pair, N, draw) order as one process makes them (all ranks get all)."""
    import torch.distributed as dist

    rank, world = dist_rank_world()
    if world > 1:
        parts: list[list[dict] | None] = [None] * world
        dist.all_gather_object(parts, units)
        units = [u for part in parts for u in (part or [])]
    return sorted(units, key=lambda u: (u["pair"], ns.index(u["n"]), u["draw"]))


def run_arch(arch: str, s: Settings, cache: Path) -> dict:
    rng = np.random.default_rng(s.seed)
    tb = Testbed(TestbedConfig(size=s.size), seed=s.seed)
    if arch == "tiny":
        model, info = tiny_classifier(tb, s.seed)
    else:
        model, info = load_model(arch)
    prep = preprocessor(info)
    layers = info["candidate_layers"]
    t0 = time.perf_counter()
    train = tb.make_dataset(s.n_stats, "train", cache_dir=cache if arch != "tiny" else None)
    clean_val = tb.make_dataset(s.n_clean_val, "val", cache_dir=cache if arch != "tiny" else None)
    clean_test = tb.make_dataset(s.n_test, "test", cache_dir=cache if arch != "tiny" else None)
    train_x = prep(train.images)
    stats = {
        layer: collect_key_stats(model, layer, train_x, progress=False, cache_dir=None if arch == "tiny" else cache / "stats")
        for layer in dict.fromkeys(layers["deep"] + layers["high_res"])
    }
    logger.info("%s: data and key statistics in %.1fs", arch, time.perf_counter() - t0)
    pairs, all_pairs = select_pairs(model, tb, prep, clean_val, s, rng)
    concept_ref = {}
    for p in pairs:
        has = train.has_concept(p["concept"]).nonzero().flatten()[: s.n_concept_ref]
        concept_ref[p["concept"]] = {"x": train_x[has], "m": train.mask(p["concept"])[has].float()}
    clean_val_c = CachedImages(model, prep(clean_val.images), batch_size=256)
    clean_test_c = CachedImages(model, prep(clean_test.images), batch_size=256)
    rank, world = dist_rank_world()
    units = []
    for i, p in enumerate(pairs):
        if i % world != rank:  # pairs are dealt round-robin to the ranks of a torchrun job
            continue
        if s.deadline is not None and time.time() > s.deadline:
            break
        pd = prepare_pair(model, tb, prep, p, clean_test, s, np.random.default_rng([s.seed, i]))
        for n in s.ns:
            for d in range(s.draws):
                if s.deadline is not None and time.time() > s.deadline:
                    logger.warning("time budget spent: skipping the remaining units of %s/%s", pd.concept, pd.style)
                    break
                units.append(run_unit(
                    model, pd, n, d, stats, layers, clean_val_c, clean_val.labels, clean_test_c, clean_test,
                    concept_ref, s, np.random.default_rng([s.seed, i, n, d]), i < s.reference_pairs, i,
                ))
        del pd
    units = gather_units(units, s.ns)
    clean_acc = 100.0 * (clean_test_c.logits0.argmax(1) == clean_test.labels).double().mean().item()
    return {
        "model_info": {k: v for k, v in info.items() if isinstance(v, (str, int, float, list, dict, bool))},
        "clean_test_acc": clean_acc,
        "candidate_layers": layers,
        "pairs": pairs,
        "pair_screen": all_pairs,
        "units": units,
        "truncated_by_time_budget": s.deadline is not None and time.time() > s.deadline,
        "summary": summarize(units, s),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vgg", choices=["vgg", "resnet", "all"])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 pairs, N=3, 2 draws, small grids")
    mode.add_argument("--tiny", action="store_true", help="a tiny classifier trained here; seconds (tests)")
    p.add_argument("--pairs", type=int)
    p.add_argument("--draws", type=int)
    p.add_argument("--ns", type=int, nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-clean-drop", type=float)
    p.add_argument("--paper-ft-grid", action="store_true", help="the paper's whole fine-tuning grid at every layer (slow)")
    p.add_argument("--max-minutes", type=float, help="start no new (pair, N, draw) unit after this long")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    p.add_argument("--name", default=None, help="file stem (default efficacy[_quick|_tiny])")
    p.add_argument("--render", type=Path, metavar="JSON", help="only re-render an earlier run's markdown and figure")
    args = p.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        write_report(result, args.render.parent, args.render.stem)
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("surgery.apply").setLevel(logging.WARNING)
    mode_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    archs = ["tiny"] if args.tiny else (["vgg", "resnet"] if args.arch == "all" else [args.arch])
    s = settings_for(mode_name, archs[0], pairs=args.pairs, draws=args.draws,
                     ns=tuple(args.ns) if args.ns else None, seed=args.seed, max_clean_drop=args.max_clean_drop)
    if args.paper_ft_grid:
        s.ft_grid, s.ft_last_layer_only = PAPER_FT_GRID, False
    if args.max_minutes is not None:
        s.deadline = time.time() + 60 * args.max_minutes
    rank, world = init_distributed()
    cache = RESULTS / "efficacy_cache"
    stem = args.name or ("efficacy" if mode_name == "full" else f"efficacy_{mode_name}")
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
    result = {
        "mode": mode_name,
        "command": f"{launcher} -m benchmarks.efficacy " + " ".join(sys.argv[1:] if argv is None else argv),
        "processes": world,
        "settings": {k: v for k, v in asdict(s).items() if k not in ("arch", "deadline")},
        "surgery_version": surgery.__version__,
        "restricted_to_correct_originals": True,
        "archs": {},
    }
    for arch in archs:
        s.arch = arch
        result["archs"][arch] = run_arch(arch, s, cache)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
        write_report(result, args.out, stem)
    return result


def write_report(result: dict, out: Path, stem: str) -> None:
    """``<stem>.md`` and ``<stem>.png`` next to the JSON, and the markdown on stdout."""
    (out / f"{stem}.md").write_text(markdown(result) + f"\n![figure]({stem}.png)\n")
    figure(result, out / f"{stem}.png")
    print(markdown(result))


def init_distributed() -> tuple[int, int]:
    """Join the torchrun job described by the environment (gloo), if any: ``(rank, world size)``."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist_rank_world()


if __name__ == "__main__":
    main()
