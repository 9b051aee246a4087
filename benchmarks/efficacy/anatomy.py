"""Where a concept's change reaches the edited layer's value, and how much of it one edit removes.

For each testbed classifier and candidate layer, on scenes showing a concept and the same scenes with
the concept restyled: the value difference ``dv = v(restyled) - v(original)`` splits into the part
that arrives through the block's skip (``d skip``, which no edit of this layer's weight can change) and
the part the layer's branch produces. A rank-one edit from N exemplars (the fast solver, L1, no mask) is
then applied at strength 1 and the value difference left on held-out scenes is measured. For the ViT,
the class token and the grid tokens are reported apart (the head reads the class token).

    python -m benchmarks.efficacy.anatomy [--arch vgg resnet vit convnext] [--pairs 3] [--n 10]

Writes ``benchmarks/results/efficacy_anatomy.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from surgery import collect_key_stats, edited, get_layer, rewrite
from surgery._files import write_text
from surgery.testbed import Testbed, TestbedConfig, TestbedData
from surgery.testbed.models import candidate_layers
from surgery.testbed.protocol import select_pairs

from .models import load_model, preprocessor

RESULTS = Path(__file__).resolve().parents[1] / "results"
logger = logging.getLogger("benchmarks.efficacy.anatomy")


def _norms(d: torch.Tensor, prefix: int) -> dict[str, float]:
    """Mean L2 norm per position of ``d``; tokens ``(N, L, C)`` split into prefix and grid."""
    if d.ndim == 3:  # tokens
        out = {"grid": float(d[:, prefix:].norm(dim=-1).mean())}
        if prefix:
            out["class token"] = float(d[:, :prefix].norm(dim=-1).mean())
        return out
    return {"grid": float(d.norm(dim=1).mean())}  # NCHW maps


def measure_layer(model, layer_name: str, stats, x0, x1, n: int, rng: np.random.Generator) -> dict:
    layer = get_layer(model, layer_name)
    prefix = layer.value_layout.prefix or 0
    with torch.no_grad():
        a, b = layer.capture(model, x0), layer.capture(model, x1)
    dv = b.values - a.values
    skip_name = next(iter(b.context), None)
    res: dict = {"layer": layer_name, "block": layer.block, "dv": _norms(dv, prefix)}
    if skip_name is not None:
        dskip = b.context[skip_name] - a.context[skip_name]
        if dskip.shape == dv.shape:
            res["d_skip"] = _norms(dskip, prefix)
            res["skip_share"] = {k: res["d_skip"][k] / max(res["dv"][k], 1e-12) for k in res["dv"]}
    idx = rng.permutation(len(x0))
    ex, held = idx[:n], idx[n:]
    edit = rewrite(model, layer, x0[ex], x1[ex], stats=stats, solver="fast")
    with torch.no_grad(), edited(model, edit):
        c = layer.capture(model, x1[held])
    before = _norms(dv[held], prefix)
    res["left_after_edit"] = {k: v / max(before[k], 1e-12) for k, v in _norms(c.values - a.values[held], prefix).items()}
    return res


def common_args(description: str, pairs: int) -> argparse.ArgumentParser:
    """The options the anatomy and the stream measurement share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--arch", nargs="+", default=["vgg", "resnet", "vit", "convnext"])
    p.add_argument("--pairs", type=int, default=pairs)
    p.add_argument("--n", type=int, default=10, help="exemplars per edit")
    p.add_argument("--scenes", type=int, default=600, help="test scenes to draw pairs' images from")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def scene_sets(scenes: int) -> tuple[Testbed, TestbedData, TestbedData, TestbedData]:
    """One thread, logging, the testbed and its train (statistics), val (pairs) and test scenes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    tb = Testbed(TestbedConfig())
    return tb, tb.make_dataset(2000, "train"), tb.make_dataset(1000, "val"), tb.make_dataset(scenes, "test")


def restyled_pool(tb: Testbed, test: TestbedData, pair: dict, prep) -> tuple[torch.Tensor, torch.Tensor]:
    """The test scenes showing the pair's concept, as model inputs: as they are, and restyled."""
    pool = test.has_concept(pair["concept"]).nonzero().flatten()
    specs = [test.specs[i] for i in pool.tolist()]
    restyled, _ = tb.render_batch(specs, restyle={pair["concept"]: (pair["style"], 0)})
    return prep(test.images[pool]), prep(restyled)


def main(argv: list[str] | None = None) -> dict:
    args = common_args(__doc__.split("\n\n")[0], pairs=3).parse_args(argv)
    tb, train, val, test = scene_sets(args.scenes)
    cli = sys.argv[1:] if argv is None else argv
    out: dict = {"command": " ".join(["OMP_NUM_THREADS=1 python -m benchmarks.efficacy.anatomy", *cli]), "archs": {}}
    for arch in args.arch:
        model, info = load_model(arch)
        prep = preprocessor(info)
        rng = np.random.default_rng(0)
        pairs, _ = select_pairs(model, tb, prep, val, k=args.pairs, rng=rng)
        layers = candidate_layers(arch)
        names = list(dict.fromkeys(layers["deep"] + layers["high_res"]))
        stats = {l: collect_key_stats(model, l, prep(train.images), progress=False) for l in names}
        rows = []
        for pair in pairs:
            x0, x1 = restyled_pool(tb, test, pair, prep)
            for name in names:
                r = measure_layer(model, name, stats[name], x0, x1, args.n, np.random.default_rng(1))
                r["pair"] = f"{pair['concept']}/{pair['style']}"
                rows.append(r)
                logger.info("%s %s %s: %s", arch, r["pair"], name, {k: r[k] for k in ("skip_share", "left_after_edit") if k in r})
        out["archs"][arch] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "efficacy_anatomy.json", json.dumps(out, indent=1))
    write_text(args.out / "efficacy_anatomy.md", markdown(out))
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    lines = [
        "# Where the concept's change reaches the edited value",
        "",
        f"Command: `{out['command']}`. Per layer, mean over pairs: `|d skip| / |dv|` (the share of the",
        "value's change that arrives through the skip, which the layer's edit cannot touch) and the value",
        "change left on held-out scenes after one rank-one edit at strength 1 (1.0 = nothing removed).",
        "",
        "| model | layer | block | positions | skip / dv | left after edit |",
        "|---|---|---|---|---|---|",
    ]
    for arch, rows in out["archs"].items():
        for name in dict.fromkeys(r["layer"] for r in rows):
            rs = [r for r in rows if r["layer"] == name]
            for pos in rs[0]["dv"]:
                skip = [r["skip_share"][pos] for r in rs if "skip_share" in r]
                left = [r["left_after_edit"][pos] for r in rs]
                skip_cell = f"{np.mean(skip):.2f}" if skip else "-"
                lines.append(f"| {arch} | {name} | {rs[0]['block']} | {pos} | {skip_cell} | {np.mean(left):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
