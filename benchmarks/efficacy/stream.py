"""What is left of a concept's change along the network after one edit: the README's family figure.

For each testbed classifier, on scenes showing a concept and the same scenes with it restyled (pairs
drawn by the protocol), one rank-one edit is made from N exemplars at each efficacy candidate (single
layers and spans, the fast solver, L1, strength 1). On held-out scenes, at the value of every block of
the network and at the logits, the change ``|v(restyled) - v(original)|`` left with the edit is divided
by the change without it (1.0 = nothing removed; below the edited site it stays 1.0). The figure draws
each network as its blocks in forward order, skip-free sites apart from residual ones, and marks the
edited sites.

    OMP_NUM_THREADS=1 python -m benchmarks.efficacy.stream [--arch vgg resnet vit convnext] [--pairs 2]

Writes ``benchmarks/results/efficacy_stream.{md,json,png}``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from surgery import Edit, collect_key_stats, edited, editable_layers, rewrite
from surgery._files import save_figure, write_text
from surgery.layers import get_layer, site_kind
from surgery.stats.fingerprint import read_sites
from surgery.testbed import Testbed, TestbedData
from surgery.testbed.models import candidate_layers
from surgery.testbed.protocol import select_pairs, span_parts

from .anatomy import common_args, restyled_pool, scene_sets
from .models import load_model, preprocessor

__all__ = ["stream_layers", "change_left", "measure_arch", "main"]

logger = logging.getLogger("benchmarks.efficacy.stream")

# The layers whose values are the network's stream, block by block (each block's last layer, and the
# skip-free stage transitions).
STREAM = {
    "vgg": r"features\.\d+",
    "resnet": r"layer\d\.\d+\.conv2",
    "vit": r"blocks\.\d+\.(attn\.proj|mlp\.fc2)",
    "convnext": r"stages\.\d\.(blocks\.\d+\.mlp\.fc2|downsample\.1)",
}


def stream_layers(model: nn.Module, arch: str) -> list[str]:
    """The layers that stand for the blocks of ``arch``'s testbed model, in forward order (VGG: every
    convolution; ResNet: each block's last convolution; ViT: each attention and MLP output; ConvNeXt:
    each block's MLP output and each stage transition)."""
    return [layer.name for layer in editable_layers(model) if re.fullmatch(STREAM[arch], layer.name)]


def _change(values: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    return [float((v - r).double().norm()) for v, r in zip(values, reference)]


def change_left(model: nn.Module, stream: list[str], edit: Edit, x0: torch.Tensor, x1: torch.Tensor) -> list[float]:
    """Per stream layer, and at the logits last: the restyled scenes' change from the originals with
    ``edit`` applied, over the change without it."""
    sites = [get_layer(model, name).value_site for name in stream]
    with torch.no_grad():
        v0, v1 = read_sites(model, sites, x0, "stream"), read_sites(model, sites, x1, "stream")
        l0, l1 = model(x0), model(x1)
        with edited(model, edit):
            e1, le1 = read_sites(model, sites, x1, "stream"), model(x1)
    before = _change([*v1, l1], [*v0, l0])
    after = _change([*e1, le1], [*v0, l0])
    return [a / max(b, 1e-12) for a, b in zip(after, before)]


def measure_arch(arch: str, pairs: int, n: int, tb: Testbed, train: TestbedData, val: TestbedData, test: TestbedData) -> dict:
    """One row per (pair, candidate): the change left along the stream."""
    model, info = load_model(arch)
    prep = preprocessor(info)
    chosen, _ = select_pairs(model, tb, prep, val, k=pairs, rng=np.random.default_rng(0))
    groups = candidate_layers(arch)
    candidates = list(dict.fromkeys(groups["deep"] + groups["span"]))
    parts = list(dict.fromkeys(p for c in candidates for p in span_parts(c)))
    stats = collect_key_stats(model, parts, prep(train.images), progress=False)
    stream = stream_layers(model, arch)
    rows = []
    for pair in chosen:
        x0, x1 = restyled_pool(tb, test, pair, prep)
        idx = np.random.default_rng(1).permutation(len(x0))
        ex, held = torch.as_tensor(idx[:n]), torch.as_tensor(idx[n:])
        for cand in candidates:
            layers = span_parts(cand)
            edit = rewrite(
                model, layers if len(layers) > 1 else cand, x0[ex], x1[ex],
                stats={p: stats[p] for p in layers} if len(layers) > 1 else stats[cand], solver="fast",
            )
            left = change_left(model, stream, edit, x0[held], x1[held])
            rows.append({"pair": f"{pair['concept']}/{pair['style']}", "candidate": cand, "left": left})
            logger.info("%s %s %s: logits %.3f", arch, rows[-1]["pair"], cand, left[-1])
    kinds = [site_kind(get_layer(model, name)) for name in stream]
    return {"stream": [*stream, "logits"], "kinds": [*kinds, "logits"], "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    args = common_args(__doc__.split("\n\n")[0], pairs=2).parse_args(argv)
    start = time.perf_counter()
    tb, train, val, test = scene_sets(args.scenes)
    cli = sys.argv[1:] if argv is None else argv
    out: dict = {"command": " ".join(["OMP_NUM_THREADS=1 python -m benchmarks.efficacy.stream", *cli]), "archs": {}}
    for arch in args.arch:
        out["archs"][arch] = measure_arch(arch, args.pairs, args.n, tb, train, val, test)
    out["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "efficacy_stream.json", json.dumps(out, indent=1))
    write_text(args.out / "efficacy_stream.md", markdown(out))
    figure(out, args.out / "efficacy_stream.png")
    print(markdown(out))
    return out


def _mean_left(arch_result: dict) -> dict[str, np.ndarray]:
    """Per candidate, the change left at each stream site, mean over pairs."""
    by: dict[str, list[list[float]]] = {}
    for row in arch_result["rows"]:
        by.setdefault(row["candidate"], []).append(row["left"])
    return {cand: np.mean(np.array(v), axis=0) for cand, v in by.items()}


def markdown(out: dict) -> str:
    lines = [
        "# What is left of the concept's change along the network after one edit",
        "",
        f"Command: `{out['command']}` ({out.get('seconds', 0) / 60:.0f} min). Per edit candidate (the efficacy "
        "benchmark's, single layers and spans; N exemplars, fast solver, strength 1), mean over pairs: the "
        "restyled scenes' change from the originals with the edit, over the change without it, at the "
        "network's last stream site before the head and at the logits (1.00 = nothing removed). Every site "
        "is in the JSON and the figure.",
        "",
        "| model | edited | site | last block | logits |",
        "|---|---|---|---|---|",
    ]
    for arch, a in out["archs"].items():
        kinds = dict(zip(a["stream"], a["kinds"]))
        for cand, left in _mean_left(a).items():
            kind = "span" if len(span_parts(cand)) > 1 else kinds.get(cand, "?")
            lines.append(f"| {arch} | `{cand}` | {kind} | {left[-2]:.2f} | {left[-1]:.2f} |")
    return "\n".join(lines) + "\n\n![figure](efficacy_stream.png)\n"


def figure(out: dict, path: Path) -> None:
    """One panel per model: its blocks in forward order along the x axis (skip-free sites drawn as
    squares, residual ones as circles), the change left after each candidate's edit as a line, the edited
    sites marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(out["archs"])
    fig, axes = plt.subplots(len(archs), 1, figsize=(12, 2.8 * len(archs)), squeeze=False)
    for ax, arch in zip(axes[:, 0], archs):
        a = out["archs"][arch]
        xs = np.arange(len(a["stream"]))
        for i, cand in enumerate(_mean_left(a).items()):
            name, left = cand
            colour = plt.get_cmap("tab10")(i % 10)
            ax.plot(xs, left, color=colour, lw=1.2, label=name.replace("+", " + "))
            for part in span_parts(name):
                ax.plot(a["stream"].index(part), left[a["stream"].index(part)], marker="*", ms=11, color=colour)
        for x, kind in zip(xs, a["kinds"]):
            marker = {"skip-free": "s", "residual": "o"}.get(kind, "D")
            ax.plot(x, 1.08, marker=marker, ms=6, color="0.35", clip_on=False)
        ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
        ax.set_xticks(xs, [s.replace("stages.", "s").replace("blocks.", "b").replace(".mlp.fc2", ".fc2") for s in a["stream"]],
                      rotation=60, fontsize=7, ha="right")
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("change left")
        ax.set_title(f"{arch}: blocks in forward order (square: skip-free, circle: residual); star: edited", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
