"""Do span edits reach the breadth targets? One edit spread over the last residual blocks before a site,
beside the first recommended single site.

The breadth table edits one layer per model (``recommended_layers`` ranks single layers); issue 26 asks
for "the recommended site or span". Here, for each model, spans of K consecutive residual layers (the
library's span edit, MEMIT's share schedule, ``rewrite(model, [...], stats={...})``) ending at two
anchors fixed before measuring:

- ``family``: the family's first residual candidate (``Adapter.candidates``' first layer valued after a
  residual add), with the K-1 layers of its branch and value shape just before it;
- ``deepest``: the model's deepest layer valued after a residual add, likewise.

Each is measured with the breadth benchmark's data, weights and ratios; the single first recommended
site is the reference row. Models without K such layers of one shape get no span row.

    OMP_NUM_THREADS=1 python -m benchmarks.breadth.span [--models a,b] [--sizes 2 4] [--name breadth-span]

Writes ``benchmarks/results/<name>.{md,json}``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from surgery.adapters import get_adapter, site_branch

import surgery

from .driver import model_specs, prepare_run, study_command, study_models, study_parser, write_study
from .measure import measure_layer

__all__ = ["main", "markdown", "residual_spans", "SIZES"]

SIZES = (2, 4)
ANCHORS = ("family", "deepest")


def residual_spans(model: torch.nn.Module, probe: torch.Tensor, sizes: Sequence[int]) -> dict[str, list]:
    """``{"<anchor> K=<k>": [layers]}``: for each anchor (see the module docstring) and size, the anchor
    and the residual layers of its branch and value shape just before it, in forward order."""
    adapter = get_adapter(model)
    residual = [l for l in adapter.candidates(model) if l.skip and l.valued_after_add]
    if not residual:
        return {}
    order = {l.name: i for i, l in enumerate(adapter.layers(model))}
    forward = sorted(residual, key=lambda l: order[l.name])
    shape = {l.name: tuple(l.capture(model, probe).values.shape[1:]) for l in forward}
    anchors = {"family": residual[0], "deepest": forward[-1]}
    spans: dict[str, list] = {}
    for anchor_name, anchor in anchors.items():
        same = [l for l in forward if site_branch(l) == site_branch(anchor) and shape[l.name] == shape[anchor.name]]
        before = same[: same.index(anchor) + 1]
        for k in sizes:
            if len(before) >= k:
                spans[f"{anchor_name} K={k}"] = before[-k:]
    return spans


def run_model(model_id: str, sizes: Sequence[int], images: dict[str, int] | None = None) -> dict[str, Any]:
    """One model's rows: its first recommended site, then each span of :func:`residual_spans`."""
    t0 = time.perf_counter()
    data, model, base = prepare_run(model_specs([model_id])[model_id], images=images)  # the breadth run's data and weights
    out: dict[str, Any] = {"model": model_id, "rows": []}
    choices: dict[str, Any] = {"site": surgery.recommended_layers(model, k=1)[0]}
    choices.update(residual_spans(model, data.x2[:1], sizes))
    for name, target in choices.items():
        try:
            row = measure_layer(model, target, data, base)
        except Exception as e:  # noqa: BLE001 - report, keep going
            row = {"layer": "+".join(l.name for l in target) if isinstance(target, list) else target.name,
                   "error": f"{type(e).__name__}: {e}"}
        row["choice"] = name
        out["rows"].append(row)
        print(f"  {model_id:32s} {name:12s} " + (row.get("error") or
              f"exemplars {row['exemplar_ratio']:.3f} held-out {row['heldout_ratio']:.3f} clean {row['clean_change']:.3f}"),
              file=sys.stderr, flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def markdown(result: dict[str, Any]) -> str:
    names = ["site"] + [f"{a} K={k}" for a in ANCHORS for k in result["sizes"]]
    lines = [
        "# Breadth: span edits beside the recommended site",
        "",
        f"Command: `{result['command']}`.",
        "",
        "The breadth benchmark's data, weights and ratios (after/before; 1 = no effect); **site**: the first "
        "recommended single layer (breadth.md); **family K** / **deepest K**: a span edit (MEMIT share schedule) of "
        "the K residual layers of one branch and value shape ending at the family's first residual candidate / the "
        "model's deepest residual layer. Each cell: held-out ratio (exemplars ratio; clean change).",
        "",
        "| model | " + " | ".join(names) + " | span ends |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    held: dict[str, list[float]] = {n: [] for n in names + ["best by exemplars"]}
    for m in result["models"]:
        rows = {r["choice"]: r for r in m.get("rows", []) if "error" not in r}
        cells = []
        for n in names:
            r = rows.get(n)
            cells.append("-" if r is None else f"{r['heldout_ratio']:.3f} ({r['exemplar_ratio']:.3f}; {r['clean_change']:.3f})")
            if r is not None:
                held[n].append(r["heldout_ratio"])
        if rows:
            held["best by exemplars"].append(min(rows.values(), key=lambda r: r["exemplar_ratio"])["heldout_ratio"])
        ends = sorted({r["layer"].split("+")[-1] for n, r in rows.items() if n != "site"})
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " | " + ", ".join(f"`{e}`" for e in ends) + " |")
    lines += [
        "",
        "Median held-out ratio over the models with a row: "
        + ", ".join(f"{n} {np.median(v):.3f} ({len(v)})" for n, v in held.items() if v)
        + ". **best by exemplars**: per model, the choice whose exemplars' ratio is lowest (chosen without the "
        "held-out images).",
        "",
        "Paired with the site on the models that have the span (held-out ratio, span minus site; below 0 = the "
        "span moves the held-out logits further): "
        + "; ".join(
            f"{n}: median {np.median(d):+.3f}, lower on {sum(x < 0 for x in d)} of {len(d)}"
            for n, d in _paired(result["models"], names[1:]).items() if d
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def _paired(models: list[dict[str, Any]], names: Sequence[str]) -> dict[str, list[float]]:
    """Per span choice, its held-out ratio minus the site's, on each model that has both rows."""
    diffs: dict[str, list[float]] = {n: [] for n in names}
    for m in models:
        rows = {r["choice"]: r for r in m.get("rows", []) if "error" not in r}
        if "site" in rows:
            for n in names:
                if n in rows:
                    diffs[n].append(rows[n]["heldout_ratio"] - rows["site"]["heldout_ratio"])
    return diffs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = study_parser("benchmarks.breadth.span", __doc__, name="breadth-span")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ids = study_models(args.models)
    models = []
    for i, model_id in enumerate(ids):
        print(f"[{i + 1}/{len(ids)}] {model_id}", file=sys.stderr, flush=True)
        try:
            models.append(run_model(model_id, args.sizes))
        except Exception as e:  # noqa: BLE001
            models.append({"model": model_id, "error": f"{type(e).__name__}: {e}"})
    result = {"command": study_command("benchmarks.breadth.span", argv), "sizes": args.sizes,
              "models": models}
    write_study(args.out, args.name, result, markdown)
    return result


if __name__ == "__main__":
    main()
