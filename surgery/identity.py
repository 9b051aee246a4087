"""Identities: the one place where tensors, models, transforms and edits are hashed.

Edits record the SHA-256 of the weights they were made on and the architecture they were made for;
key statistics are cached under a fingerprint of the weights upstream of their layer and an id of the
data and its preprocessing; stacked edits are told apart by their content. All of it is hashed here,
the same way everywhere: raw C-contiguous bytes on the CPU, reprs with memory addresses blanked.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "hasher",
    "digest",
    "dtype_name",
    "hash_tensor",
    "tensor_sha256",
    "blank_addresses",
    "stable_repr",
    "transform_id",
    "layout_digest",
    "architecture_id",
    "content_id",
]

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def hasher(data: str | bytes = b"") -> Any:
    """A new SHA-256 hasher, fed ``data`` (a str as UTF-8); feed it more with ``update`` or :func:`hash_tensor`."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data)


def digest(data: str | bytes, length: int | None = None) -> str:
    """SHA-256 (hex) of ``data`` (a str as UTF-8); its first ``length`` hex digits when given."""
    return hasher(data).hexdigest()[:length]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed a tensor's raw bytes (C-contiguous, on the CPU, whatever its dtype) into hasher ``h``."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy().tobytes())


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's raw bytes."""
    h = hasher()
    hash_tensor(h, t)
    return h.hexdigest()


def blank_addresses(text: str) -> str:
    """``text`` with memory addresses (``0x7f...``) blanked, so that it is the same in every process."""
    return _ADDRESS.sub("0x", text)


def stable_repr(obj: Any) -> str:
    """``repr(obj)`` with memory addresses blanked."""
    return blank_addresses(repr(obj))


def transform_id(transform: Callable[..., Any] | None) -> str:
    """A short, process-independent hash of a preprocessing transform (``None``: plain ToTensor)."""
    text = "ToTensor()" if transform is None else stable_repr(transform)
    return digest(text, 16)


def layout_digest(model: nn.Module) -> str:
    """Short SHA-256 of a model's module tree: every module's name and class, every parameter's name."""
    h = hasher()
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
        return f"open_clip:{type(visual).__name__}@{layout_digest(visual)}"
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}@{layout_digest(model)}"


def content_id(layer: str, method: str, deltas: Mapping[str, torch.Tensor]) -> str:
    """A digest of what an edit does (its layer, method and every update's bytes): equal edits, equal ids."""
    h = hasher(f"{layer}\0{method}")
    for name, t in sorted(deltas.items()):
        h.update(name.encode())
        h.update(tensor_sha256(t).encode())
    return h.hexdigest()
