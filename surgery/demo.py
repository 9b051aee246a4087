"""``surgery demo``: the method end to end, in a few minutes on a laptop CPU.

The default demo uses the concept testbed (``surgery/testbed`` in a clone of the repository): a
small VGG trained on scenes where classes prefer certain floors and backdrops. It picks the
concept-style pair (e.g. graffiti on the curtain) that hurts the most classes, edits one layer from 3
exemplars of one class, and compares with fine-tuning the same layer on the same exemplars: errors
corrected on that class and on the others, on the exemplars' style variant and on held-out ones, and
the clean-accuracy cost. Strengths and learning rates are chosen on validation scenes. ``surgery demo --photos`` instead runs
the real ImageNet EfficientNet-Lite0 on real photos and lists its editable layers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ._files import save_figure
from .errors import SurgeryError

__all__ = ["classify_photos", "run_photo_demo", "run_concept_demo", "run_demo"]

logger = logging.getLogger(__name__)

LAYER = "features.22"
N_EXEMPLARS = 3


def classify_photos(model, photos, *, top_k: int = 3) -> dict[str, list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) for each photo, with the model's own preprocessing."""
    from .models import preprocess

    transform = preprocess(model)
    names = list(photos)
    batch = torch.stack([transform(photos[n]) for n in names])
    device = next(model.parameters()).device
    with torch.no_grad():
        probs = model(batch.to(device)).softmax(dim=-1).cpu()
    top = probs.topk(top_k, dim=-1)
    classes = model.class_names
    return {
        n: [(classes[i], p) for p, i in zip(top.values[r].tolist(), top.indices[r].tolist())]
        for r, n in enumerate(names)
    }


def run_photo_demo(*, top_k: int = 3) -> int:
    """Print EfficientNet-Lite0's predictions on the bundled photos, then its editable layers."""
    from .cli import format_layer_table
    from .layers import describe_layers
    from .models import default_input_size, efficientnet_lite0
    from .photos import sample_photos

    model = efficientnet_lite0()
    photos = sample_photos()
    print("EfficientNet-Lite0, real ImageNet weights, on real photos:\n")
    for name, preds in classify_photos(model, photos, top_k=top_k).items():
        shown = ", ".join(f"{c} {p:.2f}" for c, p in preds)
        print(f"  {name:<18} {shown}")
    infos = describe_layers(model, default_input_size(model))
    blocks = [i for i in infos if i.layer.post is not None]
    print(f"\n{len(infos)} editable layers; {len(blocks)} of them are valued after their BN, before the residual add:\n")
    print(format_layer_table(blocks))
    print("\nAll layers: surgery layers surgery:efficientnet_lite0")
    return 0


def _step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _pick_pair(model, testbed, seed: int, n: int = 800) -> tuple[str, str]:
    """The (concept, style) whose first variant hurts the most classes by >= 15 points (then the most)."""
    scenes = testbed.make_dataset(n, "val", seed=seed)
    predict = testbed.train.predict
    clean = predict(model, scenes.images) == scenes.labels
    best = None
    for concept in testbed.CONCEPTS:
        has = scenes.has_concept(concept)
        for style, variants in testbed.STYLES.items():
            restyled = testbed.make_dataset(n, "val", seed=seed, restyle={concept: (style, list(variants)[0])})
            hit = predict(model, restyled.images) == scenes.labels
            drops = []
            for c in scenes.labels[has].unique():
                sel = has & (scenes.labels == c)
                if sel.sum() >= 5:
                    drops.append(100 * (clean[sel].float().mean() - hit[sel].float().mean()).item())
            key = (sum(d >= 15 for d in drops), sum(drops))
            if best is None or key > best[0]:
                best = (key, concept, style)
    assert best is not None
    return best[1], best[2]


def run_concept_demo(*, out_dir: str | Path = "demo-output", seed: int = 0) -> int:
    """Edit the testbed VGG so that snow-covered grass is seen as grass; compare with fine-tuning."""
    from . import collect_key_stats, evaluate_edit, finetune, rewrite
    from .select import Candidate, NoCandidateError, select_strength, strength_grid

    from . import testbed
    from .testbed import train as train_mod

    norm = train_mod.normalize
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _step("loading the testbed VGG (trained once, then reloaded)")
    model, info = train_mod.load_trained("vgg", progress=print)
    names = testbed.CLASS_NAMES

    _step("finding a concept-style pair that hurts several classes (the paper's criterion)")
    concept, style = _pick_pair(model, testbed, seed)
    variants = list(testbed.STYLES[style])
    seen, held_out = variants[0], variants[1:]

    _step(f"rendering test scenes, and the same scenes with their {concept} covered in {style}")
    test = testbed.make_dataset(3000, "test", seed=seed)
    snowy = testbed.make_dataset(3000, "test", seed=seed, restyle={concept: (style, seen)})
    other_snow = [testbed.make_dataset(3000, "test", seed=seed, restyle={concept: (style, v)}) for v in held_out]
    has = test.has_concept(concept)
    idx = has.nonzero().flatten()
    clean_pred, snow_pred = train_mod.predict(model, test.images), train_mod.predict(model, snowy.images)
    labels = test.labels
    hurt = []
    for c in range(len(names)):
        sel = idx[labels[idx] == c]
        if len(sel) >= 10:
            drop = 100 * ((clean_pred[sel] == c).float().mean() - (snow_pred[sel] == c).float().mean()).item()
            hurt.append((drop, c, len(sel)))
    hurt.sort(reverse=True)
    print(f"\nAccuracy drop on test scenes with {concept} when it is covered in {style} ({seen}):")
    for drop, c, n in hurt[:6]:
        print(f"  {names[c]:<12} -{drop:5.1f} points  ({n} scenes)")
    target = hurt[0][1]

    _step(f"exemplars: {N_EXEMPLARS} training scenes of {names[target]} with {concept}")
    pool = testbed.make_dataset(3000, "train", seed=seed + 1)
    ex = ((pool.labels == target) & pool.has_concept(concept)).nonzero().flatten()[:N_EXEMPLARS]
    if len(ex) < N_EXEMPLARS:
        raise SurgeryError(f"only {len(ex)} training scenes of {names[target]} show {concept}")
    pool_snow = testbed.make_dataset(3000, "train", seed=seed + 1, restyle={concept: (style, seen)})
    x, x2 = norm(pool.images[ex]), norm(pool_snow.images[ex])
    masks = pool.mask(concept)[ex].unsqueeze(1).float()

    _step(f"key statistics of {LAYER} over clean training scenes")
    clean_train = testbed.make_dataset(1500, "train", seed=seed + 2)
    stats = collect_key_stats(model, LAYER, norm(clean_train.images), batch_size=250, cache_dir=out / "cache")

    # validation (30%) / test (70%) split of the transformed scenes with the concept
    perm = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    n_val = int(0.3 * len(perm))
    val, tst = perm[:n_val], perm[n_val:]
    clean_val = torch.arange(0, len(test), 2)  # clean-accuracy budget on every other scene
    clean_tst = torch.arange(1, len(test), 2)

    def select(candidates):
        candidates = list(candidates)
        try:
            return select_strength(
                model, candidates, norm(snowy.images[val]), labels[val],
                clean_images=norm(test.images[clean_val]), clean_labels=labels[clean_val], max_clean_drop=0.25,
            ).candidate
        except NoCandidateError as e:  # report the gentlest one rather than nothing
            best = min(e.table, key=lambda r: r.clean_drop)
            print(f"  no candidate stays within 0.25 points of clean accuracy; using the gentlest "
                  f"({best.clean_drop:.2f} points drop)")
            chosen = candidates[best.index]
            return chosen if isinstance(chosen, Candidate) else Candidate(chosen, 1.0)

    _step("rewriting the layer (fast solver) and choosing its strength on validation scenes")
    edit = rewrite(model, LAYER, x, x2, masks, stats=stats)
    edit.description = f"testbed VGG: {style} on {concept} is seen as {concept} ({N_EXEMPLARS} exemplars of {names[target]})"
    chosen_edit = select(strength_grid(edit, n=8, lo=1 / 16, hi=2.0))

    _step("fine-tuning the same layer on the same exemplars (local, 400 steps), choosing the learning rate")
    tuned = [finetune(model, LAYER, x2, target, scope="local", steps=400, lr=lr) for lr in (1e-5, 1e-4, 1e-3)]
    chosen_ft = select(tuned)

    rows = []
    groups = {"target": labels[tst] == target, "others": labels[tst] != target}
    for method, cand in (("edit", chosen_edit), ("fine-tune", chosen_ft)):
        for style_name, data in ((f"{seen} (seen)", snowy), *((f"{v} (held out)", d) for v, d in zip(held_out, other_snow))):
            report = evaluate_edit(
                model, cand.edit, norm(data.images[tst]), labels[tst], groups=groups,
                originals=norm(test.images[tst]), clean_images=norm(test.images[clean_tst]),
                clean_labels=labels[clean_tst], alpha=cand.alpha,
            )
            rows.append((method, style_name, report))

    print(f"\n% errors corrected on test scenes with {concept} in {style}, among scenes classified correctly "
          f"before the transformation (target class: {names[target]}):\n")
    print(f"| method    | {style + ' variant':<19} | target | other classes | clean acc. change |")
    print("|-----------|---------------------|--------|---------------|-------------------|")
    for method, style_name, r in rows:
        t, o = r.group("target").pct_corrected, r.group("others").pct_corrected
        print(f"| {method:<9} | {style_name:<19} | {t:6.1f} | {o:13.1f} | {r.clean_acc_change:+17.2f} |")

    path = out / f"{concept}-{style}.safetensors"
    # the file holds the edit at the strength chosen on validation, ready for apply_edit
    saved = dataclasses.replace(
        edit, lam=edit.lam * chosen_edit.alpha, hparams={**edit.hparams, "alpha": chosen_edit.alpha}
    )
    saved.save(path)
    _step(f"edit saved to {path} ({path.stat().st_size / 1024:.1f} KB; chosen strength alpha={chosen_edit.alpha:.3g})")
    figure = _figure(out, model, norm, pool, pool_snow, ex, snowy, test, tst, chosen_edit, names, target, concept, style)
    if figure:
        _step(f"figure saved to {figure}")
    return 0


def _figure(out, model, norm, pool, pool_snow, ex, snowy, test, tst, cand, names, target, concept, style) -> Path | None:
    """Exemplars (original, transformed, mask) and test scenes with predictions before/after the edit."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no figure")
        return None
    from .apply import edited

    show = tst[:6]
    with torch.no_grad():
        before = model(norm(snowy.images[show])).argmax(1)
        with edited(model, cand.edit, alpha=cand.alpha):
            after = model(norm(snowy.images[show])).argmax(1)
    fig, axes = plt.subplots(2, 6, figsize=(12, 4.6))
    for j, i in enumerate(ex[:3]):
        axes[0, 2 * j].imshow(pool.images[i].permute(1, 2, 0))
        axes[0, 2 * j].set_title(f"exemplar {j + 1}", fontsize=9)
        axes[0, 2 * j + 1].imshow(pool_snow.images[i].permute(1, 2, 0))
        axes[0, 2 * j + 1].set_title(f"{style} on {concept}", fontsize=9)
    for j, i in enumerate(show):
        ax = axes[1, j]
        ax.imshow(snowy.images[i].permute(1, 2, 0))
        truth = int(test.labels[i])
        color = "green" if int(after[j]) == truth else "red"
        ax.set_title(f"{names[int(before[j])]} -> {names[int(after[j])]}", fontsize=8, color=color)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"Top: {names[target]} exemplars. Bottom: test scenes, prediction before -> after the edit", fontsize=10)
    fig.tight_layout()
    path = out / "demo.png"
    save_figure(fig, path, dpi=90)
    return path


def run_demo(*, top_k: int = 3, photos: bool = False, out_dir: str | Path = "demo-output") -> int:
    """The ``surgery demo`` command."""
    return run_photo_demo(top_k=top_k) if photos else run_concept_demo(out_dir=out_dir)
