"""benchmarks.cost_curves: every sweep point is measured and written (quick grids)."""

from __future__ import annotations

import json

from benchmarks import cost_curves


def test_quick_cost_curves_write_every_point(tmp_path):
    result = cost_curves.main(["--quick", "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "cost_curves_quick.json").read_text())
    assert stored["images"] == result["images"]
    for sweep, (key, _) in cost_curves.AXES.items():
        assert [p[key] for p in stored[sweep]] == list(cost_curves.QUICK[sweep])
        for p in stored[sweep]:
            assert all(p[t] > 0 for t in cost_curves.TIMES)
            assert p["solve_in_objective_evals"] == p["solve_seconds"] / p["objective_eval_seconds"]
    assert [p["channels"] for p in stored["width"]] == list(cost_curves.QUICK["width"])
    assert (tmp_path / "cost_curves_quick.png").stat().st_size > 10_000
    assert "| layer width (channels) |" in (tmp_path / "cost_curves_quick.md").read_text()
