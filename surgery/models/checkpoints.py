"""Checkpoints read without unpickling: safetensors files and state dicts saved with ``torch.save``.

``.pth``/``.pt``/``.bin``/``.ckpt`` files are read with ``torch.load(weights_only=True)``: nothing a
file holds can run code. Wrappers (``{"state_dict": ...}``) and DDP / ``torch.compile`` key prefixes
are removed; :func:`load_checkpoint_into` loads strictly and leaves the model unchanged on a mismatch.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from surgery.errors import ModelLoadError

__all__ = [
    "TORCH_SUFFIXES",
    "read_checkpoint",
    "load_checkpoint_into",
    "pair_state_dict_in_order",
    "torch_load",
]

logger = logging.getLogger(__name__)


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def _is_batch_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def pair_state_dict_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys by position.

    For two implementations of one architecture whose parameters are registered in the same order but
    under different names. ``num_batches_tracked`` entries are skipped on both sides; the returned
    dict takes them from ``target``, so it loads with ``strict=True``.

    Args:
        source: The state dict to rename (e.g. read from a foreign checkpoint).
        target: The state dict of the model to load into (``model.state_dict()``).

    Returns:
        A state dict with ``target``'s keys and ``source``'s tensors.

    Raises:
        ModelLoadError: The two have different numbers of tensors, or a pair differs in shape or in
            its kind (the last name component, e.g. ``weight`` vs ``bias``).
    """
    src = [(k, v) for k, v in source.items() if not _is_batch_counter(k)]
    tgt = [(k, v) for k, v in target.items() if not _is_batch_counter(k)]
    if len(src) != len(tgt):
        raise ModelLoadError(
            f"cannot pair state dicts in order: the checkpoint has {len(src)} tensors, the model "
            f"{len(tgt)} (num_batches_tracked not counted)"
        )
    out: dict[str, torch.Tensor] = {k: v for k, v in target.items() if _is_batch_counter(k)}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ModelLoadError(
                f"cannot pair state dicts in order: tensor #{i} {sk!r} has shape {tuple(sv.shape)} "
                f"but the model's {tk!r} has shape {tuple(tv.shape)}"
            )
        if sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise ModelLoadError(
                f"cannot pair state dicts in order: tensor #{i} {sk!r} does not match the model's "
                f"{tk!r} (different kind of tensor)"
            )
        out[tk] = sv
    return out


def _pickle_protocol(path: Path) -> int | None:
    """The pickle protocol of a ``torch.save`` zip checkpoint's ``data.pkl``, when it can be read."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            with z.open(name) as f:
                head = f.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        protocol = _pickle_protocol(path)
        if protocol is not None and protocol > 2 and "Unsupported operand" in str(e):
            raise ModelLoadError(
                f"checkpoint {str(path)!r} was saved with pickle protocol {protocol}, which "
                "torch.load(weights_only=True) cannot read (it reads protocol 2, the default of torch.save); "
                "nothing was loaded. Re-save it without pickle_protocol=..., e.g. "
                "torch.save(torch.load(path, weights_only=False), path2) if you trust the file, "
                "or convert it to safetensors"
            ) from None
        raise ModelLoadError(
            f"checkpoint {str(path)!r} contains pickled Python objects, which are not loaded for "
            "safety (unpickling can run arbitrary code). Save a plain state dict instead: "
            "torch.save(model.state_dict(), path), or safetensors.torch.save_file(...)"
        ) from e
    except Exception as e:  # corrupt or foreign file: zip errors, EOF, bad magic number, ...
        raise ModelLoadError(f"could not read checkpoint {str(path)!r}: {e}") from e


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """Unwrap ``{"state_dict": ...}``/``{"model": ...}`` containers and strip DDP/compile prefixes."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} holds no state dict (found {type(obj).__name__}); save "
            "model.state_dict(), optionally wrapped as {'state_dict': ...}"
        )
    sd = {str(k): v for k, v in obj.items()}
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a state dict from a local checkpoint file, without unpickling any Python object.

    ``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` with
    ``torch.load(weights_only=True)``. A dict wrapping the state dict under ``"state_dict"``,
    ``"model_state_dict"`` or ``"model"`` is unwrapped, and a ``module.`` (DDP) or ``_orig_mod.``
    (torch.compile) prefix on every key is stripped.

    Args:
        path: The checkpoint file.

    Returns:
        The state dict, on CPU.

    Raises:
        ModelLoadError: The file is missing, unreadable, of an unknown type, holds pickled objects, or
            holds no state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"checkpoint {str(p)!r} does not exist or is not a file")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as e:
            raise ModelLoadError(f"could not read safetensors checkpoint {str(p)!r}: {e}") from e
    elif suffix in TORCH_SUFFIXES:
        obj = torch_load(p)
    else:
        raise ModelLoadError(
            f"checkpoint {str(p)!r} has an unknown type {suffix!r}; use .safetensors or a state "
            f"dict saved with torch.save as one of {', '.join(TORCH_SUFFIXES)}"
        )
    return _unwrap_state_dict(obj, p)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_checkpoint_into(
    model: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, Any]
) -> nn.Module:
    """Load a checkpoint into ``model`` strictly; on any mismatch the model is left unchanged.

    Args:
        model: The model to load into.
        checkpoint: A checkpoint file (see :func:`read_checkpoint`) or a state dict.

    Returns:
        ``model``, with the checkpoint's weights.

    Raises:
        ModelLoadError: The checkpoint cannot be read, or its keys or shapes do not match the model's
            (the message lists a few missing and unexpected keys and shape mismatches).
    """
    if isinstance(checkpoint, Mapping):
        sd = dict(checkpoint)
        where = "the state dict"
    else:
        sd = read_checkpoint(checkpoint)
        where = f"checkpoint {os.fspath(checkpoint)!r}"
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd
        and isinstance(v, torch.Tensor)
        and isinstance(sd[k], torch.Tensor)
        and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{where} does not fit the model ({type(model).__name__}):"]
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_few(mismatched)}")
        if len(missing) + len(unexpected) > len(expected) // 2:
            parts.append("is it a checkpoint of another architecture?")
        raise ModelLoadError("\n  ".join(parts))
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # e.g. a non-tensor value; checked above otherwise
        raise ModelLoadError(f"could not load {where}: {e}") from e
    return model
