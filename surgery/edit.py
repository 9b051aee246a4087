"""The :class:`Edit`: a weight update of one layer, as factors (rank-one rewrite) or dense deltas.

A rewrite stores ``lam`` and ``u`` with the update ``delta[o, c, ...] = sum_r lam[r, o, ...] * u[r, c]``:
``u`` lies along the input-channel axis of the edited weight and ``lam`` holds one coefficient per
output channel and kernel tap. Methods without factors (fine-tuning) store dense ``deltas`` per
parameter name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError

__all__ = ["Edit", "tensor_sha256", "rank_one_delta", "architecture_id", "base_record"]


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


def _layout_digest(model: nn.Module) -> str:
    """Short SHA-256 of a model's module tree: every module's name and class, every parameter's name."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        cls = type(module)
        h.update(f"{name}\0{cls.__module__}.{cls.__qualname__}\0".encode())
        for pname, _ in module.named_parameters(recurse=False):
            h.update(f"{pname}\0".encode())
    return h.hexdigest()[:12]


def architecture_id(model: nn.Module) -> str:
    """A name for the model's architecture.

    timm's ``pretrained_cfg`` architecture when known (``timm:resnet50``); else the class (the CLIP image
    tower's class for open_clip models) followed by ``@`` and a digest of the module tree, so that
    models of one class with other layers (torchvision's resnet18 and resnet34) get different ids.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return f"timm:{cfg['architecture']}"
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and (
        type(model).__module__.startswith("open_clip") or type(model).__name__ == "ZeroShotClassifier"
    ):
        return f"open_clip:{type(visual).__name__}@{_layout_digest(visual)}"
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}@{_layout_digest(model)}"


def base_record(params: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Shape, dtype and SHA-256 of the original bytes of each parameter an edit will change."""
    return {
        name: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "sha256": tensor_sha256(p)}
        for name, p in params.items()
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        base: for every parameter the edit changes, its ``shape``, ``dtype`` and the ``sha256`` of its
            original bytes (see :func:`base_record`).
        architecture: the model's architecture id (:func:`architecture_id`).
        description: free text.
        created: UTC time of creation, ISO 8601.
        info: free-form results (objective, norms, timings).
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

    def __post_init__(self) -> None:
        if (self.lam is None) != (self.u is None):
            raise SurgeryError("an Edit needs both factors (lam and u) or neither")
        if self.lam is None and not self.deltas:
            raise SurgeryError("an Edit needs factors (lam, u) or dense deltas")
        if self.lam is not None:
            rank_one_delta(self.lam[:, :1], self.u[:, :1])  # shape check only, cheap

    @property
    def base_fingerprints(self) -> dict[str, str]:
        """SHA-256 of the original bytes of every parameter the edit changes."""
        return {name: rec["sha256"] for name, rec in self.base.items() if "sha256" in rec}

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

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the edit as one safetensors file (see :mod:`surgery.edit_file`)."""
        from .edit_file import save_edit

        save_edit(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Edit:
        """Read an edit file written by :meth:`save`; raises :class:`EditFormatError` on a bad file."""
        from .edit_file import load_edit

        return load_edit(path)

    def __repr__(self) -> str:
        what = f"rank {self.rank}" if self.factored else f"dense, {len(self.deltas)} parameter(s)"
        return f"Edit({self.layer!r}, {self.method}, {what})"

