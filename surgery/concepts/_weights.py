"""Pretrained torchvision weights for the concept helpers: found in the torch hub cache, never
downloaded silently (offline machines get a message naming the file, its URL and the folder)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from surgery.errors import SurgeryError
from surgery.inputs.preprocess import Preprocess

__all__ = ["imagenet_normalize", "torchvision_weights", "load_torchvision_model"]

logger = logging.getLogger(__name__)

_IMAGENET = Preprocess()


def imagenet_normalize(x: Tensor) -> Tensor:
    """Pixels in ``[0, 1]`` -> the input of torchvision's ImageNet models."""
    return _IMAGENET.normalize(x)


def _checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights(enum_name: str, what: str, download: bool) -> Any:
    """A torchvision ``Weights`` enum member whose file is cached, else a SurgeryError saying what to get."""
    import torchvision.models as tvm
    import torchvision.models.segmentation as tvs

    cls_name, _, member = enum_name.partition(".")
    enum = getattr(tvm, cls_name, None) or getattr(tvs, cls_name, None)
    if enum is None:
        raise SurgeryError(f"torchvision has no weights {enum_name!r}; upgrade torchvision")
    weights = getattr(enum, member)
    filename = weights.url.rsplit("/", 1)[-1]
    path = _checkpoint_dir() / filename
    if not path.is_file() and not download:
        raise SurgeryError(
            f"{what} needs the pretrained torchvision weights {enum_name} ({filename}), which are not in "
            f"the torch hub cache {str(_checkpoint_dir())!r}. Download {weights.url} into that folder "
            f"(or pass download=True with network access, or pass your own model)"
        )
    return weights


def load_torchvision_model(builder: Any, weights: Any, what: str, **kwargs: Any) -> nn.Module:
    try:
        return builder(weights=weights, progress=False, **kwargs).eval()
    except Exception as e:  # network errors, corrupt files
        filename = weights.url.rsplit("/", 1)[-1]
        raise SurgeryError(
            f"could not load {what} weights {filename} ({type(e).__name__}: {e}); download {weights.url} "
            f"into {str(_checkpoint_dir())!r}"
        ) from e
