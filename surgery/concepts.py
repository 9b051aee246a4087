"""Transform a concept in images: paste a texture inside a mask, load hand-made masks, style transfer.

These helpers make the *transformed* exemplars ``x'`` that :func:`surgery.rewrite` needs (e.g. "the
road covered in snow"): :func:`paste_texture` fills a concept mask with a texture,
:func:`style_transfer` restyles the masked region with Gatys et al.'s Gram-matrix loss (VGG features),
and :func:`masks_from_segmentation` finds concept masks with a torchvision segmentation model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from .errors import SurgeryError

__all__ = [
    "ADAIN_WEIGHTS_URL",
    "VOC_CLASSES",
    "VGGFeatures",
    "adain_transfer",
    "load_mask",
    "load_masks",
    "masks_from_segmentation",
    "paste_texture",
    "segmentation_model",
    "style_transfer",
    "vgg_features",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# --------------------------------------------------------------------------------------------------
# images, masks, textures
# --------------------------------------------------------------------------------------------------


def _images(images: Tensor, what: str = "images") -> tuple[Tensor, bool]:
    """Validate a batch ``(N, 3, H, W)`` (or ``(3, H, W)``); return float ``[0, 1]`` and whether it was 3-D."""
    if not isinstance(images, Tensor):
        raise SurgeryError(f"{what} must be a tensor (N, 3, H, W), got {type(images).__name__}")
    single = images.ndim == 3
    x = images[None] if single else images
    if x.ndim != 4 or x.shape[1] != 3:
        hint = " It looks channels-last: use x.permute(0, 3, 1, 2)." if x.ndim == 4 and x.shape[-1] == 3 else ""
        raise SurgeryError(f"{what} has shape {tuple(images.shape)}; expected (N, 3, H, W) or (3, H, W).{hint}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise SurgeryError(f"{what} has dtype {x.dtype}; pass float images in [0, 1] or uint8")
    if not bool(torch.isfinite(x).all()):
        raise SurgeryError(f"{what} contains NaN or infinite values")
    return x, single


def _masks(masks: Tensor, n: int, hw: tuple[int, int], what: str = "masks") -> Tensor:
    """Validate masks ``(N, H, W)``, ``(N, 1, H, W)`` or ``(H, W)``; return float ``(N, 1, H, W)`` in ``[0, 1]``."""
    if not isinstance(masks, Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    m = masks
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise SurgeryError(f"{what} has shape {tuple(masks.shape)}; expected (N, H, W), (N, 1, H, W) or (H, W)")
    if m.dtype == torch.bool:
        m = m.float()
    elif m.dtype == torch.uint8:
        m = m.float() / 255.0 if int(m.max()) > 1 else m.float()
    elif not m.is_floating_point():
        raise SurgeryError(f"{what} has dtype {m.dtype}; pass bool masks or float masks in [0, 1]")
    if bool(torch.isnan(m).any()) or float(m.min()) < 0.0 or float(m.max()) > 1.0:
        raise SurgeryError(f"{what} must hold values in [0, 1] (no NaN)")
    if m.shape[0] == 1 and n > 1:
        m = m.expand(n, -1, -1, -1)
    if m.shape[0] != n:
        raise SurgeryError(f"{what} has {m.shape[0]} masks for {n} images; pass one mask per image (or one for all)")
    if tuple(m.shape[-2:]) != hw:
        raise SurgeryError(
            f"{what} have size {tuple(m.shape[-2:])} but the images are {hw}; resize them "
            f"(load_masks(paths, size=(H, W)))"
        )
    return m.float()


def _texture_tensor(texture: Tensor | Image.Image) -> Tensor:
    """A texture as float ``(3, h, w)`` in ``[0, 1]``."""
    if isinstance(texture, Image.Image):
        arr = np.asarray(texture.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    if not isinstance(texture, Tensor):
        raise SurgeryError(f"texture must be a tensor (3, h, w) or a PIL image, got {type(texture).__name__}")
    t = texture
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 2:
        t = t[None].expand(3, -1, -1)
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise SurgeryError(f"texture has shape {tuple(texture.shape)}; expected (3, h, w), (1, h, w) or (h, w)")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():
        raise SurgeryError(f"texture has dtype {t.dtype}; pass float in [0, 1] or uint8")
    return t.float()


def _fit_texture(
    tex: Tensor,
    hw: tuple[int, int],
    mode: str,
    scale: float,
    offset: tuple[int, int],
) -> Tensor:
    """Texture ``(3, h, w)`` -> ``(3, H, W)``: tiled (after scaling by ``scale``) or resized."""
    H, W = hw
    if mode == "resize":
        return F.interpolate(tex[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
    if mode != "tile":
        raise SurgeryError(f"mode must be 'tile' or 'resize', got {mode!r}")
    if scale <= 0:
        raise SurgeryError(f"scale must be positive, got {scale}")
    if scale != 1.0:
        h = max(1, round(tex.shape[1] * scale))
        w = max(1, round(tex.shape[2] * scale))
        tex = F.interpolate(tex[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    h, w = tex.shape[1:]
    oy, ox = offset[0] % h, offset[1] % w
    reps_y = (H + oy) // h + 1
    reps_x = (W + ox) // w + 1
    tiled = tex.repeat(1, reps_y, reps_x)
    return tiled[:, oy : oy + H, ox : ox + W]


def paste_texture(
    images: Tensor,
    masks: Tensor,
    texture: Tensor | Image.Image,
    blend: float = 1.0,
    *,
    mode: str = "tile",
    scale: float = 1.0,
    seed: int | None = None,
    match_brightness: bool = False,
) -> Tensor:
    """Paste a texture into each image inside its mask: ``out = (1 - b*m) * x + b*m * tex``.

    Args:
        images: ``(N, 3, H, W)`` (or ``(3, H, W)``) float in ``[0, 1]`` or uint8 (returned as float).
        masks: ``(N, H, W)``, ``(N, 1, H, W)`` or ``(H, W)`` (one mask for all images); bool or
            float in ``[0, 1]`` (soft masks blend proportionally).
        texture: ``(3, h, w)`` / ``(h, w)`` tensor or a PIL image.
        blend: ``b`` in ``[0, 1]``: 0 returns the images unchanged, 1 puts the exact texture in the mask.
        mode: ``"tile"`` repeats the texture (scaled by ``scale``) over the image; ``"resize"``
            stretches it to the image size.
        scale: texture scale factor before tiling (``"tile"`` only).
        seed: when given, each image gets a random tiling offset drawn from this seed (so the
            pasted texture is not aligned identically in every image); ``None`` tiles from ``(0, 0)``.
        match_brightness: rescale the texture so its mean matches the masked region's mean
            (per image, per channel), keeping the scene's lighting.

    Returns:
        Float tensor of the images' shape, values in ``[0, 1]``.

    Raises:
        SurgeryError: bad shapes, dtypes or values.
    """
    x, single = _images(images)
    n, _, H, W = x.shape
    m = _masks(masks, n, (H, W)).to(x.device)
    if not 0.0 <= float(blend) <= 1.0:
        raise SurgeryError(f"blend must lie in [0, 1], got {blend}")
    tex = _texture_tensor(texture).to(x.device, x.dtype)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = torch.empty_like(x)
    for i in range(n):
        offset = (0, 0)
        if gen is not None:
            offset = (int(torch.randint(0, 1 << 16, (1,), generator=gen)), int(torch.randint(0, 1 << 16, (1,), generator=gen)))
        t = _fit_texture(tex, (H, W), mode, scale, offset)
        mi = m[i]
        if match_brightness:
            area = mi.sum()
            if float(area) > 0:
                region_mean = (x[i] * mi).sum(dim=(1, 2)) / area
                tex_mean = (t * mi).sum(dim=(1, 2)) / area
                t = (t * (region_mean / tex_mean.clamp_min(1e-6))[:, None, None]).clamp(0.0, 1.0)
        bm = float(blend) * mi
        out[i] = (1.0 - bm) * x[i] + bm * t
    return out[0] if single else out


def _mask_array(im: Image.Image) -> np.ndarray:
    """A PIL mask as float array in ``[0, 1]``: alpha for RGBA/LA with transparency, else gray level."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba, dtype=np.float64)[..., 3] / 255.0
        if alpha.min() < 1.0:
            return alpha
        return np.asarray(rgba.convert("L"), dtype=np.float64) / 255.0
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.float64) / 65535.0
    if im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        return arr / 65535.0 if arr.max() > 255 else arr / 255.0
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float64), 0.0, 1.0)
    if im.mode == "1":
        return np.asarray(im, dtype=np.float64)
    return np.asarray(im.convert("L"), dtype=np.float64) / 255.0


def load_mask(path: PathLike, size: int | Sequence[int] | None = None) -> Tensor:
    """Load a mask PNG as a bool tensor ``(H, W)`` (pixels >= 0.5 are the concept).

    Grayscale PNGs use their gray level (white = concept); RGBA/LA PNGs with transparency use the
    alpha channel (opaque = concept), otherwise their gray level.

    Args:
        path: the image file.
        size: expected ``(H, W)`` (or an int for a square): a mask of the same aspect ratio (within
            2%) is resized to it (nearest neighbour); a different aspect ratio is an error.

    Raises:
        SurgeryError: the file is missing or unreadable, the mask is empty, or it has the wrong size.
    """
    p = Path(path)
    if not p.is_file():
        raise SurgeryError(f"mask file {str(p)!r} does not exist; check the path")
    try:
        with Image.open(p) as im:
            im.load()
            arr = _mask_array(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SurgeryError(f"cannot read mask {str(p)!r} as an image ({e}); save it as a grayscale PNG") from None
    mask = torch.from_numpy(arr >= 0.5)
    if size is not None:
        hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(hw) != 2 or min(hw) <= 0:
            raise SurgeryError(f"size must be an int or (H, W) with positive entries, got {size}")
        if tuple(mask.shape) != hw:
            h, w = mask.shape
            if abs((h / w) / (hw[0] / hw[1]) - 1.0) > 0.02:
                raise SurgeryError(
                    f"mask {str(p)!r} is {h}x{w} (HxW) but the image is {hw[0]}x{hw[1]}; "
                    "draw the mask on the image it belongs to"
                )
            mask = F.interpolate(mask[None, None].float(), size=hw, mode="nearest")[0, 0] >= 0.5
    if not bool(mask.any()):
        raise SurgeryError(
            f"mask {str(p)!r} is empty (no pixel >= 0.5); paint the concept white (or opaque) on black"
        )
    return mask


def load_masks(paths: Sequence[PathLike], size: int | Sequence[int] | None = None) -> Tensor:
    """Load several mask PNGs with :func:`load_mask` into a bool tensor ``(N, H, W)``.

    Raises:
        SurgeryError: as :func:`load_mask`, or masks of different sizes when ``size`` is ``None``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise SurgeryError("no mask files given")
    masks = [load_mask(p, size) for p in paths]
    sizes = {tuple(m.shape) for m in masks}
    if len(sizes) > 1:
        raise SurgeryError(f"masks have different sizes {sorted(sizes)}; pass size=(H, W)")
    return torch.stack(masks)


# --------------------------------------------------------------------------------------------------
# pretrained weights (torchvision): found in the torch hub cache, never downloaded silently
# --------------------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalize(x: Tensor) -> Tensor:
    mean = torch.tensor(_IMAGENET_MEAN, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(_IMAGENET_STD, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


def _checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_weights(enum_name: str, what: str, download: bool) -> Any:
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


def _load_torchvision_model(builder: Any, weights: Any, what: str, **kwargs: Any) -> nn.Module:
    try:
        return builder(weights=weights, progress=False, **kwargs).eval()
    except Exception as e:  # network errors, corrupt files
        filename = weights.url.rsplit("/", 1)[-1]
        raise SurgeryError(
            f"could not load {what} weights {filename} ({type(e).__name__}: {e}); download {weights.url} "
            f"into {str(_checkpoint_dir())!r}"
        ) from e


# --------------------------------------------------------------------------------------------------
# neural style transfer inside a mask (Gatys et al. 2016; AdaIN, Huang & Belongie 2017)
# --------------------------------------------------------------------------------------------------

# relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (style) and relu4_2 (content) in torchvision's vgg19.features
VGG19_STYLE_LAYERS: tuple[int, ...] = (1, 6, 11, 20, 29)
VGG19_CONTENT_LAYERS: tuple[int, ...] = (22,)


class VGGFeatures(nn.Module):
    """Feature maps of chosen indices of a VGG ``features`` stack, from images in ``[0, 1]``.

    Args:
        features: an ``nn.Sequential`` (e.g. ``torchvision.models.vgg19().features``).
        layers: indices whose outputs are returned, in order.
        normalize: apply the ImageNet mean/std first (torchvision VGGs expect it).
    """

    def __init__(self, features: nn.Sequential, layers: Sequence[int], normalize: bool = True) -> None:
        super().__init__()
        layers = sorted({int(i) for i in layers})
        if not layers or layers[0] < 0 or layers[-1] >= len(features):
            raise SurgeryError(f"layers {layers} out of range for a stack of {len(features)} modules")
        self.features = features[: layers[-1] + 1]
        self.layers = tuple(layers)
        self.normalize = normalize
        for m in self.features.modules():  # in-place ReLUs would overwrite the features we keep
            if isinstance(m, nn.ReLU):
                m.inplace = False

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.normalize:
            x = _normalize(x)
        out = []
        for i, module in enumerate(self.features):
            x = module(x)
            if i in self.layers:
                out.append(x)
        return out


def vgg_features(
    layers: Sequence[int] = VGG19_STYLE_LAYERS + VGG19_CONTENT_LAYERS, *, download: bool = False
) -> VGGFeatures:
    """torchvision's ImageNet VGG-19 as a :class:`VGGFeatures` extractor (frozen, eval mode).

    Raises:
        SurgeryError: the weights ``vgg19-dcbb9e9d.pth`` are not in the torch hub cache (the message
            says where to put them), unless ``download=True``.
    """
    import torchvision

    weights = _torchvision_weights("VGG19_Weights.IMAGENET1K_V1", "style transfer", download)
    vgg = _load_torchvision_model(torchvision.models.vgg19, weights, "VGG-19")
    ext = VGGFeatures(vgg.features, layers).eval()
    for p in ext.parameters():
        p.requires_grad_(False)
    return ext


def _as_list(feats: Any) -> list[Tensor]:
    if isinstance(feats, Tensor):
        return [feats]
    if isinstance(feats, dict):
        return list(feats.values())
    if isinstance(feats, (list, tuple)):
        return list(feats)
    raise SurgeryError(f"feature_extractor must return a tensor, a list or a dict of tensors, got {type(feats).__name__}")


def _gram(f: Tensor, w: Tensor | None = None) -> Tensor:
    """Gram matrix ``(N, C, C)`` of features ``(N, C, h, w)``, optionally weighted by ``w`` ``(N, 1, h, w)``."""
    n, c = f.shape[:2]
    if w is None:
        flat = f.reshape(n, c, -1)
        return flat @ flat.transpose(1, 2) / flat.shape[-1]
    flat = (f * w.sqrt()).reshape(n, c, -1)
    area = w.reshape(n, -1).sum(-1).clamp_min(1e-6)
    return flat @ flat.transpose(1, 2) / area[:, None, None]


def _resize_mask_to(m: Tensor, hw: Sequence[int]) -> Tensor:
    return F.interpolate(m, size=tuple(hw), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def style_transfer(
    images: Tensor,
    masks: Tensor,
    style: Tensor | Image.Image,
    *,
    feature_extractor: nn.Module | None = None,
    style_layers: Sequence[int] | None = None,
    content_layers: Sequence[int] | None = None,
    steps: int = 200,
    lr: float = 0.02,
    style_weight: float = 1e5,
    content_weight: float = 1.0,
    style_size: int | None = 256,
    download: bool = False,
) -> Tensor:
    """Restyle the masked region of each image after ``style`` (Gatys et al., "Image style transfer
    using convolutional neural networks", CVPR 2016), leaving the rest as it is.

    Only the masked pixels change: the result is ``x + m * delta`` and ``delta`` is optimized (Adam,
    from zero) so that the Gram matrices of the features *inside the mask* match those of the style
    image, while the features stay close to the original's (content loss, which keeps the concept's
    shapes and the borders coherent).

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]`` (or uint8).
        masks: ``(N, H, W)``, ``(N, 1, H, W)`` or ``(H, W)``: the concept to restyle (soft allowed).
        style: the style (texture) image, ``(3, h, w)`` tensor or PIL image.
        feature_extractor: a module mapping images in ``[0, 1]`` to a list (or dict, or a single
            tensor) of feature maps; default torchvision's ImageNet VGG-19 (:func:`vgg_features`),
            which must be in the torch hub cache.
        style_layers, content_layers: indices into the extractor's outputs used for the style and
            the content loss; by default the VGG-19 layers relu1_1..relu5_1 and relu4_2, or, for
            a custom extractor, all outputs for style and the last for content.
        steps, lr: Adam steps and learning rate on the pixels.
        style_weight, content_weight: weights of the two losses.
        style_size: resize the style image's shorter side to this (``None``: keep it).
        download: let torchvision download VGG-19 when it is not cached.

    Returns:
        Float tensor like ``images``, values in ``[0, 1]``.

    Raises:
        SurgeryError: bad inputs, or VGG-19 weights missing (the message names the file and folder).
    """
    x, single = _images(images)
    n, _, H, W = x.shape
    m = _masks(masks, n, (H, W)).to(x.device)
    if steps < 1:
        raise SurgeryError(f"steps must be at least 1, got {steps}")
    if feature_extractor is None:
        feature_extractor = vgg_features(download=download)
        s_idx, c_idx = list(range(len(VGG19_STYLE_LAYERS))), [len(VGG19_STYLE_LAYERS)]
    else:
        s_idx = c_idx = None  # resolved after the first forward
    if style_layers is not None:
        s_idx = list(style_layers)
    if content_layers is not None:
        c_idx = list(content_layers)
    feature_extractor = feature_extractor.to(x.device)
    was_training = feature_extractor.training
    feature_extractor.eval()
    grads = [p.requires_grad for p in feature_extractor.parameters()]
    for p in feature_extractor.parameters():
        p.requires_grad_(False)
    try:
        s = _texture_tensor(style).to(x.device, x.dtype)
        if style_size is not None:
            h, w = s.shape[1:]
            k = style_size / min(h, w)
            s = F.interpolate(s[None], size=(max(1, round(h * k)), max(1, round(w * k))), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        with torch.no_grad():
            style_feats = _as_list(feature_extractor(s[None]))
            content_feats = _as_list(feature_extractor(x))
        nf = len(style_feats)
        s_idx = list(range(nf)) if s_idx is None else s_idx
        c_idx = [nf - 1] if c_idx is None else c_idx
        bad = [i for i in list(s_idx) + list(c_idx) if not -nf <= i < nf]
        if bad:
            raise SurgeryError(f"layer indices {bad} out of range: the feature extractor returns {nf} maps")
        style_grams = {i: _gram(style_feats[i]) for i in s_idx}
        masks_at = {i: _resize_mask_to(m, content_feats[i].shape[-2:]) for i in set(s_idx) | set(c_idx)}
        delta = torch.zeros_like(x, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        for step in range(steps):
            opt.zero_grad()
            out = (x + m * delta).clamp(0.0, 1.0)
            feats = _as_list(feature_extractor(out))
            style_loss = sum(
                F.mse_loss(_gram(feats[i], masks_at[i]), style_grams[i].expand(n, -1, -1)) for i in s_idx
            )
            content_loss = sum(F.mse_loss(feats[i], content_feats[i]) for i in c_idx)
            loss = style_weight * style_loss + content_weight * content_loss
            loss.backward()
            opt.step()
            if step == 0 or step == steps - 1:
                logger.debug("style transfer step %d: style %.4g content %.4g", step, float(style_loss.detach()),
                             float(content_loss.detach()))
        result = (x + m * delta.detach()).clamp(0.0, 1.0)
    finally:
        for p, g in zip(feature_extractor.parameters(), grads):
            p.requires_grad_(g)
        feature_extractor.train(was_training)
    return result[0] if single else result


# AdaIN (Huang & Belongie, ICCV 2017), architecture of github.com/naoto0804/pytorch-AdaIN
ADAIN_WEIGHTS_URL = "https://github.com/naoto0804/pytorch-AdaIN/releases/tag/v0.0.0"


def _adain_encoder() -> nn.Sequential:
    """The normalized VGG-19 of pytorch-AdaIN, up to relu4_1 (31 modules)."""
    def conv(i: int, o: int, k: int = 3) -> list[nn.Module]:
        return [nn.ReflectionPad2d(1), nn.Conv2d(i, o, k), nn.ReLU()] if k == 3 else [nn.Conv2d(i, o, k)]

    layers: list[nn.Module] = [nn.Conv2d(3, 3, 1)]
    layers += conv(3, 64) + conv(64, 64) + [nn.MaxPool2d(2, 2, ceil_mode=True)]
    layers += conv(64, 128) + conv(128, 128) + [nn.MaxPool2d(2, 2, ceil_mode=True)]
    layers += conv(128, 256) + conv(256, 256) + conv(256, 256) + conv(256, 256) + [nn.MaxPool2d(2, 2, ceil_mode=True)]
    layers += conv(256, 512)
    return nn.Sequential(*layers)


def _adain_decoder() -> nn.Sequential:
    """The decoder of pytorch-AdaIN (relu4_1 features -> image)."""
    def conv(i: int, o: int, relu: bool = True) -> list[nn.Module]:
        return [nn.ReflectionPad2d(1), nn.Conv2d(i, o, 3)] + ([nn.ReLU()] if relu else [])

    up = nn.Upsample(scale_factor=2, mode="nearest")
    layers: list[nn.Module] = conv(512, 256) + [up]
    layers += conv(256, 256) + conv(256, 256) + conv(256, 256) + conv(256, 128) + [nn.Upsample(scale_factor=2, mode="nearest")]
    layers += conv(128, 128) + conv(128, 64) + [nn.Upsample(scale_factor=2, mode="nearest")]
    layers += conv(64, 64) + conv(64, 3, relu=False)
    return nn.Sequential(*layers)


def _adain_module(obj: nn.Module | PathLike | None, build: Any, what: str, filename: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj.eval()
    if obj is None:
        raise SurgeryError(
            f"AdaIN needs the {what} weights: download {filename} from {ADAIN_WEIGHTS_URL} and pass its path "
            f"(or an nn.Module); or use style_transfer(), which needs only torchvision's VGG-19"
        )
    p = Path(obj)
    if not p.is_file():
        raise SurgeryError(f"AdaIN {what} weights {str(p)!r} do not exist; download {filename} from {ADAIN_WEIGHTS_URL}")
    module = build()
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
        if what == "encoder":
            module.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[0]) < len(module)})
        else:
            module.load_state_dict(state)
    except Exception as e:
        raise SurgeryError(f"cannot load AdaIN {what} weights {str(p)!r} ({type(e).__name__}: {e}); expected {filename} "
                           f"from {ADAIN_WEIGHTS_URL}") from e
    return module.eval()


def _adain(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    n, c = content.shape[:2]
    cm = content.reshape(n, c, -1).mean(-1)[..., None, None]
    cs = content.reshape(n, c, -1).std(-1)[..., None, None] + eps
    sm = style.reshape(style.shape[0], c, -1).mean(-1)[..., None, None]
    ss = style.reshape(style.shape[0], c, -1).std(-1)[..., None, None] + eps
    return (content - cm) / cs * ss + sm


def adain_transfer(
    images: Tensor,
    masks: Tensor,
    style: Tensor | Image.Image,
    *,
    decoder: nn.Module | PathLike | None = None,
    encoder: nn.Module | PathLike | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """Restyle the masked region with AdaIN (one forward pass; Huang & Belongie, ICCV 2017).

    Needs the pytorch-AdaIN weights (``decoder.pth`` and ``vgg_normalised.pth``, from
    :data:`ADAIN_WEIGHTS_URL`), as paths or as modules: ``encoder`` maps images in ``[0, 1]`` to
    features, ``decoder`` maps features back to images.

    Args:
        images, masks, style: as :func:`style_transfer`.
        alpha: content-style trade-off: 0 keeps the content features, 1 takes the full AdaIN features.

    Returns:
        Float tensor like ``images``: the decoded image inside the mask, the original outside.

    Raises:
        SurgeryError: missing weights (naming what to download) or bad inputs.
    """
    x, single = _images(images)
    n, _, H, W = x.shape
    m = _masks(masks, n, (H, W)).to(x.device)
    if not 0.0 <= alpha <= 1.0:
        raise SurgeryError(f"alpha must lie in [0, 1], got {alpha}")
    dec = _adain_module(decoder, _adain_decoder, "decoder", "decoder.pth").to(x.device)
    enc = _adain_module(encoder, _adain_encoder, "encoder", "vgg_normalised.pth").to(x.device)
    s = _texture_tensor(style).to(x.device, x.dtype)
    with torch.no_grad():
        fc = enc(x)
        fs = enc(s[None])
        t = alpha * _adain(fc, fs) + (1.0 - alpha) * fc
        y = dec(t)
    if tuple(y.shape[-2:]) != (H, W):
        y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
    y = y.clamp(0.0, 1.0)
    out = m * y + (1.0 - m) * x
    return out[0] if single else out


# --------------------------------------------------------------------------------------------------
# concept masks from a segmentation model
# --------------------------------------------------------------------------------------------------

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

    weights = _torchvision_weights(_SEGMENTATION_MODELS[name], f"segmentation model {name}", download)
    return _load_torchvision_model(getattr(tvs, name), weights, name)


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
    x, single = _images(images)
    n, _, H, W = x.shape
    ids = _class_ids(classes, categories)
    if model is None:
        model = segmentation_model(download=download)
    with torch.no_grad():
        out = model(_normalize(x) if normalize else x)
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
