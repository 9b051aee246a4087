"""``surgery demo``: the method as benchmarked, end to end on the concept testbed, in minutes on a CPU.

It follows the efficacy benchmark's rules (:mod:`surgery.testbed.protocol`) on the trained testbed VGG:
``pairs`` concept-style pairs are drawn at random among those that hurt at least 3 classes by 15
points on validation scenes (drawn, not picked for how they look); for each, a target class among the
classes it hurts, the exemplars' style variant, and ``draws`` draws of 3 exemplars of that class. For
each draw the edit (one rewrite per deep candidate layer, a grid of strengths) and local fine-tuning
(the benchmark's learning rates) are chosen on validation scenes within a 0.25-point clean-accuracy
budget, and measured on test scenes. The result is the mean over every pair and draw, with each
pair's row beside it; the figure shows test scenes of the first pair drawn. The benchmark's full run
(8 pairs x 5 draws x N = 1, 3, 10, with intervals) is ``python -m benchmarks.efficacy``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery._files import refuse_overwrite, save_figure, write_text
from surgery.errors import SurgeryError
from surgery.evaluation.cached import CachedImages, Candidate
from surgery.evaluation.metrics import errors_corrected
from surgery.evaluation.select import NoCandidateError, select_strength
from surgery.finetune import finetune
from surgery.stats import collect_key_stats

__all__ = ["run_concept_demo", "summary_table"]

logger = logging.getLogger(__name__)

ARCH = "vgg"
N_EXEMPLARS = 3
PAIRS = 4  # concept-style pairs drawn by the protocol; the printed result is the mean over them
DRAWS = 1  # draws of exemplars per pair (the benchmark draws 5)
FT_LRS = (1e-2, 1e-3, 1e-4)  # the benchmark's fine-tuning grid: 200 steps at the deepest layer
FT_STEPS = 200
MAX_CLEAN_DROP = 0.25
VAL_FRACTION = 0.3
SCENES = (4000, 2000, 3000)  # the benchmark's numbers of training (statistics), validation, test scenes
METHODS = ("edit", "fine-tune")
COLUMNS = (
    ("target/seen", "target class, seen variant"),
    ("others/seen", "other classes, seen variant"),
    ("others/held out", "other classes, held-out variants"),
)
INTRO = (
    "What this does: the testbed VGG misreads scenes once a concept (a floor or backdrop its classes prefer) is restyled.\n"
    "For each of {pairs} concept-style pairs drawn at random, it rewrites one layer from 3 exemplars of one class so the "
    "restyled concept looks like the original, and compares with fine-tuning the same layer on the same exemplars, on "
    "test scenes of that class and of the others."
)


def _step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass
class Unit:
    """One pair and one draw of its exemplars: the chosen candidates and their results on test scenes.

    Attributes:
        pair: the pair's number, in the order the protocol drew them (1-based).
        draw: the draw's number within the pair (1-based).
        label: e.g. ``"snow on the grass (coat)"``: the style, the concept and the target class.
        results: ``{method: {column: % errors corrected, or None when there was no error to correct}}``.
        clean_change: ``{method: change of clean test accuracy in points}``.
        chosen: ``{method: the candidate chosen on validation, None when none was within the budget}``.
    """

    pair: int
    draw: int
    label: str
    results: dict[str, dict[str, float | None]]
    clean_change: dict[str, float]
    chosen: dict[str, Candidate | None] = dataclasses.field(default_factory=dict, repr=False)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _fmt(value: float | None, unit: str = "%") -> str:
    return "n/a" if value is None else f"{value:+.0f}{unit}"


def _lead(u: Unit) -> float | None:
    e, f = u.results["edit"]["others/seen"], u.results["fine-tune"]["others/seen"]
    return None if e is None or f is None else e - f


def summary_table(units: list[Unit]) -> str:
    """The demo's result: one row per unit and method, then the mean over the units, then the edit's lead."""
    n_pairs, n_draws = len({u.pair for u in units}), max(u.draw for u in units)
    per = "one draw per pair" if n_draws == 1 else f"{n_draws} draws per pair"
    lines = [
        f"% errors corrected on test scenes showing the restyled concept, among scenes classified correctly before "
        f"the restyle ({N_EXEMPLARS} exemplars of the target class, {per}; strengths and learning rates chosen on "
        f"validation scenes within a {MAX_CLEAN_DROP}-point clean-accuracy budget):",
        "",
        "| pair (target class) | method | " + " | ".join(title for _, title in COLUMNS) + " | clean acc. change (pp) |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for u in units:
        name = f"{u.pair}. {u.label}" + (f", draw {u.draw}" if n_draws > 1 else "")
        for m, method in enumerate(METHODS):
            tag = "" if u.chosen.get(method, True) is not None else " (none within budget)"
            cells = " | ".join(_fmt(u.results[method][key]) for key, _ in COLUMNS)
            lines.append(f"| {name if m == 0 else ''} | {method}{tag} | {cells} | {u.clean_change[method]:+.2f} |")
    mean_name = f"**mean of {n_pairs} pairs**" if n_draws == 1 else f"**mean of {len(units)} units ({n_pairs} pairs)**"
    for m, method in enumerate(METHODS):
        cells = " | ".join(f"**{_fmt(_mean([u.results[method][key] for u in units]))}**" for key, _ in COLUMNS)
        clean = _mean([u.clean_change[method] for u in units])
        lines.append(f"| {mean_name if m == 0 else ''} | {method} | {cells} | {clean:+.2f} |")
    leads = [_lead(u) for u in units]
    lines += [
        "",
        f"Edit's lead over fine-tuning on other classes' errors (seen variant): {_fmt(_mean(leads), ' points')}, "
        f"the mean of {len(units)} ({', '.join(_fmt(v, '') for v in leads)}).",
        "The efficacy benchmark on this model (8 pairs x 5 draws, N = 1, 3, 10, with 95% intervals): "
        "benchmarks/results/efficacy.md in the repository.",
    ]
    return "\n".join(lines)


@dataclasses.dataclass
class _Shared:
    """What every pair uses: the model, its candidate layers and their statistics, the clean scenes."""

    model: torch.nn.Module
    tb: Any
    normalize: Any
    layers: list[str]
    stats: dict[str, Any]
    clean_val: Any
    clean_val_c: CachedImages
    clean_test: Any
    clean_test_c: CachedImages
    ft_steps: int


@dataclasses.dataclass
class _Shown:
    """What the figure needs of one unit."""

    unit: Unit
    test: np.ndarray
    seen: CachedImages
    x0: CachedImages
    y: torch.Tensor
    pixels: torch.Tensor


def _run_pair(s: _Shared, number: int, pair: dict[str, Any], draws: int, seed: int) -> tuple[list[Unit], _Shown]:
    """Every draw of one pair; returns the units and what the figure needs of the first draw."""
    from surgery.testbed import CLASS_NAMES, STYLES
    from surgery.testbed.protocol import choose_target, edit_candidates

    concept, style = pair["concept"], pair["style"]
    rng = np.random.default_rng([seed, number])
    variants = list(range(len(STYLES[style])))
    v_ex = int(rng.integers(len(variants)))
    held = [v for v in variants if v != v_ex]
    variant_name = list(STYLES[style])
    pool = s.clean_test.has_concept(concept).nonzero().flatten()
    y = s.clean_test.labels[pool]
    target = choose_target(pair, y, N_EXEMPLARS + 2, rng)
    label = f"{style} on the {concept} ({CLASS_NAMES[target]})"
    _step(f"pair {number}: {len(pool)} test scenes show the {concept}; target class {CLASS_NAMES[target]}; exemplars "
          f"in {style}/{variant_name[v_ex]}, held out: {', '.join(variant_name[v] for v in held)}")
    specs = [s.clean_test.specs[i] for i in pool.tolist()]
    restyled = {v: s.tb.render_batch(specs, restyle={concept: (style, v)})[0] for v in variants}
    x0 = CachedImages(s.model, s.normalize(s.clean_test.images[pool]), batch_size=256)
    xv = {v: CachedImages(s.model, s.normalize(restyled[v]), batch_size=256) for v in variants}
    masks = s.clean_test.mask(concept)[pool].float()[:, None]
    correct0 = x0.logits0.argmax(1) == y
    acc0 = (s.clean_test_c.logits0.argmax(1) == s.clean_test.labels).double().mean()

    units: list[Unit] = []
    shown: _Shown | None = None
    for d in range(draws):
        r = np.random.default_rng([seed, number, N_EXEMPLARS, d])
        ex = r.choice((y == target).nonzero().flatten().numpy(), size=N_EXEMPLARS, replace=False)
        perm = r.permutation(np.array([i for i in range(len(y)) if i not in set(ex.tolist())]))
        n_val = round(VAL_FRACTION * len(perm))
        val, test = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        t_ex = torch.as_tensor(ex)
        x, x2, y_ex = x0.images[t_ex], xv[v_ex].images[t_ex], y[t_ex]
        candidates = {
            "edit": edit_candidates(s.model, s.layers, s.stats, x, x2, masks[t_ex]),
            "fine-tune": [
                Candidate(finetune(s.model, s.layers[-1], x2, y_ex, scope="local", lr=lr, steps=s.ft_steps)) for lr in FT_LRS
            ],
        }
        chosen: dict[str, Candidate | None] = {}
        for method, cands in candidates.items():
            try:
                chosen[method] = select_strength(
                    s.model, cands, xv[v_ex].subset(val), y[torch.as_tensor(val)], clean_images=s.clean_val_c,
                    clean_labels=s.clean_val.labels, max_clean_drop=MAX_CLEAN_DROP, val_originals=x0.subset(val),
                ).candidate
            except NoCandidateError:
                chosen[method] = None  # no setting within the budget: no edit, as the paper counts it
        t = torch.as_tensor(test)
        yt, keep0 = y[t], correct0[t]
        results: dict[str, dict[str, float | None]] = {}
        clean_change: dict[str, float] = {}
        for method, cand in chosen.items():
            for key, group, vs in (("target/seen", yt == target, [v_ex]), ("others/seen", yt != target, [v_ex]),
                                   ("others/held out", yt != target, held)):
                e0 = sum(int((xv[v].subset(test).logits0.argmax(1) != yt)[keep0 & group].sum()) for v in vs)
                e1 = sum(int((xv[v].subset(test).logits(cand).argmax(1) != yt)[keep0 & group].sum()) for v in vs)
                value = errors_corrected(e0, e1)
                results.setdefault(method, {})[key] = None if math.isnan(value) else value
            after = (s.clean_test_c.logits(cand).argmax(1) == s.clean_test.labels).double().mean()
            clean_change[method] = 100.0 * float(after - acc0)
        unit = Unit(number, d + 1, label, results, clean_change, chosen)
        units.append(unit)
        if shown is None:
            shown = _Shown(unit, test, xv[v_ex], x0, y, restyled[v_ex])
        edit_c = chosen["edit"]
        where = "no edit within the budget" if edit_c is None else f"{edit_c.edit.layer} at strength {edit_c.alpha:g}"
        _step(f"pair {number}, draw {d + 1}: edit {where}; it corrects {_fmt(results['edit']['others/seen'])} of other "
              f"classes' errors, fine-tuning {_fmt(results['fine-tune']['others/seen'])}")
    assert shown is not None
    return units, shown


def run_concept_demo(
    *,
    out_dir: str | Path = "demo-output",
    seed: int = 0,
    pairs: int = PAIRS,
    draws: int = DRAWS,
    scenes: tuple[int, int, int] = SCENES,
    ft_steps: int = FT_STEPS,
) -> int:
    """Run the demo; writes ``demo.md``, the first pair's chosen edit and a figure to ``out_dir``.

    Args:
        out_dir: where the outputs go.
        seed: draws the pairs, targets, variants and exemplars.
        pairs: concept-style pairs to draw (at least 1); the result is the mean over them.
        draws: draws of exemplars per pair.
        scenes: training (key statistics), validation and test scenes rendered.
        ft_steps: fine-tuning steps of each learning rate.

    Returns:
        The exit status (0).
    """
    # the testbed needs the [demo] extras (scipy, scikit-image, mlxtend): imported only here
    from surgery.testbed import CLASS_NAMES, Testbed, TestbedConfig
    from surgery.testbed.models import candidate_layers
    from surgery.testbed.protocol import select_pairs
    from surgery.testbed.train import load_trained, normalize, weights_path

    if pairs < 1 or draws < 1:
        raise SurgeryError(f"the demo needs at least one pair and one draw; got pairs={pairs}, draws={draws}")
    out = Path(out_dir)
    edit_path, figure_path = out / "demo-edit.safetensors", out / "demo.png"
    for path in (edit_path, figure_path, out / "demo.md"):
        refuse_overwrite(path, [weights_path(ARCH)], what="the demo output")
    print(INTRO.format(pairs=pairs), flush=True)
    torch.manual_seed(seed)
    try:
        model, _ = load_trained(ARCH, train_if_missing=False)
    except FileNotFoundError as e:
        raise SurgeryError(str(e)) from None
    layers = candidate_layers(ARCH)["deep"]
    tb = Testbed(TestbedConfig(), seed=seed)
    n_train, n_val, n_test = scenes
    _step(f"rendering {n_train} training, {n_val} validation and {n_test} test scenes")
    train, clean_val, clean_test = (
        tb.make_dataset(n, split) for n, split in ((n_train, "train"), (n_val, "val"), (n_test, "test"))
    )

    _step("screening every concept x style on validation scenes for pairs that hurt >= 3 classes by >= 15 points")
    drawn, screened = select_pairs(model, tb, normalize, clean_val, k=pairs, rng=np.random.default_rng(seed))
    qualifying = sum(r["qualifies"] for r in screened)
    print(f"  {qualifying} of {len(screened)} pairs qualify; drawn at random:")
    for i, pair in enumerate(drawn, 1):
        hurt = ", ".join(f"{CLASS_NAMES[h['class']]} -{h['drop_pp']:.0f}" for h in sorted(pair["hurt"], key=lambda h: -h["drop_pp"]))
        extra = "" if pair["qualifies"] else " (does not qualify: too few pairs do)"
        print(f"  {i}. {pair['style']} on the {pair['concept']} (hurts {hurt or 'no class by 15 points'}){extra}")

    _step(f"key statistics of {', '.join(layers)} over {n_train} clean training scenes")
    train_x = normalize(train.images)
    shared = _Shared(
        model=model, tb=tb, normalize=normalize, layers=layers,
        stats={layer: collect_key_stats(model, layer, train_x, progress=False, cache_dir=out / "cache") for layer in layers},
        clean_val=clean_val, clean_val_c=CachedImages(model, normalize(clean_val.images), batch_size=256),
        clean_test=clean_test, clean_test_c=CachedImages(model, normalize(clean_test.images), batch_size=256),
        ft_steps=ft_steps,
    )
    units: list[Unit] = []
    shown: _Shown | None = None
    for i, pair in enumerate(drawn, 1):
        pair_units, pair_shown = _run_pair(shared, i, pair, draws, seed)
        units += pair_units
        shown = shown or pair_shown

    table = summary_table(units)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    assert shown is not None
    figure_note = f"The figure ({figure_path}) shows test scenes of pair 1, draw 1: {shown.unit.label}."
    write_text(out / "demo.md", table + "\n\n" + figure_note + "\n")
    chosen_edit = shown.unit.chosen["edit"]
    if chosen_edit is not None:
        e = chosen_edit.edit
        saved = dataclasses.replace(e, lam=e.lam * chosen_edit.alpha, hparams={**e.hparams, "alpha": chosen_edit.alpha})
        saved.description = f"testbed VGG, pair 1: {shown.unit.label}, {N_EXEMPLARS} exemplars of the target class"
        saved.save(edit_path)
        _step(f"pair 1's edit saved to {edit_path} ({edit_path.stat().st_size / 1024:.1f} KB, at the chosen strength)")
    path = _figure(figure_path, shown, CLASS_NAMES, len(drawn))
    if path is not None:
        _step(f"figure of pair 1, {shown.unit.label}, saved to {path}")
    return 0


def _figure(path: Path, shown: _Shown, names: tuple[str, ...], n_pairs: int) -> Path | None:
    """Test scenes of one unit: true class, prediction before -> after the edit, and the verdict."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no figure")
        return None
    cand = shown.unit.chosen["edit"]
    t = torch.as_tensor(shown.test)
    before = shown.seen.subset(t).logits0.argmax(1)
    after = before if cand is None else shown.seen.subset(t).logits(cand).argmax(1)
    truth = shown.y[t]
    ok0 = shown.x0.subset(t).logits0.argmax(1) == truth
    rng = np.random.default_rng(1)
    wrong = [i for i in range(len(t)) if ok0[i] and before[i] != truth[i]]
    right = [i for i in range(len(t)) if ok0[i] and before[i] == truth[i]]
    picked = [sorted(rng.choice(g, size=min(6, len(g)), replace=False).tolist()) for g in (wrong, right)]
    cols = 6
    fig, axes = plt.subplots(2, cols, figsize=(2.1 * cols, 2.9 * 2 + 0.6), squeeze=False)
    colours = {"fixed": "#1a7f37", "broken": "#cf222e", "unchanged": "#57606a"}
    for row, group in enumerate(picked):  # first row: scenes the restyle broke; second: scenes it left right
        for ax, i in zip(axes[row], group):
            ax.imshow(shown.pixels[int(t[i])].permute(1, 2, 0).numpy())
            b, a, true = int(before[i]), int(after[i]), int(truth[i])
            verdict = "fixed" if b != true and a == true else "broken" if b == true and a != true else "unchanged"
            ax.set_title(f"true: {names[true]}\n{names[b]} -> {names[a]}\n{verdict}", fontsize=7.5, color=colours[verdict])
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(
        f"Pair 1 of {n_pairs} drawn: {shown.unit.label}, draw 1. Test scenes the restyle broke (first row) and left\n"
        "right (second row); prediction before -> after the edit (green: fixed, red: broken, grey: unchanged)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9), h_pad=1.5)
    return save_figure(fig, path, dpi=80)
