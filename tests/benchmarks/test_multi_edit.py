"""benchmarks.multi_edit: retained efficacy of k rules in one model, summarized and drawn."""

from __future__ import annotations

import json
import math

from benchmarks.multi_edit.report import MIN_SOLO, figure, markdown, summarize


def _draw(solo_other, stacked_other, clean=-0.2):
    solo = [{"edit": "e", "layer": "l", "alpha": 1.0, "other/same": s, "target/same": 50.0} for s in solo_other]
    k = len(stacked_other)
    row = {"scores": [{"other/same": v, "target/same": 40.0} for v in stacked_other],
           "clean_change_pp": clean, "edits": ["e"] * k, "overlaps": [0.3] * (k - 1)}
    return {"pairs": ["a->b"] * k, "solo": solo, "k": {str(k): {"stacked": row}}}


def test_retained_is_the_median_ratio_over_rules_whose_solo_edit_worked(tmp_path):
    # four rules: solo 20, 10, 40 and 2 (below MIN_SOLO: not counted); with all four, 10, 10, 20, 9
    draw = _draw([20.0, 10.0, 40.0, MIN_SOLO - 3], [10.0, 10.0, 20.0, 9.0])
    arch = {"draws": [draw], "seconds": 60.0}
    row = summarize(arch)["4/stacked"]
    assert row["rules"] == 4 and row["rules_counted"] == 3
    assert math.isclose(row["retained_median"], 0.5)  # ratios 0.5, 1.0, 0.5
    assert row["retained_ci95"][0] <= 0.5 <= row["retained_ci95"][1]
    assert math.isclose(row["other_same_mean"], 12.25) and math.isclose(row["clean_change_pp_mean"], -0.2)
    result = json.loads(json.dumps({"command": "test", "archs": {"vgg": arch}}))
    text = markdown(result)
    assert "| vgg | 4 | stacked | 4 (3) | 0.50 [" in text
    figure(result, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0
