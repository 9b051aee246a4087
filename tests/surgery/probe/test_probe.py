"""surgery.probe: per-class concept sensitivity by transforming one concept at a time."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.probe_testbed import recovery
from surgery.errors import SurgeryError
from surgery.probe.run import PIXEL_STYLES, ProbeResult, probe
from surgery.testbed import (
    CLASS_NAMES,
    CONCEPT_REGION,
    CONCEPTS,
    REGIONS,
    Testbed,
    TestbedConfig,
    TestbedData,
)
from surgery.testbed.probing import scene_inputs

# --------------------------------------------------------------------------------------------------
# A classifier whose rules are known by construction, on real testbed scenes
# --------------------------------------------------------------------------------------------------

K = len(CLASS_NAMES)


class RuleModel(nn.Module):
    """Predicts class ``c`` when it sees ``c``'s object and at least one of ``c``'s preferred concepts.

    The object part is an oracle: a pixel code in row 0 (outside every concept mask) stands in for
    the object. The context part detects each region's concept from the colour and texture of a band
    at the top (backdrop) and bottom (floor) of the image: the nearest concept prototype, or none
    when it is farther than ``tau``. Without a preferred concept it predicts the next class. So
    transforming a preferred concept hurts its class (when the other region shows a non-preferred
    one, ~30% of scenes), and transforming any other concept changes nothing.
    """

    def __init__(self, tb: Testbed, size: int, tau: float = 3.0) -> None:
        super().__init__()
        self.bands, self.tau = ((1, int(0.16 * size)), (int(0.84 * size), size)), tau
        self.regions = [[j for j, c in enumerate(CONCEPTS) if CONCEPT_REGION[c] == r] for r in REGIONS]
        self.register_buffer("pref", torch.tensor([[float(tb.prefers(k, c)) for c in CONCEPTS] for k in range(K)]))
        self.register_buffer("proto", torch.zeros(len(CONCEPTS), 5))
        self.register_buffer("scale", torch.ones(len(REGIONS), 5))

    def band_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for lo, hi in self.bands:
            lum = x[:, :, lo:hi].mean(1)
            grad = (lum[:, :, 1:] - lum[:, :, :-1]).abs().mean((1, 2))
            out.append(torch.cat([x[:, :, lo:hi].mean((2, 3)), lum.flatten(1).std(1)[:, None], grad[:, None]], 1))
        return out

    def fit(self, x: torch.Tensor, data: TestbedData) -> RuleModel:
        for r, (f, idx) in enumerate(zip(self.band_features(x), self.regions)):
            self.scale[r] = f.std(0)
            for j in idx:
                self.proto[j] = f[data.has_concept(CONCEPTS[j])].mean(0)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = torch.zeros(len(x), len(CONCEPTS))
        for r, (f, idx) in enumerate(zip(self.band_features(x), self.regions)):
            d, j = (f[:, None] - self.proto[idx]).div(self.scale[r]).square().sum(2).min(1)
            near = d < self.tau**2
            seen[near.nonzero()[:, 0], torch.tensor(idx)[j[near]]] = 1.0
        code = x[:, 0, 0, :K].argmax(1)
        ok = (seen * self.pref[code]).sum(1) >= 1
        return nn.functional.one_hot(torch.where(ok, code, (code + 1) % K), K).float()


def _stamp(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, 0] = 0.0
    x[torch.arange(len(x)), 0, 0, labels] = 1.0
    return x


PAINT = {
    "paint": lambda x, m: torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand_as(x),
    "invert": lambda x, m: 1.0 - x,
}


@pytest.fixture(scope="module")
def scenes():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensor ops: a second thread only waits on a busy 2-core machine
    try:
        tb = Testbed(TestbedConfig(size=64), seed=0)
        train, test = tb.make_dataset(300, "train"), tb.make_dataset(1200, "test")
        model = RuleModel(tb, 64).fit(train.float_images(), train).eval()
        yield tb, test, model
    finally:
        torch.set_num_threads(threads)


def test_probe_recovers_each_class_preferred_concepts(scenes):
    tb, test, model = scenes
    masks = {c: test.mask(c).clone() for c in CONCEPTS}
    for m in masks.values():
        m[:, 0] = False  # the object code
    res = probe(model, _stamp(test.float_images(), test.labels), test.labels, masks, PAINT,
                class_names=CLASS_NAMES, n_boot=100, min_images=3)
    m = res.drop_matrix()
    for k in range(K):
        pref = [j for j, c in enumerate(CONCEPTS) if tb.prefers(k, c)]
        other = [j for j, c in enumerate(CONCEPTS) if not tb.prefers(k, c) and np.isfinite(m[k, j])]
        assert len(pref) == 2 and np.isfinite(m[k, pref]).all() and len(other) >= 4
        assert m[k, pref].min() > m[k, other].max(), (CLASS_NAMES[k], m[k])
        assert {c.concept for c in res.rules(top_k=2)[CLASS_NAMES[k]]} == {CONCEPTS[j] for j in pref}
    rec = recovery(res, tb)
    assert rec["n_classes"] == K and rec["top1_preferred"] == rec["mean_auc"] == rec["both_in_top2"] == 1.0


def test_testbed_transform_re_renders_only_the_concept(scenes):
    tb, test, _ = scenes
    images, _, masks, transform = scene_inputs(tb, test)
    index = masks["grass"].flatten(1).any(1).nonzero().flatten()[:8]
    changed = (transform("grass", "snow", index) != images[index]).any(1)
    # restyling may also touch the object's soft edge where it blends with the region (testbed README)
    allowed = masks["grass"][index] | test.mask("object")[index]
    assert changed.any() and not (changed & ~allowed).any()


# --------------------------------------------------------------------------------------------------
# Bootstrap intervals, on a model whose accuracy is known by construction
# --------------------------------------------------------------------------------------------------


class LeftHalf(nn.Module):
    """Class 1 when the mean of channel 0 over the left half exceeds 0.5, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0, :, : x.shape[3] // 2].mean((1, 2))
        return self.w * (v[:, None] - 0.5)


def _half_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 1, 1, generator=g).expand(n, 3, 8, 8).clone()
    masks = {"left": torch.zeros(n, 8, 8, dtype=torch.bool), "right": torch.zeros(n, 8, 8, dtype=torch.bool)}
    masks["left"][:, :, :4] = True
    masks["right"][:, :, 4:] = True
    return x, torch.ones(n, dtype=torch.long), masks


ZERO = {"zero": lambda x, m: torch.zeros_like(x)}


def test_bootstrap_interval_contains_the_estimate_and_shrinks():
    model = LeftHalf().eval()
    widths = []
    for n in (40, 640):
        x, y, masks = _half_data(n)
        res = probe(model, x, y, masks, ZERO, n_boot=400, min_images=5, seed=1)
        (row,) = [r for r in res.rows if r.label == 1 and r.concept == "left"]
        assert row.acc_after == 0.0 and row.drop == pytest.approx(row.acc_before - row.acc_after)
        assert 20 < row.acc_before < 80 and row.ci_low <= row.drop <= row.ci_high
        (right,) = [r for r in res.rows if r.label == 1 and r.concept == "right"]
        assert right.drop == 0.0 and right.ci_low == right.ci_high == 0.0  # the model never looks there
        assert not [r for r in res.rows if r.label == 0]  # no image of class 0: no rows at all
        widths.append(row.ci_high - row.ci_low)
    assert widths[1] < 0.5 * widths[0]
    again = probe(model, x, y, masks, ZERO, n_boot=400, seed=1)
    assert [r.ci_low for r in again.rows if not r.skipped] == [r.ci_low for r in res.rows if not r.skipped]


def test_min_images_skips_small_cells():
    x, y, masks = _half_data(12)
    res = probe(LeftHalf().eval(), x, y, masks, ZERO, n_boot=10, min_images=13)
    assert all(r.skipped and r.n in (0, 12) and math.isnan(r.drop) for r in res.rows)
    assert res.rules() == {} and res.concept_sensitivity() == []


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def _bad_cases():
    x, y, masks = _half_data(10)
    return {
        "labels": ({"labels": y[:9]}, "shape (10,)"),
        "label range": ({"labels": y + 5}, "must lie in [0, 1]"),
        "mask shape": ({"masks": {"left": masks["left"][:, :4]}}, "the mask of 'left' must have shape (10, 8, 8)"),
        "mask count": ({"masks": {"left": masks["left"][:9]}}, "one mask per image"),
        "soft mask": ({"masks": {"left": masks["left"].float() * 0.7}}, "threshold soft masks"),
        "no masks": ({"masks": {}}, "non-empty dict"),
        "class names": ({"class_names": ["a", "b", "c"]}, "one name per model output (2); got 3 names"),
        "concepts": ({"concepts": ["sky"]}, "have no mask"),
        "styles": ({"styles": {"zero": 3}}, "styles must be a non-empty dict"),
        "style output": ({"styles": {"crop": lambda x, m: x[:, :, :4]}}, "must return a tensor of the shape"),
        "transform output": ({"styles": ["s"], "transform": lambda c, s, i: torch.zeros(2, 3, 8, 8)}, "must return the"),
        "n_boot": ({"n_boot": 0}, "n_boot must be a positive int"),
        "images": ({"images": x[0]}, "shape (N, 3, H, W)"),
        "uint8 without preprocess": ({"images": (x * 255).to(torch.uint8)}, "floating-point"),
    }, {"images": x, "labels": y, "masks": masks, "styles": ZERO}


@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_bad_inputs_raise_and_leave_the_model_unchanged(case):
    cases, good = _bad_cases()
    kwargs, message = cases[case]
    model = LeftHalf().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        probe(model, **{**good, **kwargs}, min_images=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


def test_a_model_in_training_mode_is_refused_and_left_in_training_mode():
    x, y, masks = _half_data(10)
    model = LeftHalf().train()
    with pytest.raises(SurgeryError, match="eval mode"):
        probe(model, x, y, masks, ZERO)
    assert model.training


# --------------------------------------------------------------------------------------------------
# Outputs and the CLI
# --------------------------------------------------------------------------------------------------


def test_outputs_are_written(tmp_path):
    x, y, masks = _half_data(30)
    y[:10] = 0
    res = probe(LeftHalf().eval(), x, y, masks, {**ZERO, "gray": PIXEL_STYLES["gray"]}, class_names=["neg", "pos"], n_boot=50)
    assert isinstance(res, ProbeResult) and len(res.rows) == 2 * 2 * 2 and len(res.cells) == 4
    res.to_csv(tmp_path / "p.csv")
    res.to_json(tmp_path / "sub" / "p.json")
    res.heatmap(tmp_path / "p.png", highlight={(1, "left")})
    res.bar_charts(tmp_path / "bars.png")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("label,class_name,concept,style,n,acc_before") and len(lines) == 9
    doc = json.loads((tmp_path / "sub" / "p.json").read_text())
    assert doc["class_names"] == ["neg", "pos"] and len(doc["rows"]) == 8 and doc["meta"]["n_boot"] == 50
    for f in ("p.png", "bars.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
    assert res.concept_sensitivity()[0]["concept"] == "left"
    assert "| pos | left" in res.to_markdown()


def test_cli_probe_on_the_testbed(tmp_path, capsys):
    from surgery.cli.main import main

    pytest.importorskip("safetensors")
    rc = main(["probe", "--testbed", "vgg", "--n", "40", "--styles", "snow", "--n-boot", "20",
               "--min-images", "1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "rules of the testbed vgg" in out and "t-shirt:" in out
    for name in ("probe_vgg.csv", "probe_vgg.json", "probe_vgg.md", "probe_vgg.png", "probe_vgg_bars.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert main(["probe", "--testbed", "vgg", "--styles", "glitter", "--out", str(tmp_path)]) == 2
    assert "unknown style(s) glitter" in capsys.readouterr().err
