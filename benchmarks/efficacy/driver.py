"""Running the efficacy benchmark: one architecture's data, statistics, pairs and units (split over
torchrun processes), and the command line (see the package docstring for the protocol)."""


from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch.distributed as dist

import surgery
from surgery import collect_key_stats
from surgery._files import refuse_overwrite, write_text
from surgery.evaluation import CachedImages
from surgery.stats.distributed import process_group
from surgery.testbed import Testbed, TestbedConfig
from surgery.testbed.models import ARCHS
from surgery.testbed.train import weights_path
from surgery.testbed.protocol import select_pairs, span_parts

from .models import load_model, preprocessor, tiny_classifier
from .report import pooled_markdown, summarize, write_report
from .settings import METHODS, PAPER_FT_GRID, Settings, settings_for
from .units import prepare_pair, run_unit

__all__ = ["main", "run_arch", "RESULTS"]

logger = logging.getLogger("benchmarks.efficacy")

RESULTS = Path(__file__).resolve().parents[1] / "results"


def dist_rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` outside a torchrun job)."""
    return process_group() or (0, 1)


def gather_units(units: list[dict], ns: tuple[int, ...]) -> list[dict]:
    """Every rank's units, in (pair, N, draw) order as one process makes them (all ranks get all)."""
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
    stats = collect_key_stats(  # every candidate's statistics, in one pass over the images
        model, list(dict.fromkeys(part for group in layers.values() for entry in group for part in span_parts(entry))),
        train_x, progress=False, cache_dir=None if arch == "tiny" else cache / "stats",
    )
    logger.info("%s: data and key statistics in %.1fs", arch, time.perf_counter() - t0)
    pairs, all_pairs = select_pairs(
        model, tb, prep, clean_val, k=s.pairs, rng=rng, min_drop=s.min_drop, min_hurt=s.min_hurt,
        concepts=s.concepts, styles=s.styles,
    )
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
    p.add_argument(
        "--arch", nargs="+", default=["vgg"], choices=[*ARCHS, "all"],
        help=f"testbed classifiers to measure ({', '.join(ARCHS)}; all: every one with trained weights)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 pairs, N=3, 2 draws, small grids")
    mode.add_argument("--tiny", action="store_true", help="a tiny classifier trained here; seconds (tests)")
    p.add_argument("--pairs", type=int)
    p.add_argument("--draws", type=int)
    p.add_argument("--ns", type=int, nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-clean-drop", type=float)
    p.add_argument("--alphas", type=float, nargs="+", help="the edits' strength grid (default: the protocol's, 1/16 .. 1)")
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, metavar="METHOD",
        help="measure only these methods (default: the main methods and variants; choices: " + ", ".join(METHODS) + ")",
    )
    p.add_argument("--paper-ft-grid", action="store_true", help="the paper's whole fine-tuning grid at every layer (slow)")
    p.add_argument("--max-minutes", type=float, help="start no new (pair, N, draw) unit after this long")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    p.add_argument("--name", default=None, help="file stem (default efficacy[_quick|_tiny])")
    p.add_argument("--render", type=Path, metavar="JSON", help="only re-render an earlier run's markdown and figure")
    p.add_argument(
        "--include", type=Path, metavar="JSON",
        help="carry the models of an earlier run with the same settings into this run's result "
        "(e.g. vgg and resnet, when this run measures vit and convnext); its file is not overwritten",
    )
    p.add_argument(
        "--merge", type=Path, nargs="+", metavar="JSON",
        help="only merge earlier runs with the same settings (e.g. one per model, run side by side) into "
        "one result (--out, --name) and render it; the inputs are not overwritten",
    )
    p.add_argument(
        "--pool", type=Path, nargs="+", metavar="JSON",
        help="only report the leads of earlier runs that differ only in --seed (and --methods), pooled over "
        "all their units, as one markdown file (--out, --name); the inputs are not overwritten",
    )
    args = p.parse_args(argv)
    if args.pool is not None:
        command = "python -m benchmarks.efficacy " + shlex.join(sys.argv[1:] if argv is None else argv)
        return pool_results(args.pool, args.out, args.name or "efficacy_pooled", command)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        write_report(result, args.render.parent, args.render.stem)
        return result
    if args.merge is not None:
        result = merge_results([json.loads(path.read_text()) for path in args.merge], args.merge)
        stem = args.name or ("efficacy" if result["mode"] == "full" else f"efficacy_{result['mode']}")
        refuse_overwrite(args.out / f"{stem}.json", args.merge, what="the merged result")
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / f"{stem}.json", json.dumps(result, indent=1, default=float))
        write_report(result, args.out, stem)
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("surgery.edits.apply").setLevel(logging.WARNING)
    mode_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.tiny:
        archs = ["tiny"]
    elif "all" in args.arch:  # every testbed classifier whose trained weights are committed
        archs = [a for a in ARCHS if weights_path(a).is_file()]
        untrained = [a for a in ARCHS if a not in archs]
        if untrained:
            logger.warning("no trained weights for %s: train with python -m surgery.testbed.train --arch NAME", ", ".join(untrained))
    else:
        archs = list(dict.fromkeys(args.arch))
    def settings(arch: str) -> Settings:
        """``arch``'s settings in this mode, with the command line's overrides."""
        s = settings_for(mode_name, arch, pairs=args.pairs, draws=args.draws,
                         ns=tuple(args.ns) if args.ns else None, seed=args.seed, max_clean_drop=args.max_clean_drop,
                         methods=tuple(args.methods) if args.methods else None,
                         alphas=tuple(sorted(args.alphas)) if args.alphas else None)
        if args.paper_ft_grid:
            s.ft_grid, s.ft_last_layer_only = PAPER_FT_GRID, False
        return s

    s = settings(archs[0])
    deadline = None
    if args.max_minutes is not None:
        s.deadline = deadline = time.time() + 60 * args.max_minutes
    rank, world = init_distributed()
    cache = RESULTS / "efficacy_cache"
    stem = args.name or ("efficacy" if mode_name == "full" else f"efficacy_{mode_name}")
    earlier = None
    if args.include is not None:
        refuse_overwrite(args.out / f"{stem}.json", [args.include], what="the result")
        earlier = json.loads(args.include.read_text())
        mine = {"settings": json.loads(json.dumps(_stored_settings(s)))}  # as the JSON would hold them
        if earlier.get("mode") != mode_name or _comparable_settings(mine) != _comparable_settings(earlier):
            raise SystemExit(f"{args.include} was run with other settings or another mode; rerun its models here")
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
    result = {
        "mode": mode_name,
        "command": f"{launcher} -m benchmarks.efficacy " + shlex.join(sys.argv[1:] if argv is None else argv),
        "processes": world,
        "settings": _stored_settings(s),
        "surgery_version": surgery.__version__,
        "restricted_to_correct_originals": True,
        "archs": {},
    }
    if earlier is not None:
        result["command"] = earlier["command"] + " ; " + result["command"]
        result["archs"] = {a: r for a, r in earlier["archs"].items() if a not in archs}
    for arch in archs:
        s = settings(arch)
        s.deadline = deadline  # one time budget for the whole run
        result["archs"][arch] = run_arch(arch, s, cache)
        result["archs"][arch]["methods"] = list(s.methods)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / f"{stem}.json", json.dumps(result, indent=1, default=float))
        write_report(result, args.out, stem)
    return result


def _stored_settings(s) -> dict:
    """A run's settings as its JSON stores them (the model and the time budget are not settings)."""
    return {k: v for k, v in asdict(s).items() if k not in ("arch", "deadline")}


def _comparable_settings(result: dict) -> dict:
    """Settings two runs must share to be reported together (methods differ per model)."""
    return {k: v for k, v in result["settings"].items() if k != "methods"}


def pool_results(paths: list[Path], out: Path, stem: str, command: str) -> dict:
    """Write the leads of the runs at ``paths``, pooled over their units (:func:`report.pooled_markdown`),
    to ``out/stem.md``; runs must share every setting but the seed and the methods."""
    results = [json.loads(path.read_text()) for path in paths]
    for path, r in zip(paths, results):
        if r.get("mode") != results[0].get("mode") or _seedless(r) != _seedless(results[0]):
            raise SystemExit(f"{path} was run with other settings than {paths[0]} (not only another seed); rerun it")
    refuse_overwrite(out / f"{stem}.md", paths, what="the pooled report")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{stem}.md", pooled_markdown(results, [p.stem for p in paths], command))
    return {"runs": [str(p) for p in paths], "archs": sorted({a for r in results for a in r["archs"]})}


def _seedless(result: dict) -> dict:
    """Settings runs must share to be pooled: all but the seed and the methods."""
    return {k: v for k, v in _comparable_settings(result).items() if k != "seed"}


def merge_results(results: list[dict], names: list[Path] | None = None) -> dict:
    """One result holding the models of several runs made with the same mode and settings.

    A model present in several runs must be identical in each (e.g. the VGG and ResNet that two runs
    both carried with ``--include``); commands are joined with `` ; ``.
    """
    names = names or [Path(f"run {i}") for i in range(len(results))]
    first = results[0]
    commands = dict.fromkeys(part for r in results for part in r["command"].split(" ; "))  # shared --include runs once
    merged = {**first, "archs": {}, "command": " ; ".join(commands)}
    merged["processes"] = max(r["processes"] for r in results)
    for name, r in zip(names, results):
        if r.get("mode") != first.get("mode") or _comparable_settings(r) != _comparable_settings(first):
            raise SystemExit(f"{name} was run with other settings or another mode than {names[0]}; rerun it")
        for arch, res in r["archs"].items():
            if arch in merged["archs"] and merged["archs"][arch] != res:
                raise SystemExit(f"{name} and an earlier input hold different results for {arch}; keep one")
            merged["archs"].setdefault(arch, res)
    return merged


def init_distributed() -> tuple[int, int]:
    """Join the torchrun job described by the environment (gloo), if any: ``(rank, world size)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist_rank_world()
