"""Issue 28: edits stacked on one weight. Overlapping key directions warn (on a model and in ``surgery
apply``), orthogonal ones and other layers do not, and taking one edit out of a stack of eight through its
handle leaves exactly the model that carries the other seven."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from surgery import Edit, SurgeryWarning, apply_edit, list_edits, revert_edit
from surgery.cli.main import main
from surgery.edits import key_overlap
from surgery.edits.interference import OVERLAP_THRESHOLD
from surgery.errors import InterferenceWarning
from surgery.identity import architecture_id
from tests.strategies import ModelRecipe, editable_layers, edits, model_recipes

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
alphas = st.just(1.0) | st.floats(-3.0, 3.0, allow_nan=False)
RECIPE = ModelRecipe((3, 6, 5), (3, 1), (True, False), (True, True), 3, torch.float32, 7)


def _edit(model: nn.Module, layer: str, u: torch.Tensor, seed: int = 0, description: str = "") -> Edit:
    """A factored edit of ``layer`` with the key directions ``u`` (rows normalized) and random ``lam``."""
    w = model.get_parameter(f"{layer}.weight")
    u = torch.as_tensor(u, dtype=torch.float32).reshape(-1, w.shape[1])
    g = torch.Generator().manual_seed(seed)
    lam = 0.1 * torch.randn(u.shape[0], w.shape[0], *w.shape[2:], generator=g)
    edit = Edit(
        layer=layer, method="rewrite", lam=lam, u=nn.functional.normalize(u, dim=1),
        architecture=architecture_id(model), description=description,
    )
    return edit.made_on({f"{layer}.weight": w})


def _interference(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, InterferenceWarning)]


def _apply_all(model: nn.Module, *stack: Edit) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for e in stack:
            apply_edit(model, e)
    return _interference(record)


# --------------------------------------------------------------------------------------------------
# The overlap
# --------------------------------------------------------------------------------------------------


def test_key_overlap_is_the_largest_abs_cosine_between_u_rows() -> None:
    model = RECIPE.build()
    a = _edit(model, "0", [[1.0, 0, 0], [0, 1.0, 0]])
    b = _edit(model, "0", [[0, 0, 1.0], [-1.0, 1.0, 0]])  # second row: cos -1/sqrt2 and 1/sqrt2 with a's
    assert key_overlap(a, b) == pytest.approx({"0.weight": 2**-0.5})
    assert key_overlap(a, b) == key_overlap(b, a)
    assert key_overlap(a, _edit(model, "0", [[0, 0, 3.0]])) == {"0.weight": 0.0}
    assert key_overlap(a, a) == pytest.approx({"0.weight": 1.0})
    assert key_overlap(a, _edit(model, "3", [[1.0] * 6])) == {}  # other layer: nothing in common
    dense = Edit(layer="0", method="finetune", deltas={"0.weight": torch.zeros_like(model.get_parameter("0.weight"))})
    assert key_overlap(a, dense) == {} and key_overlap(dense, a) == {}


# --------------------------------------------------------------------------------------------------
# The warning on a model
# --------------------------------------------------------------------------------------------------


def test_nearly_the_same_direction_warns_and_names_both_edits() -> None:
    model = RECIPE.build()
    first = _edit(model, "0", [[1.0, 0.2, 0.0]], seed=1, description="snow on roads")
    second = _edit(model, "0", [[1.0, 0.0, 0.1]], seed=2, description="wooden wheels")
    assert key_overlap(first, second)["0.weight"] > 0.9
    apply_edit(model, first)
    with pytest.warns(InterferenceWarning) as record:
        apply_edit(model, second)
    (message,) = _interference(record.list)
    overlap = key_overlap(first, second)["0.weight"]
    for part in (repr(first), repr(second), "snow on roads", "wooden wheels", "'0.weight'", f"{overlap:.3f}",
                 "rewrote", "may no longer hold", "batch rewrite", "multi_edit.md"):
        assert part in message, part
    assert record.list[0].filename == __file__  # points at the caller of apply_edit
    assert [h.edit for h in list_edits(model)] == [first, second]  # a warning only: both applied


def test_orthogonal_directions_and_other_layers_do_not_warn() -> None:
    model = RECIPE.build()
    assert _apply_all(model, _edit(model, "0", [[1.0, 0, 0]], 1), _edit(model, "0", [[0, 1.0, 0]], 2)) == []
    assert _apply_all(model, _edit(model, "3", [[1.0] * 6], 3)) == []  # another layer
    assert len(list_edits(model)) == 3


def test_the_threshold_is_strict_and_reverted_edits_no_longer_count() -> None:
    model = RECIPE.build()
    cos = OVERLAP_THRESHOLD
    below = [[(1 - (cos - 0.01) ** 2) ** 0.5, cos - 0.01, 0]]  # overlap just below the threshold with e_1
    first = _edit(model, "0", [[0, 1.0, 0]], 1)
    handle = apply_edit(model, first)
    assert _apply_all(model, _edit(model, "0", below, 2)) == []
    revert_edit(model, handle)
    assert _apply_all(model, _edit(model, "0", [[0, 1.0, 0.01]], 3)) == []  # first is gone


def test_a_span_edit_is_checked_at_each_of_its_layers() -> None:
    model = RECIPE.build()
    w0, w3 = model.get_parameter("0.weight"), model.get_parameter("3.weight")
    span = Edit(
        layer="0", method="rewrite", architecture=architecture_id(model),
        span={
            "0.weight": (0.1 * torch.randn(1, *w0.shape[:1], *w0.shape[2:]), torch.tensor([[1.0, 0, 0]])),
            "3.weight": (0.1 * torch.randn(1, *w3.shape[:1], *w3.shape[2:]), torch.tensor([[0, 0, 0, 0, 0, 1.0]])),
        },
    ).made_on({"0.weight": w0, "3.weight": w3})
    later = _edit(model, "3", [[0, 0, 0, 0, 0.1, 1.0]], 5)
    (message,) = _apply_all(model, span, later)
    assert "'3.weight'" in message and "'0.weight'" not in message.split("already carries")[0]
    assert _apply_all(model, _edit(model, "0", [[0, 1.0, 0]], 6)) == []  # orthogonal at the span's first layer


def test_dense_edits_and_the_same_edit_twice_give_no_interference_warning() -> None:
    model = RECIPE.build()
    w = model.get_parameter("0.weight")
    dense = Edit(layer="0", method="finetune", deltas={"0.weight": 0.01 * torch.randn(w.shape)}).made_on({"0.weight": w})
    factored = _edit(model, "0", [[1.0, 0, 0]], 1)
    assert _apply_all(model, dense, factored) == []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        apply_edit(model, factored)  # its own warning says it is applied already
    assert _interference(record) == [] and any("already applied" in str(w.message) for w in record)


# --------------------------------------------------------------------------------------------------
# The stack in `surgery apply`
# --------------------------------------------------------------------------------------------------


def test_surgery_apply_warns_on_overlapping_edits_and_lists_the_stack(tmp_path: Path, capsys) -> None:
    model = RECIPE.build()
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    paths = []
    for i, u in enumerate(([[1.0, 0.1, 0]], [[1.0, 0, 0.1]], [[0, 0, 1.0]])):
        paths.append(tmp_path / f"e{i}.safetensors")
        _edit(model, "0", u, i, description=f"rule {i}").save(paths[-1])
    assert main(["apply", str(ckpt), *map(str, paths[:2]), "-o", str(tmp_path / "a.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert err.count("surgery: warning:") == 1 and "'rule 0'" in err and "'rule 1'" in err and "'0.weight'" in err
    assert f"  1. {Edit.load(paths[0])!r} ('rule 0') from {paths[0]}" in out and "  2. " in out
    assert main(["apply", str(ckpt), str(paths[0]), str(paths[2]), "-o", str(tmp_path / "b.safetensors")]) == 0
    assert "surgery: warning:" not in capsys.readouterr().err  # orthogonal: applied quietly


# --------------------------------------------------------------------------------------------------
# Removing one edit from a stack of eight
# --------------------------------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_removing_one_of_eight_stacked_edits_leaves_exactly_the_other_seven(data) -> None:
    """Through its handle, bit for bit: the remaining edits are re-added to the saved original bytes in
    their order, each rounded once (``add_scaled``), the same arithmetic as applying them to a fresh copy."""
    recipe = data.draw(model_recipes())
    model = recipe.build()
    pool = data.draw(st.lists(st.sampled_from(editable_layers(model)), min_size=1, max_size=2, unique=True))
    stack = [data.draw(edits(model, data.draw(st.sampled_from(pool)))) for _ in range(8)]
    strengths = [data.draw(alphas) for _ in range(8)]
    out = data.draw(st.integers(0, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryWarning)  # overlaps, an edit drawn twice, large updates
        handles = [apply_edit(model, e, alpha=a) for e, a in zip(stack, strengths)]
        assert revert_edit(model, handles[out]).through_handle
        reference = recipe.build()
        for j in range(8):
            if j != out:
                apply_edit(reference, stack[j], alpha=strengths[j])
    assert list_edits(model) == [h for j, h in enumerate(handles) if j != out]
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
