"""The :class:`Edit`: a weight update of one layer, as factors (rank-one rewrite) or dense deltas.

A rewrite stores ``lam`` and ``u`` with the update ``delta[o, c, ...] = sum_r lam[r, o, ...] * u[r, c]``:
``u`` lies along the input-channel axis of the edited weight and ``lam`` holds one coefficient per
output channel and kernel tap. Methods without factors (fine-tuning) store dense ``deltas`` per
parameter name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SurgeryError

__all__ = ["Edit", "tensor_sha256", "rank_one_delta"]


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (C-contiguous, on CPU), whatever its dtype."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def rank_one_delta(lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``sum_r lam[r] (x) u[r]`` with ``u`` on axis 1: ``(r, m, *k)`` and ``(r, n)`` -> ``(m, n, *k)``."""
    if lam.ndim < 2 or u.ndim != 2 or lam.shape[0] != u.shape[0]:
        raise SurgeryError(
            f"factors do not fit: lambda {tuple(lam.shape)} must be (rank, m, ...) and u "
            f"{tuple(u.shape)} must be (rank, n) with the same rank"
        )
    return torch.einsum("rm...,rn->mn...", lam, u)


@dataclass
class Edit:
    """A weight update of one editable layer.

    Attributes:
        layer: module name of the edited layer.
        method: e.g. ``"rewrite"`` or ``"finetune"``.
        hparams: how it was made (solver, loss, ridge, steps, ...); JSON-serializable.
        lam: ``(rank, m, kh, kw)`` for convs, ``(rank, m)`` for Linear layers; ``None`` for dense edits.
        u: ``(rank, n)``, unit rows along the input-channel axis; ``None`` for dense edits.
        deltas: dense updates by parameter name, for methods without factors.
        base_fingerprints: SHA-256 of the original bytes of every parameter the edit changes.
        info: free-form results (objective, norms, timings).
    """

    layer: str
    method: str
    hparams: dict[str, Any] = field(default_factory=dict)
    lam: torch.Tensor | None = None
    u: torch.Tensor | None = None
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    base_fingerprints: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.lam is None) != (self.u is None):
            raise SurgeryError("an Edit needs both factors (lam and u) or neither")
        if self.lam is None and not self.deltas:
            raise SurgeryError("an Edit needs factors (lam, u) or dense deltas")
        if self.lam is not None:
            rank_one_delta(self.lam[:, :1], self.u[:, :1])  # shape check only, cheap

    @property
    def param(self) -> str:
        """Name of the edited layer's weight parameter."""
        return f"{self.layer}.weight" if self.layer else "weight"

    @property
    def factored(self) -> bool:
        """True when the edit is stored as factors ``lam`` and ``u``."""
        return self.lam is not None

    @property
    def rank(self) -> int | None:
        """Number of rank-one terms, ``None`` for dense edits."""
        return None if self.u is None else int(self.u.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense update of the edited layer's weight."""
        if self.factored:
            return rank_one_delta(self.lam, self.u)  # type: ignore[arg-type]
        if self.param not in self.deltas:
            raise SurgeryError(f"this edit has no update for {self.param}")
        return self.deltas[self.param]

    def parameter_deltas(self) -> dict[str, torch.Tensor]:
        """Every parameter this edit changes, with its dense update."""
        return {self.param: self.delta()} if self.factored else dict(self.deltas)

    def new_weight(self, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``weight + alpha * delta`` in ``weight``'s dtype, without modifying ``weight``."""
        d = self.delta().to(device=weight.device)
        return (weight.detach().to(d.dtype) + alpha * d).to(weight.dtype)

    def __repr__(self) -> str:
        what = f"rank {self.rank}" if self.factored else f"dense, {len(self.deltas)} parameter(s)"
        return f"Edit({self.layer!r}, {self.method}, {what})"

