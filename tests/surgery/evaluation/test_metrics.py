"""% errors corrected, batched predictions, and evaluate_edit on a case whose every prediction is known."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery.edits.apply import list_edits
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError
from surgery.evaluation.metrics import EditReport, errors_corrected, evaluate_edit, predict
from surgery.identity import tensor_sha256


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (10, 5, 50.0),
        (10, 0, 100.0),
        (10, 10, 0.0),
        (10, 15, -50.0),
        (10, 20, -100.0),
        (10, 30, -100.0),  # -200 floored
        (2.5, 1.0, 60.0),
    ],
)
def test_errors_corrected(before, after, expected):
    assert errors_corrected(before, after) == pytest.approx(expected)


def test_errors_corrected_undefined_and_invalid():
    assert math.isnan(errors_corrected(0, 0))
    assert math.isnan(errors_corrected(0, 3))
    for bad in [(-1, 0), (1, -1), (float("nan"), 1), (1, float("inf"))]:
        with pytest.raises(SurgeryError):
            errors_corrected(*bad)


# A 3-class "classifier" of 1x1 images: prediction = argmax of the 3 channels. The edit swaps classes
# 0 and 1 (W' = P), so every prediction after the edit is known exactly.
SWAP = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def linear_model() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3))
        model[1].bias.zero_()
    return model.eval()


def swap_edit() -> Edit:
    return Edit(layer="1", method="dense-test", deltas={"1.weight": SWAP - torch.eye(3)})


def images_predicted_as(classes: list[int]) -> torch.Tensor:
    return F.one_hot(torch.tensor(classes), 3).float().reshape(-1, 3, 1, 1)


PRE = [0, 0, 1, 1, 2, 2, 0, 1]  # predictions on the transformed images before the edit
POST = [1, 1, 0, 0, 2, 2, 1, 0]  # ... after swapping 0 and 1
LABELS = torch.tensor([1, 1, 0, 1, 2, 0, 0, 0])
# errors before: 0 1 2 5 7 (5); after: 3 5 6 (3)
ORIGINAL_CORRECT = [True, True, True, False, False, True, False, True]


def originals() -> torch.Tensor:
    preds = [int(y) if ok else (int(y) + 1) % 3 for y, ok in zip(LABELS, ORIGINAL_CORRECT)]
    return images_predicted_as(preds)


def groups() -> dict[str, torch.Tensor]:
    return {"target": LABELS == 0, "others": LABELS != 0, "easy": torch.arange(8) == 4}


def snapshot(model: nn.Module) -> dict[str, str]:
    return {n: tensor_sha256(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}


def test_predict_is_batched_argmax():
    model = linear_model()
    x = torch.randn(11, 3, 1, 1)
    got = predict(model, x, batch_size=3)
    assert got.dtype == torch.long and got.shape == (11,)
    assert torch.equal(got, model(x).argmax(1))
    assert torch.equal(predict(model, images_predicted_as(PRE)), torch.tensor(PRE))


def test_evaluate_edit_counts():
    model = linear_model()
    before = snapshot(model)
    x = images_predicted_as(PRE)
    report = evaluate_edit(model, swap_edit(), x, LABELS, groups=groups(), batch_size=3)
    assert snapshot(model) == before and list_edits(model) == []
    assert torch.equal(report.preds_before, torch.tensor(PRE))
    assert torch.equal(report.preds_after, torch.tensor(POST))
    assert not report.restricted
    target, others, easy = report.rows
    # target = 2 5 6 7: wrong before 2 5 7, after 5 6
    assert (target.name, target.n, target.errors_before, target.errors_after) == ("target", 4, 3, 2)
    assert target.pct_corrected == pytest.approx(100 / 3)
    # others = 0 1 3 4: wrong before 0 1, after 3
    assert (others.n, others.errors_before, others.errors_after, others.pct_corrected) == (4, 2, 1, 50.0)
    assert (easy.n, easy.errors_before, easy.errors_after) == (1, 0, 0) and math.isnan(easy.pct_corrected)
    assert report.clean_acc_before is None and report.clean_acc_change is None

    whole = evaluate_edit(model, swap_edit(), images_predicted_as(PRE), LABELS)
    assert [(r.name, r.n, r.errors_before, r.errors_after) for r in whole.rows] == [("all", 8, 5, 3)]
    assert whole.rows[0].pct_corrected == pytest.approx(40.0)


def test_evaluate_edit_restricts_to_correct_originals():
    model = linear_model()
    report = evaluate_edit(
        model, swap_edit(), images_predicted_as(PRE), LABELS, groups=groups(), originals=originals()
    )
    assert report.restricted
    target, others, easy = report.rows
    # kept: 0 1 2 5 7. target -> 2 5 7: wrong before 2 5 7, after 5
    assert (target.n, target.n_total, target.errors_before, target.errors_after) == (3, 4, 3, 1)
    assert target.pct_corrected == pytest.approx(200 / 3)
    # others -> 0 1: wrong before both, after neither
    assert (others.n, others.n_total, others.errors_before, others.errors_after) == (2, 4, 2, 0)
    assert others.pct_corrected == 100.0
    assert (easy.n, easy.n_total) == (0, 1) and math.isnan(easy.pct_corrected)
    text = str(report)
    assert "untransformed original was classified correctly" in text
    assert "3/4" in text and "n/a" in text
    assert "not restricted" in str(evaluate_edit(model, swap_edit(), images_predicted_as(PRE), LABELS))


def test_clean_accuracy_change_and_serialization():
    model = linear_model()
    before = snapshot(model)
    clean = images_predicted_as([0, 1, 2, 2])  # after the swap: 1 0 2 2
    report = evaluate_edit(
        model,
        swap_edit(),
        images_predicted_as(PRE),
        LABELS,
        clean_images=clean,
        clean_labels=torch.tensor([0, 1, 2, 0]),
    )
    assert report.clean_acc_before == pytest.approx(75.0)
    assert report.clean_acc_after == pytest.approx(25.0)
    assert report.clean_acc_change == pytest.approx(-50.0)
    assert "75.00% -> 25.00% (-50.00 pp)" in str(report)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["clean"] == {"n": 4, "acc_before": 75.0, "acc_after": 25.0, "acc_change_pp": -50.0}
    assert d["preds_after"] == POST and d["restricted_to_correct_originals"] is False
    assert d["groups"][0]["pct_corrected"] == pytest.approx(40.0)
    assert snapshot(model) == before

    easy_only = {"easy": groups()["easy"]}
    nan_row = evaluate_edit(model, swap_edit(), images_predicted_as(PRE), LABELS, groups=easy_only)
    assert json.loads(json.dumps(nan_row.to_dict(), allow_nan=False))["groups"][0]["pct_corrected"] is None


def test_alpha_zero_changes_nothing():
    report = evaluate_edit(linear_model(), swap_edit(), images_predicted_as(PRE), LABELS, alpha=0.0)
    assert torch.equal(report.preds_before, report.preds_after)
    assert report.rows[0].pct_corrected == 0.0


def test_evaluate_a_finetune_edit_leaves_model_unchanged():
    from surgery.edits.apply import edited
    from surgery.finetune import finetune

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    x = torch.randn(6, 3, 8, 8)
    edit = finetune(model, "4", x, 2, scope="global", steps=10, lr=0.5)
    before = snapshot(model)
    report = evaluate_edit(model, edit, x, 2, clean_images=x, clean_labels=torch.full((6,), 2))
    assert isinstance(report, EditReport) and snapshot(model) == before
    with torch.no_grad(), edited(model, edit):
        assert torch.equal(report.preds_after, model(x).argmax(1))
    assert report.clean_acc_after == pytest.approx(100.0 * (report.preds_after == 2).float().mean().item())


def test_evaluate_edit_errors():
    model = linear_model()
    x = images_predicted_as(PRE)
    with pytest.raises(SurgeryError, match="boolean mask"):
        evaluate_edit(model, swap_edit(), x, LABELS, groups={"g": torch.arange(8)})
    with pytest.raises(SurgeryError, match="shape"):
        evaluate_edit(model, swap_edit(), x, LABELS, groups={"g": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(SurgeryError, match="pair up"):
        evaluate_edit(model, swap_edit(), x, LABELS, originals=x[:3])
    with pytest.raises(SurgeryError, match="together"):
        evaluate_edit(model, swap_edit(), x, LABELS, clean_images=x)
    with pytest.raises(SurgeryError, match=r"\[0, 2\]"):
        evaluate_edit(model, swap_edit(), x, 3)
    bad = Edit(layer="1", method="dense-test", deltas={"1.weight": torch.zeros(2, 2)})
    before = snapshot(model)
    with pytest.raises(SurgeryError, match="shape"):
        evaluate_edit(model, bad, x, LABELS)
    assert snapshot(model) == before and list_edits(model) == []
    model.train()
    with pytest.raises(SurgeryError, match=r"model\.eval\(\)"):
        evaluate_edit(model, swap_edit(), x, LABELS)


# evaluate_edit applies the edit itself: a model that already carries it is refused (issue 27).
REFUSED = "already carries it"
FIX = "pass the unedited model, or revert the edit first"


def factored_edit(model: nn.Module) -> Edit:
    """A rank-one edit of the linear layer, recording the weights it was made on."""
    lam, u = torch.tensor([[0.5, -1.0, 0.25]]), F.normalize(torch.tensor([[1.0, 2.0, -1.0]]), dim=1)
    return Edit(layer="1", method="rewrite-test", lam=lam, u=u).made_on({"1.weight": model[1].weight.detach().clone()})


def with_weight(model: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A fresh copy of ``model`` holding ``weight`` (no handles: as if loaded from an edited checkpoint)."""
    other = linear_model()
    with torch.no_grad():
        other[1].weight.copy_(weight)
    return other


def test_evaluate_edit_refuses_a_model_that_carries_the_edit():
    from surgery.edits.apply import apply_edit, edited, revert_edit

    model, x = linear_model(), images_predicted_as(PRE)
    edit = swap_edit()
    handle = apply_edit(model, edit)  # the old README's mistake: apply, then evaluate
    with pytest.raises(SurgeryError, match=REFUSED) as e:
        evaluate_edit(model, edit, x, LABELS)
    assert FIX in str(e.value).lower() and "apply_edit at strength 1" in str(e.value)
    with pytest.raises(SurgeryError, match=REFUSED):  # an equal edit read back from a file is the same edit
        evaluate_edit(model, Edit(layer="1", method="dense-test", deltas={"1.weight": SWAP - torch.eye(3)}), x, LABELS)
    revert_edit(model, handle)
    assert evaluate_edit(model, edit, x, LABELS).rows[0].errors_after == 3
    with edited(model, edit), pytest.raises(SurgeryError, match=REFUSED):
        evaluate_edit(model, edit, x, LABELS)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_evaluate_edit_finds_the_edit_on_the_weights(alpha):
    """No handle (an edited checkpoint): the weights along the edit give it away, at any strength."""
    model, x = linear_model(), images_predicted_as(PRE)
    edit = factored_edit(model)
    carrying = with_weight(model, edit.new_weight(model[1].weight, alpha=alpha))
    with pytest.raises(SurgeryError, match=REFUSED) as e:
        evaluate_edit(carrying, edit, x, LABELS)
    assert f"strength {alpha:.3g}" in str(e.value) and FIX in str(e.value).lower()
    evaluate_edit(model, edit, x, LABELS)  # the unedited model is measured


@pytest.mark.filterwarnings("ignore:.*differs from the weights the edit was made on")
def test_evaluate_edit_accepts_other_weights():
    """Weights the edit was not made on, or changed in another way along it, are not taken for the edit."""
    model, x = linear_model(), images_predicted_as(PRE)
    edit = factored_edit(model)
    torch.manual_seed(0)
    other = with_weight(model, model[1].weight + 0.3 * torch.randn(3, 3))
    assert evaluate_edit(other, edit, x, LABELS).rows[0].n == 8
    # a dense edit of one parameter is measured by one number: only a strength near 1 (or alpha) counts
    dense = Edit(layer="1", method="dense-test", deltas={"1.weight": SWAP - torch.eye(3)}).made_on(
        {"1.weight": model[1].weight.detach().clone()}
    )
    shifted = with_weight(model, model[1].weight + 0.37 * (SWAP - torch.eye(3)))
    evaluate_edit(shifted, dense, x, LABELS)
    with pytest.raises(SurgeryError, match=REFUSED):
        evaluate_edit(with_weight(model, dense.new_weight(model[1].weight)), dense, x, LABELS)
    with pytest.raises(SurgeryError, match=REFUSED):
        evaluate_edit(shifted, dense, x, LABELS, alpha=0.37)
