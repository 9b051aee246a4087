"""The :class:`KeyStats` container and its file format: the running second moment of one layer's keys.

``C = sum k k^T / count`` (uncentered, see docs/method.md section 2) is kept as a float64 sum and a
count, so partial results from batches, files or processes add up exactly (:meth:`KeyStats.merge`).
Statistics are saved as safetensors with string metadata: layer, count, key dtype, dataset id and a
fingerprint of the weights upstream of the layer (:mod:`surgery.stats.fingerprint`). Since format
version 2 the file also holds the whitening ``C^{-1/2}`` (:meth:`KeyStats.whitening`), computed once
when the statistics are saved, so edits read it instead of decomposing ``C`` again; version-1 files
(the sum alone) are still read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery._files import atomic_write
from surgery.errors import SurgeryError
from surgery.identity import digest, dtype_name, tensor_sha256
from surgery.stats.whitening import inverse_sqrt

__all__ = ["KeyStats", "key_sums", "ridged", "ridged_moment", "FORMAT", "FORMAT_VERSION", "READ_VERSIONS"]


FORMAT = "surgery.keystats"
"""The ``format`` metadata value of a key-statistics file."""
FORMAT_VERSION = "2"
"""The ``format_version`` this library writes (it reads ``READ_VERSIONS``)."""
READ_VERSIONS = ("1", "2")


def key_sums(keys: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, int]:
    """The sum of ``k k^T`` over every key vector of ``keys``, and how many there are.

    Args:
        keys: any tensor whose axis ``channel_dim`` holds the ``n`` channels of each key vector
            (``(N, n, H, W)`` with ``channel_dim=1``, ``(N, T, n)`` with ``channel_dim=-1``).
        channel_dim: the channel axis.

    Returns:
        ``(sum, count)``: ``sum`` is ``n x n`` float64 on ``keys``' device.
    """
    if keys.ndim == 0:
        raise SurgeryError("keys must have a channel axis; got a scalar")
    k = keys.detach().movedim(channel_dim, -1)
    k = k.reshape(-1, k.shape[-1]).to(torch.float64)
    return k.T @ k, int(k.shape[0])


def ridged(moment: torch.Tensor, share: float = 1e-2) -> torch.Tensor:
    """``moment`` plus ``share`` times its mean eigenvalue on the diagonal: statistics from a handful of
    images leave the second moment nearly singular, and ``C^-1 k`` then points into unused directions."""
    ridge = share * torch.trace(moment) / moment.shape[0]
    return moment + ridge * torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)


def ridged_moment(keys: torch.Tensor, channel_dim: int, share: float = 1e-2) -> torch.Tensor:
    """The second moment of the key vectors of ``keys`` (float64), :func:`ridged` by ``share``."""
    s, count = key_sums(keys, channel_dim)
    return ridged(s / count, share)


@dataclass(eq=False)
class KeyStats:
    """The running second moment of one layer's keys.

    Attributes:
        layer: module name of the editable layer.
        sum: ``n x n`` float64, the sum of ``k k^T`` over every key vector seen.
        count: the number of key vectors (images x positions or tokens).
        dtype: dtype of the keys, e.g. ``"float32"``.
        dataset_id: where the keys came from (see :func:`surgery.inputs.batches.data_id`); ``None`` if unknown.
        fingerprint: SHA-256 of the model upstream of the key site (:func:`weights_fingerprint`).
        max_images: the image limit the statistics were collected under (``None``: all the data).
    """

    layer: str
    sum: torch.Tensor
    count: int
    dtype: str
    dataset_id: str | None = None
    fingerprint: str = ""
    max_images: int | None = None

    def __post_init__(self) -> None:
        s = self.sum
        if not isinstance(s, torch.Tensor) or s.ndim != 2 or s.shape[0] != s.shape[1]:
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise SurgeryError(f"KeyStats.sum must be a square matrix, got {shape}")
        if s.dtype != torch.float64:
            raise SurgeryError(f"KeyStats.sum must be float64, got {s.dtype}")
        if int(self.count) <= 0:
            raise SurgeryError(f"KeyStats.count must be positive, got {self.count}")
        self.count = int(self.count)
        # C^{-1/2}, with what it was computed from: the sum tensor and its in-place version counter
        self._whitening: tuple[torch.Tensor, int, int, int] | None = None

    @property
    def n(self) -> int:
        """The number of key channels."""
        return int(self.sum.shape[0])

    def moment(self) -> torch.Tensor:
        """``C = sum / count``: the uncentered second moment, float64 ``n x n``."""
        return self.sum / self.count

    def whitening(self) -> torch.Tensor:
        """``C^{-1/2}`` (float64 ``n x n``, :func:`~surgery.stats.whitening.inverse_sqrt`), computed on
        first use and kept: every edit with these statistics reuses it. Recomputed if ``sum`` or
        ``count`` were changed since."""
        key = (id(self.sum), self.sum._version, self.count)
        if self._whitening is None or self._whitening[1:] != key:
            self._whitening = (inverse_sqrt(self.moment()), *key)
        return self._whitening[0]

    @classmethod
    def from_keys(
        cls,
        keys: torch.Tensor,
        channel_dim: int,
        *,
        layer: str,
        dataset_id: str | None = None,
        fingerprint: str = "",
    ) -> KeyStats:
        """Statistics of captured keys, e.g. ``layer.capture(model, x).keys``.

        Args:
            keys: key tensor with channels on ``channel_dim``.
            channel_dim: ``layer.key_channel_dim``.
            layer: the layer's name.
            dataset_id: optional provenance.
            fingerprint: optional :func:`weights_fingerprint` of the model.
        """
        s, count = key_sums(keys, channel_dim)
        if count == 0:
            raise SurgeryError("no key vectors: keys are empty")
        return cls(layer, s.cpu(), count, dtype_name(keys.dtype), dataset_id, fingerprint)

    def merge(self, other: KeyStats) -> KeyStats:
        """A new KeyStats over both sets of keys (sums and counts added; ``max_images`` dropped).

        Raises:
            SurgeryError: different layer, fingerprint, key dtype or size.
        """
        for attr in ("layer", "fingerprint", "dtype", "n"):
            a, b = getattr(self, attr), getattr(other, attr)
            if a != b:
                raise SurgeryError(
                    f"cannot merge key statistics with different {attr}: {a!r} vs {b!r}"
                )
        if self.dataset_id == other.dataset_id:
            did = self.dataset_id
        elif self.dataset_id is None or other.dataset_id is None:
            did = None
        else:
            joined = "\n".join(sorted((self.dataset_id, other.dataset_id)))
            did = "merged:" + digest(joined, 16)
        s = self.sum + other.sum.to(self.sum.device)
        return KeyStats(self.layer, s, self.count + other.count, self.dtype, did, self.fingerprint)

    def metadata(self) -> dict[str, str]:
        """The string metadata written to a safetensors file."""
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layer": self.layer,
            "count": str(self.count),
            "n": str(self.n),
            "dtype": self.dtype,
            "fingerprint": self.fingerprint,
        }
        if self.dataset_id is not None:
            meta["dataset_id"] = self.dataset_id
        if self.max_images is not None:
            meta["max_images"] = str(self.max_images)
        return meta

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to a safetensors file (atomically: a temporary file renamed into place).

        Returns:
            The path written.
        """
        from safetensors.torch import save_file

        total = self.sum.detach().cpu().contiguous()
        tensors = {"sum": total, "whitening": self.whitening().detach().cpu().contiguous()}
        meta = {**self.metadata(), "whitening_of": tensor_sha256(total)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyStats:
        """Read a file written by :meth:`save`, validating it.

        Raises:
            SurgeryError: the file is missing, not safetensors, not key statistics, of another format
                version, or inconsistent (shape, count, non-finite or non-symmetric sum).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SurgeryError(f"key statistics file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                names = sorted(f.keys())
                s = f.get_tensor("sum") if names in (["sum"], ["sum", "whitening"]) else None
                z = f.get_tensor("whitening") if s is not None and "whitening" in names else None
        except SurgeryError:
            raise
        except Exception as e:  # safetensors raises its own error types, OSError, ValueError...
            raise SurgeryError(
                f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e}); "
                "recompute it with surgery.collect_key_stats"
            ) from None

        def bad(why: str) -> SurgeryError:
            return SurgeryError(
                f"{str(path)!r} is not a valid key statistics file: {why}; "
                "recompute it with surgery.collect_key_stats"
            )

        if meta.get("format") != FORMAT:
            raise bad(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") not in READ_VERSIONS:
            raise bad(
                f"format version {meta.get('format_version')!r}; this library reads "
                + " and ".join(repr(v) for v in READ_VERSIONS)
            )
        missing = [k for k in ("layer", "count", "n", "dtype", "fingerprint") if k not in meta]
        if missing:
            raise bad(f"metadata lacks {missing}")
        if s is None:
            raise bad(f"it holds tensors {names}, expected exactly ['sum'] or ['sum', 'whitening']")
        try:
            count, n = int(meta["count"]), int(meta["n"])
            max_images = int(meta["max_images"]) if "max_images" in meta else None
        except ValueError:
            raise bad("count, n or max_images is not an integer") from None
        if count <= 0:
            raise bad(f"count is {count}")
        if s.dtype != torch.float64 or tuple(s.shape) != (n, n):
            raise bad(f"sum is {s.dtype} {tuple(s.shape)}, expected float64 ({n}, {n})")
        if not bool(torch.isfinite(s).all()):
            raise bad("sum has NaN or infinite values")
        if s.numel():
            scale = float(s.abs().max())
            if float((s - s.T).abs().max()) > 1e-8 * scale:
                raise bad("sum is not symmetric")
        if bool((s.diagonal() < 0).any()):
            raise bad("sum has negative diagonal entries")
        stats = cls(
            layer=meta["layer"],
            sum=s,
            count=count,
            dtype=meta["dtype"],
            dataset_id=meta.get("dataset_id"),
            fingerprint=meta["fingerprint"],
            max_images=max_images,
        )
        if z is not None:
            if z.dtype != torch.float64 or tuple(z.shape) != (n, n) or not bool(torch.isfinite(z).all()):
                raise bad(f"its whitening is {z.dtype} {tuple(z.shape)} or not finite, expected float64 ({n}, {n})")
            if meta.get("whitening_of") != tensor_sha256(s):
                raise bad("its whitening was not computed from its sum")
            stats._whitening = (z, id(stats.sum), stats.sum._version, stats.count)
        return stats

    def __repr__(self) -> str:
        return (
            f"KeyStats({self.layer!r}, n={self.n}, count={self.count}, dtype={self.dtype}, "
            f"fingerprint={self.fingerprint[:12]})"
        )
