"""A tiny end-to-end run of the efficacy benchmark (benchmarks/efficacy/)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from benchmarks import efficacy
from benchmarks.efficacy import units as _units  # noqa: F401  (efficacy.units is patched below)


def _hashes(x: torch.Tensor) -> set[str]:
    return {hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest() for img in x}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficacy")
    seen = {"selection": set(), "test": set(), "n_select": 0}
    select, match, evaluate = efficacy.units.select_strength, efficacy.units.select_by_concept_match, efficacy.units.evaluate_on_test

    def spy_select(model, cands, val_images, *a, **kw):
        seen["selection"] |= _hashes(val_images.images)
        seen["n_select"] += 1
        return select(model, cands, val_images, *a, **kw)

    def spy_match(model, cands, images, *a, **kw):
        seen["selection"] |= _hashes(images.images)
        seen["n_select"] += 1
        return match(model, cands, images, *a, **kw)

    def spy_evaluate(cand, pd, test_idx, test_sets, *a, **kw):
        t = torch.as_tensor(test_idx)
        for v, x in pd.xv.items():
            seen["test"] |= _hashes(x.images[t])
            assert torch.equal(test_sets[v].images, x.images[t])
        return evaluate(cand, pd, test_idx, test_sets, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(efficacy.units, "select_strength", spy_select)
    mp.setattr(efficacy.units, "select_by_concept_match", spy_match)
    mp.setattr(efficacy.units, "evaluate_on_test", spy_evaluate)
    try:
        result = efficacy.main(["--tiny", "--out", str(out)])
    finally:
        mp.undo()
    return out, result, seen


def test_outputs_have_the_expected_keys(tiny_run):
    out, _result, _ = tiny_run
    for ext in ("json", "md", "png"):
        assert (out / f"efficacy_tiny.{ext}").is_file()
    data = json.loads((out / "efficacy_tiny.json").read_text())
    assert data["mode"] == "tiny" and data["restricted_to_correct_originals"] is True
    assert data["command"].startswith("python -m benchmarks.efficacy")
    arch = data["archs"]["tiny"]
    assert {"pairs", "pair_screen", "units", "summary", "clean_test_acc", "candidate_layers"} <= set(arch)
    assert len(arch["pairs"]) == 1 and {"concept", "style", "hurt", "qualifies"} <= set(arch["pairs"][0])
    assert len(arch["units"]) == 1
    unit = arch["units"][0]
    assert set(unit["methods"]) == {"edit", "reference", "finetune local", "finetune global", "edit label-free"}
    for res in unit["methods"].values():
        assert set(res["pct"]) == set(efficacy.GROUPS)
        assert {"clean_acc_change_pp", "logit_shifts", "selection_table", "chosen"} <= set(res)
    summary = arch["summary"]
    assert "N=1/edit" in summary and "N=1/finetune global" in summary
    row = summary["N=1/edit"]
    assert set(efficacy.GROUPS) <= set(row) and "clean_acc_change_pp" in row
    md = (out / "efficacy_tiny.md").read_text()
    assert "| N | method |" in md and "other-nonprefer/same" in md


def test_test_split_never_used_for_selection(tiny_run):
    _, result, seen = tiny_run
    for unit in result["archs"]["tiny"]["units"]:
        val, test, ex = set(unit["val_idx"]), set(unit["test_idx"]), set(unit["exemplar_idx"])
        assert val and test
        assert not val & test and not ex & test and not ex & val
        assert len(val) + len(test) + len(ex) == len(unit["pool_idx"])
    assert seen["n_select"] >= 5 and seen["selection"] and seen["test"]
    assert not seen["selection"] & seen["test"], "a test image was shown to the selection"


def test_bootstrap_interval_contains_the_mean():
    import numpy as np

    lo, hi = efficacy.bootstrap_ci([0.0, 10.0, 20.0, 30.0], 500, np.random.default_rng(0))
    assert lo <= 15.0 <= hi and lo >= 0.0 and hi <= 30.0


def _same(a, b, path="$"):
    """Equal JSON values; floats up to 1e-6 relative (sums over shards are added in another order)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _strip_timing(x):
    if isinstance(x, dict):
        return {k: _strip_timing(v) for k, v in x.items() if k not in ("seconds", "command", "processes")}
    if isinstance(x, list):
        return [_strip_timing(v) for v in x]
    return x


def test_torchrun_two_processes_give_the_same_report(tmp_path):
    """The grid split across 2 torchrun processes (gloo) reports what one process reports."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    args = ["-m", "benchmarks.efficacy", "--tiny", "--pairs", "2", "--name", "grid"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *args, "--out", str(one)], check=True, env=env, cwd=root, capture_output=True)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, "--out", str(two)],
        env=env, cwd=root, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    a = json.loads((one / "grid.json").read_text())
    b = json.loads((two / "grid.json").read_text())
    assert a["processes"] == 1 and b["processes"] == 2 and b["command"].startswith("torchrun --nproc_per_node=2")
    units = b["archs"]["tiny"]["units"]
    assert [u["pair"] for u in units] == [0, 1], "both pairs ran, in order"
    _same(_strip_timing(a), _strip_timing(b))


def test_include_carries_an_earlier_runs_models_and_never_overwrites_it(tiny_run, tmp_path):
    out, _result, _ = tiny_run
    earlier = json.loads((out / "efficacy_tiny.json").read_text())
    earlier["archs"] = {"vgg": earlier["archs"]["tiny"]}  # stands for a model measured in another run
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    result = efficacy.main(["--tiny", "--include", str(path), "--out", str(tmp_path / "new")])
    assert list(result["archs"]) == ["vgg", "tiny"]
    assert result["archs"]["vgg"] == earlier["archs"]["vgg"]
    assert result["command"].startswith(earlier["command"] + " ; ")
    saved = json.loads((tmp_path / "new" / "efficacy_tiny.json").read_text())
    assert list(saved["archs"]) == ["vgg", "tiny"] and "## vgg" in (tmp_path / "new" / "efficacy_tiny.md").read_text()
    before = path.read_bytes()
    with pytest.raises(Exception, match="overwrite|same file|input"):
        efficacy.main(["--tiny", "--include", str(path), "--out", str(tmp_path), "--name", "earlier"])
    assert path.read_bytes() == before
    other = {**earlier, "settings": {**earlier["settings"], "pairs": 7}}
    path.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other settings"):
        efficacy.main(["--tiny", "--include", str(path), "--out", str(tmp_path / "x")])


def test_merge_joins_runs_of_other_models_and_refuses_mismatches(tiny_run, tmp_path):
    out, _result, _ = tiny_run
    run = json.loads((out / "efficacy_tiny.json").read_text())
    shared = run["archs"]["tiny"]
    a = {**run, "archs": {"vgg": shared, "vit": shared}, "command": "run vgg ; python -m benchmarks.efficacy --arch vit"}
    b = {**run, "archs": {"vgg": shared, "convnext": shared}, "command": "run vgg ; python -m benchmarks.efficacy --arch convnext"}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    merged = efficacy.main(["--merge", str(pa), str(pb), "--out", str(tmp_path / "m"), "--name", "all"])
    assert list(merged["archs"]) == ["vgg", "vit", "convnext"]
    assert merged["command"] == "run vgg ; python -m benchmarks.efficacy --arch vit ; python -m benchmarks.efficacy --arch convnext"
    saved = json.loads((tmp_path / "m" / "all.json").read_text())
    assert list(saved["archs"]) == ["vgg", "vit", "convnext"] and "## convnext" in (tmp_path / "m" / "all.md").read_text()
    before = pa.read_bytes()
    with pytest.raises(Exception, match="overwrite|same file|input"):
        efficacy.main(["--merge", str(pa), str(pb), "--out", str(tmp_path), "--name", "a"])
    assert pa.read_bytes() == before
    pb.write_text(json.dumps({**b, "settings": {**b["settings"], "pairs": 7}}))
    with pytest.raises(SystemExit, match="other settings"):
        efficacy.main(["--merge", str(pa), str(pb), "--out", str(tmp_path / "x")])
    pb.write_text(json.dumps({**b, "archs": {"vgg": {**shared, "seconds": -1.0}}}))
    with pytest.raises(SystemExit, match="different results for vgg"):
        efficacy.main(["--merge", str(pa), str(pb), "--out", str(tmp_path / "y")])


def test_edit_lead_is_paired_against_the_better_fine_tuning():
    from benchmarks.efficacy.report import edit_lead

    def unit(n, edit, local, glob):
        return {"n": n, "methods": {m: {"pct": {"other/same": v}} for m, v in
                                    (("edit", edit), ("finetune local", local), ("finetune global", glob))}}

    # global fine-tuning is better on average (+5 vs +1); the edit leads it by 10 and 20 points
    units = [unit(3, 20.0, 0.0, 10.0), unit(3, 20.0, 2.0, 0.0), unit(10, 5.0, None, 0.0)]
    lead = edit_lead(units, (3, 10), reps=200, seed=0)
    assert lead[3]["vs"] == "finetune global" and lead[3]["mean"] == 15.0 and lead[3]["units"] == 2
    assert 10.0 <= lead[3]["ci95"][0] <= lead[3]["ci95"][1] <= 20.0
    assert lead[10] == {"vs": "finetune global", "mean": 5.0, "ci95": [5.0, 5.0], "units": 1}


def test_the_rank_variant_is_led_and_counted_on_its_own_choices():
    from benchmarks.efficacy.report import chosen_layers, edit_lead
    from benchmarks.efficacy.settings import RANK_VARIANTS

    RANK_VARIANT = next(iter(RANK_VARIANTS))

    def unit(n, edit, ranked, rank, local):
        return {"n": n, "methods": {
            "edit": {"pct": {"other/same": edit}, "layer": "fc", "rank": 1},
            RANK_VARIANT: {"pct": {"other/same": ranked}, "layer": None if rank is None else "fc", "rank": rank},
            "finetune local": {"pct": {"other/same": local}},
        }}

    units = [unit(3, 10.0, 14.0, 4, 2.0), unit(3, 10.0, 10.0, 1, 0.0), unit(3, 6.0, 0.0, None, 0.0)]
    assert edit_lead(units, (3,), reps=100, seed=0)[3]["mean"] == pytest.approx(8.0)
    assert edit_lead(units, (3,), reps=100, seed=0, method=RANK_VARIANT)[3]["mean"] == pytest.approx(22.0 / 3)
    over_edit = edit_lead(units, (3,), reps=100, seed=0, method=RANK_VARIANT, over="edit")[3]
    assert over_edit["vs"] == "edit" and over_edit["mean"] == pytest.approx(-2.0 / 3) and over_edit["units"] == 3
    assert chosen_layers(units, RANK_VARIANT, key="rank") == {3: {"4": 1, "1": 1, "no edit": 1}}
    assert chosen_layers(units, RANK_VARIANT) == {3: {"fc": 2, "no edit": 1}}


def test_edit_candidates_make_each_layer_at_the_rank_asked():
    from surgery import collect_key_stats
    from surgery.testbed.protocol import edit_candidates
    from tests.tiny_models import tiny_vit

    model, layer = tiny_vit(), "blocks.1.mlp.fc2"
    x, x2 = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    stats = {layer: collect_key_stats(model, layer, torch.rand(16, 3, 32, 32), progress=False)}
    for rank in (1, 2):
        cands = edit_candidates(model, [layer], stats, x, x2, None, alphas=(0.5, 1.0), rank=rank)
        assert [c.alpha for c in cands] == [0.5, 1.0]
        assert all(c.edit.hparams["rank"] == rank and c.edit.u.shape[0] == rank for c in cands)


def _run_counting_ranks(argv: list[str]) -> tuple[dict, list[int]]:
    """An efficacy run, and the rank of every ``edit_candidates`` call it made."""
    calls = []
    make = efficacy.units.edit_candidates

    def spy(*a, rank=1, **kw):
        calls.append(rank)
        return make(*a, rank=rank, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(efficacy.units, "edit_candidates", spy)
    try:
        return efficacy.main(argv), calls
    finally:
        mp.undo()


def test_rank_variants_make_each_rank_once_per_unit_and_extend_the_one_below(tmp_path):
    """`edit rank 8` selects among the rank-1, rank-4 and rank-8 candidates, reusing those `edit` and
    `edit rank 4` made in the same unit; the report leads each variant over the one below it."""
    result, calls = _run_counting_ranks(
        ["--tiny", "--methods", "edit", "edit rank 4", "edit rank 8", "finetune local", "--out", str(tmp_path), "--name", "ranks"]
    )
    units = result["archs"]["tiny"]["units"]
    assert units and sorted(calls) == sorted([1, 4, 8] * len(units))
    for u in units:
        one, four, eight = (u["methods"][m]["n_candidates"] for m in ("edit", "edit rank 4", "edit rank 8"))
        assert four == 2 * one and eight == 3 * one
        assert u["methods"]["edit rank 8"]["rank"] in (None, 1, 4, 8)
    md = (tmp_path / "ranks.md").read_text()
    assert "Ranks the selection took for `edit rank 4`" in md and "Ranks the selection took for `edit rank 8`" in md
    # the tiny model has no other classes' errors to lead on: give every method a number to see the leads
    for u in units:
        for i, res in enumerate(u["methods"].values()):
            res["pct"]["other/same"] = float(i)
    md = efficacy.report.markdown(result)
    assert "`edit rank 8`'s lead over `edit rank 4` (what its rank-8 candidates add), other classes" in md
    assert "`edit rank 4`'s lead over `edit` (its rank-one candidates alone), other classes" in md


def test_pool_reports_leads_over_the_units_of_runs_that_differ_only_in_seed(tiny_run, tmp_path):
    from benchmarks.efficacy.report import edit_lead

    out, _result, _ = tiny_run
    runs = []
    for seed in (0, 1):
        run = json.loads((out / "efficacy_tiny.json").read_text())
        run["settings"]["seed"] = seed
        for i, u in enumerate(run["archs"]["tiny"]["units"]):
            u["methods"]["edit"]["pct"]["other/same"] = 10.0 + 5 * seed + i
            for m in ("finetune local", "finetune global"):
                u["methods"][m]["pct"]["other/same"] = float(seed)
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps(run))
        runs.append((path, run))
    efficacy.main(["--pool", *(str(p) for p, _ in runs), "--out", str(tmp_path), "--name", "pooled"])
    md = (tmp_path / "pooled.md").read_text()
    units = [u for _, r in runs for u in r["archs"]["tiny"]["units"]]
    lead = edit_lead(units, runs[0][1]["settings"]["ns"], 200, 0)
    n = runs[0][1]["settings"]["ns"][0]
    assert f"N={n} {lead[n]['mean']:+.1f} [" in md and f"({lead[n]['units']} units)" in md
    assert "### `seed0` (seed 0)" in md and "### `seed1` (seed 1)" in md and "--pool" in md
    # another setting than the seed: refused, nothing written
    other = json.loads(runs[1][0].read_text())
    other["settings"]["alphas"] = [0.5]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="not only another seed"):
        efficacy.main(["--pool", str(runs[0][0]), str(tmp_path / "other.json"), "--out", str(tmp_path), "--name", "refused"])
    assert not (tmp_path / "refused.md").exists()


def test_rank_variants_before_edit_still_make_each_rank_once(tmp_path):
    """Whatever the order of --methods, each rank is solved once per unit; `edit` after the rank variants takes
    their rank-one candidates."""
    result, calls = _run_counting_ranks(["--tiny", "--methods", "edit rank 4", "edit rank 8", "--out", str(tmp_path), "--name", "r"])
    assert sorted(calls) == sorted([1, 4, 8] * len(result["archs"]["tiny"]["units"]))
    result, calls = _run_counting_ranks(
        ["--tiny", "--methods", "edit rank 8", "edit", "--out", str(tmp_path), "--name", "r2"]
    )
    units = result["archs"]["tiny"]["units"]
    assert sorted(calls) == sorted([1, 4, 8] * len(units))
    for u in units:
        assert 3 * u["methods"]["edit"]["n_candidates"] == u["methods"]["edit rank 8"]["n_candidates"]
