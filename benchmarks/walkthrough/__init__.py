"""A walkthrough on real weights, offline: EfficientNet-Lite0 and the bundled photos.

``python -m benchmarks.walkthrough`` (about two and a half minutes on 2 CPU cores) writes
``benchmarks/results/walkthrough.{md,json,png}``:

(a) **Transforming a concept.** Every bundled photo has a hand-made mask of one background concept
    (``masks/*.png``, drawn by :mod:`benchmarks.walkthrough.make_masks`: the table under the
    espresso, the sky behind the rocket, the garage floor, ...). The concept is covered with a
    texture (:func:`surgery.concepts.paste_texture`, scikit-image's ``gravel`` by default) and the
    model's top-3 predictions are compared photo by photo.
(b) **One edit from a single synthetic exemplar.** One photo and its textured copy define a rank-one
    edit of one layer (``surgery.rewrite``: the textured keys are mapped to the original values).
    Key statistics come from the bundled photos, their mirror images and a few random crops. The
    report says, photo by photo, what the edit changed (textured photos whose prediction came back)
    and what it left alone (the clean photos' predictions and probabilities).
(c) **Several exemplars, a photo never seen** (:mod:`benchmarks.walkthrough.held_out`): for each photo
    the texture changes, an edit from the other photos, at the recommended layers, the layer of (b) and
    the layer ``recommended_layers`` measures on the other photos alone.

Everything is in the same 224x224 geometry as the model's preprocessing (resize 256, center crop):
the texture is pasted at the photo's own resolution, then photo, textured photo and mask go through
the same resize and crop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import surgery
from surgery.concepts.paste import paste_texture
from surgery.inputs.masks import load_masks
from surgery.inputs.photos import sample_photos, sample_textures
from surgery.inputs.preprocess import Preprocess, default_input_size
from surgery.models.loading import load_model
from surgery.stats.keystats import ridged

from . import held_out
from .held_out import MEASURED, held_out_edits, held_out_photos, measured_choices, predict
from .make_masks import MASKS, mask_path

__all__ = ["DEFAULTS", "RESULTS_DIR", "main", "run_walkthrough"]

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"

DEFAULTS: dict[str, Any] = {
    "texture": "gravel",
    "scale": 0.5,
    "exemplar": "rocket",
    "layer": "blocks.6.0.conv_pwl",
    "crops_per_photo": 6,
    "shrink": 0.01,
    "seed": 0,
}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0


def _to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _top(probs: torch.Tensor, classes: Sequence[str], k: int = 3) -> list[list[Any]]:
    top = probs.topk(k)
    return [[classes[i], round(float(p), 4)] for p, i in zip(top.values.tolist(), top.indices.tolist())]


def _stats_images(photos: dict[str, Image.Image], transform: Any, crops: int, seed: int) -> torch.Tensor:
    """Clean images for the key statistics: each photo, its mirror image and ``crops`` random crops."""
    import torchvision.transforms as T

    torch.manual_seed(seed)
    crop = T.RandomResizedCrop(224, scale=(0.25, 1.0))
    out = []
    for im in photos.values():
        out += [transform(im), transform(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
        for _ in range(crops):
            c = crop(im)
            out.append(transform(c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else c))
    return torch.stack(out)


def run_walkthrough(
    photos: Sequence[str] | None = None,
    *,
    texture: str = DEFAULTS["texture"],
    scale: float = DEFAULTS["scale"],
    exemplar: str = DEFAULTS["exemplar"],
    layer: str = DEFAULTS["layer"],
    crops_per_photo: int = DEFAULTS["crops_per_photo"],
    shrink: float = DEFAULTS["shrink"],
    alpha: float = 1.0,
    seed: int = DEFAULTS["seed"],
    out_dir: str | Path | None = RESULTS_DIR,
    name: str = "walkthrough",
    figure: bool = True,
    model: torch.nn.Module | None = None,
    threads: int | None = 1,
    held_out_layers: Sequence[str] | None = None,
    measured_pool: int = 12,
) -> dict[str, Any]:
    """Run the walkthrough and return its results (also written to ``out_dir/name.{json,md,png}``).

    Args:
        photos: photo names (default: every bundled photo that has a mask); must include ``exemplar``.
        texture, scale: the texture pasted into the concept masks and its tiling scale.
        exemplar: the photo whose textured copy defines the edit (the single exemplar).
        layer: the edited layer.
        crops_per_photo: random crops per photo for the key statistics (plus the photo and its mirror).
        shrink: ``C + shrink * mean_eigenvalue * I``: a few photos give a rank-deficient second moment.
        alpha: strength the edit is applied with (``surgery.edited(..., alpha=)``).
        out_dir: where to write the reports (``None``: write nothing).
        figure: draw ``name.png``.
        model: the model (default: the pretrained EfficientNet-Lite0).
        held_out_layers: the layers of part (c) (default: the model's three recommended layers and
            ``layer``; empty: no part (c)).
        measured_pool: part (c) also edits, for each held-out photo, the layer ``recommended_layers``
            measures best of the model's first ``measured_pool`` candidates on the other photos (0: not).
        threads: torch threads for the run (restored afterwards; ``None``: leave as is). One thread
            is the default: on a loaded 2-core machine, two threads spin-wait for each other (the
            whole run took 4x longer, and ``torch.linalg.eigvalsh`` of the 1152 x 1152 key moment
            took 30 s instead of 0.3 s).
    """
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(photos, texture, scale, exemplar, layer, crops_per_photo, shrink, alpha, seed, out_dir,
                    name, figure, model, held_out_layers, measured_pool)
    finally:
        torch.set_num_threads(saved)


def _run(
    photos: Sequence[str] | None,
    texture: str,
    scale: float,
    exemplar: str,
    layer: str,
    crops_per_photo: int,
    shrink: float,
    alpha: float,
    seed: int,
    out_dir: str | Path | None,
    name: str,
    figure: bool,
    model: torch.nn.Module | None,
    held_out_layers: Sequence[str] | None,
    measured_pool: int,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    names = list(MASKS) if photos is None else list(photos)
    if exemplar not in names:
        raise surgery.SurgeryError(f"the exemplar {exemplar!r} must be one of the photos {names}")
    unknown = [n for n in names if n not in MASKS]
    if unknown:
        raise surgery.SurgeryError(f"no hand-made mask for {unknown}; photos with masks: {list(MASKS)}")
    if model is None:
        model = load_model("surgery:efficientnet_lite0")
    model.eval()
    classes = model.class_names
    transform = Preprocess.from_model(model).model_input()
    mask_geometry = Preprocess.from_model(model).pixels(default_input_size(model)[1])  # the photos' resize + crop
    images = sample_photos(names)
    tex = sample_textures([texture])[texture]
    times["load"] = time.perf_counter() - t_start

    # (a) transform the concept in every photo
    t = time.perf_counter()
    x, x2, masks, concepts = [], [], [], {}
    for n, im in images.items():
        mask = load_masks(mask_path(n), size=(im.height, im.width))[0, 0] >= 0.5
        textured = paste_texture(_to_tensor(im), mask, tex, scale=scale)
        x.append(transform(im))
        x2.append(transform(_to_pil(textured)))
        masks.append(mask_geometry(Image.fromarray(mask.numpy().astype(np.uint8) * 255))[:1])
        concepts[n] = MASKS[n][0]
    x, x2, masks = torch.stack(x), torch.stack(x2), torch.stack(masks)
    p_clean, p_tex = predict(model, x), predict(model, x2)
    times["transform_and_predict"] = time.perf_counter() - t

    # (b) one edit from the single exemplar
    t = time.perf_counter()
    stats_images = _stats_images(images, transform, crops_per_photo, seed)
    if held_out_layers is None:
        held_out_layers = [one.name for one in surgery.recommended_layers(model, k=3)] + [layer]
    held = held_out_photos(p_clean, p_tex)
    choices = {name: dict.fromkeys(held, name) for name in held_out_layers}
    measured = {}
    if held_out_layers and measured_pool:
        t_measure = time.perf_counter()
        measured = measured_choices(model, x, x2, masks, stats_images, held, pool=measured_pool)
        choices[MEASURED] = {h: name for h, (name, _) in measured.items()}
        times["measured_choice"] = time.perf_counter() - t_measure
    edited_layers = list(dict.fromkeys([layer, *(name for one in choices.values() for name in one.values())]))
    all_stats = surgery.collect_key_stats(model, edited_layers, stats_images, progress=False)  # one pass
    stats = all_stats[layer]
    moments = {name: ridged(one.moment(), shrink) for name, one in all_stats.items()}
    moment, n_keys = moments[layer], stats.n
    times["key_stats"] = time.perf_counter() - t - times.get("measured_choice", 0.0)
    t = time.perf_counter()
    i = names.index(exemplar)
    edit = surgery.rewrite(model, layer, x[i : i + 1], x2[i : i + 1], masks[i : i + 1], stats=moment)
    edit.description = f"{texture} on the {concepts[exemplar]} is seen as the {concepts[exemplar]} ({exemplar}, one exemplar)"
    times["rewrite"] = time.perf_counter() - t
    t = time.perf_counter()
    with surgery.edited(model, edit, alpha=alpha):
        q_clean, q_tex = predict(model, x), predict(model, x2)
    times["predict_edited"] = time.perf_counter() - t

    rows = []
    for r, n in enumerate(names):
        c = int(p_clean[r].argmax())
        rows.append(
            {
                "photo": n,
                "concept": concepts[n],
                "exemplar": n == exemplar,
                "clean_top3": _top(p_clean[r], classes),
                "textured_top3": _top(p_tex[r], classes),
                "textured_edited_top3": _top(q_tex[r], classes),
                "clean_edited_top3": _top(q_clean[r], classes),
                "original_class": classes[c],
                "flipped": int(p_tex[r].argmax()) != c,
                "restored": int(p_tex[r].argmax()) != c and int(q_tex[r].argmax()) == c,
                "broken_by_edit": int(p_tex[r].argmax()) == c and int(q_tex[r].argmax()) != c,
                "p_original_textured": round(float(p_tex[r, c]), 4),
                "p_original_textured_edited": round(float(q_tex[r, c]), 4),
                "clean_top1_unchanged": int(q_clean[r].argmax()) == c,
                "clean_p_change": round(float(q_clean[r, c] - p_clean[r, c]), 5),
                "clean_max_abs_prob_change": round(float((q_clean[r] - p_clean[r]).abs().max()), 5),
            }
        )
    flipped = [r for r in rows if r["flipped"]]
    summary = {
        "photos": len(rows),
        "flipped_by_texture": len(flipped),
        "restored": sum(r["restored"] for r in rows),
        "restored_excluding_exemplar": sum(r["restored"] for r in rows if not r["exemplar"]),
        "flipped_excluding_exemplar": sum(r["flipped"] for r in flipped if not r["exemplar"]),
        "broken_by_edit": sum(r["broken_by_edit"] for r in rows),
        "clean_top1_unchanged": sum(r["clean_top1_unchanged"] for r in rows),
        "clean_max_abs_prob_change": max(r["clean_max_abs_prob_change"] for r in rows),
    }
    t = time.perf_counter()
    held_rows = held_out_edits(model, names, x, x2, masks, choices, moments)
    times["held_out_edits"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start
    result: dict[str, Any] = {
        "model": "surgery:efficientnet_lite0 (pretrained, offline)",
        "settings": {
            "photos": names, "texture": texture, "scale": scale, "exemplar": exemplar, "layer": layer,
            "crops_per_photo": crops_per_photo, "shrink": shrink, "alpha": alpha, "seed": seed, "solver": "fast", "loss": "l1", "use_mask": False,
            "measured_pool": measured_pool,
        },
        "stats": {"images": len(stats_images), "keys": stats.count, "key_dim": n_keys},
        "edit": {
            "objective_before": edit.info.get("objective_before"),
            "objective_after": edit.info.get("objective"),
            "lam_norm": float(edit.lam.norm()) if edit.lam is not None else None,
        },
        "summary": summary,
        "rows": rows,
        "held_out": held_rows,
        "measured_choice": {names[h]: {"layer": name, "score": score} for h, (name, score) in measured.items()},
        "seconds": times,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{name}.md").write_text(_markdown(result, f"{name}.png" if figure else None))
        if figure:
            _figure(result, x, x2, masks, out / f"{name}.png")
    return result


def _fmt_top(top: list[list[Any]], k: int = 3) -> str:
    return ", ".join(f"{c} {p:.2f}" for c, p in top[:k])


def _markdown(res: dict[str, Any], png: str | None) -> str:
    s, sm = res["settings"], res["summary"]
    rows = res["rows"]
    ex = next(r for r in rows if r["exemplar"])
    lines = [
        "# Walkthrough: EfficientNet-Lite0 on real photos, one concept, one edit",
        "",
        f"Model: {res['model']}. Photos: the bundled ones ({', '.join(s['photos'])}). "
        f"Concept: each photo's background region (hand-made masks in `benchmarks/walkthrough/masks/`), "
        f"covered with scikit-image's `{s['texture']}` texture (tiled, scale {s['scale']}). "
        "Reproduce: `python -m benchmarks.walkthrough`.",
        "",
    ]
    if png:
        lines += [f"![walkthrough]({png})", ""]
    lines += [
        "## (a) Transforming the concept, photo by photo",
        "",
        "| photo | concept | top-3, clean | top-3, concept textured | top-1 changed |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['photo']} | {r['concept']} | {_fmt_top(r['clean_top3'])} | {_fmt_top(r['textured_top3'])} | "
            f"{'**yes**' if r['flipped'] else 'no'} |"
        )
    lines += [
        "",
        f"The texture changes the top-1 prediction of {sm['flipped_by_texture']} of {sm['photos']} photos.",
        "",
        "## (b) One edit from a single synthetic exemplar",
        "",
        f"Exemplar: `{s['exemplar']}` and its copy with the {ex['concept']} textured (one pair). Layer "
        f"`{s['layer']}` (the 1x1 projection of the last MBConv block, 1152 -> 320 channels, with no residual add: its output is the value), fast solver, L1 loss, no mask in the loss, applied at strength {s['alpha']}. Key statistics: "
        f"{res['stats']['images']} clean images (the {len(s['photos'])} photos, their mirror images, "
        f"{s['crops_per_photo']} random crops each), {res['stats']['keys']} key vectors of dimension "
        f"{res['stats']['key_dim']}; the second moment is shrunk toward the identity by {s['shrink']} x its "
        f"mean eigenvalue (a few dozen correlated crops of a few photos leave it nearly singular; without shrinkage the "
        f"direction C^-1 k points into unused directions and the edit does nothing). Exemplar objective (L1 between edited textured values and "
        f"original values): {res['edit']['objective_before']:.3f} -> {res['edit']['objective_after']:.3f}.",
        "",
        "| photo | textured: top-1 before edit | textured: top-1 after edit | p(original class), textured: before -> after | restored | clean: top-1 unchanged | clean: p(top-1) change | clean: max abs prob change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = "restored" if r["restored"] else ("not restored" if r["flipped"] else ("**broken**" if r["broken_by_edit"] else "was right"))
        name = f"{r['photo']} (exemplar)" if r["exemplar"] else r["photo"]
        lines.append(
            f"| {name} | {_fmt_top(r['textured_top3'], 1)} | {_fmt_top(r['textured_edited_top3'], 1)} | "
            f"{r['original_class']}: {r['p_original_textured']:.2f} -> {r['p_original_textured_edited']:.2f} | "
            f"{status} | {'yes' if r['clean_top1_unchanged'] else '**no**'} | {r['clean_p_change']:+.4f} | "
            f"{r['clean_max_abs_prob_change']:.4f} |"
        )
    lines += [
        "",
        "What it changed: "
        + (
            f"{sm['restored']} of the {sm['flipped_by_texture']} photos whose prediction the texture changed "
            f"got their original top-1 back ({sm['restored_excluding_exemplar']} of "
            f"{sm['flipped_excluding_exemplar']} besides the exemplar)."
        ),
        f"What it left alone: the clean photos keep their top-1 in {sm['clean_top1_unchanged']} of "
        f"{sm['photos']} cases; the largest change of any clean class probability is "
        f"{sm['clean_max_abs_prob_change']:.4f}. Textured photos the edit broke: {sm['broken_by_edit']}.",
        "",
    ]
    if sm["restored_excluding_exemplar"] < sm["flipped_excluding_exemplar"]:
        lines += [
            "Honest reading: one synthetic exemplar is enough to restore the exemplar itself and to leave "
            "clean predictions essentially untouched, but on this model it does not carry over to every "
            "other photo. The rank-one direction is fitted to the textured keys of one scene (one pair, 49 "
            "positions at 7x7), and the same texture pasted over a different scene produces different keys at "
            "this late layer, where every position already sees most of the image. The paper uses several "
            "exemplars, 50,000 clean images for the second moment, and larger models; crops of a few photos "
            "give only a rough estimate of it.",
            "",
            "Other choices tried while writing this walkthrough (same texture, statistics and layer; not "
            "rerun by the script): exemplar `grace_hopper` at strength 2 restored itself and `flower`; "
            "`astronaut` or `flower` restored only themselves (strength 1); the earlier layer "
            "`blocks.5.3.conv_pwl` (7x7, residual) or `blocks.4.2.conv_pwl` (14x14, residual) restored "
            "nothing at strengths 1-2, as the skip connection still carries the textured features. No "
            "choice restored more than one photo besides the exemplar, and none changed a clean top-1.",
            "",
        ]
    lines += held_out.markdown(res.get("held_out", []), sm["photos"], res.get("measured_choice", {}))
    t = res["seconds"]
    lines += [
        "Timing (this run): " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _figure(res: dict[str, Any], x: torch.Tensor, x2: torch.Tensor, masks: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    n = len(rows)
    fig, axes = plt.subplots(n, 3, figsize=(11, 2.4 * n), gridspec_kw={"width_ratios": [1, 1, 2.4]})
    axes = np.atleast_2d(axes)

    def show(ax: Any, img: torch.Tensor) -> None:
        small = torch.nn.functional.interpolate(img[None], size=(112, 112), mode="bilinear", antialias=True)[0]
        ax.imshow((small * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy())  # as drawn at dpi 55
        ax.set_xticks([])
        ax.set_yticks([])

    for r, row in enumerate(rows):
        show(axes[r, 0], x[r])
        axes[r, 0].set_title(row["photo"] + (" (exemplar)" if row["exemplar"] else ""), fontsize=9)
        show(axes[r, 1], x2[r])
        axes[r, 1].contour(masks[r, 0, ::2, ::2].numpy(), levels=[0.5], colors="magenta", linewidths=0.6)
        axes[r, 1].set_title(f"{row['concept']} textured", fontsize=9)
        ax = axes[r, 2]
        ax.axis("off")
        status = "restored" if row["restored"] else ("not restored" if row["flipped"] else "unchanged by texture")
        colour = "green" if row["restored"] else ("red" if row["flipped"] or row["broken_by_edit"] else "black")
        text = (
            f"clean:              {_fmt_top(row['clean_top3'], 2)}\n"
            f"clean + edit:       {_fmt_top(row['clean_edited_top3'], 2)}\n"
            f"textured:           {_fmt_top(row['textured_top3'], 2)}\n"
            f"textured + edit:    {_fmt_top(row['textured_edited_top3'], 2)}\n"
            f"-> {status}"
        )
        ax.text(0.0, 0.5, text, family="monospace", fontsize=8, va="center", color=colour)
    s = res["settings"]
    fig.suptitle(
        f"EfficientNet-Lite0: {s['texture']} pasted on each photo's background; one edit of {s['layer']} "
        f"from one exemplar ({s['exemplar']})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=55)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.walkthrough", description=__doc__.split("\n")[0])
    p.add_argument("--photos", nargs="+", default=None, help="photo names (default: all with a mask)")
    for key in ("texture", "exemplar", "layer"):
        p.add_argument(f"--{key}", default=DEFAULTS[key])
    p.add_argument("--scale", type=float, default=DEFAULTS["scale"])
    p.add_argument("--crops-per-photo", type=int, default=DEFAULTS["crops_per_photo"])
    p.add_argument("--shrink", type=float, default=DEFAULTS["shrink"])
    p.add_argument("--alpha", type=float, default=1.0, help="edit strength")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--name", default="walkthrough")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: leave torch's default)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    res = run_walkthrough(
        a.photos, texture=a.texture, scale=a.scale, exemplar=a.exemplar, layer=a.layer,
        crops_per_photo=a.crops_per_photo, shrink=a.shrink, alpha=a.alpha, seed=a.seed, out_dir=a.out_dir, name=a.name,
        figure=not a.no_figure, threads=a.threads or None,
    )
    sm = res["summary"]
    print(
        f"texture flipped {sm['flipped_by_texture']}/{sm['photos']}; edit restored {sm['restored']} "
        f"({sm['restored_excluding_exemplar']}/{sm['flipped_excluding_exemplar']} besides the exemplar); "
        f"clean top-1 unchanged {sm['clean_top1_unchanged']}/{sm['photos']}, max |dp| {sm['clean_max_abs_prob_change']:.4f}; "
        f"{res['seconds']['total']:.1f} s -> {Path(a.out_dir) / a.name}.md"
    )
    return 0
