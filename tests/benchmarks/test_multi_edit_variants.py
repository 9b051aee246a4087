"""benchmarks.multi_edit.variants: one edit from several rules' factors, and the variants' report."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.efficacy.settings import settings_for
from benchmarks.multi_edit.variants import VARIANTS, strength_choice, factored_edit, markdown, merge_variant_runs, null_space_moment
from surgery import apply_edit, revert_edit
from surgery.edits.edit import Edit
from surgery.solvers.direction import rank_one_direction
from surgery.testbed.models import build_model


def _factors(layer: torch.nn.Conv2d, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lam = torch.randn(rank, layer.out_channels, *layer.kernel_size, generator=g)
    u = torch.nn.functional.normalize(torch.randn(rank, layer.in_channels, generator=g), dim=1)
    return lam, u


def test_factored_edit_adds_the_parts_of_a_layer_and_spans_layers_in_forward_order():
    model = build_model("vgg").eval()
    convs = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    first, last = convs[0], convs[-1]
    a, b, c = (_factors(model.get_submodule(n), 1, i) for i, n in enumerate([last, last, first]))
    one = factored_edit(model, [(last, *a), (last, *b)])
    assert one.layers == [last] and one.rank == 2
    single = [Edit(layer=last, method="rewrite", lam=lam, u=u) for lam, u in (a, b)]
    assert torch.allclose(one.delta(), single[0].delta() + single[1].delta(), atol=1e-6)
    span = factored_edit(model, [(last, *a), (first, *c)])  # given out of order
    assert span.layers == [first, last]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_edit(model, span.made_on({f"{n}.weight": model.get_submodule(n).weight for n in span.layers}))
    assert not torch.equal(model.get_submodule(first).weight, before[f"{first}.weight"])
    revert_edit(model, handle)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_markdown_pools_retained_efficacy_over_draws():
    draw = {"pairs": ["a->b", "c->d"], "solo": [20.0, 2.0], "variants": {
        name: {"scores": [10.0, 2.0], "clean_change_pp": -0.3, "alphas": [0.5]} for name in VARIANTS}}
    draw["variants"]["stacked, budget/k"]["alphas"] = [0.25, None]
    draw["variants"]["stacked"]["solo_clean_pp"] = [-0.1, -0.05]
    text = markdown(json.loads(json.dumps({"command": "test", "archs": {"vgg": {"draws": [draw, draw], "seconds": 1}}})))
    assert "| vgg | joint | 2 | 0.50 [0.50, 0.50] | -0.30 (-0.30) | 0.5; 0.5 |" in text  # the rule under MIN_SOLO is left out
    assert "| vgg | stacked, budget/k | 2 | 0.50 [0.50, 0.50] | -0.30 (-0.30) | 0.25/-; 0.25/- |" in text
    assert "| vgg | stacked | -0.15 | -0.30 |" in text  # costs one at a time against together


def test_null_space_moment_turns_the_whitened_direction_away_from_the_clean_keys_main_directions():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    evals = torch.tensor([1e-4, 2e-4, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # two near-null directions
    moment = (q * evals) @ q.T
    raised, share = null_space_moment(moment)
    assert share == pytest.approx(2 / 6)
    main, null = q[:, 2:], q[:, :2]  # the clean keys' main and near-null eigen-directions
    # exemplar keys almost all along the main directions: whitening alone (1 / eigenvalue) keeps them there
    keys = torch.randn(5, 4, generator=g, dtype=torch.float64) @ main.T + 1e-5 * torch.randn(5, 2, generator=g, dtype=torch.float64) @ null.T
    plain, avoiding = (rank_one_direction(m, keys)[0] for m in (moment, raised))
    assert float((avoiding @ main).norm()) < 0.1 * float((plain @ main).norm())
    assert float(avoiding @ moment @ avoiding) < float(plain @ moment @ plain)  # clean keys reach it less


def test_markdown_reports_a_subset_of_variants_and_the_null_space_share():
    names = ("stacked", "joint", "joint, clean-key null space")
    draw = {"pairs": ["a->b"], "solo": [20.0], "null_space_share": 0.25, "variants": {
        name: {"scores": [10.0], "clean_change_pp": -0.3, "alphas": [0.5]} for name in names}}
    draw["variants"]["stacked"]["solo_clean_pp"] = [-0.1]
    text = markdown({"command": "test", "archs": {"vgg": {"draws": [draw], "seconds": 1}}})
    assert "| vgg | joint, clean-key null space | 1 | 0.50" in text
    assert "| vgg | joint, protected |" not in text
    assert "per draw: vgg 0.25." in text


def test_merging_runs_of_one_model_joins_their_variants_and_refuses_disagreement(tmp_path):
    def run(variants: dict, solo=(20.0,), **extra) -> dict:
        draw = {"pairs": ["a->b"], "solo": list(solo), "variants": variants, **extra}
        return {"command": "run", "archs": {"vgg": {"draws": [draw], "seconds": 1}}}

    joint = {"scores": [10.0], "clean_change_pp": -0.3, "alphas": [0.5]}
    null = {"scores": [4.0], "clean_change_pp": -0.5, "alphas": [0.75]}
    paths = []
    for i, r in enumerate([run({"joint": joint}), run({"joint": joint, "joint, clean-key null space": null}, null_space_share=0.16)]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    merged = merge_variant_runs(paths)
    draw = merged["archs"]["vgg"]["draws"][0]
    assert set(draw["variants"]) == {"joint", "joint, clean-key null space"} and draw["null_space_share"] == 0.16
    assert merged["command"] == "run ; run"
    disagree = tmp_path / "disagree.json"
    disagree.write_text(json.dumps(run({"joint": {**joint, "clean_change_pp": -0.2}})))
    with pytest.raises(SystemExit, match="measured twice with different results"):
        merge_variant_runs([paths[0], disagree])
    other_pairs = tmp_path / "other.json"
    other_pairs.write_text(json.dumps(run({"joint": joint}, solo=(5.0,))))
    with pytest.raises(SystemExit, match="other pairs or solo edits"):
        merge_variant_runs([paths[0], other_pairs])


def test_only_the_wide_budget_variant_chooses_its_strength_within_half_a_point_up_to_4():
    s = settings_for("full", "vgg")
    grid, within = strength_choice("joint, 0.5-point budget", s)
    assert max(grid) == 4.0 and within.max_clean_drop == 0.5 and s.max_clean_drop == 0.25
    assert strength_choice("joint", s) == (s.alphas, s)


def test_the_curve_section_pools_each_strength_over_draws():
    def point(alpha, val, drop, clean, score):
        return {"alpha": alpha, "val_score": val, "val_clean_drop_pp": drop, "clean_change_pp": clean, "scores": [score]}

    draws = [
        {"pairs": ["a->b"], "solo": [20.0], "variants": {"joint": {"scores": [10.0], "clean_change_pp": -0.3, "alphas": [0.5]}},
         "joint_curve": [point(0.5, 10.0, 0.1, -0.2, 10.0), point(1.0, 20.0, 0.6, -0.4, 20.0)]},
        {"pairs": ["c->d"], "solo": [10.0], "variants": {"joint": {"scores": [5.0], "clean_change_pp": -0.3, "alphas": [0.5]}},
         "joint_curve": [point(0.5, 12.0, 0.2, -0.4, 5.0), point(1.0, 16.0, 0.8, -0.6, 8.0)]},
    ]
    text = markdown({"command": "test", "archs": {"vgg": {"draws": draws, "seconds": 1}}})
    assert "| vgg | 0.5 | +11.0 | 0.10/0.20 | -0.30 (-0.40) | 0.50 [0.50, 0.50] |" in text
    assert "| vgg | 1 | +18.0 | 0.60/0.80 | -0.50 (-0.60) | 0.90 [0.80, 1.00] |" in text
