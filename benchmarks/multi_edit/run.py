"""The measurement: draws of 8 pairs per testbed model, their solo edits, and k of them together."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from surgery import collect_key_stats, edited, select_strength, strength_grid
from surgery._files import write_text
from surgery.batch import Rule, rewrite_rules
from surgery.edits.interference import key_overlap
from surgery.errors import InterferenceWarning, SurgeryWarning
from surgery.evaluation import CachedImages, Candidate, NoCandidateError
from surgery.solvers import solver_config
from surgery.testbed import Testbed, TestbedConfig, TestbedData
from surgery.testbed.protocol import edit_candidates, select_pairs

from benchmarks.efficacy.models import load_model, preprocessor
from benchmarks.efficacy.settings import Settings, settings_for
from benchmarks.efficacy.units import PairData, draw_unit, errors_by_group, prepare_pair

from .report import write_report

__all__ = [
    "main", "measure_arch", "Bench", "load_bench", "run_archs", "join_runs", "merge_runs", "write_json", "write_result", "make_rule",
    "accuracy", "carrying", "rule_scores", "choose", "solo_edit", "KS", "METHODS",
]

logger = logging.getLogger("benchmarks.multi_edit")

RESULTS = Path(__file__).resolve().parents[1] / "results"
KS = (1, 2, 4, 8)
METHODS = ("stacked", "sequential", "batch")
GROUPS = ("other/same", "target/same")


@dataclass
class RuleData:
    """One pair's rule: its scenes, exemplars, validation and test split, and unedited test logits."""

    pd: PairData
    ex: dict[str, torch.Tensor]
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_orig: torch.Tensor
    test_idx: np.ndarray
    logit0: dict[int, torch.Tensor]


def _logits(model: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """% of ``images`` the model (as it is now) classifies as ``labels``."""
    return float((_logits(model, images).argmax(1) == labels).double().mean()) * 100


@contextlib.contextmanager
def carrying(model: nn.Module, candidates: Sequence[Candidate | None]) -> Iterator[None]:
    """The model with every candidate's edit applied at its strength (``None``: no edit), quietly: the
    overlaps are measured here, not warned about."""
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore", InterferenceWarning)
        warnings.simplefilter("ignore", SurgeryWarning)
        for c in candidates:
            if c is not None:
                stack.enter_context(edited(model, c.edit, alpha=c.alpha))
        yield


def rule_scores(model: nn.Module, rule: RuleData) -> dict[str, float | None]:
    """% errors corrected on the rule's test scenes by the model as it is now (with whatever it carries)."""
    t = torch.as_tensor(rule.test_idx)
    logit1 = {v: _logits(model, rule.pd.xv[v].images[t]) for v in rule.logit0}
    pct = errors_by_group(rule.pd, rule.test_idx, rule.logit0, logit1, {rule.pd.target})["pct"]
    return {g: pct[g] for g in GROUPS}


def choose(model, candidates: list[Candidate], val_x, val_y, val_orig, clean_x, clean_y, s: Settings) -> Candidate | None:
    """The efficacy benchmark's choice on validation within the clean budget (``None``: nothing qualified)."""
    try:
        return select_strength(
            model, candidates, val_x, val_y, clean_images=clean_x, clean_labels=clean_y,
            max_clean_drop=s.max_clean_drop, val_originals=val_orig, check_every_candidate=False,
        ).candidate
    except NoCandidateError:
        return None


def solo_edit(model, rule: RuleData, stats, layers: list[str], clean_x, clean_y, s: Settings) -> Candidate | None:
    cands = edit_candidates(model, layers, stats, rule.ex["x"], rule.ex["x2"], rule.ex["m"], alphas=s.alphas, steps=s.fast_steps)
    return choose(model, cands, rule.val_x, rule.val_y, rule.val_orig, clean_x, clean_y, s)


def batch_edit(model, rules: list[RuleData], solos: list[Candidate | None], stats, clean_x, clean_y, s: Settings) -> Candidate | None:
    """One batch rewrite of ``rules`` at the layer most of their solo edits chose."""
    chosen = [c.edit.layer for c in solos if c is not None]
    if not chosen:
        return None
    layer = Counter(chosen).most_common(1)[0][0]
    edit = rewrite_rules(
        model, layer, [Rule(r.ex["x"], r.ex["x2"], r.ex["m"]) for r in rules], stats=stats[layer],
        solver=solver_config("fast", max_iter=s.fast_steps),
    )
    val_x, val_y, val_orig = (torch.cat([getattr(r, key) for r in rules]) for key in ("val_x", "val_y", "val_orig"))
    return choose(model, strength_grid(edit, s.alphas), val_x, val_y, val_orig, clean_x, clean_y, s)


def make_rule(model, tb, prep, pair: dict, clean_test, s: Settings, stream: Sequence[int], n: int = 3) -> RuleData:
    """The rule of ``pair``: its scenes (drawn from the rng ``stream``), N = ``n`` exemplars, validation and
    test split (from ``[*stream, n]``)."""
    pd = prepare_pair(model, tb, prep, pair, clean_test, s, np.random.default_rng(list(stream)))
    split = draw_unit(pd, n, s, np.random.default_rng([*stream, n]))
    t = torch.as_tensor(split["ex_idx"])
    ex = {"x": pd.x0.images[t], "x2": pd.xv[pd.v_ex].images[t], "m": pd.masks[t]}
    v = torch.as_tensor(split["val_idx"])
    tt = torch.as_tensor(split["test_idx"])
    return RuleData(
        pd=pd, ex=ex, val_x=pd.xv[pd.v_ex].images[v], val_y=pd.y[v], val_orig=pd.x0.images[v],
        test_idx=split["test_idx"], logit0={w: pd.xv[w].logits0[tt] for w in [pd.v_ex, *pd.held]},
    )


def _overlaps(cands: Sequence[Candidate | None]) -> list[float]:
    edits = [c.edit for c in cands if c is not None]
    return [v for i, a in enumerate(edits) for b in edits[i + 1 :] for v in key_overlap(a, b).values()]


def measure_draw(b: Bench, pairs: list[dict], s: Settings, draw: int) -> dict:
    """One draw: the solo edits of its pairs, then stacked, sequential and batch for each k."""
    model, stats, layers = b.model, b.stats, b.layers
    rules = [make_rule(model, b.tb, b.prep, p, b.clean_test, s, [s.seed, draw, i]) for i, p in enumerate(pairs)]
    clean_val_x, clean_val_y, clean_val_c = b.clean_val_x, b.clean_val.labels, b.clean_val_cached
    solos = [solo_edit(model, r, stats, layers, clean_val_c, clean_val_y, s) for r in rules]
    solo_scores = []
    for c, r in zip(solos, rules):
        with carrying(model, [c]):
            solo_scores.append(rule_scores(model, r))
    logger.info("draw %d: solo edits %s", draw, [None if c is None else c.name for c in solos])

    sequential: list[Candidate | None] = []
    for i, r in enumerate(rules):  # edit i made on the model carrying edits 0 .. i-1
        if i == 0:
            sequential.append(solos[0])
            continue
        with carrying(model, sequential):
            seq_stats = collect_key_stats(model, layers, b.train_x, progress=False)
            sequential.append(solo_edit(model, r, seq_stats, layers, clean_val_x, clean_val_y, s))
    out: dict[str, Any] = {
        "pairs": [f"{p['concept']}->{p['style']}" for p in pairs],
        "solo": [{"edit": None if c is None else c.name, "layer": None if c is None else c.edit.layer,
                  "alpha": None if c is None else c.alpha, **sc} for c, sc in zip(solos, solo_scores)],
        "k": {},
    }
    for k in [k for k in KS if k <= len(rules)]:
        sets: dict[str, list[Candidate | None]] = {"stacked": solos[:k], "sequential": sequential[:k]}
        if k >= 2:
            sets["batch"] = [batch_edit(model, rules[:k], solos[:k], stats, clean_val_c, clean_val_y, s)]
        row: dict[str, Any] = {}
        for method, cands in sets.items():
            scores = []
            with carrying(model, cands):
                scores = [rule_scores(model, r) for r in rules[:k]]
            row[method] = {
                "scores": scores, "clean_change_pp": b.clean_change(cands), "edits": [None if c is None else c.name for c in cands],
                "overlaps": _overlaps(cands),
            }
        out["k"][str(k)] = row
        logger.info("draw %d k=%d: %s", draw, k, {m: round(v["clean_change_pp"], 2) for m, v in row.items()})
    return out


@dataclass
class Bench:
    """A trained testbed model with what every measurement of it here needs: the testbed, the train images
    preprocessed, the key statistics of ``layers``, the clean validation images (preprocessed, and cached for
    the unedited model) and the clean test images (preprocessed) with the unedited model's accuracy on them."""

    model: nn.Module
    prep: Callable[[torch.Tensor], torch.Tensor]
    tb: Testbed
    train_x: torch.Tensor
    layers: list[str]
    stats: dict
    clean_val: TestbedData
    clean_val_x: torch.Tensor
    clean_val_cached: CachedImages
    clean_test: TestbedData
    clean_test_x: torch.Tensor
    clean_test_acc: float

    def clean_change(self, candidates: Sequence[Candidate | None]) -> float:
        """Clean test accuracy change (pp) of the model carrying ``candidates``."""
        with carrying(self.model, candidates):
            return accuracy(self.model, self.clean_test_x, self.clean_test.labels) - self.clean_test_acc


def load_bench(arch: str, s: Settings, layers: Callable[[dict], list[str]] = lambda info: info["candidate_layers"]["deep"]) -> Bench:
    """``arch``'s trained model and data; ``layers(info)`` picks the layers whose statistics are collected."""
    model, info = load_model(arch)
    prep = preprocessor(info)
    tb = Testbed(TestbedConfig())
    cache = RESULTS / "efficacy_cache"
    train_x = prep(tb.make_dataset(s.n_stats, "train", cache_dir=cache).images)
    names = layers(info)
    clean_val = tb.make_dataset(s.n_clean_val, "val", cache_dir=cache)
    clean_val_x = prep(clean_val.images)
    clean_test = tb.make_dataset(s.n_test, "test", cache_dir=cache)
    clean_test_x = prep(clean_test.images)
    return Bench(
        model=model, prep=prep, tb=tb, train_x=train_x, layers=names,
        stats=collect_key_stats(model, names, train_x, progress=False, cache_dir=cache / "stats"),
        clean_val=clean_val, clean_val_x=clean_val_x, clean_val_cached=CachedImages(model, clean_val_x, batch_size=256),
        clean_test=clean_test, clean_test_x=clean_test_x, clean_test_acc=accuracy(model, clean_test_x, clean_test.labels),
    )


def measure_arch(arch: str, draws: int, s: Settings, deadline: float | None) -> dict:
    b = load_bench(arch, s)
    result: dict[str, Any] = {"draws": [], "candidate_layers": b.layers}
    for d in range(draws):
        if deadline is not None and time.time() > deadline:
            logger.warning("%s: time budget spent after %d draws", arch, d)
            break
        pairs, _ = select_pairs(b.model, b.tb, b.prep, b.clean_val, k=max(KS), rng=np.random.default_rng([s.seed, 100 + d]))
        result["draws"].append(measure_draw(b, pairs, s, d))
    return result


def run_archs(module: str, archs: Sequence[str], measure: Callable[[str], dict], argv: list[str] | None) -> dict:
    """``{"command", "archs": {arch: measure(arch) + its seconds}}``, one thread, progress logged."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("surgery").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    cli = sys.argv[1:] if argv is None else argv
    result: dict[str, Any] = {"command": " ".join(["OMP_NUM_THREADS=1 python -m", module, *([shlex.join(cli)] if cli else [])]), "archs": {}}
    for arch in archs:
        start = time.perf_counter()
        result["archs"][arch] = measure(arch)
        result["archs"][arch]["seconds"] = round(time.perf_counter() - start, 1)
    return result


def join_runs(runs: Sequence[dict]) -> dict:
    """Results of earlier runs (one or more models each) as one; their commands joined with `` ; ``."""
    return {"command": " ; ".join(r["command"] for r in runs), "archs": {a: v for r in runs for a, v in r["archs"].items()}}


def merge_runs(paths: Sequence[Path]) -> dict:
    """Earlier runs' JSON files joined into one result (:func:`join_runs`)."""
    return join_runs([json.loads(path.read_text()) for path in paths])


def write_json(result: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{name}.json", json.dumps(result, indent=1, default=float))


def write_result(result: dict, out: Path, name: str, markdown: Callable[[dict], str]) -> None:
    """The result as ``name.json`` and its report ``markdown(result)`` as ``name.md`` (also printed)."""
    write_json(result, out, name)
    text = markdown(result)
    write_text(out / f"{name}.md", text)
    print(text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multi_edit", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["vgg", "resnet", "vit", "convnext"])
    p.add_argument("--draws", type=int, default=3, help="draws of 8 pairs per model")
    p.add_argument("--quick", action="store_true", help="the efficacy benchmark's quick settings (smaller grids and sets)")
    p.add_argument("--max-minutes", type=float, help="start no new draw after this long")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="multi_edit")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="only join earlier runs (one per model) into --name")
    args = p.parse_args(argv)
    if args.merge:
        result = merge_runs(args.merge)
    else:
        deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes

        def measure(arch: str) -> dict:
            s = settings_for("quick" if args.quick else "full", arch)
            settings = {"n": 3, "alphas": list(s.alphas), "max_clean_drop": s.max_clean_drop}
            return {**measure_arch(arch, args.draws, s, deadline), "settings": settings}

        result = run_archs("benchmarks.multi_edit", args.arch, measure, argv)
    write_json(result, args.out, args.name)
    write_report(result, args.out, args.name)
    return result
