"""``surgery demo``: the method end to end on the concept testbed, in a few minutes on a CPU.

It follows the efficacy benchmark's rules (:mod:`surgery.testbed.protocol`) on the trained testbed VGG:
the concept-style pair is drawn at random among those that hurt at least 3 classes by 15 points on
validation scenes, the target class among the classes it hurts; 3 exemplars of that class are drawn
3 times; for each draw the edit (one rewrite per deep candidate layer, a grid of strengths) and local
fine-tuning (the benchmark's learning rates) are chosen on validation scenes within a 0.25-point
clean-accuracy budget, and measured on test scenes. The median draw (by the edit's errors corrected
on other classes) is shown, so that the demo reports a typical unit, not a lucky one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from surgery._files import refuse_overwrite, save_figure, write_text
from surgery.errors import SurgeryError
from surgery.evaluation.cached import CachedImages, Candidate
from surgery.evaluation.metrics import errors_corrected
from surgery.evaluation.select import NoCandidateError, select_strength
from surgery.finetune import finetune
from surgery.stats import collect_key_stats

__all__ = ["run_concept_demo"]

logger = logging.getLogger(__name__)

ARCH = "vgg"
N_EXEMPLARS = 3
DRAWS = 3
PAIRS = 8  # the benchmark's full run draws 8 pairs; the demo takes the first
FT_LRS = (1e-2, 1e-3, 1e-4)  # the benchmark's fine-tuning grid: 200 steps at the deepest layer
FT_STEPS = 200
MAX_CLEAN_DROP = 0.25
VAL_FRACTION = 0.3
N_TRAIN, N_VAL, N_TEST = 4000, 2000, 3000  # the benchmark's numbers of scenes
INTRO = (
    "What this does: the testbed VGG misreads scenes once a concept (a floor or backdrop its classes prefer) is restyled.\n"
    "It rewrites one layer from 3 exemplars of one class so the restyled concept looks like the original, and compares "
    "with fine-tuning the same layer on the same exemplars, on test scenes of that class and of the others."
)


def _step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass
class _Draw:
    """One draw of exemplars: their split of the pool, the chosen candidates and their test results."""

    draw: int
    exemplars: np.ndarray
    val: np.ndarray
    test: np.ndarray
    chosen: dict[str, Candidate | None]
    results: dict[str, dict[str, float | None]]
    clean_change: dict[str, float]


def _pct(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> float | None:
    e0, e1 = int((before.argmax(1) != labels)[keep].sum()), int((after.argmax(1) != labels)[keep].sum())
    value = errors_corrected(e0, e1)
    return None if math.isnan(value) else value


def run_concept_demo(*, out_dir: str | Path = "demo-output", seed: int = 0) -> int:
    """Run the demo; writes the chosen edit and a figure to ``out_dir``. Returns the exit status."""
    # the testbed needs the [demo] extras (scipy, scikit-image, mlxtend): imported only here
    from surgery.testbed import CLASS_NAMES, STYLES, Testbed, TestbedConfig
    from surgery.testbed.models import candidate_layers
    from surgery.testbed.protocol import choose_target, edit_candidates, select_pairs
    from surgery.testbed.train import load_trained, normalize, weights_path

    out = Path(out_dir)
    edit_path, figure_path = out / "demo-edit.safetensors", out / "demo.png"
    for path in (edit_path, figure_path, out / "demo.md"):
        refuse_overwrite(path, [weights_path(ARCH)], what="the demo output")
    print(INTRO, flush=True)
    torch.manual_seed(seed)
    try:
        model, _ = load_trained(ARCH, train_if_missing=False)
    except FileNotFoundError as e:
        raise SurgeryError(str(e)) from None
    layers = candidate_layers(ARCH)["deep"]
    names = CLASS_NAMES
    tb = Testbed(TestbedConfig(), seed=seed)

    _step(f"rendering {N_TRAIN} training, {N_VAL} validation and {N_TEST} test scenes")
    train, clean_val, clean_test = (tb.make_dataset(n, split) for n, split in ((N_TRAIN, "train"), (N_VAL, "val"), (N_TEST, "test")))

    _step("screening every concept x style on validation scenes for pairs that hurt >= 3 classes by >= 15 points")
    pairs, screened = select_pairs(model, tb, normalize, clean_val, k=PAIRS, rng=np.random.default_rng(seed))
    pair = pairs[0]
    concept, style = pair["concept"], pair["style"]
    qualifying = sum(r["qualifies"] for r in screened)
    hurt = ", ".join(f"{names[h['class']]} -{h['drop_pp']:.0f}" for h in sorted(pair["hurt"], key=lambda h: -h["drop_pp"]))
    print(f"  {qualifying} of {len(screened)} pairs qualify; drawn: {style} on the {concept} (hurts {hurt})")

    rng = np.random.default_rng([seed, 0])
    variants = list(range(len(STYLES[style])))
    v_ex = int(rng.integers(len(variants)))
    held = [v for v in variants if v != v_ex]
    variant_name = list(STYLES[style])
    pool = clean_test.has_concept(concept).nonzero().flatten()
    y = clean_test.labels[pool]
    target = choose_target(pair, y, N_EXEMPLARS + 2, rng)
    _step(f"test pool: {len(pool)} scenes showing the {concept}; target class {names[target]}; exemplars in "
          f"{style}/{variant_name[v_ex]}, held out: {', '.join(variant_name[v] for v in held)}")
    specs = [clean_test.specs[i] for i in pool.tolist()]
    restyled = {v: tb.render_batch(specs, restyle={concept: (style, v)})[0] for v in variants}
    x0 = CachedImages(model, normalize(clean_test.images[pool]), batch_size=256)
    xv = {v: CachedImages(model, normalize(restyled[v]), batch_size=256) for v in variants}
    clean_val_c = CachedImages(model, normalize(clean_val.images), batch_size=256)
    clean_test_c = CachedImages(model, normalize(clean_test.images), batch_size=256)
    masks = clean_test.mask(concept)[pool].float()[:, None]
    correct0 = x0.logits0.argmax(1) == y

    _step(f"key statistics of {', '.join(layers)} over {N_TRAIN} clean training scenes")
    train_x = normalize(train.images)
    stats = {layer: collect_key_stats(model, layer, train_x, progress=False, cache_dir=out / "cache") for layer in layers}

    draws: list[_Draw] = []
    for d in range(DRAWS):
        r = np.random.default_rng([seed, 0, N_EXEMPLARS, d])
        ex = r.choice((y == target).nonzero().flatten().numpy(), size=N_EXEMPLARS, replace=False)
        perm = r.permutation(np.array([i for i in range(len(y)) if i not in set(ex.tolist())]))
        n_val = round(VAL_FRACTION * len(perm))
        val, test = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        t_ex = torch.as_tensor(ex)
        x, x2, y_ex = x0.images[t_ex], xv[v_ex].images[t_ex], y[t_ex]
        candidates = {
            "edit": edit_candidates(model, layers, stats, x, x2, masks[t_ex]),
            "fine-tune": [Candidate(finetune(model, layers[-1], x2, y_ex, scope="local", lr=lr, steps=FT_STEPS)) for lr in FT_LRS],
        }
        chosen: dict[str, Candidate | None] = {}
        for method, cands in candidates.items():
            try:
                chosen[method] = select_strength(
                    model, cands, xv[v_ex].subset(val), y[torch.as_tensor(val)], clean_images=clean_val_c,
                    clean_labels=clean_val.labels, max_clean_drop=MAX_CLEAN_DROP, val_originals=x0.subset(val),
                ).candidate
            except NoCandidateError:
                chosen[method] = None  # no setting within the budget: no edit, as the paper counts it
        t = torch.as_tensor(test)
        yt, keep0 = y[t], correct0[t]
        results: dict[str, dict[str, float | None]] = {}
        clean_change: dict[str, float] = {}
        for method, cand in chosen.items():
            for group, sel in (("target", yt == target), ("others", yt != target)):
                for label, vs in (("seen", [v_ex]), ("held out", held)):
                    e0 = sum(int((xv[v].subset(test).logits0.argmax(1) != yt)[keep0 & sel].sum()) for v in vs)
                    e1 = sum(int((xv[v].subset(test).logits(cand).argmax(1) != yt)[keep0 & sel].sum()) for v in vs)
                    value = errors_corrected(e0, e1)
                    results.setdefault(method, {})[f"{group}/{label}"] = None if math.isnan(value) else value
            before = (clean_test_c.logits0.argmax(1) == clean_test.labels).double().mean()
            after = (clean_test_c.logits(cand).argmax(1) == clean_test.labels).double().mean()
            clean_change[method] = 100.0 * float(after - before)
        draws.append(_Draw(d, ex, val, test, chosen, results, clean_change))
        edit_c = chosen["edit"]
        where = "no edit within the budget" if edit_c is None else f"{edit_c.edit.layer} at strength {edit_c.alpha:g}"
        _step(f"draw {d + 1}/{DRAWS}: edit {where}; corrects {_fmt(results['edit']['others/seen'])} of other classes' errors")

    order = sorted(draws, key=lambda dr: -math.inf if dr.results["edit"]["others/seen"] is None else dr.results["edit"]["others/seen"])
    median = order[len(order) // 2]
    table = _table(median, draws, names[target], concept, style, variant_name[v_ex])
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "demo.md", table + "\n")
    chosen_edit = median.chosen["edit"]
    if chosen_edit is not None:
        e = chosen_edit.edit
        saved = dataclasses.replace(e, lam=e.lam * chosen_edit.alpha, hparams={**e.hparams, "alpha": chosen_edit.alpha})
        saved.description = f"testbed VGG: {style} on the {concept} seen as the {concept} ({N_EXEMPLARS} exemplars of {names[target]})"
        saved.save(edit_path)
        _step(f"edit saved to {edit_path} ({edit_path.stat().st_size / 1024:.1f} KB, at the chosen strength)")
    path = _figure(figure_path, median, xv[v_ex], x0, y, names, concept, style, restyled[v_ex])
    if path is not None:
        _step(f"figure saved to {path}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.0f}%"


def _table(median: _Draw, draws: list[_Draw], target: str, concept: str, style: str, variant: str) -> str:
    lines = [
        f"% errors corrected on test scenes with the {concept} in {style} (target class: {target}; the median of "
        f"{len(draws)} draws of 3 exemplars, draw {median.draw + 1}), among scenes classified correctly before the restyle:",
        "",
        "| method | variant | target | other classes | clean acc. change (pp) |",
        "|---|---|---|---|---|",
    ]
    for method, res in median.results.items():
        cand = median.chosen[method]
        tag = "" if cand is not None else " (nothing within the budget)"
        for label, name in (("seen", f"{variant} (seen)"), ("held out", "held-out variants")):
            lines.append(
                f"| {method}{tag} | {name} | {_fmt(res[f'target/{label}'])} | {_fmt(res[f'others/{label}'])} | "
                f"{median.clean_change[method]:+.2f} |"
            )
    others = ", ".join(_fmt(d.results["edit"]["others/seen"]) for d in draws)
    lines += ["", f"Edit, other classes, exemplars' variant, in each draw: {others}."]
    return "\n".join(lines)


def _figure(
    path: Path, median: _Draw, seen: CachedImages, x0: CachedImages, y: torch.Tensor, names: tuple[str, ...],
    concept: str, style: str, pixels: torch.Tensor,
) -> Path | None:
    """Test scenes of the median draw: true class, prediction before -> after the edit, and the verdict."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no figure")
        return None
    cand = median.chosen["edit"]
    t = torch.as_tensor(median.test)
    before = seen.subset(t).logits0.argmax(1)
    after = before if cand is None else seen.subset(t).logits(cand).argmax(1)
    truth = y[t]
    ok0 = (x0.subset(t).logits0.argmax(1) == truth)
    rng = np.random.default_rng(1)
    wrong = [i for i in range(len(t)) if ok0[i] and before[i] != truth[i]]
    right = [i for i in range(len(t)) if ok0[i] and before[i] == truth[i]]
    shown = sorted(rng.choice(wrong, size=min(6, len(wrong)), replace=False).tolist()) + sorted(
        rng.choice(right, size=min(6, len(right)), replace=False).tolist()
    )
    cols = 6
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.9 * rows + 0.5), squeeze=False)
    colours = {"fixed": "#1a7f37", "broken": "#cf222e", "unchanged": "#57606a"}
    for ax, i in zip(axes.flat, shown):
        ax.imshow(pixels[int(t[i])].permute(1, 2, 0).numpy())
        b, a, true = int(before[i]), int(after[i]), int(truth[i])
        verdict = "fixed" if b != true and a == true else "broken" if b == true and a != true else "unchanged"
        ax.set_title(f"true: {names[true]}\n{names[b]} -> {names[a]}\n{verdict}", fontsize=7.5, color=colours[verdict])
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(
        f"{style} on the {concept}: test scenes the restyle broke (first row) and left right (second row);\n"
        "prediction before -> after the edit (green: fixed, red: broken, grey: unchanged)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9), h_pad=1.5)
    return save_figure(fig, path, dpi=80)
