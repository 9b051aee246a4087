"""surgery.concepts: texture pasting, mask files, style transfer and segmentation masks (offline, tiny)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from surgery.concepts.paste import paste_texture
from surgery.concepts.segmentation import VOC_CLASSES, masks_from_segmentation, segmentation_model
from surgery.concepts.neural_style import VGGFeatures, adain_transfer, style_transfer, vgg_features
from surgery.errors import SurgeryError
from surgery.inputs.masks import load_masks


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 24, generator=g)
    m = torch.zeros(2, 20, 24, dtype=torch.bool)
    m[0, 4:12, 5:15] = True
    m[1, 10:, :8] = True
    tex = torch.rand(3, 7, 9, generator=g)
    return x, m, tex


# ---------------------------------------------------------------------------------------- paste


def test_paste_changes_only_the_mask(batch):
    x, m, tex = batch
    out = paste_texture(x, m, tex, seed=3)
    outside = ~m[:, None].expand_as(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out[outside], x[outside])
    assert not torch.allclose(out[~outside], x[~outside])


def test_blend_zero_is_identity_and_blend_one_is_the_texture(batch):
    x, m, tex = batch
    assert torch.equal(paste_texture(x, m, tex, blend=0.0), x)
    out = paste_texture(x, m, tex, blend=1.0)  # tiled from (0, 0): pixel (i, j) = tex[:, i % 7, j % 9]
    tiled = tex.repeat(1, 3, 3)[:, :20, :24]
    inside = m[:, None].expand_as(x)
    assert torch.equal(out[inside], tiled.expand_as(x)[inside])


def test_soft_mask_blends_proportionally(batch):
    x, _, tex = batch
    soft = torch.full((2, 1, 20, 24), 0.25)
    out = paste_texture(x, soft, tex, blend=0.8)
    tiled = tex.repeat(1, 3, 3)[:, :20, :24]
    assert torch.allclose(out, 0.8 * x + 0.2 * tiled, atol=1e-6)


def test_uint8_pil_texture_resize_and_single_image(batch):
    x, m, _ = batch
    x8 = (x * 255).round().to(torch.uint8)
    tex = Image.new("RGB", (5, 5), (255, 0, 0))
    out = paste_texture(x8[0], m[0], tex, mode="resize")
    assert out.shape == (3, 20, 24)
    assert torch.allclose(out[:, m[0]], torch.tensor([1.0, 0.0, 0.0])[:, None])
    # one mask for the whole batch, random tiling offsets differ per image
    a = paste_texture(x, m[0], torch.rand(3, 7, 9), seed=1)
    assert a.shape == x.shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": torch.rand(2, 20, 24, 3)}, "channels-last"),
        ({"masks": torch.zeros(3, 20, 24)}, "3 masks for 2 images"),
        ({"masks": torch.zeros(2, 10, 24)}, "size"),
        ({"masks": torch.full((2, 20, 24), 2.0)}, r"\[0, 1\]"),
        ({"texture": torch.rand(4, 5, 5)}, "texture has shape"),
        ({"blend": 1.5}, "blend"),
        ({"mode": "stretch"}, "mode"),
    ],
)
def test_paste_errors(batch, kwargs, match):
    x, m, tex = batch
    args = {"images": x, "masks": m, "texture": tex}
    extra = {k: kwargs.pop(k) for k in ("blend", "mode") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(SurgeryError, match=match):
        paste_texture(**args, **extra)


# ---------------------------------------------------------------------------------------- masks


def _save(path: Path, arr: np.ndarray, mode: str) -> Path:
    Image.fromarray(arr, mode=mode).save(path)
    return path


def test_load_masks_gray_rgba_and_resize(tmp_path):
    """One semantics for files: the gray level, or the alpha channel when there is transparency."""
    gray = np.zeros((10, 16), np.uint8)
    gray[2:5, 3:9] = 200
    m = load_masks(_save(tmp_path / "g.png", gray, "L"))
    assert m.dtype == torch.float32 and m.shape == (1, 1, 10, 16)
    assert int((m >= 0.5).sum()) == 18 and float(m.max()) == pytest.approx(200 / 255)
    rgba = np.zeros((10, 16, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the opaque part is the concept
    rgba[6:, :, 3] = 255
    m = load_masks(_save(tmp_path / "a.png", rgba, "RGBA"))[0, 0]
    assert int((m >= 0.5).sum()) == 4 * 16 and bool((m[6:] == 1).all())
    big = load_masks(tmp_path / "g.png", size=(20, 32))  # same aspect ratio: resized, soft edges
    assert big.shape == (1, 1, 20, 32) and int((big >= 0.5).sum()) == pytest.approx(4 * 18, abs=8)
    both = load_masks([tmp_path / "g.png", tmp_path / "a.png"], size=(10, 16))
    assert both.shape == (2, 1, 10, 16)


def test_load_masks_errors_name_the_file(tmp_path):
    with pytest.raises(SurgeryError, match="nope.png.*does not exist"):
        load_masks(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SurgeryError, match="bad.png"):
        load_masks(tmp_path / "bad.png")
    with pytest.raises(SurgeryError, match="is a folder"):
        load_masks(tmp_path)
    ok = np.full((8, 8), 255, np.uint8)
    _save(tmp_path / "ok.png", ok, "L")
    with pytest.raises(SurgeryError, match="ok.png.*8x8.*another shape"):
        load_masks(tmp_path / "ok.png", size=(8, 20))
    with pytest.raises(SurgeryError, match="another shape"):  # tensors follow the same rule
        load_masks(torch.ones(8, 8), size=(8, 20))
    _save(tmp_path / "other.png", np.full((4, 4), 255, np.uint8), "L")
    with pytest.raises(SurgeryError, match="different sizes"):
        load_masks([tmp_path / "ok.png", tmp_path / "other.png"])


# ---------------------------------------------------------------------------------------- style


@pytest.fixture(scope="module")
def tiny_vgg() -> VGGFeatures:
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
    )
    return VGGFeatures(features, layers=(1, 4))


def test_style_transfer_changes_only_the_mask_and_lowers_style_loss(tiny_vgg):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 24, 24, generator=g) * 0.5
    m = torch.zeros(1, 24, 24)
    m[:, 6:18, 6:18] = 1.0
    style = torch.rand(3, 16, 16, generator=g)
    out = style_transfer(x, m, style, feature_extractor=tiny_vgg, steps=8, lr=0.05, style_size=None)
    assert out.shape == x.shape
    inside = m.bool()[:, None].expand_as(x)
    assert torch.equal(out[~inside], x[~inside])
    assert (out - x)[inside].abs().mean() > 0.01
    assert not any(p.requires_grad is False for p in tiny_vgg.parameters())  # restored as it was


def test_style_transfer_bad_layer_index(tiny_vgg):
    x, m = torch.rand(1, 3, 16, 16), torch.ones(1, 16, 16)
    with pytest.raises(SurgeryError, match="out of range"):
        style_transfer(x, m, torch.rand(3, 8, 8), feature_extractor=tiny_vgg, style_layers=[5], steps=1)


def test_missing_weights_errors_name_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(SurgeryError, match=r"vgg19-dcbb9e9d\.pth.*hub.*download\.pytorch\.org"):
        vgg_features()
    x, m = torch.rand(1, 3, 16, 16), torch.ones(1, 16, 16)
    with pytest.raises(SurgeryError, match="vgg19-dcbb9e9d.pth"):
        style_transfer(x, m, torch.rand(3, 8, 8), steps=1)
    with pytest.raises(SurgeryError, match=r"lraspp_mobilenet_v3_large-.*\.pth.*hub"):
        masks_from_segmentation(x, ["person"])
    with pytest.raises(SurgeryError, match="unknown segmentation model"):
        segmentation_model("unet")
    with pytest.raises(SurgeryError, match="decoder.pth"):
        adain_transfer(x, m, torch.rand(3, 8, 8))
    with pytest.raises(SurgeryError, match="missing.pth"):
        adain_transfer(x, m, torch.rand(3, 8, 8), decoder=tmp_path / "missing.pth")


def test_adain_with_given_modules():
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.ReLU())
    dec = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 3, padding=1), nn.Sigmoid())
    x = torch.rand(2, 3, 16, 16)
    m = torch.zeros(2, 16, 16)
    m[:, :8] = 1
    out = adain_transfer(x, m, torch.rand(3, 12, 12), encoder=enc, decoder=dec)
    assert out.shape == x.shape
    assert torch.equal(out[:, :, 8:], x[:, :, 8:])


# ---------------------------------------------------------------------------------------- segmentation


class FakeSegmenter(nn.Module):
    """Returns fixed logits at half resolution: class 15 (person) on the left, 0 (background) on the right."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = x.shape
        logits = torch.zeros(n, len(VOC_CLASSES), h // 2, w // 2)
        logits[:, 15, :, : w // 4] = 5.0
        logits[:, 0, :, w // 4 :] = 5.0
        logits[:, 8, :, w // 4 :] = 4.0  # cat: runner-up on the right
        return {"out": logits}


def test_masks_from_segmentation_with_fake_model():
    x = torch.rand(3, 3, 16, 20)
    person = masks_from_segmentation(x, ["person"], model=FakeSegmenter())
    assert person.shape == (3, 16, 20) and person.dtype == torch.bool
    assert bool(person[:, :, :9].all()) and not bool(person[:, :, 11:].any())
    both = masks_from_segmentation(x, ["person", 0], model=FakeSegmenter())
    assert bool(both.all())
    cat = masks_from_segmentation(x, "cat", model=FakeSegmenter())
    assert not bool(cat.any())  # never the arg-max
    soft = masks_from_segmentation(x, ["cat"], model=FakeSegmenter(), threshold=0.2)
    assert bool(soft[:, :, 11:].all())  # p(cat) ~ 0.27 on the right
    single = masks_from_segmentation(x[0], ["person"], model=FakeSegmenter())
    assert single.shape == (16, 20)


def test_masks_from_segmentation_errors():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(SurgeryError, match="unknown class 'unicorn'"):
        masks_from_segmentation(x, ["unicorn"], model=FakeSegmenter())
    with pytest.raises(SurgeryError, match="categories"):
        masks_from_segmentation(x, [1], model=FakeSegmenter(), categories=["a", "b"])
    with pytest.raises(SurgeryError, match="logits"):
        masks_from_segmentation(x, [1], model=nn.Flatten())
