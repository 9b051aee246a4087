"""Edits as files: one safetensors file with the factors and string metadata (format versions 2 and 3).

Tensors:
    ``<param>.lambda`` ``(rank, m, *kernel)`` and ``<param>.u`` ``(rank, n)`` for factored edits (for each
    layer of a span edit, which is what version 3 adds: a factored edit of several parameters), or
    ``<param>.delta`` (the parameter's shape) for each parameter of a dense edit; and for each changed
    parameter ``<param>.base_along``: its original values along the edit (``W0 ._1 u``, the shape of
    ``lambda``, for factored edits; the scalar ``<W0, delta>`` for dense ones), with which a revert
    tells whether the edit is on a set of weights. Version 1 files (without ``base_along``) are read. A
    writer marks a file version 3 only when it needs to (a span edit), so that single-layer edits stay
    readable by libraries that know version 2.
Metadata (every value a string; JSON where noted):
    ``format`` = ``model-surgery/edit``, ``format_version`` = ``1``, ``library_version``, ``kind``
    (``factored`` | ``dense``), ``method``, ``layer``, ``params`` (JSON list), ``base`` (JSON: for each
    parameter its ``shape``, ``dtype`` and ``sha256`` of the original bytes), ``hparams`` (JSON),
    ``architecture``, ``description``, ``created`` (ISO 8601, UTC), ``info`` (JSON), ``file_sha256``.

``file_sha256`` is the SHA-256 (hex) of the whole file's bytes with this value's own 64 hex digits
replaced by 64 ASCII ``0``: a writer saves the file with 64 zeros there, hashes it, and writes the digest
over the zeros. Any corrupted byte (in the header, a metadata string or a factor) is then detected.

Reading validates everything before an :class:`~surgery.edits.edit.Edit` is built from the fields: header size, JSON, metadata types,
tensor names, the file checksum, dtypes, shapes against the recorded base shapes, and finiteness.
Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from surgery._files import atomic_write
from surgery._version import __version__
from surgery.errors import EditFormatError, SurgeryError
from surgery.identity import digest, hasher

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CHECKSUM_KEY",
    "save_edit_file",
    "load_edit_file",
    "read_edit_metadata",
    "MAX_HEADER_BYTES",
]

FORMAT = "model-surgery/edit"
FORMAT_VERSION = "3"
READABLE_VERSIONS = ("1", "2", "3")
MAX_HEADER_BYTES = 1 << 20  # real edit headers are a few KB; refuse anything beyond 1 MiB
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
CHECKSUM_KEY = "file_sha256"
_CHECKSUM_PLACEHOLDER = "0" * 64
_REQUIRED = ("format", "format_version", "kind", "method", "layer", "params", "base", "hparams", CHECKSUM_KEY)


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def save_edit_file(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> None:
    """Write one edit file atomically (a temporary file in the same folder, then a rename).

    ``tensors``: the file's tensors by name (see the module docstring); ``fields``: ``kind``,
    ``method``, ``layer``, ``params`` (list), ``base`` (dict), ``hparams`` (dict), ``architecture``,
    ``description``, ``created``, ``info`` (dict). Format, versions and the checksum are added here.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    for name, t in tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise SurgeryError(f"refusing to save {name}: it must be a finite floating-point tensor")
    params = list(fields["params"])
    missing = [p for p in params if p not in fields["base"]]
    if missing:
        raise SurgeryError(
            f"the edit has no base record (shape, dtype, fingerprint) for {missing}; edits made by "
            "rewrite() and finetune() have one"
        )
    spans = fields["kind"] == "factored" and len(params) > 1
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if spans else "2",
        "library_version": __version__,
        "kind": fields["kind"],
        "method": fields["method"],
        "layer": fields["layer"],
        "params": json.dumps(params),
        "base": json.dumps({p: fields["base"][p] for p in params}),
        "hparams": json.dumps(_json_safe(fields["hparams"]), sort_keys=True),
        "architecture": fields["architecture"] or "",
        "description": fields["description"],
        "created": fields["created"],
        "info": json.dumps(_json_safe(fields["info"]), sort_keys=True),
    }
    data = _checksummed(save_bytes(tensors, metadata={**metadata, CHECKSUM_KEY: _CHECKSUM_PLACEHOLDER}))
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise SurgeryError(
            f"the edit's metadata takes {n} bytes, more than the {MAX_HEADER_BYTES} readers accept; shorten "
            "its description, hparams or info"
        )

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _checksum_span(header: bytes) -> tuple[int, int] | None:
    """Where the 64 hex digits of ``file_sha256`` lie in the raw header bytes (None: not exactly once)."""
    key = f'"{CHECKSUM_KEY}":"'.encode()
    if header.count(key) != 1:
        return None
    start = header.index(key) + len(key)
    if header[start + 64 : start + 65] != b'"' or not re.fullmatch(rb"[0-9a-f]{64}", header[start : start + 64]):
        return None
    return start, start + 64


def _checksummed(data: bytes) -> bytes:
    """A safetensors file (as bytes) written with the placeholder checksum, with the digest filled in."""
    (n,) = struct.unpack("<Q", data[:8])
    span = _checksum_span(data[8 : 8 + n])
    if span is None:  # cannot happen with the metadata save_edit writes
        raise SurgeryError("internal error: the edit file's checksum placeholder was not found")
    return data[: 8 + span[0]] + digest(data).encode() + data[8 + span[1] :]


def _verify_checksum(path: Path, n: int, recorded: str) -> None:
    """Recompute ``file_sha256`` over the file and compare it with the recorded value."""
    try:
        with path.open("rb") as f:
            head = f.read(8 + n)
            span = _checksum_span(head[8:])
            if span is None or head[8 + span[0] : 8 + span[1]].decode() != recorded:
                raise EditFormatError(f"{path}: metadata {CHECKSUM_KEY!r} is malformed; the file is corrupted")
            h = hasher(head[: 8 + span[0]] + _CHECKSUM_PLACEHOLDER.encode() + head[8 + span[1] :])
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise EditFormatError(f"cannot read edit file {path}: {e}") from None
    if h.hexdigest() != recorded:
        raise EditFormatError(
            f"{path} fails its checksum ({CHECKSUM_KEY}): the file was corrupted or modified after it was "
            "written; get a fresh copy"
        )


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check the safetensors header ourselves before the library touches the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise EditFormatError(f"{path} is not an edit file: it is {size} bytes long (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise EditFormatError(
                    f"{path} has a bad header length ({n} bytes for a {size}-byte file); it is truncated, "
                    "corrupted, or not a model-surgery edit"
                )
            raw = f.read(n)
    except OSError as e:
        raise EditFormatError(f"cannot read edit file {path}: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EditFormatError(f"{path} has a header that is not valid JSON; the file is corrupted") from None
    if not isinstance(header, dict):
        raise EditFormatError(f"{path} has a header that is not a JSON object; the file is corrupted")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise EditFormatError(
            f"{path} has no string metadata; it is a safetensors file but not a model-surgery edit"
        )
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _FLOAT_DTYPES:
            raise EditFormatError(f"{path}: tensor {name!r} must have a floating-point dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise EditFormatError(f"{path}: tensor {name!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise EditFormatError(f"{path}: tensor {name!r} has invalid data offsets")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise EditFormatError(
            f"{path} is {size} bytes but its header describes {8 + n + end}; the file is truncated or corrupted"
        )
    return header, n


def _loads(meta: dict[str, str], key: str, path: Path, kind: type) -> Any:
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError:
        raise EditFormatError(f"{path}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise EditFormatError(f"{path}: metadata {key!r} must be a JSON {kind.__name__}")
    return value


def read_edit_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The checked string metadata of an edit file, without loading its tensors."""
    path = Path(path)
    header, n = _read_header(path)
    meta = header["__metadata__"]
    if meta.get("format") != FORMAT:
        raise EditFormatError(f"{path} is a safetensors file but not a model-surgery edit (format {meta.get('format')!r})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise EditFormatError(
            f"{path} uses edit format version {meta.get('format_version')!r}; this library reads versions "
            f"{', '.join(READABLE_VERSIONS)}. Upgrade model-surgery to read it"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise EditFormatError(f"{path} lacks required metadata {missing}")
    _verify_checksum(path, n, meta[CHECKSUM_KEY])
    return meta


def _check_base(base: dict, params: list, path: Path) -> None:
    for p in params:
        rec = base.get(p)
        if not (
            isinstance(rec, dict)
            and isinstance(rec.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in rec["shape"])
            and isinstance(rec.get("dtype"), str)
            and isinstance(rec.get("sha256"), str)
        ):
            raise EditFormatError(f"{path}: the base record of {p!r} must have shape, dtype and sha256")


def load_edit_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate an edit file; returns the fields of an :class:`~surgery.edits.edit.Edit`.

    Raises:
        EditFormatError: naming what is wrong with the file.
    """
    path = Path(path)
    if not path.is_file():
        raise EditFormatError(f"edit file {path} does not exist")
    meta = read_edit_metadata(path)
    params = _loads(meta, "params", path, list)
    if not params or not all(isinstance(p, str) for p in params):
        raise EditFormatError(f"{path}: metadata 'params' must list parameter names")
    base = _loads(meta, "base", path, dict)
    _check_base(base, params, path)
    hparams = _loads(meta, "hparams", path, dict)
    info = _loads(meta, "info", path, dict) if "info" in meta else {}
    kind = meta["kind"]
    if kind == "factored":
        if len(params) != 1 and meta["format_version"] in ("1", "2"):
            raise EditFormatError(
                f"{path}: a factored edit of format version {meta['format_version']} changes exactly one parameter"
            )
        if len(set(params)) != len(params):
            raise EditFormatError(f"{path}: metadata 'params' names a parameter twice")
        expected = {f"{p}.{t}" for p in params for t in ("lambda", "u")}
    elif kind == "dense":
        expected = {f"{p}.delta" for p in params}
    else:
        raise EditFormatError(f"{path}: unknown edit kind {kind!r} (expected 'factored' or 'dense')")
    # base_along is recorded for every changed parameter or for none (edits made without their
    # original weights; every version-1 file)
    allowed = [expected] if meta["format_version"] == "1" else [expected, expected | {f"{p}.base_along" for p in params}]
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names not in allowed:
                raise EditFormatError(
                    f"{path} holds tensors {sorted(names)} but its metadata calls for {sorted(allowed[-1])}"
                )
            tensors = {name: f.get_tensor(name) for name in names}
    except EditFormatError:
        raise
    except Exception as e:  # the safetensors parser's own checks
        raise EditFormatError(f"{path} is not a valid safetensors file: {e}") from None
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise EditFormatError(f"{path}: tensor {name!r} holds NaN or infinite values")
    along = {p: tensors[f"{p}.base_along"] for p in params if f"{p}.base_along" in tensors}
    common = dict(
        base_along=along,
        layer=meta["layer"],
        method=meta["method"],
        hparams=hparams,
        base={p: base[p] for p in params},
        architecture=meta.get("architecture") or None,
        description=meta.get("description", ""),
        created=meta.get("created", ""),
        info=info,
    )
    if kind == "factored":
        factors = {}
        for p in params:
            lam, u = tensors[f"{p}.lambda"], tensors[f"{p}.u"]
            shape = base[p]["shape"]
            if not (
                len(shape) >= 2
                and u.ndim == 2
                and lam.ndim == len(shape)
                and lam.shape[0] == u.shape[0] >= 1
                and lam.shape[1] == shape[0]
                and u.shape[1] == shape[1]
                and list(lam.shape[2:]) == shape[2:]
            ):
                raise EditFormatError(
                    f"{path}: factors lambda {tuple(lam.shape)} and u {tuple(u.shape)} of {p!r} do not fit the "
                    f"parameter shape {tuple(shape)} recorded in the file"
                )
            if not p.endswith(".weight") and p != "weight":
                raise EditFormatError(f"{path}: factored parameter {p!r} is not the weight of a layer")
            if p in along and tuple(along[p].shape) != tuple(lam.shape):
                raise EditFormatError(f"{path}: {p}.base_along must have the shape of lambda {tuple(lam.shape)}")
            factors[p] = (lam, u)
        if params[0] != (f"{meta['layer']}.weight" if meta["layer"] else "weight"):
            raise EditFormatError(f"{path}: parameter {params[0]!r} is not the weight of layer {meta['layer']!r}")
        if len(factors) == 1:
            ((lam, u),) = factors.values()
            return {"lam": lam, "u": u, **common}
        return {"span": factors, **common}
    for p in params:
        if list(tensors[f"{p}.delta"].shape) != base[p]["shape"]:
            raise EditFormatError(f"{path}: delta of {p!r} does not have the recorded shape {base[p]['shape']}")
        if p in along and along[p].ndim != 0:
            raise EditFormatError(f"{path}: {p}.base_along of a dense edit must be a scalar")
    return {"deltas": {p: tensors[f"{p}.delta"] for p in params}, **common}
