"""Span edits (surgery.span): one edit over several residual blocks, applied, saved and reverted as a whole."""

from __future__ import annotations

import pytest
import timm
import torch

from surgery import SurgeryError, apply_edit, collect_key_stats, edited, revert_edit, rewrite
from surgery.edits.edit import Edit
from surgery.edits.file import read_edit_metadata
from tests.strategies import state_hashes
from tests.tiny_models import randomize_layer_scale

SIZE = 128  # stage 3 of convnext_atto at 4 x 4
A, B = "stages.3.blocks.0.mlp.fc2", "stages.3.blocks.1.mlp.fc2"


@pytest.fixture(scope="module")
def atto():
    """timm convnext_atto with random weights (layer scales made to matter), three exemplars whose lower
    half shows one pasted "concept", and key statistics of both stage-3 fc2 layers."""
    torch.manual_seed(0)
    model = randomize_layer_scale(timm.create_model("convnext_atto")).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE, generator=g)
    x2 = x.clone()
    x2[:, :, SIZE // 2 :] = torch.randn(1, 3, SIZE // 2, SIZE, generator=g)
    data = torch.randn(128, 3, SIZE, SIZE, generator=g)
    stats = {layer: collect_key_stats(model, layer, data, progress=False) for layer in (A, B)}
    return model, x, x2, stats


def _logit_distance(model, x, x2, edit: Edit | None = None) -> float:
    """Mean distance of the transformed exemplars' logits to the unedited model's logits of the originals."""
    with torch.no_grad():
        target = model(x)
        if edit is None:
            return float((model(x2) - target).norm(dim=1).mean())
        with edited(model, edit):
            return float((model(x2) - target).norm(dim=1).mean())


def test_a_span_edit_of_convnext_atto_is_one_file_reverts_exactly_and_beats_each_layer_alone(atto, tmp_path):
    model, x, x2, stats = atto
    before = state_hashes(model)
    span = rewrite(model, [A, B], x, x2, stats=stats)
    assert state_hashes(model) == before  # rewrite leaves the model alone
    assert span.layers == [A, B] and span.hparams["span"] == [A, B] and span.hparams["schedule"] == "memit"
    gaps = span.info["gap_at_last"]
    assert len(gaps) == 3 and gaps[-1] < gaps[0]  # the gap at B shrinks with each layer's share

    path = tmp_path / "span.safetensors"
    span.save(path)
    assert read_edit_metadata(path)["format_version"] == "3"
    loaded = Edit.load(path)
    assert loaded.layers == [A, B]
    handle = apply_edit(model, path)
    assert state_hashes(model) != before
    assert revert_edit(model, handle).through_handle
    assert state_hashes(model) == before

    # measured (random weights): 9.857 -> A alone 0.999, B alone 0.957, the span 0.956 of the distance
    d0 = _logit_distance(model, x, x2)
    alone = [_logit_distance(model, x, x2, rewrite(model, layer, x, x2, stats=stats[layer])) for layer in (A, B)]
    together = _logit_distance(model, x, x2, span)
    assert together < min(alone) < d0, (d0, alone, together)


def test_first_last_edits_only_the_span_ends(atto):
    model, x, x2, stats = atto
    mid = "stages.2.blocks.5.mlp.fc2"  # stage 2's values differ in shape from stage 3's: refused below
    with pytest.raises(SurgeryError, match="different shapes"):
        rewrite(model, [mid, A], x, x2, stats={mid: stats[A], A: stats[A]})
    edit = rewrite(model, [A, B], x, x2, stats=[stats[A], stats[B]], schedule="first_last")
    assert edit.layers == [A, B] and edit.hparams["schedule"] == "first_last"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layer=[A]), "two or more distinct layers"),
        (dict(layer=[A, A]), "two or more distinct layers"),
        (dict(stats="one"), "takes stats as a mapping"),
        (dict(stats={A: None}), "no key statistics"),
        (dict(schedule="uniform"), "schedule must be one of"),
        (dict(solver="reference", restrict_rank=False), "restrict_rank=False is for one layer"),
    ],
)
def test_span_errors_name_the_fix(atto, kwargs, match):
    model, x, x2, stats = atto
    kwargs = {"layer": [A, B], "stats": stats, **kwargs}
    if kwargs["stats"] == "one":
        kwargs["stats"] = stats[A]
    before = state_hashes(model)
    with pytest.raises(SurgeryError, match=match):
        rewrite(model, kwargs.pop("layer"), x, x2, **kwargs)
    assert state_hashes(model) == before


def test_cached_values_of_a_span_are_its_last_layers_through_the_whole_span(atto):
    """Label-free selection matches a concept's activations where the edit acts: a span's last layer."""
    from surgery import get_layer
    from surgery.evaluation import CachedImages, Candidate

    model, x, x2, stats = atto
    span = rewrite(model, [A, B], x, x2, stats=stats)
    got = CachedImages(model, x2).values(Candidate(span, 0.5))
    with edited(model, span, alpha=0.5), torch.no_grad():
        expected = get_layer(model, B).capture(model, x2).values
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
