"""surgery.evaluation.select: choosing the strongest edit within a clean-accuracy budget."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.vgg import VGG

from surgery import Edit, SurgeryError, finetune, get_layer
from surgery.edits.edit import base_record
from surgery.evaluation.select import (
    CachedImages,
    Candidate,
    CandidateResult,
    NoCandidateError,
    _choose,
    _measure_clean,
    select_strength,
    strength_grid,
)
from surgery.evaluation.concept_match import select_by_concept_match
from tests.tiny_models import randomize_batchnorm, tiny_vit

LAYER = "features.4"


def tiny_vgg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    model = VGG(features, num_classes=10, init_weights=False)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(12, 10)
    randomize_batchnorm(model, seed)
    model.eval()
    with torch.no_grad():  # standardize the pooled features so that predictions spread over the classes
        f = model.avgpool(model.features(torch.randn(256, 3, 16, 16))).flatten(1)
        mean, std = f.mean(0), f.std(0) + 1e-6
        wc = torch.randn(10, 12) / std
        model.classifier.weight.copy_(wc)
        model.classifier.bias.copy_(-wc @ mean)
    return model


def dense_edit(model: nn.Module, delta: torch.Tensor, name: str) -> Edit:
    layer = get_layer(model, LAYER)
    return Edit(
        layer=LAYER, method="test", hparams={"name": name}, deltas={layer.param_name: delta},
        base=base_record({layer.param_name: layer.weight}),
    )


def predictions(model: nn.Module, x: torch.Tensor, edit: Edit | None = None, alpha: float = 1.0):
    from surgery import edited

    with torch.no_grad():
        if edit is None:
            return model(x).argmax(1)
        with edited(model, edit, alpha=alpha):
            return model(x).argmax(1)


@pytest.fixture(scope="module")
def case():
    """Candidates with known outcomes: B corrects every validation error, C breaks clean accuracy."""
    model = tiny_vgg()
    g = torch.Generator().manual_seed(1)
    w = get_layer(model, LAYER).weight.detach()
    direction = torch.randn(w.shape, generator=g)
    b = dense_edit(model, 0.01 * w.norm() / direction.norm() * direction, "B")
    pool = torch.randn(600, 3, 16, 16, generator=g)
    base = predictions(model, pool)
    changed = predictions(model, pool, b) != base
    assert changed.sum() >= 10, "edit B must change some predictions"
    val = pool[changed][:20]
    val_labels = predictions(model, val, b)  # B's predictions are the "truth": it corrects everything
    clean = pool[~changed][:200]
    clean = torch.cat([clean, pool[changed][20:25]])  # B costs exactly 5 of 205 clean images
    clean_labels = predictions(model, clean)  # the unedited model is 100% right on clean data
    a = dense_edit(model, 1e-6 * direction, "A")  # changes nothing
    c = dense_edit(model, 8.0 * b.delta(), "C")  # far too strong
    drop_b = 100 * (predictions(model, clean, b) != clean_labels).double().mean().item()
    drop_c = 100 * (predictions(model, clean, c) != clean_labels).double().mean().item()
    assert drop_c > drop_b + 0.5
    return {
        "model": model, "a": a, "b": b, "c": c, "val": val, "val_labels": val_labels, "clean": clean,
        "clean_labels": clean_labels, "drop_b": drop_b, "drop_c": drop_c,
    }


def test_known_winner_and_budget_exclusion(case):
    budget = case["drop_b"] + 0.1
    sel = select_strength(
        case["model"], [case["a"], case["b"], case["c"]], case["val"], case["val_labels"],
        clean_images=case["clean"], clean_labels=case["clean_labels"], max_clean_drop=budget,
    )
    assert sel.index == 1 and sel.edit is case["b"]
    a, b, c = sel.table
    assert a.score == 0.0 and a.clean_drop == 0.0 and a.qualifies
    assert b.score == 100.0 and b.errors_after == 0 and b.qualifies
    assert b.clean_drop == pytest.approx(case["drop_b"])
    assert not c.qualifies and c.clean_drop == pytest.approx(case["drop_c"])
    assert sel.path == "suffix"
    assert "chosen" in sel.to_markdown()
    # with a budget below B's drop, A (the only one left) wins
    sel2 = select_strength(
        case["model"], [case["a"], case["b"], case["c"]], case["val"], case["val_labels"],
        clean_images=case["clean"], clean_labels=case["clean_labels"], max_clean_drop=case["drop_b"] / 2,
    )
    assert sel2.index == 0


def test_clean_check_of_the_best_candidates_only_makes_the_same_choice(case):
    """check_every_candidate=False measures clean accuracy best score first, until a score group qualifies."""
    cands = [case["a"], case["b"], case["c"]]
    kw = {"clean_images": case["clean"], "clean_labels": case["clean_labels"]}
    for budget in (case["drop_b"] + 0.1, case["drop_b"] / 2):
        full = select_strength(case["model"], cands, case["val"], case["val_labels"], max_clean_drop=budget, **kw)
        lazy = select_strength(
            case["model"], cands, case["val"], case["val_labels"], max_clean_drop=budget,
            check_every_candidate=False, **kw,
        )
        assert lazy.index == full.index
        for r, f in zip(lazy.table, full.table):
            assert r.score == f.score
            if r.qualifies is not None:  # measured rows equal the full table's
                assert r.clean_drop == f.clean_drop and r.qualifies == f.qualifies
    # the generous budget: B (100% corrected) qualifies, so A (0%) is never measured
    a = select_strength(
        case["model"], cands, case["val"], case["val_labels"], max_clean_drop=case["drop_b"] + 0.1,
        check_every_candidate=False, **kw,
    ).table[0]
    assert a.qualifies is None and math.isnan(a.clean_drop) and a.to_dict()["clean_drop"] is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0.0, 25.0, 50.0, 100.0, math.nan]), st.floats(-1.0, 2.0)), min_size=1, max_size=8),
    st.floats(0.0, 1.0),
)
def test_measuring_clean_lazily_never_changes_the_choice(rows, budget):
    def table():
        return [
            CandidateResult(index=i, name=str(i), layer="l", alpha=1.0, score=s, clean_acc_before=90.0,
                            clean_acc_after=math.nan, clean_drop=math.nan, qualifies=None)
            for i, (s, _) in enumerate(rows)
        ]

    def clean_logits(i):  # logits whose accuracy is 90 - drop_i on 1,000 images of label 0
        right = round(10 * (90.0 - rows[i][1]))
        return torch.tensor([[1.0, 0.0]] * right + [[0.0, 1.0]] * (1000 - right))

    labels = torch.zeros(1000, dtype=torch.long)
    picks = []
    for every in (True, False):
        t = table()
        _measure_clean(t, clean_logits, labels, budget, every)
        try:
            picks.append(_choose(t, budget))
        except NoCandidateError:
            picks.append(None)
    assert picks[0] == picks[1]


def test_suffix_path_equals_full_forward(case):
    cands = [Candidate(case["b"], 0.5), Candidate(case["b"], 1.0), Candidate(case["c"], 0.3)]
    kw = {"clean_images": case["clean"], "clean_labels": case["clean_labels"], "max_clean_drop": 100.0}
    fast = select_strength(case["model"], cands, case["val"], case["val_labels"], **kw)
    full = select_strength(case["model"], cands, case["val"], case["val_labels"], use_suffix=False, **kw)
    assert fast.path == "suffix" and full.path == "full"
    assert fast.index == full.index
    for r1, r2 in zip(fast.table, full.table):
        assert (r1.score, r1.errors_after, r1.clean_acc_after) == (r2.score, r2.errors_after, r2.clean_acc_after)
    # and the logits themselves agree
    cached = CachedImages(case["model"], case["val"], batch_size=16)
    assert cached.path(cands[0]) == "suffix" and cached.path(cands[0], use_suffix=False) == "full"
    for c in (*cands, cands[0]):  # strengths of one edit share its layer-output change; then another edit
        torch.testing.assert_close(cached.logits(c), cached.logits(c, use_suffix=False), rtol=1e-4, atol=1e-5)
    # a factored rank-one rewrite of a conv with a bias, on a subset
    from surgery import collect_key_stats, rewrite

    x = case["val"]
    e = rewrite(case["model"], LAYER, x[:2], x[2:4], stats=collect_key_stats(case["model"], LAYER, x, progress=False))
    assert e.factored and get_layer(case["model"], LAYER).module.bias is not None
    sub = CachedImages(case["model"], torch.cat([x, case["clean"][:30]])).subset(range(5, 40))
    for a in (0.25, 1.0):
        torch.testing.assert_close(sub.logits(Candidate(e, a)), sub.logits(Candidate(e, a), use_suffix=False), rtol=1e-4, atol=1e-5)


def test_cached_images_reused_across_calls_and_subsets(case):
    """CachedImages (and subsets of them) give the same selection as plain tensors."""
    model = case["model"]
    cands = [Candidate(case["b"], 0.5), Candidate(case["b"], 1.0), Candidate(case["c"], 0.3)]
    pool = torch.cat([case["val"], case["clean"]])
    cached_pool = CachedImages(model, pool, batch_size=32)
    cached_pool.logits(cands[0])  # fill the layer cache on the parent before taking subsets
    n = len(case["val"])
    val, clean = cached_pool.subset(range(n)), cached_pool.subset(range(n, len(pool)))
    kw = {"clean_labels": case["clean_labels"], "max_clean_drop": case["drop_b"] + 0.01}
    plain = select_strength(model, cands, case["val"], case["val_labels"], clean_images=case["clean"], **kw)
    for _ in range(2):  # the second call reuses everything cached by the first
        sel = select_strength(model, cands, val, case["val_labels"], clean_images=clean, **kw)
        assert sel.index == plain.index == 1 and sel.path == "suffix"
        assert [r.to_dict() for r in sel.table] == [r.to_dict() for r in plain.table]
    torch.testing.assert_close(val.logits0, CachedImages(model, case["val"]).logits0)
    assert val.layer_cache(LAYER).keys.shape[0] == n
    with pytest.raises(SurgeryError, match="out of range"):
        cached_pool.subset([len(pool)])
    with pytest.raises(SurgeryError, match="another model"):
        select_strength(tiny_vgg(1), cands, val, case["val_labels"], clean_images=clean, **kw)


def test_cached_images_multi_parameter_edits():
    """Global fine-tuning is evaluated from cached keys when it changes only parameters after them, and
    with full forwards when it changes the module a residual block's context comes from."""
    vgg = tiny_vgg(2)
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ft = finetune(vgg, LAYER, x[:4], [1, 2, 3, 4], scope="global", steps=5, lr=0.05)
    assert len(ft.parameter_deltas()) > 1
    cached = CachedImages(vgg, x)
    cand = Candidate(ft)
    assert cached.path(cand) == "suffix"
    torch.testing.assert_close(cached.logits(cand), cached.logits(cand, use_suffix=False), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cached.logits(cand), cached.logits0)

    resnet = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    xr = torch.randn(6, 3, 32, 32)
    cached = CachedImages(resnet, xr)
    local = Candidate(finetune(resnet, "layer4.0.conv2", xr[:2], 1, scope="local", steps=2, lr=0.1))
    glob = Candidate(finetune(resnet, "layer4.0.conv2", xr[:2], 1, scope="global", steps=2, lr=0.1))
    assert any(k.startswith("layer4.0.downsample.") for k in glob.edit.parameter_deltas())
    assert cached.path(local) == "suffix" and cached.path(glob) == "full"
    for c in (local, glob):
        torch.testing.assert_close(cached.logits(c), cached.logits(c, use_suffix=False), rtol=1e-4, atol=1e-4)


def test_error_when_none_qualifies(case):
    with pytest.raises(NoCandidateError, match="smallest drop was") as info:
        select_strength(
            case["model"], [case["c"], Candidate(case["c"], 2.0)], case["val"], case["val_labels"],
            clean_images=case["clean"], clean_labels=case["clean_labels"], max_clean_drop=0.0,
        )
    assert f"{case['drop_c']:.3f}" in str(info.value)
    assert len(info.value.table) == 2


def test_refuses_a_model_that_carries_a_candidate(case):
    """select_strength applies every candidate itself: on a model that already has one, it would measure
    that edit twice over (issue 27)."""
    from surgery import edited

    model, args = case["model"], (case["val"], case["val_labels"])
    kwargs = {"clean_images": case["clean"], "clean_labels": case["clean_labels"]}
    with edited(model, case["b"]), pytest.raises(SurgeryError, match="already carries it") as info:
        select_strength(model, [case["a"], *strength_grid(case["b"], n=2)], *args, **kwargs)
    assert "pass the unedited model, or revert the edit first" in str(info.value).lower()
    assert "select_strength" in str(info.value)
    with edited(model, case["c"]):  # another edit on the model is no reason to refuse
        select_strength(model, [case["a"], case["b"]], *args, **kwargs, max_clean_drop=100.0)
    assert select_strength(model, [case["a"], case["b"]], *args, **kwargs, max_clean_drop=100.0).edit is case["b"]


def test_custom_score_and_strength_grid(case):
    grid = strength_grid(case["b"], n=4, lo=0.125, hi=1.0)
    assert [c.alpha for c in grid] == pytest.approx([0.125, 0.25, 0.5, 1.0])
    # a score that prefers the weakest edit
    sel = select_strength(
        case["model"], grid, case["val"], case["val_labels"], clean_images=case["clean"],
        clean_labels=case["clean_labels"], max_clean_drop=100.0, score=lambda l0, l1, y: -float((l1 - l0).abs().sum()),
    )
    assert sel.alpha == 0.125


def test_concept_match_picks_the_matching_strength(case):
    model = case["model"]
    x = case["val"][:8]
    masks = torch.ones(8, 16, 16)
    grid = [Candidate(case["b"], a) for a in (1.0, 0.0, 0.5)]
    # the "concept" images are the same images: the unedited activations match exactly at alpha 0
    sel = select_by_concept_match(
        model, grid, x, masks, x, masks, clean_images=case["clean"], max_clean_drop=100.0
    )
    assert sel.alpha == 0.0 and sel.result.extra["distance"] == pytest.approx(0.0, abs=1e-6)
    assert sel.table[0].extra["distance"] > sel.table[2].extra["distance"] > 0


def test_concept_match_on_tokens_weighs_only_the_concepts_grid_tokens():
    """A ViT's values are tokens (N, L, C): the match pools masks onto the grid, the class token weighs 0."""
    from surgery import rewrite
    from surgery.evaluation.concept_match import _masked_mean

    vit = tiny_vit()
    layer = get_layer(vit, "blocks.1.mlp.fc2")
    x = torch.randn(6, 3, 32, 32)
    masks = torch.zeros(6, 32, 32)
    masks[:, 16:] = 1  # the lower half: grid rows 2-3 of the 4x4 patches
    with torch.no_grad():
        values = layer.capture(vit, x).values  # (6, 17, 32)
    mean = _masked_mean(values, masks, layer.value_layout)
    torch.testing.assert_close(mean, values[:, 1 + 8 :].double().mean(dim=(0, 1)))  # class token and upper half excluded
    x2 = x.clone()
    x2[:, :, 16:] = torch.randn(6, 3, 16, 32)
    edit = rewrite(vit, layer, x[:2], x2[:2], stats=torch.eye(128))
    grid = [Candidate(edit, a) for a in (1.0, 0.0, 0.5)]
    sel = select_by_concept_match(vit, grid, x, masks, x, masks, clean_images=x, max_clean_drop=100.0)
    assert sel.alpha == 0.0 and sel.result.extra["distance"] == pytest.approx(0.0, abs=1e-6)
    assert sel.table[0].extra["distance"] > sel.table[2].extra["distance"] > 0


def test_a_strength_chosen_in_bfloat16_scores_the_weights_apply_writes():
    """In bfloat16, W + alpha * delta rounded in the weight's dtype and in float64 differ: selection scores
    the weight that apply_edit writes (float64, rounded once), so the logits it scored for the chosen
    strength are those of the model carrying the edit."""
    from surgery import apply_edit, revert_edit

    model = tiny_vgg().to(torch.bfloat16)
    layer = get_layer(model, LAYER)
    g = torch.Generator().manual_seed(3)
    w = layer.weight.detach().float()
    direction = torch.randn(w.shape, generator=g)
    edit = dense_edit(model, (0.05 * w.norm() / direction.norm() * direction), "E")
    images = torch.randn(64, 3, 16, 16, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 10, (64,), generator=g)
    alphas = (1 / 3, 0.7, 1.3)
    scored: dict[float, torch.Tensor] = {}

    def score(before, after, y):
        scored[len(scored)] = after.clone()
        return float((after.argmax(1) == y).double().mean())

    sel = select_strength(
        model, [(edit, a) for a in alphas], images, labels, clean_images=images, clean_labels=labels,
        max_clean_drop=100.0, score=score,
    )
    i = alphas.index(sel.alpha)
    naive = (layer.weight.detach() + sel.alpha * edit.delta().to(torch.bfloat16)).detach()
    handle = apply_edit(model, edit, alpha=sel.alpha)
    try:
        written = layer.weight.detach().clone()
        with torch.no_grad():
            after = model(images).float()
    finally:
        revert_edit(model, handle)
    assert not torch.equal(naive, written)  # the two roundings differ here: the test can tell them apart
    assert torch.equal(edit.new_weight(layer.weight, sel.alpha), written)
    torch.testing.assert_close(scored[i].float(), after, rtol=0, atol=0)
