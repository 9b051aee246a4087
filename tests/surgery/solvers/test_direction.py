"""The rank-one direction: whitened top singular vector, generalized eigenvector, robust to bad C."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery import SurgeryError
from surgery.solvers.direction import key_weights, rank_one_direction
from surgery.stats.whitening import inverse_sqrt


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


@settings(max_examples=20)
@given(n=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_single_key_gives_c_inverse_k(n, seed):
    c = _spd(n, seed)
    k = torch.randn(1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    u = rank_one_direction(c, k)[0]
    expected = torch.linalg.solve(c, k[0])
    expected = expected / expected.norm()
    assert torch.allclose(u.abs(), expected.abs(), atol=1e-8)
    assert u.norm().item() == pytest.approx(1.0)


@settings(max_examples=20)
@given(n=st.integers(2, 10), p=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_direction_is_top_generalized_eigenvector(n, p, seed):
    g = torch.Generator().manual_seed(seed)
    c = _spd(n, seed)
    keys = torch.randn(p, n, dtype=torch.float64, generator=g)
    w = torch.rand(p, dtype=torch.float64, generator=g) + 0.1
    u = rank_one_direction(c, keys, w)[0]
    a = (keys * w[:, None] ** 2).T @ keys  # sum_j w_j^2 k_j k_j^T
    # Rayleigh quotient u^T A u / u^T C u is maximal over all directions
    rq = (u @ a @ u) / (u @ c @ u)
    l = torch.linalg.cholesky(c)
    top = torch.linalg.eigvalsh(torch.linalg.solve_triangular(l, torch.linalg.solve_triangular(l, a, upper=False).T, upper=False)).max()
    assert rq.item() == pytest.approx(top.item(), rel=1e-7)


def test_rank_r_directions_are_unit_and_distinct():
    c = _spd(8, 0)
    keys = torch.randn(30, 8, dtype=torch.float64)
    u = rank_one_direction(c, keys, rank=3)
    assert u.shape == (3, 8)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.linalg.matrix_rank(u) == 3


def test_singular_moment_gets_eps_and_a_warning_never_nan(caplog):
    keys = torch.randn(4, 16, dtype=torch.float64)
    c = keys.T @ keys / 4  # rank 4 of 16: singular
    with caplog.at_level(logging.WARNING, logger="surgery.solvers.direction"):
        u = rank_one_direction(c, keys[:1])
    assert torch.isfinite(u).all()
    assert "ill-conditioned" in caplog.text
    z = inverse_sqrt(torch.zeros(3, 3).fill_diagonal_(1.0))
    torch.testing.assert_close(z, torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "moment,keys,match",
    [
        (torch.zeros(3, 3), torch.ones(1, 3), "zero"),
        (torch.full((3, 3), float("nan")), torch.ones(1, 3), "NaN"),
        (torch.eye(3), torch.zeros(2, 3), "all zero"),
        (torch.eye(3), torch.ones(2, 4), "match the statistics"),
        (torch.eye(3, 4), torch.ones(2, 3), "square"),
    ],
)
def test_bad_inputs_are_clear_errors(moment, keys, match):
    with pytest.raises(SurgeryError, match=match):
        rank_one_direction(moment, keys)


def test_mask_weights_select_the_concept_positions():
    # keys point one way inside the mask and another way outside; the direction follows the mask
    n = 4
    keys = torch.zeros(1, n, 4, 4, dtype=torch.float64)
    keys[:, 0, :2] = 1.0  # top half: channel 0
    keys[:, 1, 2:] = 1.0  # bottom half: channel 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1  # bottom half of the image
    w = key_weights(mask, keys, 1)
    rows = keys.movedim(1, -1).reshape(-1, n)
    u = rank_one_direction(torch.eye(n, dtype=torch.float64), rows, w)[0]
    assert u[1].item() == pytest.approx(1.0) and u[0].item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(SurgeryError, match="spatial keys"):
        key_weights(mask, torch.zeros(1, 5, n), -1)
