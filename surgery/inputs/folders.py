"""Labelled photos from class folders, kept in pixel space, and concept masks drawn on them.

Concept transformations (a texture pasted into a region, a region restyled) act on pixels; the model
sees normalized tensors. Photos and their masks go through the same geometry
(:class:`surgery.inputs.preprocess.Preprocess`); the normalization comes right before the model.

Layouts read here::

    photos/<class>/*.jpg                    class = a class name (fire_engine) or index (555)
    masks/<concept>/<class>/<photo>.png     optional per photo: where <concept> is in that photo
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from surgery._files import PathLike
from surgery.errors import SurgeryError
from surgery.inputs.images import IMAGE_EXTENSIONS, load_images
from surgery.inputs.masks import load_masks
from surgery.inputs.preprocess import Preprocess

__all__ = [
    "LabelledPhotos",
    "load_concept_masks",
    "load_labelled_photos",
    "resolve_class",
]

logger = logging.getLogger(__name__)


def _norm_name(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def resolve_class(name: str, *class_lists: Sequence[str]) -> int:
    """The class index of a folder name: an index (``"751"``) or a class name from any of the lists.

    Names match case-insensitively, with ``_`` and ``-`` read as spaces (``fire_engine``).

    Raises:
        SurgeryError: an unknown name (with suggestions), an ambiguous one, or an index out of range.
    """
    n = len(class_lists[0])
    text = str(name).strip()
    if text.isdigit():
        i = int(text)
        if not 0 <= i < n:
            raise SurgeryError(f"class index {i} is out of range: there are {n} classes (0..{n - 1})")
        return i
    key = _norm_name(text)
    hits = sorted({i for names in class_lists for i, c in enumerate(names) if _norm_name(c) == key})
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise SurgeryError(
            f"class name {text!r} is ambiguous: it names classes {', '.join(map(str, hits))}; "
            "name the folder by the class index instead"
        )
    known = sorted({_norm_name(c) for names in class_lists for c in names})
    close = difflib.get_close_matches(key, known, n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    raise SurgeryError(
        f"{text!r} is not one of the model's {n} class names, nor an index.{hint} Name each class "
        "folder by the class name (e.g. 'fire_engine') or its index (e.g. 555)"
    )


@dataclass
class LabelledPhotos:
    """Labelled photos in pixel space.

    Attributes:
        images: ``(N, 3, S, S)``, as the transform made them (pixels in ``[0, 1]``, or model inputs).
        labels: ``(N,)`` class indices.
        files: paths relative to the photo folder.
        folders: class index -> the folder it came from.
        sizes: each photo's ``(H, W)`` before resizing (what its masks are drawn on).
    """

    images: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    folders: dict[int, str]
    sizes: list[tuple[int, int]]

    def stem_index(self) -> dict[str, int]:
        """Each photo's position by its path without extension (``class/name``), in file order:
        how masks and paired folders name a photo.

        Raises:
            SurgeryError: two photos differ only in their extension.
        """
        stems = [Path(f).with_suffix("").as_posix() for f in self.files]
        index = {stem: i for i, stem in enumerate(stems)}
        if len(index) < len(stems):
            counts = Counter(stems)
            twins = sorted(f for f, stem in zip(self.files, stems) if counts[stem] > 1)
            raise SurgeryError(f"photos {twins[:4]} differ only in their extension; rename one so each name is one photo")
        return index


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def load_labelled_photos(
    root: PathLike,
    class_lists: Sequence[Sequence[str]],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    max_per_class: int | None = None,
) -> LabelledPhotos:
    """Read ``root/<class>/*`` (every image file, recursively within each class folder).

    Args:
        root: the folder of class folders.
        class_lists: the model's class names (several lists: a folder may use a name from any).
        transform: PIL image -> tensor, the same size for every photo: ``pre.pixels(size)`` to
            keep pixels (for concept masks and transformations), ``pre.model_input(size)`` for the
            model's input.
        max_per_class: read at most this many photos of each class (the first, sorted by path).

    Raises:
        SurgeryError: ``root`` is missing, has no class folder with images, or a folder name is not
            a class.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SurgeryError(f"photo folder {str(root)!r} does not exist")
    layout = "expected one folder per class: DIR/<class name or index>/*.jpg"
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        logger.warning("ignoring %d image(s) directly in %s (%s)", len(loose), root, layout)
    images, labels, files, sizes = [], [], [], []
    folders: dict[int, str] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        paths = _image_files(folder)[:max_per_class]
        if not paths:
            continue
        label = resolve_class(folder.name, *class_lists)
        if label in folders:
            raise SurgeryError(
                f"folders {folders[label]!r} and {folder.name!r} both name class {label}; merge them"
            )
        folders[label] = folder.name
        images.append(load_images(paths, transform))
        for p in paths:
            with Image.open(p) as im:
                sizes.append((im.height, im.width))
        labels += [label] * len(paths)
        files += [p.relative_to(root).as_posix() for p in paths]
    if not images:
        raise SurgeryError(f"no photos in class folders under {str(root)!r}; {layout}")
    return LabelledPhotos(torch.cat(images), torch.tensor(labels, dtype=torch.long), files, folders, sizes)


def load_concept_masks(
    root: PathLike, photos: LabelledPhotos, pre: Preprocess, size: int
) -> dict[str, torch.Tensor]:
    """Read ``root/<concept>/<photo path>`` masks (any image extension) for ``photos``.

    A mask is drawn on its photo: white (or opaque) where the concept is. A photo without a mask
    file for a concept does not show it. Each mask goes through the photos' resize and crop.

    Returns:
        ``{concept: (N, size, size) bool}`` in the order of ``photos``, concepts sorted by name.

    Raises:
        SurgeryError: ``root`` is missing or holds no concept folder; a mask file names no photo (a
            typo, or a photo not read); a mask's aspect ratio differs from its photo's.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SurgeryError(f"mask folder {str(root)!r} does not exist")
    layout = "expected MASKS/<concept>/<class folder>/<photo name>.png"
    index = photos.stem_index()
    concepts: dict[str, torch.Tensor] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        masks = torch.zeros(len(photos.files), size, size, dtype=torch.bool)
        found = 0
        for path in _image_files(folder):
            rel = path.relative_to(folder).with_suffix("").as_posix()
            if rel not in index:
                close = difflib.get_close_matches(rel, list(index), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SurgeryError(
                    f"mask {str(path)!r} names no photo: there is no {rel}.* among the photos read{hint}; {layout}"
                )
            i = index[rel]
            m = load_masks(path, size=photos.sizes[i])  # drawn on the photo: its shape, maybe scaled
            masks[i] = pre.mask_pixels(m, size)[0, 0] >= 0.5
            found += 1
        if found == 0:
            continue
        shown = int(masks.flatten(1).any(1).sum())
        if shown < found:
            logger.warning("%s: %d of %d masks cover nothing inside the center crop", folder.name, found - shown, found)
        concepts[folder.name] = masks
    if not concepts:
        raise SurgeryError(f"no masks under {str(root)!r}; {layout}")
    return concepts
