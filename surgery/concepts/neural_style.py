"""Neural style transfer inside a concept mask: Gatys et al. (2016) and AdaIN (Huang & Belongie, 2017).

Both restyle only the masked region of an image, to make transformed exemplars ("the road covered in
snow") from a style image. Gatys' optimization needs VGG-19 features (torchvision's ImageNet weights,
when cached, or any ``feature_extractor=``); AdaIN needs the pytorch-AdaIN encoder and decoder weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from surgery._files import PathLike
from surgery.concepts._weights import imagenet_normalize, load_torchvision_model, torchvision_weights
from surgery.concepts.paste import _masks, _texture_tensor
from surgery.errors import SurgeryError
from surgery.inputs.images import pixels_to_float

__all__ = ["ADAIN_WEIGHTS_URL", "VGGFeatures", "vgg_features", "style_transfer", "adain_transfer"]

logger = logging.getLogger(__name__)


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
            x = imagenet_normalize(x)
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

    weights = torchvision_weights("VGG19_Weights.IMAGENET1K_V1", "style transfer", download)
    vgg = load_torchvision_model(torchvision.models.vgg19, weights, "VGG-19")
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
    x, single = pixels_to_float(images)
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
    x, single = pixels_to_float(images)
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
