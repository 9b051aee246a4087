"""benchmarks.walkthrough: the real EfficientNet-Lite0 on two bundled photos, one edit (offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

import surgery
from benchmarks.walkthrough import run_walkthrough
from benchmarks.walkthrough.held_out import MEASURED
from benchmarks.walkthrough.make_masks import MASKS, draw, mask_path
from surgery.errors import SurgeryError
from surgery.inputs.masks import load_masks
from surgery.models.loading import load_model


def test_shipped_masks_match_their_definitions():
    for photo, (_, size, _) in MASKS.items():
        path = mask_path(photo)
        assert path.is_file(), f"run python -m benchmarks.walkthrough.make_masks ({path} is missing)"
        mask = load_masks(path, size=size[::-1])[0, 0] >= 0.5
        assert 0.05 < float(mask.float().mean()) < 0.8
        assert (mask.numpy() == (np.asarray(draw(photo)) >= 128)).all()


def test_walkthrough_on_two_photos(tmp_path):
    res = run_walkthrough(
        ["rocket", "coffee"], exemplar="rocket", crops_per_photo=0, out_dir=tmp_path, name="w",
        held_out_layers=["conv_head", "blocks.6.0.conv_pwl"], measured_pool=2,
    )
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"w.{ext}").stat().st_size > 0
    assert json.loads((tmp_path / "w.json").read_text())["summary"] == res["summary"]
    rows = {r["photo"]: r for r in res["rows"]}
    assert rows["rocket"]["flipped"]  # gravel in the sky: no longer a missile
    assert rows["rocket"]["p_original_textured_edited"] > rows["rocket"]["p_original_textured"]
    assert res["edit"]["objective_after"] < res["edit"]["objective_before"]
    for r in res["rows"]:  # the edit leaves clean photos alone
        assert r["clean_top1_unchanged"]
        assert r["clean_max_abs_prob_change"] < 0.02
    assert "## (b) One edit" in (tmp_path / "w.md").read_text()
    # (c): the photo the texture flips, edited from the other photo alone, at each layer and strength
    held = res["held_out"]
    assert [(r["layer"], r["alpha"]) for r in held] == [
        ("conv_head", 1.0), ("conv_head", 2.0), ("blocks.6.0.conv_pwl", 1.0), ("blocks.6.0.conv_pwl", 2.0),
        (MEASURED, 1.0), (MEASURED, 2.0),
    ]
    assert all(r["held_out"] == ["rocket"] and r["exemplars"] == 1 and r["site"] == "skip-free" for r in held)
    # the measured row edits, for the held-out rocket, the better of the model's first two candidates as
    # rank_layers scores them on the other photo (coffee) alone
    two = [l.name for l in surgery.recommended_layers(load_model("surgery:efficientnet_lite0"), k=2)]
    choice = res["measured_choice"]["rocket"]
    assert choice["layer"] in two and held[-1]["layers"] == {"rocket": choice["layer"]}
    assert 0.0 <= choice["score"] and f"rocket: `{choice['layer']}`" in (tmp_path / "w.md").read_text()
    assert all(set(r["restored"]) <= {"rocket"} for r in held)
    assert "## (c) Several exemplars" in (tmp_path / "w.md").read_text()


def test_walkthrough_rejects_bad_photos(tmp_path):
    with pytest.raises(SurgeryError, match="exemplar"):
        run_walkthrough(["coffee"], exemplar="rocket", out_dir=None)
