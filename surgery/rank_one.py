"""The rank-one update's arithmetic, shared by the solvers (below) and the edit files and apply (above).

An edit of a weight ``W`` (``m x n`` or ``m x n x kh x kw``) along unit directions ``u`` ``(rank, n)`` on its
input-channel axis is ``delta[o, c, ...] = sum_r lam[r, o, ...] * u[r, c]``; applying it at strength ``alpha``
writes ``W + alpha * delta`` computed in float64 and rounded once to ``W``'s dtype (:func:`add_scaled`), the
weight that strength selection scores and apply writes alike.
"""

from __future__ import annotations

import torch

from surgery.errors import SurgeryError

__all__ = ["rank_one_delta", "project_on", "add_scaled"]


def rank_one_delta(lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``sum_r lam[r] (x) u[r]`` with ``u`` on axis 1: ``(r, m, *k)`` and ``(r, n)`` -> ``(m, n, *k)``."""
    if lam.ndim < 2 or u.ndim != 2 or lam.shape[0] != u.shape[0]:
        raise SurgeryError(
            f"factors do not fit: lambda {tuple(lam.shape)} must be (rank, m, ...) and u "
            f"{tuple(u.shape)} must be (rank, n) with the same rank"
        )
    return torch.einsum("rm...,rn->mn...", lam, u)


def project_on(weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``weight`` along the rows of ``u`` on its input-channel axis: ``(m, n, *k)``, ``(r, n)`` -> ``(r, m, *k)``.

    Computed in float64. For a factored edit ``delta = lam (x) u`` with unit rows, the edit moves this
    projection by ``G lam`` (``G = u u^T``) and leaves the rest of the weight alone.
    """
    return torch.einsum("mn...,rn->rm...", weight.detach().to(torch.float64), u.detach().to(weight.device, torch.float64))


def add_scaled(weight: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """``weight + alpha * delta`` computed in float64 and rounded once to ``weight``'s dtype (a new tensor)."""
    return (weight.detach().to(torch.float64) + alpha * delta.detach().to(weight.device, torch.float64)).to(weight.dtype)
