"""Images in, tensors out: image folders, exemplar images, and batches for statistics.

Everything here turns what a user has (a folder, a few paths, PIL images, tensors, a ``Dataset`` or a
``DataLoader``) into float tensors ``(N, 3, H, W)``, and fails early with a
:class:`~surgery.errors.SurgeryError` that says what to fix. Masks: :mod:`surgery.inputs.masks`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler

from surgery._checks import as_hw
from surgery._files import PathLike
from surgery.errors import SurgeryError
from surgery.identity import hasher, tensor_sha256, transform_id

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "load_images",
    "iter_batches",
    "count_images",
    "data_id",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".bmp",
    ".gif",
    ".jpeg",
    ".jpg",
    ".pgm",
    ".png",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)
"""File extensions (lower case) that :class:`ImageFolder` treats as images, whatever their case."""

ImageLike = Union[PathLike, Image.Image, torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]

def _open_rgb(path: PathLike) -> Image.Image:
    """Open an image file as RGB, with a SurgeryError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"image file {str(path)!r} does not exist; check the path")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise SurgeryError(
            f"cannot read {str(path)!r} as an image ({e}); use a PNG, JPEG or another format PIL reads"
        ) from None


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float32 tensor ``(C, H, W)`` in ``[0, 1]``."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _check_image_tensor(t: torch.Tensor, what: str, *, rgb: bool = True) -> torch.Tensor:
    """Validate a ``(N, 3, H, W)`` image batch (any ``C`` when not ``rgb``): float (uint8 is scaled to
    ``[0, 1]``) and finite."""
    if t.ndim != 4:
        raise SurgeryError(f"{what} has shape {tuple(t.shape)}; expected (N, 3, H, W) or (3, H, W)")
    if rgb and t.shape[1] != 3:
        hint = (
            " It looks channels-last: use x.permute(0, 3, 1, 2)."
            if t.shape[-1] == 3
            else " Convert grayscale images with x.expand(-1, 3, -1, -1) or PIL's convert('RGB')."
        )
        raise SurgeryError(
            f"{what} has {t.shape[1]} channels in shape {tuple(t.shape)}; expected 3 (RGB).{hint}"
        )
    if not t.is_floating_point():
        if t.dtype != torch.uint8:
            raise SurgeryError(f"{what} has dtype {t.dtype}; pass float images (or uint8 in 0..255)")
        t = t.float().div_(255.0)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise SurgeryError(
            f"{what} contains {bad} NaN or infinite value(s); fix the images or their preprocessing"
        )
    return t


class ImageFolder(Dataset):
    """Every image file under ``root`` (recursively, sorted), as ``(3, H, W)`` tensors.

    Files are found by extension (:data:`IMAGE_EXTENSIONS`, case-insensitive) and opened as RGB.
    There are no labels: items are image tensors only.

    Args:
        root: the folder.
        transform: PIL image -> tensor, e.g. ``surgery.Preprocess.from_model(model).model_input()``; default ``ToTensor``
            (images must then share one size to be batched).

    Raises:
        SurgeryError: ``root`` is not a folder or holds no image.
    """

    def __init__(self, root: PathLike, transform: Transform | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise SurgeryError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        self.transform = transform
        files = [
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        ]
        self.files: list[Path] = sorted(files, key=lambda p: p.relative_to(self.root).as_posix())
        if not self.files:
            raise SurgeryError(
                f"no image files under {str(self.root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                "any case, in every subfolder)"
            )
        self._dataset_id: str | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = _open_rgb(self.files[index])
        out = _to_tensor(image) if self.transform is None else self.transform(image)
        if not isinstance(out, torch.Tensor):
            raise SurgeryError(
                f"the transform returned {type(out).__name__} for {str(self.files[index])!r}; "
                "it must end with ToTensor (PIL image -> tensor)"
            )
        return out

    @property
    def dataset_id(self) -> str:
        """A stable id for caching: resolved path, file count, and a hash of the files and transform.

        The hash covers each file's relative path, size and modification time, and the transform's
        repr (so the same folder preprocessed differently gets another id). A transform whose repr
        changes between processes only costs cache misses.
        """
        if self._dataset_id is None:
            h = hasher()
            for p in self.files:
                st = p.stat()
                rel = p.relative_to(self.root).as_posix()
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            h.update(f"transform\0{transform_id(self.transform)}".encode())
            root = self.root.resolve().as_posix()
            self._dataset_id = f"folder:{root}:{len(self.files)}:{h.hexdigest()[:16]}"
        return self._dataset_id

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self.files)} images)"


def _resize_to_tensor(hw: tuple[int, int]) -> Transform:
    """A transform: bilinear (antialiased) resize of a PIL image to ``hw``, then to a tensor."""

    def resize(image: Image.Image) -> torch.Tensor:
        return _to_tensor(image.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))

    return resize


def _is_image_like(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike, Image.Image, torch.Tensor))


def load_images(
    images: ImageLike | Sequence[ImageLike],
    transform: Transform | None = None,
    *,
    size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Load images into one float batch ``(N, 3, H, W)``.

    Args:
        images: a tensor ``(3, H, W)`` or ``(N, 3, H, W)`` (float, or uint8 scaled by 1/255), a path or
            PIL image, or a sequence of any of these.
        transform: applied to every path / PIL image (e.g. ``surgery.Preprocess.from_model(model).model_input()``).
        size: without ``transform``, resize paths / PIL images to this ``int`` (square) or ``(H, W)``.
            Tensors are never resized.

    Returns:
        The stacked batch (tensor inputs keep their float dtype; others are float32).

    Raises:
        SurgeryError: a missing or unreadable file, a channel count other than 3, NaN/inf values, or
            images of different sizes (the message says to pass ``size`` or ``transform``).
    """
    if isinstance(images, torch.Tensor):
        t = images.unsqueeze(0) if images.ndim == 3 else images
        return _check_image_tensor(t, "images")
    items = [images] if _is_image_like(images) else list(images)
    if not items:
        raise SurgeryError("no images given")
    tf = transform
    if tf is None and size is not None:
        tf = _resize_to_tensor(as_hw(size))

    batches: list[torch.Tensor] = []
    names: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            t = item.unsqueeze(0) if item.ndim == 3 else item
            name = f"images[{i}]"
        elif isinstance(item, (str, os.PathLike, Image.Image)):
            if isinstance(item, Image.Image):
                image, name = item.convert("RGB"), f"images[{i}] (PIL)"
            else:
                image, name = _open_rgb(item), str(item)
            t = _to_tensor(image) if tf is None else tf(image)
            if not isinstance(t, torch.Tensor):
                raise SurgeryError(
                    f"the transform returned {type(t).__name__} for {name}; it must return a tensor"
                )
            t = t.unsqueeze(0) if t.ndim == 3 else t
        else:
            raise SurgeryError(
                f"images[{i}] is a {type(item).__name__}; pass paths, PIL images or tensors"
            )
        batches.append(_check_image_tensor(t, name))
        names.append(name)
    sizes = {tuple(b.shape[-2:]) for b in batches}
    if len(sizes) > 1:
        listed = ", ".join(f"{n}: {b.shape[-2]}x{b.shape[-1]}" for n, b in zip(names, batches))
        raise SurgeryError(
            f"images have different sizes ({listed}); pass size=(H, W) or the model's transform "
            "(surgery.Preprocess.from_model(model).model_input()) so they can be batched"
        )
    dtypes = {b.dtype for b in batches}
    dtype = torch.float32 if len(dtypes) > 1 else dtypes.pop()
    return torch.cat([b.to(dtype) for b in batches])


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
    """A batch from a dataset or loader (any channel count): ``(N, C, H, W)`` floats, finite."""
    if batch.ndim == 3:
        batch = batch.unsqueeze(0)
    return _check_image_tensor(batch, "a batch", rgb=False)


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
    """Unchecked image batches of ``data``, whatever its kind."""
    if isinstance(data, torch.Tensor):
        x = data.unsqueeze(0) if data.ndim == 3 else data
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
    """Yield image batches ``(B, C, H, W)`` from any common data source.

    Args:
        data: a tensor ``(N, C, H, W)``; a map-style ``Dataset`` (items are tensors or tuples whose
            first element is the image), batched here by ``batch_size``; an ``IterableDataset`` of
            such items; a ``DataLoader`` or any other iterable of batches (tensors, or tuples whose
            first element is the images), used as batched. A DataLoader with workers decodes faster
            than a plain Dataset.
        batch_size: images per batch where batching happens here.
        max_images: stop after this many images, truncating the last batch.

    Raises:
        SurgeryError: an unknown data type, items that are not image tensors, items of different
            shapes within a batch, or NaN/inf values.
    """
    if batch_size <= 0:
        raise SurgeryError(f"batch_size must be positive, got {batch_size}")
    if max_images is not None and max_images <= 0:
        raise SurgeryError(f"max_images must be positive, got {max_images}")
    seen = 0
    for batch in _raw_batches(data, batch_size):
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
        n = 1 if data.ndim == 3 else int(data.shape[0])
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
