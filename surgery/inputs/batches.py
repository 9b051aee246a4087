"""Image batches from any data source, for key statistics: a tensor, a ``Dataset``, an
``IterableDataset``, a ``DataLoader``, any iterable of batches, or an :class:`ImageFolder`; each batch
held to :func:`~surgery.inputs.images.check_images`. Also how many images a source holds and a stable
id of it for caching."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler

from surgery.errors import SurgeryError
from surgery.identity import tensor_sha256
from surgery.inputs.images import ImageFolder, check_images

__all__ = ["iter_batches", "count_images", "data_id"]


def _first(item: Any, what: str) -> torch.Tensor:
    """The images of a batch or sample: the tensor itself or the first element of a tuple/list."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise SurgeryError(
            f"{what} is a {type(item).__name__}; expected an image tensor or a tuple "
            "(images, labels, ...) whose first element is one"
        )
    return item


def _check_batch(batch: torch.Tensor) -> torch.Tensor:
    """A batch read from a dataset, loader or iterable, checked by :func:`check_images` (one
    ``(3, H, W)`` image counts as a batch of one; an empty batch is passed over)."""
    if batch.ndim == 3:
        batch = batch.unsqueeze(0)
    if batch.ndim == 4 and batch.shape[0] == 0:
        return batch
    return check_images(batch, "a batch")


def _stack(samples: list[torch.Tensor], start: int) -> torch.Tensor:
    shapes = {tuple(s.shape) for s in samples}
    if len(shapes) > 1:
        raise SurgeryError(
            f"dataset items {start}..{start + len(samples) - 1} have different shapes "
            f"{sorted(shapes)}; give the dataset a transform that resizes "
            "(e.g. surgery.Preprocess.from_model(model).model_input())"
        )
    return torch.stack(samples)


def _is_map_dataset(data: Any) -> bool:
    """A map-style Dataset with a length (indexable as ``data[i]``)."""
    return (
        isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__")
    )


def _raw_batches(data: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """The image batches of ``data``, whatever its kind: a tensor is checked whole, other batches not."""
    if isinstance(data, torch.Tensor):
        x = check_images(data)
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size]
    elif isinstance(data, DataLoader):
        for j, batch in enumerate(data):
            yield _first(batch, f"batch {j} of the DataLoader")
    elif _is_map_dataset(data):
        n = len(data)
        for i in range(0, n, batch_size):
            samples = [_first(data[k], f"dataset item {k}") for k in range(i, min(i + batch_size, n))]
            yield _stack(samples, i)
    elif isinstance(data, IterableDataset):
        buf: list[torch.Tensor] = []
        start = 0
        for k, item in enumerate(data):
            buf.append(_first(item, f"dataset item {k}"))
            if len(buf) == batch_size:
                yield _stack(buf, start)
                buf, start = [], k + 1
        if buf:
            yield _stack(buf, start)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, os.PathLike)):
        for j, batch in enumerate(data):
            yield _first(batch, f"batch {j}")
    else:
        raise SurgeryError(
            f"cannot read images from a {type(data).__name__}; pass a tensor (N, 3, H, W), a Dataset, "
            "a DataLoader, an iterable of batches, or a folder via surgery.inputs.images.ImageFolder"
        )


def iter_batches(
    data: Any, *, batch_size: int = 32, max_images: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield image batches ``(B, 3, H, W)`` from any common data source, each checked by
    :func:`check_images` (the model's input: floating point, finite).

    Args:
        data: a tensor ``(N, 3, H, W)``; a map-style ``Dataset`` (items are tensors or tuples whose
            first element is the image), batched here by ``batch_size``; an ``IterableDataset`` of
            such items; a ``DataLoader`` or any other iterable of batches (tensors, or tuples whose
            first element is the images), used as batched. A DataLoader with workers decodes faster
            than a plain Dataset.
        batch_size: images per batch where batching happens here.
        max_images: stop after this many images, truncating the last batch.

    Raises:
        SurgeryError: an unknown data type, items that are not image tensors, items of different
            shapes within a batch, or images that :func:`check_images` refuses.
    """
    if batch_size <= 0:
        raise SurgeryError(f"batch_size must be positive, got {batch_size}")
    if max_images is not None and max_images <= 0:
        raise SurgeryError(f"max_images must be positive, got {max_images}")
    seen = 0
    for batch in _raw_batches(data, batch_size):
        if not isinstance(data, torch.Tensor):  # a tensor is checked whole by _raw_batches
            batch = _check_batch(batch)
        if max_images is not None and seen + batch.shape[0] > max_images:
            batch = batch[: max_images - seen]
        if batch.shape[0] == 0:
            continue
        seen += batch.shape[0]
        yield batch
        if max_images is not None and seen >= max_images:
            return


def count_images(data: Any, max_images: int | None = None) -> int | None:
    """How many images :func:`iter_batches` yields, if known without reading the data; else ``None``."""
    n: int | None = None
    if isinstance(data, torch.Tensor):
        n = int(data.shape[0]) if data.ndim else None
    elif isinstance(data, DataLoader):
        ds = data.dataset
        if not isinstance(ds, IterableDataset) and hasattr(ds, "__len__") and not data.drop_last:
            n = len(ds)  # type: ignore[arg-type]
    elif _is_map_dataset(data):
        n = len(data)
    if n is None:
        return max_images
    return n if max_images is None else min(n, max_images)


def data_id(data: Any, max_images: int | None = None) -> str | None:
    """A stable id of ``data`` for caching statistics, or ``None`` when it cannot be known.

    Tensors are hashed (dtype, shape and bytes); an :class:`ImageFolder` has its ``dataset_id``; a
    ``DataLoader`` over an ImageFolder shares its id when it reads in order and drops nothing (a
    shuffled loader reads another subset under ``max_images``).
    """
    if isinstance(data, torch.Tensor):
        dtype = str(data.dtype).removeprefix("torch.")
        return f"tensor:{dtype}:{'x'.join(map(str, data.shape))}:{tensor_sha256(data)}"
    if isinstance(data, ImageFolder):
        return data.dataset_id
    if isinstance(data, DataLoader) and isinstance(data.dataset, ImageFolder):
        ordered = isinstance(data.sampler, SequentialSampler) or max_images is None
        if ordered and not data.drop_last:
            return data.dataset.dataset_id
    return None
