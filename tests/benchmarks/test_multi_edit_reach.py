"""benchmarks.multi_edit.reach: what the rules' directions share in the whitened key space, and its report."""

from __future__ import annotations

import math

import torch

from benchmarks.multi_edit.reach import kept_after_projection, markdown, whitened_cosines


def test_whitened_cosines_are_cosines_of_c_half_u():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    moment = a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(moment)
    half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    u = torch.randn(3, 5, generator=g, dtype=torch.float64)
    s = torch.nn.functional.normalize(u @ half, dim=1)
    assert torch.allclose(whitened_cosines(u, moment), s @ s.T)
    assert torch.allclose(whitened_cosines(torch.stack([u[0], -2 * u[0]]), moment), torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))


def test_kept_is_the_norm_left_after_projecting_out_the_others():
    e = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(kept_after_projection(e), torch.ones(3, dtype=torch.float64))  # orthogonal: all kept
    c = math.cos(math.pi / 3)  # two unit vectors 60 degrees apart, and one orthogonal to both
    k = torch.tensor([[1.0, c, 0.0], [c, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(kept_after_projection(k), torch.tensor([math.sin(math.pi / 3)] * 2 + [1.0], dtype=torch.float64))
    twice = torch.ones(2, 2, dtype=torch.float64)  # one direction twice: nothing left
    assert torch.allclose(kept_after_projection(twice), torch.zeros(2, dtype=torch.float64), atol=1e-6)


def test_report_pools_draws_and_counts_shared_styles():
    layer = "features.22"
    draw = {"pairs": ["grass->snow", "sand->snow", "tiles->fur"],
            "layers": {layer: [[1.0, 0.9, 0.1], [0.9, 1.0, -0.2], [0.1, -0.2, 1.0]]}}
    md = markdown({"command": "test", "archs": {"vgg": {"draws": [draw, draw]}}})
    row = next(l for l in md.splitlines() if l.startswith("| vgg |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"`{layer}`" and cells[2] == "6"  # 3 pairs in each of 2 draws
    assert cells[3] == "0.20" and cells[5] == "0.90"  # |cosine| 0.1, 0.2, 0.9, twice
    assert cells[6] == "100% (33%)"  # the top pair is snow & snow; 1 of 3 pairs shares a style
    kept = kept_after_projection(torch.tensor(draw["layers"][layer], dtype=torch.float64))
    assert cells[8] == f"{float(kept.min()):.2f}" and float(kept.min()) < 0.5  # the two snow rules lose most
