"""The efficacy anatomy: value changes split into skip and branch, and what one edit leaves."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.efficacy.anatomy import measure_layer
from tests.tiny_models import tiny_vit


def test_skip_share_and_what_an_edit_leaves_on_a_vit():
    vit = tiny_vit()
    x0 = torch.randn(16, 3, 32, 32)
    x1 = x0.clone()
    x1[:, :, 16:] += 0.5  # the same change on every scene's lower half: one edit can undo most of it
    r = measure_layer(vit, "blocks.1.mlp.fc2", torch.eye(128), x0, x1, 8, np.random.default_rng(0))
    assert set(r["dv"]) == {"grid", "class token"}
    # the skip carries the change made before the block; the ratio of norms is positive and finite
    assert all(0 < v < 10 for v in r["skip_share"].values())
    assert 0 < r["left_after_edit"]["grid"] < 1  # the edit removes part of the change on held-out scenes
    same = measure_layer(vit, "blocks.1.mlp.fc2", torch.eye(128), x0, x0 + 0.0, 8, np.random.default_rng(0))
    assert same["dv"]["grid"] == 0.0
