"""The whitening of key statistics: ``C^{-1/2}``, which every edit direction needs (docs/method.md
section 3). It is an ``n x n`` eigendecomposition, the costliest step of an edit on a wide layer, so
:class:`~surgery.stats.keystats.KeyStats` computes it once and keeps it (in memory and in its file)."""

from __future__ import annotations

import logging

import torch

from surgery.errors import SurgeryError

__all__ = ["inverse_sqrt"]

logger = logging.getLogger(__name__)

_RCOND = 1e-10


def inverse_sqrt(moment: torch.Tensor, *, eps: float | None = None) -> torch.Tensor:
    """``C^{-1/2}`` of a symmetric positive semi-definite ``moment``, in float64.

    When ``C`` is singular or ill-conditioned (smallest eigenvalue below ``1e-10`` times the largest),
    ``eps * I`` is added first, with a logged warning; ``eps`` defaults to ``1e-6 * trace(C) / n``.
    """
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise SurgeryError(f"the key second moment must be square, got shape {tuple(moment.shape)}")
    c = moment.detach().to(torch.float64)
    if not torch.isfinite(c).all():
        raise SurgeryError("the key second moment has NaN or inf entries; recollect the statistics")
    c = (c + c.T) / 2
    n = c.shape[0]
    # one decomposition: adding eps * I shifts the eigenvalues and keeps the eigenvectors
    evals, evecs = torch.linalg.eigh(c)
    top = float(evals[-1])
    if top <= 0:
        raise SurgeryError("the key second moment is zero: the statistics saw no non-zero keys")
    if eps is None and float(evals[0]) <= _RCOND * top:
        eps = 1e-6 * float(torch.trace(c)) / n
        logger.warning(
            "key second moment is ill-conditioned (eigenvalues %.3g .. %.3g); adding %.3g * I",
            float(evals[0]),
            top,
            eps,
        )
    if eps:
        evals = evals + eps
    evals = evals.clamp_min(_RCOND * float(evals[-1]))
    return (evecs * evals.rsqrt()) @ evecs.T
