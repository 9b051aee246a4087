"""The breadth benchmark runs end to end on three small models and its report says what it measured."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

import surgery
from surgery.adapters import get_adapter
from surgery.evaluation import rank_layers

from benchmarks import breadth
from benchmarks.breadth.driver import model_specs, prepare_run, run_model, study_command, study_models
from benchmarks.breadth.rank import markdown as rank_markdown
from benchmarks.breadth.report import figure


def test_breadth_runs_on_three_small_models(tmp_path):
    images = dict(exemplars=2, held_out=4, clean=4, calibration=16)
    res = breadth.run(["tv_mobilenet_v3_small", "vit_tiny_patch16_224", "resmlp_12_224"], k=1, images=images)
    assert [m["model"] for m in res["models"]] == ["tv_mobilenet_v3_small", "vit_tiny_patch16_224", "resmlp_12_224"]
    for m in res["models"]:
        assert "error" not in m, m
        assert not m["generic_fallback"] and m["adapter"] != "GenericAdapter"
        (row,) = m["rows"]
        assert "error" not in row, row
        assert row["block_forward_rel_err"] < 1e-5
        for key in ("value_ratio", "exemplar_ratio", "heldout_ratio", "clean_change"):
            assert math.isfinite(row[key]) and row[key] >= 0
        assert row["exemplar_ratio"] < 1  # the edit moves the exemplars toward their originals
    vit_row = res["models"][1]["rows"][0]
    assert vit_row["prefix_weight"] == 36.0  # the class token weighs as much as the 6x6 grid
    md = breadth.markdown({**res, "command": "python -m benchmarks.breadth --models ..."})
    assert md.startswith("# Breadth") and "vit_tiny_patch16_224" in md and "| model |" in md
    assert {row["site"] for m in res["models"] for row in m["rows"]} <= {"skip-free", "residual"}
    assert vit_row["site"] == "residual"  # the ViT's MLP output is read after the add
    figure_path = tmp_path / "breadth.png"
    figure(res, figure_path)
    assert figure_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_concept_and_images():
    x = breadth.smooth_images(3, 32, seed=0)
    x2, masks = breadth.paste_concept(x, seed=1)
    assert x.shape == x2.shape == (3, 3, 32, 32) and masks.shape == (3, 1, 32, 32)
    inside = masks.bool().expand_as(x)
    assert not x2[~inside].ne(x[~inside]).any() and x2[inside].ne(x[inside]).any()
    tex = breadth.concept_texture(8)
    assert (tex[:, :2, :2].repeat(1, 4, 4) == tex).all()  # a 2x2 tile: the same in every even patch


def test_along_and_off_split_a_change_into_its_share_toward_the_target_and_the_rest():
    from benchmarks.breadth.clip_prefix import along_and_off

    before = torch.zeros(2, 3, 2)
    target = torch.zeros(2, 3, 2)
    target[:, 0, 0] = 2.0
    after = 0.5 * target
    after[:, 1, 1] = 3.0  # off the line toward the target: 3 against a distance of 2
    along, off = along_and_off(before, after, target)
    assert abs(along - 0.5) < 1e-12 and abs(off - 1.5) < 1e-12


def test_rank_rows_per_model_and_their_report():
    images = dict(exemplars=2, held_out=4, clean=4, calibration=16)
    spec = next(s for s in breadth.MODELS if s.id == "tv_mobilenet_v3_small")
    m = run_model(spec, mode="recommended", k=1, images=images, ranks=(1, 2), loss_masks=(False, True))
    assert [(row["rank"], row["use_mask"]) for row in m["rows"]] == [(1, False), (1, True), (2, False), (2, True)]
    assert len({row["layer"] for row in m["rows"]}) == 1  # one site, four edits of it
    ratios = [row["exemplar_ratio"] for row in m["rows"]]
    assert ratios[0] != ratios[2] and ratios[0] != ratios[1]  # the second direction, and the masked loss, change the edit
    md = rank_markdown({"command": "test", "ranks": [1, 2], "loss_masks": [False, True], "models": [m]})
    assert "| tv_mobilenet_v3_small | `" in md and "held-out r=2 |" in md and "held-out r=2, masked loss |" in md
    assert f"rank 2 {m['rows'][2]['heldout_ratio']:.3f}" in md
    assert f"rank 2, masked loss {m['rows'][3]['heldout_ratio']:.3f}" in md
    off = m["rows"][0]["value_change_off_mask"]
    assert 0.0 <= off <= 1.0 and f"tv_mobilenet_v3_small {off:.2f}" in md


def test_strength_rows_match_the_breadth_edit_and_the_choice_ignores_the_held_out_images():
    from benchmarks.breadth.strength import markdown as strength_markdown
    from benchmarks.breadth.strength import measure_strengths

    images = dict(exemplars=2, held_out=4, clean=4, calibration=16)
    spec = next(s for s in breadth.MODELS if s.id == "tv_mobilenet_v3_small")
    m = measure_strengths(spec, (0.5, 1.0, 2.0), images=images)
    (site,) = run_model(spec, mode="recommended", k=1, images=images)["rows"]
    one = next(r for r in m["rows"] if r["alpha"] == 1.0)
    assert m["layer"] == site["layer"]
    for key in ("exemplar_ratio", "heldout_ratio", "clean_change"):  # strength 1 is the breadth run's edit
        assert abs(one[key] - site[key]) < 1e-6
    assert [r["clean_change"] for r in m["rows"]] == sorted(r["clean_change"] for r in m["rows"])
    chosen = min(m["rows"], key=lambda r: r["exemplar_ratio"])
    assert m["chosen_alpha"] == chosen["alpha"]
    md = strength_markdown({"command": "test", "alphas": [0.5, 1.0, 2.0], "models": [m]})
    assert f"| {m['chosen_alpha']:g} | {chosen['heldout_ratio']:.3f} |" in md
    assert f"strength 1 {one['heldout_ratio']:.3f}" in md


def test_span_rows_beside_the_site_and_their_report():
    from benchmarks.breadth.span import markdown as span_markdown
    from benchmarks.breadth.span import run_model as span_run_model

    images = dict(exemplars=2, held_out=4, clean=4, calibration=16)
    m = span_run_model("vit_tiny_patch16_224", sizes=(2, 3), images=images)
    rows = {row["choice"]: row for row in m["rows"]}
    assert list(rows) == ["site", "family K=2", "family K=3", "deepest K=2", "deepest K=3"]
    assert all("error" not in row for row in rows.values()), m["rows"]
    assert rows["site"]["site"] == "residual" and "+" not in rows["site"]["layer"]
    span = rows["deepest K=3"]
    assert span["site"] == "span" and span["layer"] == "+".join(f"blocks.{i}.mlp.fc2" for i in (9, 10, 11))
    assert len(span["value_objective_ratio"]) == 3  # one solve per layer of the span
    assert span["gap_at_last"][-1] < span["gap_at_last"][0]  # the span closes part of the gap at its end
    assert span["exemplar_ratio"] < 1
    md = span_markdown({"command": "test", "sizes": [2, 3], "models": [m]})
    assert f"| vit_tiny_patch16_224 | {rows['site']['heldout_ratio']:.3f} (" in md and "`blocks.11.mlp.fc2`" in md
    diff = rows["deepest K=3"]["heldout_ratio"] - rows["site"]["heldout_ratio"]
    assert f"deepest K=3: median {diff:+.3f}, lower on {int(diff < 0)} of 1" in md


def test_measured_ranking_follows_the_real_edit_on_a_vit():
    """timm ``vit_tiny_reg4_gap`` (random weights, the breadth data): the default edit at an MLP output moves
    held-out images' logits to 0.48-0.52 of their distance, at an attention output to 0.94-0.97 (breadth
    run). ``rank_layers`` with the clean images' statistics ranks every MLP output first; the former quick
    proxy (L2, 10 iterations, the transformed keys in the moment) put the attention outputs first."""
    images = dict(exemplars=4, held_out=2, clean=2, calibration=16)
    data, model, _ = prepare_run(model_specs(["vit_tiny_reg4_gap"])["vit_tiny_reg4_gap"], images=images)
    pool = get_adapter(model).candidates(model)[:6]
    ranked = rank_layers(model, data.x, data.x2, data.masks, layers=pool, data=data.calibration)
    kinds = ["mlp" if layer.name.endswith("mlp.fc2") else "attn" for layer, _ in ranked]
    assert sorted(kinds) == ["attn"] * 3 + ["mlp"] * 3 and kinds == ["mlp"] * 3 + ["attn"] * 3, ranked
    assert ranked[2][1] < ranked[3][1] - 0.3  # measured 0.49 against 0.95


def test_measured_mode_edits_the_layer_ranked_first_on_the_exemplars():
    images = dict(exemplars=2, held_out=2, clean=2, calibration=8)
    res = breadth.run(["tv_mobilenet_v3_small"], mode="measured", k=1, images=images)
    (row,) = res["models"][0]["rows"]
    data, model, _ = prepare_run(model_specs(["tv_mobilenet_v3_small"])["tv_mobilenet_v3_small"], images=images)
    pool = get_adapter(model).candidates(model)[:12]
    best = rank_layers(model, data.x, data.x2, data.masks, layers=pool, data=data.calibration)[0][0]
    assert res["mode"] == "measured" and row["layer"] == best.name


def test_reach_fits_the_held_out_images_and_edits_sites_in_sequence():
    from benchmarks.breadth.reach import markdown as reach_markdown
    from benchmarks.breadth.reach import measure_reach

    images = dict(exemplars=2, held_out=4, clean=4, calibration=16)
    spec = next(s for s in breadth.MODELS if s.id == "tv_mobilenet_v3_small")
    m = measure_reach(spec.id, layers=3, chain=3, ranks=(1, 4), images=images)
    (site,) = run_model(spec, mode="recommended", k=1, images=images)["rows"]
    first = m["rows"][0]
    assert [row["layer"] for row in m["rows"]][0] == site["layer"] and len(m["rows"]) == 3
    for key in ("exemplar_ratio", "heldout_ratio", "clean_change"):  # the exemplar-fitted edit is the breadth run's
        assert abs(first["exemplars"][key] - site[key]) < 1e-6
    for row in m["rows"]:  # fitted on the held-out images themselves, rank 4 moves them further than rank 1
        assert row["held-out r=4"]["heldout_ratio"] < min(row["held-out r=1"]["heldout_ratio"], 1)
        assert row["held-out r=1"]["exemplar_ratio"] != row["exemplars"]["exemplar_ratio"]
    assert min(r["held-out r=1"]["heldout_ratio"] for r in m["rows"]) < min(r["exemplars"]["heldout_ratio"] for r in m["rows"])
    order = [l.name for l in surgery.editable_layers(prepare_run(spec, images=images)[1])]
    assert [len(s["layers"]) for s in m["sequences"]] == [2, 3]
    for seq in m["sequences"]:
        assert seq["layers"] == sorted(seq["layers"], key=order.index)
    alone = {row["layer"]: row["exemplars"]["exemplar_ratio"] for row in m["rows"]}
    assert all(m["sequences"][-1]["exemplar_ratio"] != r for r in alone.values())  # all three edits applied
    md = reach_markdown({"command": "test", "layers": 3, "chain": 3, "ranks": [1, 4], "models": [m]})
    assert f"| tv_mobilenet_v3_small | `{site['layer']}` | {site['heldout_ratio']:.3f} |" in md
    seq = m["sequences"][0]
    assert f"| tv_mobilenet_v3_small | {seq['heldout_ratio']:.3f} ({seq['exemplar_ratio']:.3f}; {seq['clean_change']:.3f})" in md


def test_reach_join_keeps_the_zoo_order_and_refuses_runs_that_do_not_fit(tmp_path):
    from benchmarks.breadth.reach import join_runs

    def run(name: str, models: list[str], layers: int = 12) -> Path:
        path = tmp_path / f"{name}.json"
        result = {"command": f"run {name}", "layers": layers, "chain": 3, "ranks": [1, 4],
                  "models": [{"model": m, "rows": [], "sequences": []} for m in models]}
        path.write_text(json.dumps(result))
        return path

    zoo = [s.id for s in breadth.MODELS]
    a, b = run("a", [zoo[5], zoo[1]]), run("b", [zoo[3]])
    joined = join_runs([a, b], "join")
    assert [m["model"] for m in joined["models"]] == [zoo[1], zoo[3], zoo[5]]
    assert joined["command"] == "run a ; run b ; join" and joined["layers"] == 12
    with pytest.raises(SystemExit, match="differ in --layers"):
        join_runs([a, run("c", [zoo[7]], layers=3)], "join")
    with pytest.raises(SystemExit, match="more than one run"):
        join_runs([a, run("d", [zoo[1]])], "join")


@pytest.mark.parametrize("study", ["rank", "ranking", "reach", "span", "strength"])
def test_every_study_reads_its_models_through_the_shared_command_line(study, tmp_path):
    main = importlib.import_module(f"benchmarks.breadth.{study}").main
    with pytest.raises(SystemExit, match=r"unknown model ids \['no_such_model'\]"):
        main(["--models", "no_such_model", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written
    assert study_models("") == [s.id for s in breadth.MODELS]
    assert study_models("convnext_atto,tv_swin_t") == ["convnext_atto", "tv_swin_t"]
    assert study_command(f"benchmarks.breadth.{study}", ["--models", "a"]) == (
        f"OMP_NUM_THREADS=1 python -m benchmarks.breadth.{study} --models a"
    )


def test_reach_command_writes_its_report_and_no_partial_file_once_done(tmp_path):
    from benchmarks.breadth.reach import main as reach_main

    result = reach_main(["--models", "tv_mobilenet_v3_small", "--layers", "2", "--chain", "2", "--ranks", "1",
                         "--out", str(tmp_path), "--name", "r"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))
    (m,) = result["models"]
    assert len(m["rows"]) == 2 and [len(s["layers"]) for s in m["sequences"]] == [2]
