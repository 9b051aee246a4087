"""Collecting key statistics: the forward passes that stop at a layer's key site, and the cache.

``C`` (docs/method.md section 2) is averaged over every image and every position (or token) of a
dataset of clean images; each batch runs through the model only up to the key site, so the edited
layer and everything after it never run. :func:`collect_key_stats` can cache the result in a folder:
a cached file is used only when the layer, dataset id, weights fingerprint, key dtype and image limit
all match, so editing an earlier layer, or reading other data, recomputes it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from surgery._guards import model_device, require_eval
from surgery.editable import EditableLayer
from surgery.errors import SurgeryError
from surgery.identity import digest
from surgery.inputs.batches import count_images, data_id, iter_batches
from surgery.layers import get_layer
from surgery.stats.distributed import all_ranks, all_reduce_sums, process_group, shard
from surgery.stats.fingerprint import (
    UpstreamRecorder,
    fingerprint_and_dtype,
    model_float_dtype,
    prepare_batch,
    read_sites,
    recording_first,
)
from surgery.stats.keystats import KeyStats, key_sums

__all__ = ["collect_key_stats", "accumulate_key_sums", "cache_path"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the forward passes


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
    return _accumulate(model, [layer], batches, device=device, progress=progress, allow_empty=allow_empty)[0]


def _accumulate(
    model: nn.Module,
    layers: Sequence[EditableLayer],
    batches: Iterable[torch.Tensor],
    *,
    device: torch.device | str | None = None,
    progress: Any = None,
    allow_empty: bool = False,
) -> list[tuple[torch.Tensor, int]]:
    """:func:`accumulate_key_sums` of several layers, every batch's forward stopped once all their key
    sites are reached."""
    device = model_device(model) if device is None else torch.device(device)
    dtype = model_float_dtype(model)
    totals: list[torch.Tensor | None] = [None] * len(layers)
    counts = [0] * len(layers)
    sites = [layer.key_site for layer in layers]
    with torch.no_grad():
        for batch in batches:
            for i, (layer, keys) in enumerate(zip(layers, read_sites(model, sites, prepare_batch(batch, device, dtype), "collecting"))):
                s, c = key_sums(keys, layer.key_channel_dim)
                total = totals[i]
                if total is None:
                    totals[i] = s
                elif s.shape != total.shape:
                    raise SurgeryError(
                        f"keys of {layer.name!r} changed size from {total.shape[0]} to {s.shape[0]} "
                        "channels between batches"
                    )
                else:
                    total += s
                counts[i] += c
            if progress is not None:
                progress.update(int(batch.shape[0]))
    out = []
    for layer, total, count in zip(layers, totals, counts):
        if total is None or count == 0:
            if not allow_empty:
                raise SurgeryError("no images to collect key statistics from: the data is empty")
            n = layer.weight.shape[1]
            total, count = torch.zeros(n, n, dtype=torch.float64, device=device), 0
        out.append((total, count))
    return out


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
    stem = layer.replace(".", "_") or "model"
    return Path(cache_dir) / f"{stem}-{digest(key, 16)}.safetensors"


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
    layer: str | EditableLayer | Sequence[str | EditableLayer],
    data: Any,
    *,
    max_images: int | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dataset_id: str | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> KeyStats | dict[str, KeyStats]:
    """The uncentered second moment of ``layer``'s keys over every image and position of ``data``.

    Each batch runs through the model only up to the key site (the layer's input): the layer and
    everything after it never run. ``sum k k^T`` is accumulated in float64.

    Args:
        model: the model, in eval mode.
        layer: an editable layer or its name; or a list of them (the layers of a span edit): then the
            statistics of every one come from one pass over ``data``, each batch's forward stopped once
            all their key sites are reached.
        data: clean images: a tensor ``(N, 3, H, W)``, a :class:`~surgery.inputs.images.ImageFolder` or other
            ``Dataset``, a ``DataLoader``, or an iterable of batches (see
            :func:`surgery.inputs.batches.iter_batches`).
        max_images: use at most this many images.
        batch_size: images per forward where batching happens here.
        device: where the images go (the model must be there already); default the device of the
            model's parameters.
        cache_dir: a folder to cache statistics in (a file per layer); a file there is used only when
            layer, dataset id, weights fingerprint, key dtype and ``max_images`` all match.
        dataset_id: id of ``data`` for the cache; found automatically for tensors and ImageFolders,
            needed for other datasets and iterables (else nothing is cached).
        progress: show a tqdm progress bar.
        distributed: under an initialized ``torch.distributed`` process group (``None``: whenever one
            is running), every rank reads its shard (see :func:`shard`), the float64 sums and counts
            are combined with ``all_reduce``, every rank returns the same statistics, and only rank 0
            writes the cache.

    Returns:
        The :class:`KeyStats`, with ``sum`` on the CPU; for a list of layers, ``{layer name: KeyStats}``
        in the list's order (what ``rewrite(model, layers, ..., stats=...)`` takes).

    Raises:
        SurgeryError: the model is in training mode, the data is empty or malformed, a key site is never
            reached, or a list of layers is empty or names a layer twice.
    """
    require_eval(model, "collect_key_stats")
    several = not isinstance(layer, (str, EditableLayer))
    layers = [get_layer(model, one) for one in (layer if several else [layer])]  # type: ignore[union-attr]
    names = [one.name for one in layers]
    if not layers or len(set(names)) != len(names):
        raise SurgeryError(f"collect_key_stats takes one layer or a list of distinct layers, got {names}")
    device = model_device(model) if device is None else torch.device(device)
    dtype = model_float_dtype(model)
    if dataset_id is None:
        dataset_id = data_id(data, max_images)

    group = process_group() if distributed is not False else None
    if distributed and group is None:
        raise SurgeryError(
            "distributed=True needs an initialized torch.distributed process group with several ranks "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    local = data if group is None else shard(data, *group, max_images)
    local_max = max_images if group is None else None

    batches: Iterable[torch.Tensor] = iter_batches(local, batch_size=batch_size, max_images=local_max)
    recorders: list[UpstreamRecorder] = []
    identity: list[tuple[str, str]] = []  # (weights fingerprint, key dtype) per layer
    if cache_dir is None and group is None:
        # nothing to look up first: the fingerprints and key dtypes come from the first batch's forward
        recorders = [UpstreamRecorder(model, one.key_site) for one in layers]
        batches = recording_first(batches, recorders)
    else:
        # One image gives the key dtype; the fingerprint depends on the weights only. Peeking keeps
        # one-shot iterables intact; a rank with an empty shard (of a tensor or dataset) looks at `data`.
        first, batches = _peek(iter(batches))
        if first is None and group is not None:
            first = next(iter_batches(data, batch_size=1, max_images=1), None)
        if first is None:
            raise SurgeryError("no images to collect key statistics from: the data is empty")
        identity = [fingerprint_and_dtype(model, one, prepare_batch(first[:1], device, dtype)) for one in layers]

    found: dict[str, KeyStats] = {}
    paths: dict[str, Path] = {}
    if cache_dir is not None:
        if dataset_id is None:
            logger.warning(
                "not caching key statistics of %s: the data (%s) has no dataset id; pass "
                "dataset_id=... (a string that changes when the data changes)",
                ", ".join(names),
                type(data).__name__,
            )
        else:
            for one, (fingerprint, key_dtype) in zip(layers, identity):
                paths[one.name] = cache_path(cache_dir, one.name, dataset_id, fingerprint, key_dtype, max_images)
                expected = {
                    "layer": one.name,
                    "dataset_id": dataset_id,
                    "fingerprint": fingerprint,
                    "dtype": key_dtype,
                    "max_images": max_images,
                }
                cached = _load_cached(paths[one.name], expected)
                if all_ranks(cached is not None, group, device):
                    found[one.name] = cached  # type: ignore[assignment]

    todo = [one for one in layers if one.name not in found]
    if todo:
        total = count_images(local, local_max)
        rank = 0 if group is None else group[0]
        with tqdm(
            total=total,
            unit="img",
            desc=f"key stats {', '.join(one.name for one in todo)}" + (f" [rank {rank}]" if group else ""),
            disable=not progress,
            leave=False,
        ) as bar:
            sums = _accumulate(model, todo, batches, device=device, progress=bar, allow_empty=group is not None)
        if recorders:
            identity = [rec.result() for rec in recorders]
        by_name = dict(zip(names, identity))
        for one, (s, count) in zip(todo, sums):
            if group is not None:
                s, count = all_reduce_sums(s, count, device)
                if count == 0:
                    raise SurgeryError("no images to collect key statistics from: the data is empty")
            fingerprint, key_dtype = by_name[one.name]
            stats = KeyStats(one.name, s.cpu(), count, key_dtype, dataset_id, fingerprint, max_images)
            logger.info(
                "key statistics of %s: %d key vectors of %d channels (%s)", one.name, count, stats.n, key_dtype
            )
            path = paths.get(one.name)
            if path is not None and rank == 0:
                try:
                    stats.save(path)
                except OSError as e:
                    logger.warning("could not cache key statistics of %s in %s: %s", one.name, path, e)
                else:
                    logger.info("cached key statistics of %s in %s", one.name, path)
            found[one.name] = stats
    result = {name: found[name] for name in names}
    return result if several else result[names[0]]


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
