"""Key statistics: the uncentered second moment ``C = E[k k^T]`` of a layer's keys (DESIGN.md §3).

``C`` is averaged over every image and every position (or token) of a dataset of clean images and
whitens the exemplar keys when the rewrite direction is chosen. It is accumulated in float64 as a
running sum of ``k k^T`` and a count, so partial results from batches, files or processes add up
exactly (:meth:`KeyStats.merge`, :func:`accumulate_key_sums`). The forward pass stops at the key site:
the edited layer and everything after it never run.

Statistics are saved as safetensors with metadata (layer, count, key dtype, dataset id and a
fingerprint of the weights upstream of the layer), and :func:`collect_key_stats` can cache them in a
folder: a cached file is used only when all of these match, so editing an earlier layer, or reading
other data, recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checks import model_device, require_eval
from .editable import EditableLayer, Site
from .errors import SurgeryError
from .hooks import trace
from .layers import get_layer

__all__ = [
    "KeyStats",
    "collect_key_stats",
    "accumulate_key_sums",
    "key_sums",
    "weights_fingerprint",
    "FORMAT",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT = "surgery.keystats"
"""The ``format`` metadata value of a key-statistics file."""
FORMAT_VERSION = "1"
"""The ``format_version`` this library writes and reads."""

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


@dataclass(eq=False)
class KeyStats:
    """The running second moment of one layer's keys.

    Attributes:
        layer: module name of the editable layer.
        sum: ``n x n`` float64, the sum of ``k k^T`` over every key vector seen.
        count: the number of key vectors (images x positions or tokens).
        dtype: dtype of the keys, e.g. ``"float32"``.
        dataset_id: where the keys came from (see :func:`surgery.data.data_id`); ``None`` if unknown.
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

    @property
    def n(self) -> int:
        """The number of key channels."""
        return int(self.sum.shape[0])

    def moment(self) -> torch.Tensor:
        """``C = sum / count``: the uncentered second moment, float64 ``n x n``."""
        return self.sum / self.count

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
        return cls(layer, s.cpu(), count, _dtype_name(keys.dtype), dataset_id, fingerprint)

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
            did = "merged:" + hashlib.sha256(joined.encode()).hexdigest()[:16]
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

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"sum": self.sum.detach().cpu().contiguous()}, tmp, metadata=self.metadata())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

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
                names = list(f.keys())
                s = f.get_tensor("sum") if names == ["sum"] else None
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
        if meta.get("format_version") != FORMAT_VERSION:
            raise bad(
                f"format version {meta.get('format_version')!r}; this library reads {FORMAT_VERSION!r}"
            )
        missing = [k for k in ("layer", "count", "n", "dtype", "fingerprint") if k not in meta]
        if missing:
            raise bad(f"metadata lacks {missing}")
        if s is None:
            raise bad(f"it holds tensors {names}, expected exactly ['sum']")
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
        return cls(
            layer=meta["layer"],
            sum=s,
            count=count,
            dtype=meta["dtype"],
            dataset_id=meta.get("dataset_id"),
            fingerprint=meta["fingerprint"],
            max_images=max_images,
        )

    def __repr__(self) -> str:
        return (
            f"KeyStats({self.layer!r}, n={self.n}, count={self.count}, dtype={self.dtype}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


# --------------------------------------------------------------------------- the forward passes


def _model_float_dtype(model: nn.Module) -> torch.dtype | None:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


def _prepare(batch: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    if dtype is not None and batch.is_floating_point() and batch.dtype != dtype:
        batch = batch.to(dtype)
    return batch


def _read_site(model: nn.Module, site: Site, batch: torch.Tensor, what: str) -> torch.Tensor:
    """One forward of ``batch`` that ends at ``site`` and returns the tensor found there."""
    want_input = site.needs_input
    with trace(
        model,
        site.module,
        retain_input=want_input,
        retain_output=not want_input,
        clone=False,  # nothing runs after the hook: the forward stops there
        stop=True,
    ) as t:
        model(batch)
    if not t.fired:
        raise SurgeryError(
            f"the key site {site} was never reached in the forward pass ({what}); is the layer "
            "part of this model's forward path?"
        )
    keys = site.read(t)  # a "call" site computes its keys from the module's call, here
    if not isinstance(keys, torch.Tensor):
        raise SurgeryError(f"the key site {site} carries a {type(keys).__name__}, not a tensor")
    return keys


class _UpstreamRecorder:
    """Records, during one forward, the modules that start before a layer's key site and the keys'
    dtype: what the weights fingerprint hashes (:func:`_fingerprint_and_dtype`)."""

    def __init__(self, model: nn.Module, site: Site) -> None:
        self.model, self.site = model, site
        self.key_module = model.get_submodule(site.module) if site.module else model
        self.started: dict[str, nn.Module] = {}
        self.key_dtype: torch.dtype | None = None
        self._handles: list[Any] = []

    def attach(self) -> None:
        def make_hook(name: str) -> Callable[[nn.Module, Any], None]:
            def hook(module: nn.Module, args: Any) -> None:
                # a "call" site's keys are computed by its module (rerun in Site.read): it counts
                if (module is not self.key_module or self.site.port == "call") and name not in self.started:
                    self.started[name] = module

            return hook

        def record(value: Any) -> None:
            if self.key_dtype is None and isinstance(value, torch.Tensor):
                self.key_dtype = value.dtype

        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(make_hook(name)))
        if self.site.port != "output":
            self._handles.append(self.key_module.register_forward_pre_hook(lambda m, args: record(args[0] if args else None)))
        else:
            self._handles.append(self.key_module.register_forward_hook(lambda m, args, out: record(out)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> tuple[str, str]:
        """``(fingerprint, key dtype name)`` of what the recorded forward saw."""
        if self.key_dtype is None:
            raise SurgeryError(f"the key site {self.site} was never reached in the forward pass")
        started = dict(self.started)
        if self.site.port == "output":  # the module at an output site runs before its keys exist
            started.pop(self.site.module, None)
        h = hashlib.sha256()
        for name in sorted(started):
            module = started[name]
            desc = f"{type(module).__module__}.{type(module).__qualname__}({module.extra_repr()})"
            h.update(f"module\0{name}\0{_ADDRESS.sub('0x', desc)}\n".encode())
            tensors = [("param", k, v) for k, v in module._parameters.items() if v is not None]
            tensors += [("buffer", k, v) for k, v in module._buffers.items() if v is not None]
            for kind, key, t in tensors:
                t = t.detach()
                h.update(f"{kind}\0{key}\0{_dtype_name(t.dtype)}\0{tuple(t.shape)}\n".encode())
                flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
                h.update(flat.numpy().tobytes())
        return h.hexdigest(), _dtype_name(self.key_dtype)


def _fingerprint_and_dtype(
    model: nn.Module, layer: EditableLayer, example_batch: torch.Tensor
) -> tuple[str, str]:
    """The weights fingerprint of ``layer``'s upstream, and the dtype of its keys, in one forward."""
    rec = _UpstreamRecorder(model, layer.key_site)
    rec.attach()
    try:
        with torch.no_grad():
            _read_site(model, layer.key_site, example_batch, "fingerprint")
    finally:
        rec.detach()
    return rec.result()


def _recording_first(batches: Iterable[torch.Tensor], rec: _UpstreamRecorder) -> Iterator[torch.Tensor]:
    """``batches``, with ``rec`` attached while the first one is processed."""
    it = iter(batches)
    rec.attach()
    try:
        first = next(it, None)
        if first is None:
            return
        yield first
    finally:
        rec.detach()
    yield from it


def weights_fingerprint(
    model: nn.Module, layer: str | EditableLayer, example_batch: torch.Tensor
) -> str:
    """SHA-256 of everything that computes ``layer``'s keys.

    One forward of ``example_batch`` (stopped at the key site) records, with forward pre-hooks, every
    module whose forward started before the key site was reached; the hash covers each one's name,
    class and ``extra_repr`` (stride, eps, ...) and the names, dtypes, shapes and bytes of the
    parameters and buffers it owns directly. Editing an earlier layer changes the fingerprint; editing
    ``layer`` itself or anything after it does not. A parent module (e.g. the model) counts as
    started, so its own parameters count even when they act after the layer (conservative).

    Args:
        model: the model, in eval mode.
        layer: the editable layer or its name.
        example_batch: images the model accepts; one image is enough (only the first is used).

    Raises:
        SurgeryError: the model is in training mode, or the key site is never reached.
    """
    require_eval(model, "collect_key_stats")
    layer = get_layer(model, layer)
    if example_batch.ndim == 3:
        example_batch = example_batch.unsqueeze(0)
    batch = _prepare(example_batch[:1], model_device(model), _model_float_dtype(model))
    return _fingerprint_and_dtype(model, layer, batch)[0]


def accumulate_key_sums(
    model: nn.Module,
    layer: EditableLayer,
    batches: Iterable[torch.Tensor],
    *,
    device: torch.device | str | None = None,
    progress: Any = None,
    allow_empty: bool = False,
) -> tuple[torch.Tensor, int]:
    """Sum ``k k^T`` and count the key vectors of ``layer`` over ``batches``, one stopped forward each.

    This is the part that distributes: partial ``(sum, count)`` from several processes add up to the
    full result (e.g. with ``torch.distributed.all_reduce``).

    Args:
        model: the model, in eval mode (not checked here).
        layer: the editable layer.
        batches: image batches, moved to ``device`` and cast to the model's float dtype.
        device: where to run; default the model's.
        progress: an optional tqdm-like object, ``update(n_images)`` after each batch.
        allow_empty: return zeros and a count of 0 for no batches (a rank with an empty shard).

    Returns:
        ``(sum, count)``: float64 ``n x n`` on ``device``, and the number of key vectors.
    """
    device = model_device(model) if device is None else torch.device(device)
    dtype = _model_float_dtype(model)
    total: torch.Tensor | None = None
    count = 0
    with torch.no_grad():
        for batch in batches:
            keys = _read_site(model, layer.key_site, _prepare(batch, device, dtype), "collecting")
            s, c = key_sums(keys, layer.key_channel_dim)
            if total is None:
                total = s
            elif s.shape != total.shape:
                raise SurgeryError(
                    f"keys of {layer.name!r} changed size from {total.shape[0]} to {s.shape[0]} "
                    "channels between batches"
                )
            else:
                total += s
            count += c
            if progress is not None:
                progress.update(int(batch.shape[0]))
    if total is None or count == 0:
        if allow_empty:
            n = layer.weight.shape[1]
            return torch.zeros(n, n, dtype=torch.float64, device=device), 0
        raise SurgeryError("no images to collect key statistics from: the data is empty")
    return total, count


def _process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` when a torch.distributed process group with several ranks is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def shard(data: Any, rank: int, world: int, max_images: int | None = None) -> Any:
    """This rank's part of ``data``: images ``rank, rank + world, ...`` of the first ``max_images``.

    Tensors and map-style datasets are split here. DataLoaders and other iterables are taken to be
    this rank's shard already (give them a ``DistributedSampler``), and cannot take ``max_images``.
    """
    from torch.utils.data import Dataset, IterableDataset, Subset

    if isinstance(data, torch.Tensor):
        return data[:max_images][rank::world]
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        n = len(data) if max_images is None else min(len(data), max_images)
        return Subset(data, range(rank, n, world))
    if max_images is not None:
        raise SurgeryError(
            "under torch.distributed, max_images applies to tensors and datasets that collect_key_stats "
            "splits itself; for a DataLoader, limit the images in its DistributedSampler instead"
        )
    return data


def cache_path(
    cache_dir: str | os.PathLike[str],
    layer: str,
    dataset_id: str,
    fingerprint: str,
    dtype: str,
    max_images: int | None,
) -> Path:
    """Where :func:`collect_key_stats` caches the statistics these arguments identify."""
    key = json.dumps([layer, dataset_id, fingerprint, dtype, max_images])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = layer.replace(".", "_") or "model"
    return Path(cache_dir) / f"{stem}-{digest}.safetensors"


def _cache_mismatch(stats: KeyStats, expected: dict[str, Any]) -> str | None:
    """Why a cached file does not serve this request, or ``None`` if it does."""
    for attr in ("layer", "dataset_id", "fingerprint", "dtype", "max_images"):
        got = getattr(stats, attr)
        if got != expected[attr]:
            return f"{attr} is {got!r}, expected {expected[attr]!r}"
    return None


def _peek(it: Iterator[torch.Tensor]) -> tuple[torch.Tensor | None, Iterator[torch.Tensor]]:
    first = next(it, None)
    if first is None:
        return None, iter(())

    def chain() -> Iterator[torch.Tensor]:
        yield first
        yield from it

    return first, chain()


def collect_key_stats(
    model: nn.Module,
    layer: str | EditableLayer,
    data: Any,
    *,
    max_images: int | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dataset_id: str | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> KeyStats:
    """The uncentered second moment of ``layer``'s keys over every image and position of ``data``.

    Each batch runs through the model only up to the key site (the layer's input): the layer and
    everything after it never run. ``sum k k^T`` is accumulated in float64.

    Args:
        model: the model, in eval mode.
        layer: an editable layer or its name.
        data: clean images: a tensor ``(N, 3, H, W)``, a :class:`~surgery.data.ImageFolder` or other
            ``Dataset``, a ``DataLoader``, or an iterable of batches (see
            :func:`surgery.data.iter_batches`).
        max_images: use at most this many images.
        batch_size: images per forward where batching happens here.
        device: where the images go (the model must be there already); default the device of the
            model's parameters.
        cache_dir: a folder to cache statistics in; a file there is used only when layer, dataset id,
            weights fingerprint, key dtype and ``max_images`` all match.
        dataset_id: id of ``data`` for the cache; found automatically for tensors and ImageFolders,
            needed for other datasets and iterables (else nothing is cached).
        progress: show a tqdm progress bar.
        distributed: under an initialized ``torch.distributed`` process group (``None``: whenever one
            is running), every rank reads its shard (see :func:`shard`), the float64 sums and counts
            are combined with ``all_reduce``, every rank returns the same statistics, and only rank 0
            writes the cache.

    Returns:
        The :class:`KeyStats`, with ``sum`` on the CPU.

    Raises:
        SurgeryError: the model is in training mode, the data is empty or malformed, or the key site
            is never reached.
    """
    from .data import count_images, data_id, iter_batches

    require_eval(model, "collect_key_stats")
    layer = get_layer(model, layer)
    device = model_device(model) if device is None else torch.device(device)
    dtype = _model_float_dtype(model)
    if dataset_id is None:
        dataset_id = data_id(data, max_images)

    group = _process_group() if distributed is not False else None
    if distributed and group is None:
        raise SurgeryError(
            "distributed=True needs an initialized torch.distributed process group with several ranks "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    local = data if group is None else shard(data, *group, max_images)
    local_max = max_images if group is None else None

    batches: Iterable[torch.Tensor] = iter_batches(local, batch_size=batch_size, max_images=local_max)
    recorder: _UpstreamRecorder | None = None
    path: Path | None = None
    if cache_dir is None and group is None:
        # nothing to look up first: the fingerprint and key dtype come from the first batch's forward
        recorder = _UpstreamRecorder(model, layer.key_site)
        batches = _recording_first(batches, recorder)
        fingerprint = key_dtype = ""
    else:
        # One image gives the key dtype; the fingerprint depends on the weights only. Peeking keeps
        # one-shot iterables intact; a rank with an empty shard (of a tensor or dataset) looks at `data`.
        first, batches = _peek(iter(batches))
        if first is None and group is not None:
            first = next(iter_batches(data, batch_size=1, max_images=1), None)
        if first is None:
            raise SurgeryError("no images to collect key statistics from: the data is empty")
        fingerprint, key_dtype = _fingerprint_and_dtype(model, layer, _prepare(first[:1], device, dtype))

    if cache_dir is not None:
        if dataset_id is None:
            logger.warning(
                "not caching key statistics of %s: the data (%s) has no dataset id; pass "
                "dataset_id=... (a string that changes when the data changes)",
                layer.name,
                type(data).__name__,
            )
        else:
            path = cache_path(cache_dir, layer.name, dataset_id, fingerprint, key_dtype, max_images)
            expected = {
                "layer": layer.name,
                "dataset_id": dataset_id,
                "fingerprint": fingerprint,
                "dtype": key_dtype,
                "max_images": max_images,
            }
            cached = _load_cached(path, expected)
            if _all_ranks(cached is not None, group, device):
                return cached  # type: ignore[return-value]

    from tqdm import tqdm

    total = count_images(local, local_max)
    rank = 0 if group is None else group[0]
    with tqdm(
        total=total,
        unit="img",
        desc=f"key stats {layer.name}" + (f" [rank {rank}]" if group else ""),
        disable=not progress,
        leave=False,
    ) as bar:
        s, count = accumulate_key_sums(
            model, layer, batches, device=device, progress=bar, allow_empty=group is not None
        )
    if group is not None:
        s, count = _all_reduce_sums(s, count, device)
        if count == 0:
            raise SurgeryError("no images to collect key statistics from: the data is empty")
    if recorder is not None:
        fingerprint, key_dtype = recorder.result()
    stats = KeyStats(layer.name, s.cpu(), count, key_dtype, dataset_id, fingerprint, max_images)
    logger.info(
        "key statistics of %s: %d key vectors of %d channels (%s)",
        layer.name,
        count,
        stats.n,
        key_dtype,
    )
    if path is not None and rank == 0:
        try:
            stats.save(path)
        except OSError as e:
            logger.warning("could not cache key statistics of %s in %s: %s", layer.name, path, e)
        else:
            logger.info("cached key statistics of %s in %s", layer.name, path)
    return stats


def _all_ranks(flag: bool, group: tuple[int, int] | None, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (just ``flag`` without a process group)."""
    if group is None:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=_reduce_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _reduce_device(device: torch.device) -> torch.device:
    import torch.distributed as dist

    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce_sums(s: torch.Tensor, count: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Add the float64 sums and the counts of every rank; every rank gets the totals."""
    import torch.distributed as dist

    where = _reduce_device(device)
    total = s.to(where, torch.float64)
    n = torch.tensor([count], dtype=torch.int64, device=where)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    dist.all_reduce(n, op=dist.ReduceOp.SUM)
    return total, int(n.item())


def _load_cached(path: Path, expected: dict[str, Any]) -> KeyStats | None:
    """The cached statistics at ``path`` when they match ``expected``; log why not otherwise."""
    if not path.is_file():
        logger.info("key statistics cache miss for %s: no file %s", expected["layer"], path)
        return None
    try:
        cached = KeyStats.load(path)
    except SurgeryError as e:
        logger.warning("key statistics cache file %s is unusable, recomputing: %s", path, e)
        return None
    why = _cache_mismatch(cached, expected)
    if why is not None:
        logger.info("key statistics cache miss for %s (%s): %s", expected["layer"], path, why)
        return None
    logger.info("key statistics cache hit for %s: %s", expected["layer"], path)
    return cached
