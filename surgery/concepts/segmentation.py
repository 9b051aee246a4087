"""Concept masks from a torchvision segmentation model (Pascal VOC classes, e.g. "person")."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery._guards import model_device
from surgery.concepts._weights import imagenet_normalize, load_torchvision_model, torchvision_weights
from surgery.errors import SurgeryError
from surgery.inputs.images import pixels_to_float

__all__ = ["VOC_CLASSES", "segmentation_model", "masks_from_segmentation"]

logger = logging.getLogger(__name__)


VOC_CLASSES: tuple[str, ...] = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
"""The 21 classes of torchvision's segmentation weights (Pascal VOC categories, trained on COCO)."""


_SEGMENTATION_MODELS: dict[str, str] = {
    "lraspp_mobilenet_v3_large": "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
    "fcn_resnet50": "FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1",
    "fcn_resnet101": "FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1",
    "deeplabv3_mobilenet_v3_large": "DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
    "deeplabv3_resnet50": "DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1",
    "deeplabv3_resnet101": "DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1",
}


def segmentation_model(name: str = "lraspp_mobilenet_v3_large", *, download: bool = False) -> nn.Module:
    """A pretrained torchvision segmentation model (eval mode), from the torch hub cache.

    Args:
        name: one of ``lraspp_mobilenet_v3_large`` (fast), ``fcn_resnet50/101``,
            ``deeplabv3_mobilenet_v3_large``, ``deeplabv3_resnet50/101``.
        download: let torchvision download the weights when they are not cached.

    Raises:
        SurgeryError: unknown name, or weights missing (the message names the file, URL and folder).
    """
    if name not in _SEGMENTATION_MODELS:
        raise SurgeryError(f"unknown segmentation model {name!r}; known: {', '.join(_SEGMENTATION_MODELS)}")
    import torchvision.models.segmentation as tvs

    weights = torchvision_weights(_SEGMENTATION_MODELS[name], f"segmentation model {name}", download)
    return load_torchvision_model(getattr(tvs, name), weights, name)


def _class_ids(classes: Sequence[str | int] | str | int, categories: Sequence[str]) -> list[int]:
    if isinstance(classes, (str, int)):
        classes = [classes]
    ids = []
    for c in classes:
        if isinstance(c, str):
            if c not in categories:
                raise SurgeryError(f"unknown class {c!r}; the segmentation model knows: {', '.join(categories)}")
            ids.append(list(categories).index(c))
        else:
            if not 0 <= int(c) < len(categories):
                raise SurgeryError(f"class index {c} out of range for {len(categories)} classes")
            ids.append(int(c))
    if not ids:
        raise SurgeryError("no classes given")
    return ids


def masks_from_segmentation(
    images: Tensor,
    classes: Sequence[str | int] | str | int,
    model: nn.Module | None = None,
    *,
    categories: Sequence[str] = VOC_CLASSES,
    threshold: float | None = None,
    normalize: bool = True,
    download: bool = False,
) -> Tensor:
    """Concept masks: the pixels a segmentation model assigns to any of ``classes``.

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]`` (or uint8).
        classes: class names (from ``categories``) or indices, e.g. ``["person"]`` or
            ``["__background__"]`` for everything but the VOC objects.
        model: any module returning logits ``(N, K, h, w)`` (or torchvision's ``{"out": logits}``);
            default :func:`segmentation_model` (LR-ASPP MobileNetV3, from the torch hub cache).
        categories: the model's class names, index ``i`` for channel ``i``.
        threshold: ``None``: a pixel is in the mask when its arg-max class is one of ``classes``; a
            float: when the summed softmax probability of ``classes`` is at least ``threshold``.
        normalize: apply the ImageNet mean/std before the model (torchvision's weights expect it).
        download: let torchvision download the default model's weights.

    Returns:
        Bool tensor ``(N, H, W)`` (``(H, W)`` for a single image).

    Raises:
        SurgeryError: unknown classes, bad shapes, or missing weights for the default model.
    """
    x, single = pixels_to_float(images)
    n, _, H, W = x.shape
    ids = _class_ids(classes, categories)
    if model is None:
        model = segmentation_model(download=download)
    x = x.to(model_device(model))  # the model may sit on a GPU; the masks come back on the CPU
    with torch.no_grad():
        out = model(imagenet_normalize(x) if normalize else x)
    if isinstance(out, dict):
        out = out["out"]
    if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise SurgeryError(f"the segmentation model returned {shape}; expected logits (N={n}, K, h, w)")
    if out.shape[1] != len(categories):
        raise SurgeryError(
            f"the segmentation model returned {out.shape[1]} classes but categories has {len(categories)}; "
            "pass categories= with the model's class names"
        )
    if tuple(out.shape[-2:]) != (H, W):
        out = F.interpolate(out.float(), size=(H, W), mode="bilinear", align_corners=False)
    if threshold is None:
        label = out.argmax(dim=1)
        mask = torch.zeros(n, H, W, dtype=torch.bool, device=out.device)
        for i in ids:
            mask |= label == i
    else:
        if not 0.0 < threshold <= 1.0:
            raise SurgeryError(f"threshold must lie in (0, 1], got {threshold}")
        mask = out.float().softmax(dim=1)[:, ids].sum(dim=1) >= threshold
    logger.info("segmentation masks for %s: %s of the pixels", classes, f"{float(mask.float().mean()):.1%}")
    mask = mask.cpu()
    return mask[0] if single else mask
