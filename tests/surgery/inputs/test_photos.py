"""Tests of surgery.inputs.photos: real sample photos and textures from installed packages."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
from PIL import Image

from surgery.errors import SurgeryError
from surgery.inputs.photos import PHOTO_NAMES, TEXTURE_NAMES, sample_photos, sample_textures

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SIZES = {  # (width, height) as PIL reports them
    "coffee": (600, 400),
    "chelsea": (451, 300),
    "rocket": (640, 427),
    "astronaut": (512, 512),
    "stereo_motorcycle": (741, 500),
    "china": (640, 427),
    "flower": (640, 427),
    "grace_hopper": (512, 600),
}


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return sample_photos()


def test_all_photos_load_as_rgb(photos: dict[str, Image.Image]) -> None:
    assert tuple(photos) == PHOTO_NAMES == tuple(SIZES)
    for name, image in photos.items():
        assert isinstance(image, Image.Image), name
        assert image.mode == "RGB", name
        assert image.size == SIZES[name], name
        pixels = np.asarray(image)
        assert pixels.dtype == np.uint8 and pixels.std() > 20, name  # a real photo, not blank


def test_photos_by_name() -> None:
    both = sample_photos(["flower", "coffee"])
    assert list(both) == ["flower", "coffee"]
    assert list(sample_photos("chelsea")) == ["chelsea"]  # a single name works too


def test_stereo_motorcycle_is_the_left_view(photos: dict[str, Image.Image]) -> None:
    import skimage.data

    left, right, _ = skimage.data.stereo_motorcycle()
    got = np.asarray(photos["stereo_motorcycle"])
    assert np.array_equal(got, left) and not np.array_equal(got, right)


def test_unknown_name_raises() -> None:
    with pytest.raises(SurgeryError, match="'lena'.*coffee.*grace_hopper"):
        sample_photos(["coffee", "lena"])
    with pytest.raises(SurgeryError, match="known: grass"):
        sample_textures(["marble"])


def test_missing_package(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # `from sklearn.datasets import` fails
    with pytest.raises(SurgeryError, match="pip install scikit-learn"):
        sample_photos(["china"])
    with caplog.at_level(logging.WARNING, logger="surgery.inputs.photos"):
        photos = sample_photos()
    assert "china" not in photos and "flower" not in photos and "coffee" in photos
    assert "scikit-learn" in caplog.text


def test_textures() -> None:
    textures = sample_textures()
    assert tuple(textures) == TEXTURE_NAMES == ("grass", "gravel", "brick")
    for name, image in textures.items():
        assert image.mode == "RGB" and image.size == (512, 512), name
        pixels = np.asarray(image)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        assert pixels.std() > 10, name
