"""Statistics carry their whitening: C^-1/2 is computed once per KeyStats, kept in its file, and every
edit reuses it (issue 16, point 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import surgery.solvers.direction as direction_mod
import surgery.stats.keystats as keystats_mod
from surgery.errors import SurgeryError
from surgery.rewrite import rewrite
from surgery.stats.collect import collect_key_stats
from surgery.stats.keystats import KeyStats
from surgery.stats.whitening import inverse_sqrt
from tests.tiny_models import randomize_batchnorm

LAYER = "layer3.0.conv3"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(timm.create_model("test_resnet")).eval()


@pytest.fixture(scope="module")
def stats(model: torch.nn.Module) -> KeyStats:
    return collect_key_stats(model, LAYER, torch.randn(40, 3, 32, 32), progress=False)


def _counting(monkeypatch: pytest.MonkeyPatch, module: object) -> list[int]:
    calls: list[int] = []

    def counted(moment: torch.Tensor, **kw: object) -> torch.Tensor:
        calls.append(moment.shape[0])
        return inverse_sqrt(moment, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "inverse_sqrt", counted)
    return calls


def test_whitening_is_computed_once_and_again_after_a_change(stats: KeyStats, monkeypatch: pytest.MonkeyPatch) -> None:
    st = KeyStats(stats.layer, stats.sum.clone(), stats.count, stats.dtype)
    calls = _counting(monkeypatch, keystats_mod)
    z = st.whitening()
    assert st.whitening() is z and len(calls) == 1
    assert torch.equal(z, inverse_sqrt(st.moment()))  # what an edit would have computed itself
    st.sum.mul_(4.0)  # changed in place: the cached whitening no longer belongs to it
    assert torch.allclose(st.whitening(), z / 2, rtol=1e-9) and len(calls) == 2
    st.count *= 4
    assert torch.allclose(st.whitening(), z, rtol=1e-9) and len(calls) == 3


def test_the_file_keeps_the_whitening(stats: KeyStats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = stats.save(tmp_path / "s.safetensors")
    calls = _counting(monkeypatch, keystats_mod)
    loaded = KeyStats.load(path)
    assert torch.equal(loaded.whitening(), stats.whitening()) and calls == []


def test_version_1_files_still_read(stats: KeyStats, tmp_path: Path) -> None:
    path = tmp_path / "v1.safetensors"
    save_file({"sum": stats.sum}, path, metadata={**stats.metadata(), "format_version": "1"})
    loaded = KeyStats.load(path)
    assert torch.equal(loaded.sum, stats.sum)
    assert torch.equal(loaded.whitening(), inverse_sqrt(stats.moment()))


def test_a_whitening_from_other_statistics_is_refused(stats: KeyStats, tmp_path: Path) -> None:
    good = KeyStats.load(stats.save(tmp_path / "good.safetensors"))
    meta = {**good.metadata(), "whitening_of": keystats_mod.tensor_sha256(good.sum)}
    cases = {
        "stale": ({"sum": good.sum * 2, "whitening": good.whitening()}, meta, "not computed from its sum"),
        "shape": ({"sum": good.sum, "whitening": good.whitening()[:3]}, meta, "whitening is"),
        "nan": ({"sum": good.sum, "whitening": good.whitening() * float("nan")}, meta, "not finite"),
    }
    for name, (tensors, md, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path, metadata=md)
        with pytest.raises(SurgeryError, match=match):
            KeyStats.load(path)


def test_edits_reuse_it_and_equal_those_from_the_raw_moment(
    model: torch.nn.Module, stats: KeyStats, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.rand(2, 3, 32, 32)
    x2 = x.clone()
    x2[:, :, 8:20, 8:20] = 0.9
    raw = rewrite(model, LAYER, x, x2, stats=stats.moment(), steps=5)
    stats.whitening()
    calls = _counting(monkeypatch, direction_mod)
    cached = [rewrite(model, LAYER, x, x2, stats=stats, steps=5) for _ in range(3)]
    assert calls == [], "an edit with KeyStats decomposed the moment again"
    for edit in cached:
        assert torch.equal(edit.u, raw.u) and torch.equal(edit.lam, raw.lam)
