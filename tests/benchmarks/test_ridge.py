"""benchmarks.efficacy.ridge: the report of a ridge grid on mlp.fc2 rewrites."""

from __future__ import annotations

import json

from benchmarks.efficacy.ridge import markdown


def _row(pair, ridge, ratio, other, chosen):
    full = {"alpha": 1.0, "other/same": other, "target/same": 50.0, "clean_change_pp": -1.0}
    return {"pair": pair, "layer": "fc2", "ridge": ridge, "norm_ratio": ratio, "full": full,
            "chosen": None if chosen is None else {**full, "alpha": chosen, "clean_change_pp": -0.2}}


def test_markdown_gives_one_row_per_layer_and_ridge_with_pairs_that_qualified():
    rows = [_row("a->b", 0.0, 300.0, 20.0, 0.5), _row("c->d", 0.0, 100.0, 10.0, None),
            _row("a->b", 0.1, 2.0, 4.0, 1.0), _row("c->d", 0.1, 4.0, None, 1.0)]
    result = {"command": "test", "archs": {"convnext": {"layers": ["fc2"], "pairs": ["a->b", "c->d"], "rows": rows, "seconds": 60}}}
    text = markdown(json.loads(json.dumps(result)))
    assert "| convnext | fc2 | 0 | 200 | +15.0 | +50.0 | -1.0 | 0.5 | +20.0 | +50.0 | -0.2 | 1/2 |" in text
    assert "| convnext | fc2 | 0.1 | 3 | +4.0 | +50.0 | -1.0 | 1/1 | +4.0 | +50.0 | -0.2 | 2/2 |" in text
