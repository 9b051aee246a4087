"""How images reach a model: the one source of every model's eval preprocessing.

:class:`Preprocess` splits a model's eval transform in two: the geometry (resize the shorter side, then
center crop), applied alike to photos and to the masks drawn on them, and the normalization, applied
right before the model. It is read from an open_clip visual tower's config, timm's
``pretrained_cfg``, or the ``data_config`` that :func:`surgery.load_model` records for torchvision
models; anything else gets ImageNet's (resize 256, crop 224, bilinear). ``Preprocess.from_model(model)
.model_input()`` is the model's whole transform (PIL image -> normalized tensor); the tests compare it
with timm's, torchvision's and open_clip's own transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from surgery._guards import as_hw
from surgery.errors import SurgeryError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocess", "default_input_size", "open_clip_visual"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CROP_MODES = ("center", "squash")


def open_clip_visual(model: nn.Module) -> nn.Module | None:
    """The visual tower of an open_clip model (given the CLIP model or the tower), else ``None``."""
    if type(model).__module__.startswith("open_clip"):
        visual = getattr(model, "visual", None)
        if isinstance(visual, nn.Module):
            return visual
        if hasattr(model, "image_size"):
            return model
    return None


def _is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and isinstance(getattr(model, "pretrained_cfg", None), Mapping)


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The model's expected input size ``(3, H, W)``.

    Read from an open_clip visual tower's ``image_size`` (given the CLIP model or the tower), timm's
    ``pretrained_cfg["input_size"]`` or ``data_config``; else ``(3, 224, 224)``.
    """
    visual = open_clip_visual(model)
    if visual is not None and getattr(visual, "image_size", None) is not None:
        return (3, *as_hw(visual.image_size))
    for attr in ("pretrained_cfg", "data_config"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            c, h, w = (int(s) for s in cfg["input_size"])
            return (c, h, w)
    return (3, 224, 224)


class _ToRGB:
    """PIL image -> RGB (grayscale, RGBA and palette images are common inputs)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image

    def __repr__(self) -> str:
        return "ToRGB()"


class _ResizeToCover:
    """Resize, keeping the aspect ratio, to the smallest size that covers ``hw`` (PIL images or tensors)."""

    def __init__(self, hw: tuple[int, int], interpolation: T.InterpolationMode) -> None:
        self.hw, self.interpolation = hw, interpolation

    def __call__(self, image: Any) -> Any:
        w, h = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
        ratio = min(h / self.hw[0], w / self.hw[1])
        return TF.resize(image, [round(h / ratio), round(w / ratio)], self.interpolation, antialias=True)

    def __repr__(self) -> str:
        return f"ResizeToCover(size={self.hw}, interpolation={self.interpolation.value})"


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(str(name).lower())
    except ValueError:
        return T.InterpolationMode.BILINEAR


@dataclass(frozen=True)
class Preprocess:
    """A model's eval preprocessing: resize + center crop in pixel space, then normalization.

    Attributes:
        mean, std: the normalization of the model's training.
        crop_pct: the crop covers this fraction of the resized image (torchvision 0.875, CLIP 1).
        interpolation: resize interpolation (``"bilinear"``, ``"bicubic"``, ...).
        crop_mode: ``"center"`` (resize the shorter side, crop the center) or ``"squash"`` (resize
            both sides, ignoring the aspect ratio, then crop), as timm names them.
        input_size: the model's input ``(H, W)``, the default size of :meth:`pixels`.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    crop_mode: str = "center"
    input_size: tuple[int, int] = (224, 224)

    def __post_init__(self) -> None:
        if self.crop_mode not in _CROP_MODES:
            raise SurgeryError(
                f"crop_mode {self.crop_mode!r} is not supported; use one of {', '.join(_CROP_MODES)} "
                "(set model.pretrained_cfg['crop_mode'] = 'center')"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise SurgeryError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @classmethod
    def from_model(cls, model: nn.Module) -> Preprocess:
        """The preprocessing ``model`` was trained with (see the module docstring for the sources)."""
        size = default_input_size(model)[1:]
        visual = open_clip_visual(model)
        if visual is not None:
            import open_clip

            cfg = getattr(visual, "preprocess_cfg", None) or {}
            return cls(
                tuple(cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN),
                tuple(cfg.get("std") or open_clip.OPENAI_DATASET_STD),
                1.0,
                str(cfg.get("interpolation") or "bicubic"),
                input_size=size,
            )
        if _is_timm_model(model):
            from timm.data import resolve_data_config

            cfg = resolve_data_config({}, model=model)
            return cls(
                tuple(cfg["mean"]), tuple(cfg["std"]), float(cfg["crop_pct"]), str(cfg["interpolation"]),
                str(cfg.get("crop_mode", "center")), tuple(cfg["input_size"][1:]),
            )
        cfg = getattr(model, "data_config", None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            crop_pct = float(cfg.get("crop_pct", 0.875))
            if cfg.get("resize_size"):
                crop_pct = min(as_hw(cfg["input_size"])) / float(cfg["resize_size"])
            return cls(
                tuple(cfg.get("mean", IMAGENET_MEAN)),
                tuple(cfg.get("std", IMAGENET_STD)),
                crop_pct,
                str(cfg.get("interpolation", "bilinear")),
                str(cfg.get("crop_mode", "center")),
                size,
            )
        return cls(input_size=size)

    def _hw(self, size: int | Sequence[int] | None) -> tuple[int, int]:
        return tuple(self.input_size) if size is None else as_hw(size)  # type: ignore[return-value]

    def _resize(self, hw: tuple[int, int]) -> Callable[[Any], Any]:
        """The resize before the crop, as timm does it: the shorter side to ``size / crop_pct`` for a
        square crop; for another crop, the smallest scale that covers ``hw / crop_pct`` (keeping the
        aspect ratio); ``squash``: exactly ``hw / crop_pct``."""
        scale = tuple(math.floor(s / self.crop_pct + 1e-6) for s in hw)
        mode = _interpolation(self.interpolation)
        if self.crop_mode == "squash":
            return T.Resize(scale, interpolation=mode, antialias=True)
        if scale[0] == scale[1]:
            return T.Resize(scale[0], interpolation=mode, antialias=True)
        return _ResizeToCover(scale, mode)  # type: ignore[arg-type]

    def pixels(self, size: int | Sequence[int] | None = None) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> ``(3, H, W)`` in ``[0, 1]``: RGB, resize, center crop (no normalization).

        ``size``: the crop, an int or ``(H, W)``; default the model's input size.
        """
        hw = self._hw(size)
        return T.Compose(
            [
                _ToRGB(),
                self._resize(hw),
                T.CenterCrop(hw),
                T.ToTensor(),
            ]
        )

    def mask_pixels(self, mask: torch.Tensor, size: int | Sequence[int] | None = None) -> torch.Tensor:
        """The same resize + crop for masks ``(N, 1, H, W)`` drawn on the photos, bilinear (soft edges)."""
        hw = self._hw(size)
        resized = self._resize(hw)(mask.float())
        return TF.center_crop(resized, list(hw)).clamp(0.0, 1.0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel batch in ``[0, 1]`` (or uint8) -> the model's input."""
        if not x.is_floating_point():
            x = x.float() / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

    def model_input(self, size: int | Sequence[int] | None = None) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> the model's input: :meth:`pixels`, then :meth:`normalize`; default size: the
        model's input size."""
        return _ModelInput(self, self._hw(size))


class _ModelInput:
    """PIL image -> normalized model input. Its repr names the size and the normalization, so that
    cached key statistics of a folder (keyed by the transform's repr) are not reused at another size."""

    def __init__(self, pre: Preprocess, hw: tuple[int, int]) -> None:
        self.pre, self.hw, self._pixels = pre, hw, pre.pixels(hw)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pre.normalize(self._pixels(image))

    def __repr__(self) -> str:
        return f"ModelInput(size={self.hw}, {self.pre!r})"

