"""Real photos and textures available offline, from the sample data of installed packages.

Sources: scikit-image (``coffee``, ``chelsea``, ``rocket``, ``astronaut``, ``stereo_motorcycle`` and
the textures ``grass``, ``gravel``, ``brick``), scikit-learn (``china``, ``flower``) and matplotlib
(``grace_hopper``). All install with ``pip install "model-surgery[demo]"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from PIL import Image

from surgery.errors import SurgeryError

__all__ = ["PHOTO_NAMES", "TEXTURE_NAMES", "sample_photos", "sample_textures"]

logger = logging.getLogger(__name__)


def _skimage(name: str) -> Callable[[], Any]:
    def load() -> Any:
        import skimage.data

        image = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":  # (left, right, disparity): keep the left view
            image = image[0]
        return image

    return load


def _sklearn(filename: str) -> Callable[[], Any]:
    def load() -> Any:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _matplotlib(filename: str) -> Callable[[], Any]:
    def load() -> Any:
        from matplotlib import cbook

        path = cbook.get_sample_data(filename, asfileobj=False)
        with Image.open(path) as image:
            image.load()
            return image.copy()

    return load


# name -> (package to install, import name, loader)
_PHOTOS: dict[str, tuple[str, str, Callable[[], Any]]] = {
    "coffee": ("scikit-image", "skimage", _skimage("coffee")),
    "chelsea": ("scikit-image", "skimage", _skimage("chelsea")),
    "rocket": ("scikit-image", "skimage", _skimage("rocket")),
    "astronaut": ("scikit-image", "skimage", _skimage("astronaut")),
    "stereo_motorcycle": ("scikit-image", "skimage", _skimage("stereo_motorcycle")),
    "china": ("scikit-learn", "sklearn", _sklearn("china.jpg")),
    "flower": ("scikit-learn", "sklearn", _sklearn("flower.jpg")),
    "grace_hopper": ("matplotlib", "matplotlib", _matplotlib("grace_hopper.jpg")),
}

_TEXTURES: dict[str, tuple[str, str, Callable[[], Any]]] = {
    name: ("scikit-image", "skimage", _skimage(name)) for name in ("grass", "gravel", "brick")
}

PHOTO_NAMES: tuple[str, ...] = tuple(_PHOTOS)
"""Names accepted by :func:`sample_photos`."""

TEXTURE_NAMES: tuple[str, ...] = tuple(_TEXTURES)
"""Names of the textures returned by :func:`sample_textures`."""


def _to_pil(image: Any, mode: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    return image.convert(mode) if image.mode != mode else image


def _load(
    table: dict[str, tuple[str, str, Callable[[], Any]]],
    names: Iterable[str] | None,
    mode: str,
    kind: str,
) -> dict[str, Image.Image]:
    explicit = names is not None
    wanted = list(table) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in table]
    if unknown:
        raise SurgeryError(f"unknown {kind} {', '.join(map(repr, unknown))}; known: {', '.join(table)}")
    out: dict[str, Image.Image] = {}
    for name in wanted:
        package, module, load = table[name]
        try:
            image = load()
        except ImportError as e:
            if explicit:
                raise SurgeryError(
                    f"{kind} {name!r} needs the package {package!r}: pip install {package} "
                    f"(or pip install \"model-surgery[demo]\")"
                ) from e
            logger.warning("skipping %s %r: package %r (import %s) is not installed", kind, name, package, module)
            continue
        out[name] = _to_pil(image, mode)
    return out


def sample_photos(names: Iterable[str] | None = None) -> dict[str, Image.Image]:
    """Return real photos bundled with installed packages, as RGB PIL images.

    Args:
        names: Photos to load (see :data:`PHOTO_NAMES`); all by default, skipping (with a warning)
            those whose package is not installed.

    Returns:
        A dict name -> RGB image, in the order asked.

    Raises:
        SurgeryError: An unknown name, or an explicitly requested photo whose package is missing.
    """
    return _load(_PHOTOS, names, "RGB", "photo")


def sample_textures(names: Iterable[str] | None = None) -> dict[str, Image.Image]:
    """Return scikit-image's grayscale textures (``grass``, ``gravel``, ``brick``), 512x512.

    They are returned as RGB images (the gray value repeated in the three channels), ready to paste
    into photos or feed to a model.

    Args:
        names: Textures to load (see :data:`TEXTURE_NAMES`); all by default, skipping (with a warning)
            any whose package is not installed.

    Returns:
        A dict name -> RGB image.

    Raises:
        SurgeryError: An unknown name, or an explicitly requested texture whose package is missing.
    """
    return _load(_TEXTURES, names, "RGB", "texture")
