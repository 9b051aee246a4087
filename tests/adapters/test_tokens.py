"""Layouts and token masks: image masks on token grids (with class/register tokens) and NHWC maps."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from surgery import SurgeryError, get_layer
from surgery.layout import Layout, token_grid
from surgery.layout import channels_last_rows
from surgery.problems import prepare_problem
from surgery.rewrite import rewrite
from surgery.solvers import value_weights
from surgery.solvers.direction import key_weights, rank_one_direction
from tests.tiny_models import randomize_layer_scale


def test_layout_channel_axes_and_resolution():
    assert Layout("nchw").channel_axis == 1
    assert Layout("nhwc").channel_axis == Layout("tokens").channel_axis == -1
    assert Layout("tokens", prefix=0, channel_dim=1).channel_axis == 1
    last = Layout("last", prefix=2)
    assert last.resolve(torch.zeros(2, 5)).kind == "flat"
    assert last.resolve(torch.zeros(2, 7, 5)) == Layout("tokens", prefix=2)
    assert last.resolve(torch.zeros(2, 3, 3, 5)).kind == "nhwc"
    with pytest.raises(SurgeryError, match="unknown layout"):
        Layout("chw")  # type: ignore[arg-type]


def test_token_grid_follows_the_aspect_ratio():
    assert token_grid(36, (96, 96)) == (6, 6)
    assert token_grid(48, (96, 128)) == (6, 8)
    assert token_grid(48, (128, 96)) == (8, 6)
    with pytest.raises(SurgeryError, match="do not factor.*prefix"):
        token_grid(37, (96, 96))  # 36 grid tokens + a class token counted as grid


def _grid_mask(n: int, h: int, w: int, rows: slice) -> torch.Tensor:
    m = torch.zeros(n, 1, h, w)
    m[:, :, rows] = 1
    return m


def test_pool_mask_on_tokens_with_prefix():
    tokens = torch.zeros(2, 2 + 16, 8)  # 2 prefix tokens, a 4x4 grid
    mask = _grid_mask(2, 32, 32, slice(16, 32))  # bottom half of the image
    pooled, prefix = Layout("tokens", prefix=2).pool_mask(mask, tokens)
    assert pooled.shape == (2, 18, 1) and prefix.shape == (2, 18, 1)
    assert prefix[:, :2].all() and not prefix[:, 2:].any()
    grid = pooled[0, 2:, 0].reshape(4, 4)  # row-major
    assert torch.equal(grid[:2], torch.zeros(2, 4, dtype=grid.dtype))
    assert torch.equal(grid[2:], torch.ones(2, 4, dtype=grid.dtype))
    assert pooled[:, :2].abs().sum() == 0


def test_key_and_value_weights_give_prefix_tokens_their_documented_weight():
    keys = torch.randn(1, 1 + 16, 8)
    lay = Layout("tokens", prefix=1)
    mask = _grid_mask(1, 32, 32, slice(0, 8))  # the top row of 4x4 patches
    w = key_weights(mask, keys, lay, prefix_weight=4.0)
    assert w.shape == (17,)
    assert w[0].item() == pytest.approx(2.0)  # sqrt(4): the direction weighs w^2 k k^T
    assert torch.equal(w[1:5], torch.ones(4, dtype=w.dtype)) and w[5:].abs().sum() == 0
    values = torch.randn(1, 17, 8)
    d1 = value_weights(mask, values, lay, prefix_weight=4.0, loss="l1")
    d2 = value_weights(mask, values, lay, prefix_weight=4.0, loss="l2")
    assert d1.shape == (1, 17, 1)
    assert d1[0, 0, 0].item() == pytest.approx(4.0) and d2[0, 0, 0].item() == pytest.approx(2.0)
    assert torch.equal(d1[0, 1:5, 0], torch.ones(4)) and d1[0, 5:].abs().sum() == 0
    # no mask: every grid token weighs 1, prefix tokens as above; no weighting when nothing changes
    unmasked = value_weights(None, values, lay, prefix_weight=9.0, loss="l2")
    assert unmasked[0, 0, 0].item() == pytest.approx(3.0) and torch.equal(unmasked[0, 1:, 0], torch.ones(16))
    assert value_weights(None, values, lay, prefix_weight=1.0) is None
    assert value_weights(None, values, Layout("tokens", prefix=0), prefix_weight=5.0) is None


def test_nhwc_maps_weigh_like_nchw():
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 4:12, 2:6] = 1
    mask[1, :, :8] = 0.5
    nchw = torch.randn(2, 5, 4, 4)
    w_nchw = key_weights(mask, nchw, Layout("nchw"))
    w_nhwc = key_weights(mask, nchw.permute(0, 2, 3, 1), Layout("nhwc"))
    assert torch.equal(w_nchw, w_nhwc)
    d = value_weights(mask, nchw.permute(0, 2, 3, 1), Layout("nhwc"))
    assert d.shape == (2, 4, 4, 1)
    torch.testing.assert_close(d.permute(0, 3, 1, 2), value_weights(mask, nchw, Layout("nchw")))


def test_flat_layouts_refuse_masks_clearly():
    mask = torch.ones(1, 1, 8, 8)
    with pytest.raises(SurgeryError, match="spatial keys"):
        key_weights(mask, torch.zeros(1, 5, 3), Layout("flat"))
    with pytest.raises(SurgeryError, match="use_mask=False"):
        value_weights(mask, torch.zeros(1, 5), Layout("last"))


def test_masked_direction_follows_the_concept_tokens():
    n = 4
    keys = torch.zeros(1, 1 + 16, n, dtype=torch.float64)
    keys[:, 0, 2] = 1.0  # class token: channel 2
    grid = keys[:, 1:].view(1, 4, 4, n)
    grid[:, :2, :, 0] = 1.0  # top half: channel 0
    grid[:, 2:, :, 1] = 1.0  # bottom half: channel 1 (the concept)
    mask = _grid_mask(1, 32, 32, slice(16, 32))
    rows = channels_last_rows(keys, -1)
    c = torch.eye(n, dtype=torch.float64)
    u = rank_one_direction(c, rows, key_weights(mask, keys, Layout("tokens", prefix=1), prefix_weight=0.0))[0]
    assert u[1].item() == pytest.approx(1.0)
    # a heavy class token takes the direction over
    u = rank_one_direction(c, rows, key_weights(mask, keys, Layout("tokens", prefix=1), prefix_weight=100.0))[0]
    assert u[2].item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = randomize_layer_scale(timm.create_model("test_vit", init_values=1e-5)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g)
    x2 = x.clone()
    x2[:, :, 32:, 16:48] = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 32:, 16:48] = 1
    return model, x, x2, mask


def _moment(layer, model, size=64):
    keys = channels_last_rows(layer.capture(model, torch.randn(6, 3, size, size)).keys, layer.key_channel_dim).double()
    return keys.T @ keys / len(keys) + 0.05 * torch.eye(keys.shape[1], dtype=torch.float64)


def test_rewrite_with_masks_on_token_layers(vit):
    model, x, x2, mask = vit
    for name in ("blocks.1.attn.proj", "blocks.1.mlp.fc2", "blocks.0.attn.qkv"):
        layer = get_layer(model, name)
        assert layer.key_layout.kind in ("tokens", "last") and layer.key_layout.prefix == model.num_prefix_tokens
        moment = _moment(layer, model)
        masked = rewrite(model, layer, x, x2, mask, stats=moment, use_mask=True, loss="l2", steps=5)
        assert torch.isfinite(masked.lam).all()
        plain = rewrite(model, layer, x, x2, stats=moment, loss="l2", steps=5)
        assert not torch.allclose(masked.u, plain.u)  # the mask weighs the direction


def test_prefix_weight_reaches_the_problem(vit):
    model, x, x2, mask = vit
    layer = get_layer(model, "blocks.1.mlp.fc2")
    moment = _moment(layer, model)
    p1 = prepare_problem(model, layer, x, x2, mask, stats=moment, use_mask=True, loss="l1", prefix_weight=1.0)
    p9 = prepare_problem(model, layer, x, x2, mask, stats=moment, use_mask=True, loss="l1", prefix_weight=9.0)
    assert p1.weights[:, 0, 0].tolist() == [1.0, 1.0] and p9.weights[:, 0, 0].tolist() == [9.0, 9.0]
    torch.testing.assert_close(p1.weights[:, 1:], p9.weights[:, 1:])
    unmasked = prepare_problem(model, layer, x, x2, stats=moment, loss="l2", prefix_weight=4.0)
    assert unmasked.weights[0, 0, 0].item() == pytest.approx(2.0) and unmasked.weights[:, 1:].eq(1).all()
    e = rewrite(model, layer, x, x2, stats=moment, loss="l2", prefix_weight=4.0, steps=5)
    assert e.hparams["prefix_weight"] == 4.0
    with pytest.raises(SurgeryError, match="prefix_weight"):
        prepare_problem(model, layer, x, x2, stats=moment, prefix_weight=-1.0)
    assert math.isfinite(float(e.lam.abs().max()))
