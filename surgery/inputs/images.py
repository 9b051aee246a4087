"""Images in, tensors out: the one image check, image files and folders, exemplar images.

:func:`check_images` is the image contract of every function that takes images (``rewrite``,
``evaluate_edit``, ``finetune``, ``collect_key_stats``, ``probe``, strength selection; docs/api.md,
"Images"). The rest turns what a user has (a folder, a few paths, PIL images, tensors) into float
tensors ``(N, 3, H, W)``, and fails early with a :class:`~surgery.errors.SurgeryError` that says what
to fix. Batches from datasets and loaders: :mod:`surgery.inputs.batches`; masks:
:mod:`surgery.inputs.masks`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from surgery._guards import as_hw
from surgery._files import PathLike
from surgery.errors import SurgeryError
from surgery.identity import hasher, transform_id

__all__ = [
    "IMAGE_EXTENSIONS",
    "check_images",
    "pixels_to_float",
    "ImageFolder",
    "load_images",
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


def check_images(images: Any, what: str = "images", *, pixels: bool = False) -> torch.Tensor:
    """The one check of an image tensor, for every function that takes images (docs/api.md, "Images").

    ``images`` must be a tensor ``(N, 3, H, W)`` with ``N >= 1`` and finite values. As the model's input
    (the default) it must be floating point: a uint8 tensor holds pixels, which a model reads only after
    its normalization, so it is refused, with the fix. With ``pixels=True`` (images that a preprocessing
    or a pixel transformation reads, not the model) uint8 is accepted too, and returned unchanged.

    Raises:
        SurgeryError: naming the problem and the fix.
    """
    if not isinstance(images, torch.Tensor):
        raise SurgeryError(
            f"{what} must be a tensor (N, 3, H, W); got {type(images).__name__}. Load image files first "
            "(surgery.inputs.load_images with the model's preprocessing) and stack them"
        )
    shape = tuple(images.shape)
    if images.ndim != 4:
        hint = (
            "It is one image: add the batch dimension with x.unsqueeze(0)"
            if images.ndim == 3 and shape[0] == 3
            else "Stack the images into one batch (torch.stack) of that shape"
        )
        raise SurgeryError(f"{what} must have shape (N, 3, H, W); got {shape}. {hint}")
    if shape[0] == 0:
        raise SurgeryError(f"{what} is empty: give at least one image")
    if shape[1] != 3:
        hint = (
            " It looks channels-last: use x.permute(0, 3, 1, 2)."
            if shape[-1] == 3
            else " Convert grayscale images with x.expand(-1, 3, -1, -1) or PIL's convert('RGB')."
        )
        raise SurgeryError(f"{what} has {shape[1]} channels in shape {shape}; expected 3 (RGB).{hint}")
    if images.dtype == torch.uint8 and not pixels:
        raise SurgeryError(
            f"{what} must be floating-point, as the model reads it; got uint8 pixels. Normalize them with "
            "the model's preprocessing, e.g. surgery.Preprocess.from_model(model).normalize(images)"
        )
    if not images.is_floating_point() and images.dtype != torch.uint8:
        kinds = "floating-point (or uint8 pixels)" if pixels else "floating-point"
        raise SurgeryError(f"{what} has dtype {images.dtype}; pass {kinds} images")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise SurgeryError(
            f"{what} contains {bad} NaN or infinite value(s); fix the images or their preprocessing"
        )
    return images


def pixels_to_float(images: Any, what: str = "images") -> tuple[torch.Tensor, bool]:
    """Pixel images ``(N, 3, H, W)`` or one ``(3, H, W)``, float in ``[0, 1]`` or uint8, checked by
    :func:`check_images` and returned as a float batch (uint8 scaled by 1/255), with whether one
    ``(3, H, W)`` image was given."""
    single = isinstance(images, torch.Tensor) and images.ndim == 3
    x = check_images(images[None] if single else images, what, pixels=True)
    return (x.float().div_(255.0) if x.dtype == torch.uint8 else x), single


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
        return pixels_to_float(images)[0]
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
            t, name = item, f"images[{i}]"
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
        else:
            raise SurgeryError(
                f"images[{i}] is a {type(item).__name__}; pass paths, PIL images or tensors"
            )
        batches.append(pixels_to_float(t, name)[0])
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
