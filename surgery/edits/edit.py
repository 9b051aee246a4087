"""The :class:`Edit`: a weight update of one layer (or of a span of layers), as factors (rank-one rewrite)
or dense deltas.

A rewrite stores ``lam`` and ``u`` with the update ``delta[o, c, ...] = sum_r lam[r, o, ...] * u[r, c]``:
``u`` lies along the input-channel axis of the edited weight and ``lam`` holds one coefficient per
output channel and kernel tap. A span edit (one rewrite spread over several blocks) stores such factors
for each of its layers. Methods without factors (fine-tuning) store dense ``deltas`` per parameter name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from surgery.edits.file import load_edit_file, save_edit_file
from surgery.errors import SurgeryError
from surgery.identity import dtype_name, tensor_sha256
from surgery.rank_one import add_scaled, project_on, rank_one_delta

__all__ = ["Edit", "Presence", "base_record"]


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything less precise is stored as float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def base_record(params: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Shape, dtype and SHA-256 of the original bytes of each parameter an edit will change."""
    return {
        name: {"shape": list(p.shape), "dtype": dtype_name(p.dtype), "sha256": tensor_sha256(p)}
        for name, p in params.items()
    }


@dataclass(frozen=True)
class Presence:
    """How strongly an edit is found on a set of weights (see :meth:`Edit.presence`).

    Attributes:
        strength: the ``alpha`` that best explains the weights as ``base + alpha * delta`` along the
            edit (0: the edit is not there; 1: applied once at full strength).
        residual: the part of the weights' change along the edit that ``strength`` does not explain,
            relative to the edit's own size (0 when the weights are exactly ``base + strength * delta``
            there; large when something else changed them, e.g. another edit of the same layer).
        tolerance: how far ``strength`` and ``residual`` may stray from exact values through float
            rounding alone, for these weights.
    """

    strength: float
    residual: float
    tolerance: float

    def at(self, alpha: float) -> bool:
        """True when the weights hold the edit at strength ``alpha`` (up to rounding)."""
        return abs(self.strength - alpha) <= self.tolerance * max(1.0, abs(alpha)) and self.clean

    @property
    def absent(self) -> bool:
        """True when the weights are the edit's base along the edit (up to rounding)."""
        return self.at(0.0)

    @property
    def clean(self) -> bool:
        """True when the change along the edit is a multiple of the edit (up to rounding)."""
        return self.residual <= self.tolerance

    def describe(self) -> str:
        return f"strength {self.strength:.4g}" + ("" if self.clean else f", {100 * self.residual:.2g}% unexplained")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Edit:
    """A weight update of one editable layer, or of several (a span edit), applied and reverted as a whole.

    Attributes:
        layer: module name of the edited layer (of a span edit: its first layer; all are in :attr:`layers`).
        method: e.g. ``"rewrite"`` or ``"finetune"``.
        hparams: how it was made (solver, loss, ridge, steps, ...); JSON-serializable.
        lam: ``(rank, m, kh, kw)`` for convs, ``(rank, m)`` for Linear layers, of a single-layer factored
            edit; ``None`` for dense and span edits.
        u: ``(rank, n)``, unit rows along the input-channel axis; as ``lam``.
        deltas: dense updates by parameter name, for methods without factors.
        base: for every parameter the edit changes, its ``shape``, ``dtype`` and the ``sha256`` of its
            original bytes (see :func:`base_record`).
        architecture: the model's architecture id (:func:`architecture_id`).
        description: free text.
        created: UTC time of creation, ISO 8601.
        info: free-form results (objective, norms, timings).
        base_along: for every parameter the edit changes, its original values *along the edit*: for a
            factored edit the projection ``W0 ._1 u`` ``(rank, m, *kernel)`` (as small as ``lam``), for
            a dense edit the scalar ``<W0, delta>``. With them a revert can tell whether (and how
            strongly) the edit is on a set of weights (:meth:`presence`). Filled by :meth:`made_on`.
        span: a span edit's factors, ``{weight parameter name: (lam, u)}`` for each of its layers in forward
            order (two or more); empty for a single-layer edit, which holds ``lam`` and ``u``.
    """

    layer: str
    method: str
    hparams: dict[str, Any] = field(default_factory=dict)
    lam: torch.Tensor | None = None
    u: torch.Tensor | None = None
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    base: dict[str, dict[str, Any]] = field(default_factory=dict)
    architecture: str | None = None
    description: str = ""
    created: str = field(default_factory=_now)
    info: dict[str, Any] = field(default_factory=dict)
    base_along: dict[str, torch.Tensor] = field(default_factory=dict)
    span: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.lam is None) != (self.u is None):
            raise SurgeryError("an Edit needs both factors (lam and u) or neither")
        kinds = (self.lam is not None) + bool(self.span) + bool(self.deltas)
        if kinds != 1:
            raise SurgeryError(
                "an Edit holds exactly one of: factors lam and u (one layer), a span of factors (several "
                "layers), or dense deltas"
            )
        if self.span:
            if len(self.span) < 2:
                raise SurgeryError("a span edit has two or more layers; give one layer's factors as lam and u")
            if next(iter(self.span)) != self.param:
                raise SurgeryError(f"a span edit's layer must be its first layer, {next(iter(self.span))!r}")
        for lam, u in self.factors().values():
            rank_one_delta(lam[:, :1], u[:, :1])  # shape check only, cheap
        for name, t in self.base_along.items():
            expected = self._along_shape(name)
            if expected is not None and tuple(t.shape) != expected:
                raise SurgeryError(
                    f"base_along of {name!r} has shape {tuple(t.shape)}, expected {expected} for this edit"
                )

    def _along_shape(self, name: str) -> tuple[int, ...] | None:
        if self.factored:
            return tuple(self.factors()[name][0].shape) if name in self.factors() else None
        return () if name in self.deltas else None

    def _along(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` along this edit's update of ``name``, in float64."""
        if self.factored:
            return project_on(weight, self.factors()[name][1])
        d = self.deltas[name].detach().to(weight.device, torch.float64)
        return (weight.detach().to(torch.float64) * d).sum()

    def made_on(self, weights: dict[str, torch.Tensor]) -> Edit:
        """Record the weights this edit was computed on (``{param name: original tensor}``), in place.

        Fills :attr:`base` (shape, dtype, SHA-256 of the bytes) and :attr:`base_along`; returns ``self``.
        """
        self.base = base_record(weights)
        self.base_along = {
            name: self._along(name, w).to(_store_dtype(w.dtype)).cpu() for name, w in weights.items()
        }
        return self

    def presence(self, weights: dict[str, torch.Tensor]) -> Presence | None:
        """How strongly this edit is on ``weights`` (``{param name: current tensor}``).

        Compares the weights along the edit with :attr:`base_along`; ``None`` when the edit does not
        record them (an edit file of format version 1).
        """
        deltas = self.parameter_deltas()
        if not self.base_along or set(self.base_along) != set(deltas):
            return None
        num = den = res = noise = 0.0
        changes: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, delta in deltas.items():
            w = weights[name]
            base = self.base_along[name].to(w.device, torch.float64)
            change = self._along(name, w) - base
            if self.factored:  # the projection moves by alpha * G lam
                unit = project_on(delta.to(w.device), self.factors()[name][1])
            else:  # the scalar <W, delta> moves by alpha * ||delta||^2
                unit = delta.detach().to(w.device, torch.float64).square().sum()
            changes.append((change, unit))
            num += float((change * unit).sum())
            den += float(unit.square().sum())
            eps_w = torch.finfo(w.dtype).eps if w.is_floating_point() else 0.0
            eps_s = torch.finfo(self.base_along[name].dtype).eps
            w_norm = float(w.detach().to(torch.float64).norm())
            d_norm = float(delta.detach().to(torch.float64).norm())
            if self.factored:
                scale = w_norm * self.factors()[name][1].shape[0] ** 0.5
                noise += (eps_w * scale + eps_s * float(base.norm())) ** 2
            else:
                noise += (eps_w * w_norm * d_norm + eps_s * abs(float(base))) ** 2
        if den == 0.0:
            return Presence(0.0, 0.0, float("inf"))
        strength = num / den
        for change, unit in changes:
            res += float((change - strength * unit).square().sum())
        size = den**0.5
        tolerance = max(1e-4, 20.0 * noise**0.5 / size)
        return Presence(strength=strength, residual=res**0.5 / size, tolerance=tolerance)

    @property
    def base_fingerprints(self) -> dict[str, str]:
        """SHA-256 of the original bytes of every parameter the edit changes."""
        return {name: rec["sha256"] for name, rec in self.base.items() if "sha256" in rec}

    @property
    def param(self) -> str:
        """Name of the edited layer's weight parameter."""
        return f"{self.layer}.weight" if self.layer else "weight"

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{weight parameter name: (lam, u)}`` of every layer a factored edit changes (empty for dense edits)."""
        if self.lam is not None:
            return {self.param: (self.lam, self.u)}  # type: ignore[dict-item]
        return dict(self.span)

    @property
    def layers(self) -> list[str]:
        """The edited layers in forward order: one, or a span edit's several."""
        if self.span:
            return [name.removesuffix(".weight") for name in self.span]
        return [self.layer]

    @property
    def factored(self) -> bool:
        """True when the edit is stored as factors (``lam`` and ``u`` per layer)."""
        return self.lam is not None or bool(self.span)

    @property
    def rank(self) -> int | None:
        """Number of rank-one terms (per layer), ``None`` for dense edits."""
        return max((int(u.shape[0]) for _, u in self.factors().values()), default=None)

    def delta(self) -> torch.Tensor:
        """The dense update of the edited layer's weight (a single-layer edit)."""
        if self.span:
            raise SurgeryError(
                f"this span edit changes {len(self.span)} layers ({', '.join(self.layers)}): take their "
                "updates from parameter_deltas()"
            )
        if self.factored:
            return rank_one_delta(self.lam, self.u)  # type: ignore[arg-type]
        if self.param not in self.deltas:
            raise SurgeryError(f"this edit has no update for {self.param}")
        return self.deltas[self.param]

    def parameter_deltas(self) -> dict[str, torch.Tensor]:
        """Every parameter this edit changes, with its dense update."""
        if self.factored:
            return {name: rank_one_delta(lam, u) for name, (lam, u) in self.factors().items()}
        return dict(self.deltas)

    def new_weight(self, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``weight + alpha * delta`` as apply writes it (:func:`~surgery.rank_one.add_scaled`: float64, rounded
        once to ``weight``'s dtype), without modifying ``weight``."""
        return add_scaled(weight, self.delta(), alpha)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the edit as one safetensors file, atomically (format: docs/edit-format.md)."""
        if self.factored:
            tensors = {}
            for name, (lam, u) in self.factors().items():
                tensors.update({f"{name}.lambda": lam, f"{name}.u": u})
        else:
            tensors = {f"{name}.delta": d for name, d in self.deltas.items()}
        tensors.update({f"{name}.base_along": t for name, t in self.base_along.items()})
        fields = {
            "kind": "factored" if self.factored else "dense",
            "params": list(self.factors()) if self.factored else list(self.deltas),
            **{k: getattr(self, k) for k in ("method", "layer", "base", "hparams", "architecture", "description", "created", "info")},
        }
        save_edit_file(path, tensors, fields)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Edit:
        """Read an edit file written by :meth:`save`; raises :class:`EditFormatError` on a bad file."""
        return cls(**load_edit_file(path))

    def __repr__(self) -> str:
        what = f"rank {self.rank}" if self.factored else f"dense, {len(self.deltas)} parameter(s)"
        where = " + ".join(self.layers)
        return f"Edit({where!r}, {self.method}, {what})"

