"""benchmarks.efficacy.ridge: the report of a ridge grid on mlp.fc2 rewrites."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.efficacy.ridge import layer_scale_view, markdown


def _row(pair, ridge, ratio, other, chosen):
    full = {"alpha": 1.0, "other/same": other, "target/same": 50.0, "clean_change_pp": -1.0}
    return {"pair": pair, "layer": "fc2", "ridge": ridge, "norm_ratio": ratio, "full": full,
            "chosen": None if chosen is None else {**full, "alpha": chosen, "clean_change_pp": -0.2}}


def test_markdown_gives_one_row_per_layer_and_ridge_with_pairs_that_qualified():
    rows = [_row("a->b", 0.0, 300.0, 20.0, 0.5), _row("c->d", 0.0, 100.0, 10.0, None),
            _row("a->b", 0.1, 2.0, 4.0, 1.0), _row("c->d", 0.1, 4.0, None, 1.0)]
    result = {"command": "test", "archs": {"convnext": {"layers": ["fc2"], "pairs": ["a->b", "c->d"], "rows": rows, "seconds": 60}}}
    text = markdown(json.loads(json.dumps(result)))
    assert "| convnext | fc2 | 0 | 200 | n/a | n/a | +15.0 | +50.0 | -1.0 | 0.5 | +20.0 | +50.0 | -0.2 | 1/2 |" in text
    assert "| convnext | fc2 | 0.1 | 3 | n/a | n/a | +4.0 | +50.0 | -1.0 | 1/1 | +4.0 | +50.0 | -0.2 | 2/2 |" in text
    rows[0].update(low_scale_share=0.99, norm_ratio_after_scale=40.0)
    rows[1].update(low_scale_share=0.97, norm_ratio_after_scale=20.0)
    assert "| convnext | fc2 | 0 | 200 | 0.980 | 30 | +15.0" in markdown(result)


def test_layer_scale_view_finds_an_update_in_the_channels_the_layer_scale_switches_off():
    gamma = torch.tensor([1e-4, 0.5] + [1.0] * 18)  # the tenth of 20 channels with the smallest gamma: 0 and 1
    weight = torch.ones(20, 3)
    delta = torch.zeros(20, 3)
    delta[0] = 1000.0  # all of the update in the switched-off channel
    delta[5] = 1.0
    view = layer_scale_view(gamma, weight, delta)
    assert view["low_scale_share"] == pytest.approx(1e6 / (1e6 + 1))
    # after gamma: rows 0 and 5 of the update (0.1 and 1 per element) against the weight's rows (1e-4, 0.5, 1 x 18)
    expected = ((3 * 0.1**2 + 3 * 1.0) / (3 * 1e-8 + 3 * 0.25 + 18 * 3)) ** 0.5
    assert view["norm_ratio_after_scale"] == pytest.approx(expected, rel=1e-5)
