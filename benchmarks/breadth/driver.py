"""The run: every model (or the quick set, or ``--models``), its recommended (by family, or measured on the
exemplars) or sweep layers, measured; the command line, and where results are written."""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from surgery.adapters import GenericAdapter, get_adapter

import surgery
from surgery._files import write_text

from .branch import branch_markdown, run_branch_comparison
from .concept import IMAGES, Data, make_data
from .measure import batch_logits, measure_layer
from .models import MODELS, QUICK, ModelSpec
from .report import figure, markdown
from .sweep import layer_branch, sweep_layers
from .weights import prepare_model

__all__ = [
    "RESULTS", "prepare_run", "run_model", "model_specs", "study_parser", "study_models", "study_command", "write_study",
    "run", "main",
]

RESULTS = Path(__file__).resolve().parents[1] / "results"


def prepare_run(
    spec: ModelSpec, *, period: int = 2, images: dict[str, int] | None = None
) -> tuple[Data, torch.nn.Module, dict[str, torch.Tensor]]:
    """A model's data, its prepared random-weight model and the unedited logits of every image set (seed 0:
    every study of the breadth package sees the same)."""
    torch.manual_seed(0)
    data = make_data(spec.size, period=period, **(images or {}))
    model = prepare_model(spec.build().eval(), data.calibration)
    base = {k: batch_logits(model, getattr(data, k)) for k in ("x", "x2", "h", "h2", "clean")}
    return data, model, base


def run_model(
    spec: ModelSpec,
    *,
    mode: str,
    k: int,
    period: int = 2,
    images: dict[str, int] | None = None,
    ranks: Sequence[int] = (1,),
    loss_masks: Sequence[bool] = (False,),
) -> dict[str, Any]:
    """One model's rows: each of its recommended (or sweep) layers edited with each rank of ``ranks``, and
    each of ``loss_masks`` (``rewrite(..., use_mask=)``)."""

    t0 = time.perf_counter()
    data, model, base = prepare_run(spec, period=period, images=images)
    adapter = get_adapter(model)
    layers_all = adapter.layers(model)
    out: dict[str, Any] = {
        "model": spec.id,
        "source": spec.source,
        "family": spec.family,
        "adapter": type(adapter).__name__,
        "generic_fallback": isinstance(adapter, GenericAdapter),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "size": spec.size,
        "editable_layers": len(layers_all),
        "block_valued_layers": sum(1 for l in layers_all if l.post is not None),
    }
    if mode == "sweep":
        layers = sweep_layers(model)
    elif mode == "measured":  # ranked on the exemplars (left out in turn) with the edit's own statistics; held-out unseen
        layers = surgery.recommended_layers(
            model, k=k, originals=data.x, transformed=data.x2, masks=data.masks, data=data.calibration
        )
    else:
        layers = surgery.recommended_layers(model, k=k)
    out["rows"] = []
    for layer in layers:
        try:
            stats = surgery.collect_key_stats(model, layer, data.calibration, batch_size=16, progress=False)
            has_prefix = layer.value_layout.kind == "tokens" and (layer.value_layout.prefix or 0) > 0
            # the sweep compares prefix weight 1 with the default ("auto") where there are prefix tokens
            settings = [1.0, "auto"] if (mode == "sweep" and has_prefix) else ["auto"]
            for i, (pw, rank, masked) in enumerate(itertools.product(settings, ranks, loss_masks)):
                row = measure_layer(
                    model, layer, data, base, stats=stats, prefix_weight=pw, scores=(mode == "sweep" and i == 0), rank=rank,
                    use_mask=masked,
                )
                row["branch"] = layer_branch(layer)
                row["depth"] = _relative_depth(layers_all, layer)
                out["rows"].append(row)
                _progress(spec.id, row)
        except Exception as e:  # noqa: BLE001 - report, keep going
            out["rows"].append({"layer": layer.name, "error": f"{type(e).__name__}: {e}"})
            _progress(spec.id, out["rows"][-1])
    out["seconds"] = time.perf_counter() - t0
    return out


def _relative_depth(layers: list, layer) -> float:
    names = [l.name for l in layers]
    return round(names.index(layer.name) / max(len(names) - 1, 1), 3)


def _progress(model_id: str, row: dict) -> None:
    if "error" in row:
        print(f"  {model_id} {row['layer']}: {row['error']}", file=sys.stderr, flush=True)
        return
    print(
        f"  {model_id:34s} {row['layer']:45s} pw={row['prefix_weight']:<5g} value {row['value_ratio']:.3f} "
        f"exemplars {row['exemplar_ratio']:.3f} held-out {row['heldout_ratio']:.3f} clean {row['clean_change']:.3f} "
        f"({row['seconds']:.0f}s)",
        file=sys.stderr,
        flush=True,
    )


def model_specs(ids: Sequence[str]) -> dict[str, ModelSpec]:
    """``{id: spec}`` for ``ids``; an unknown id stops the run with the known ones."""
    specs = {s.id: s for s in MODELS}
    unknown = [i for i in ids if i not in specs]
    if unknown:
        raise SystemExit(f"unknown model ids {unknown}; known: {', '.join(specs)}")
    return {i: specs[i] for i in ids}


def study_parser(module: str, doc: str | None, *, name: str, models: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A study's command line with the options every study takes: ``--models`` (default ``models``; empty: the
    whole zoo), ``--out`` and ``--name`` (the results' folder and stem); the study adds its own."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n")[0])
    p.add_argument("--models", default=",".join(models), help="comma-separated model ids" + ("" if models else " (default: all)"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=name)
    return p


def study_models(models: str) -> list[str]:
    """The model ids of a study's ``--models`` (checked against the zoo), or the whole zoo when empty."""
    return list(model_specs([i for i in models.split(",") if i] or [s.id for s in MODELS]))


def study_command(module: str, argv: Sequence[str] | None) -> str:
    """The command line a study's results record (one thread, as the studies run)."""
    return " ".join(["OMP_NUM_THREADS=1 python -m", module, *(sys.argv[1:] if argv is None else argv)])


def write_study(out: Path, name: str, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """A study's ``<name>.json`` and ``<name>.md`` under ``out``; the report is printed too."""
    write_text(out / f"{name}.json", json.dumps(result, indent=1))
    write_text(out / f"{name}.md", markdown(result))
    print(markdown(result))


def run(
    model_ids: Sequence[str] | None = None,
    *,
    mode: str = "recommended",
    k: int = 3,
    quick: bool = False,
    period: int = 2,
    images: dict[str, int] | None = None,
    ranks: Sequence[int] = (1,),
    loss_masks: Sequence[bool] = (False,),
) -> dict[str, Any]:
    """Run the benchmark on ``model_ids`` (default: all, or the quick set) and return the results.

    ``images`` overrides how many images ``make_data`` draws (``exemplars``, ``held_out``, ``clean``,
    ``calibration``); ``ranks`` and ``loss_masks``: each layer is edited once per rank and loss weighting
    (:mod:`.rank`).
    """
    ids = list(model_ids) if model_ids else list(QUICK if quick else (s.id for s in MODELS))
    specs = model_specs(ids)
    if quick:
        k = 1
    results = []
    for i in ids:
        print(f"[{len(results) + 1}/{len(ids)}] {i}", file=sys.stderr, flush=True)
        try:
            results.append(
                run_model(specs[i], mode=mode, k=k, period=period, images=images, ranks=ranks, loss_masks=loss_masks)
            )
        except Exception as e:  # noqa: BLE001
            results.append({"model": i, "error": f"{type(e).__name__}: {e}"})
            print(f"  {i}: {results[-1]['error']}", file=sys.stderr, flush=True)
    return {
        "mode": mode,
        "k": k,
        "quick": quick,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "texture_period": period,
        "images": {**IMAGES, **(images or {})},
        "models": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.breadth", description=sys.modules[__package__].__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 small models, the first recommended layer")
    ap.add_argument("--sweep", action="store_true", help="candidate layers at several depths, with layer-choice scores")
    ap.add_argument(
        "--measured", action="store_true",
        help="recommended layers measured on the exemplars (recommended_layers with originals and transformed)",
    )
    ap.add_argument("--models", default="", help="comma-separated model ids (default: all)")
    ap.add_argument("-k", type=int, default=3, help="recommended layers per model")
    ap.add_argument("--out", default="", help="output stem (default benchmarks/results/breadth[-sweep|-quick])")
    ap.add_argument(
        "--aperiodic", action="store_true", help="a texture whose phase changes from patch to patch (5/7 px stripes)"
    )
    ap.add_argument("--branch-only", action="store_true", help="compare values after the add with branch-only values")
    args = ap.parse_args(argv)
    if args.branch_only:
        res = run_branch_comparison()
        res["command"] = "python -m benchmarks.breadth --branch-only"
        stem = Path(args.out) if args.out else RESULTS / "breadth-branch"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float) + "\n")
        stem.with_suffix(".md").write_text(branch_markdown(res))
        print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
        return 0
    mode = "sweep" if args.sweep else "measured" if args.measured else "recommended"
    ids = [m for m in args.models.split(",") if m]
    res = run(ids or None, mode=mode, k=args.k, quick=args.quick, period=0 if args.aperiodic else 2)
    res["command"] = "python -m benchmarks.breadth " + " ".join(argv if argv is not None else sys.argv[1:])
    suffix = {"sweep": "-sweep", "measured": "-measured"}.get(mode, "-quick" if args.quick else "")
    stem = Path(args.out) if args.out else RESULTS / ("breadth" + suffix)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    if mode != "sweep":
        figure(res, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, {stem}.md and the figure", file=sys.stderr)
    return 0
