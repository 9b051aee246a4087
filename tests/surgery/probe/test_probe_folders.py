"""Users' photos and masks from folders (surgery.inputs.folders) and `surgery probe MODEL --data --masks`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import surgery.cli.probe
from surgery.cli.main import main
from surgery.errors import SurgeryError
from surgery.inputs.folders import load_concept_masks, load_labelled_photos
from surgery.inputs.preprocess import Preprocess
from surgery.models.loading import load_model
from tests.tiny_models import tiny_clip


def _libraries_own_transform(spec: str, model: nn.Module):
    """The eval transform each library itself builds for ``model``."""
    if spec.startswith("timm"):
        from timm.data import create_transform, resolve_data_config

        return create_transform(**resolve_data_config({}, model=model), is_training=False)
    if spec == "torchvision":
        import torchvision

        return torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    if spec == "open_clip":
        import open_clip

        return open_clip.image_transform(model.visual.image_size, is_train=False)
    from torchvision import transforms as T

    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


@pytest.mark.parametrize("spec", ["timm", "timm-squash", "timm-wide", "torchvision", "open_clip", "plain"])
def test_preprocess_equals_each_librarys_own_transform(spec):
    """One preprocessing source: Preprocess.from_model(model) gives what timm, torchvision and open_clip
    would, and its pixels then normalize are the same transform."""
    model = {
        "timm": lambda: timm.create_model("resnet18", pretrained=False),  # bicubic, crop 0.95
        "timm-squash": lambda: timm.create_model("resnet18", pretrained=False),
        "timm-wide": lambda: timm.create_model("resnet18", pretrained=False),
        "torchvision": lambda: load_model("torchvision:resnet18"),
        "open_clip": lambda: tiny_clip(64),  # CLIP mean/std, no crop margin
        "plain": lambda: nn.Linear(2, 2),  # ImageNet defaults
    }[spec]()
    if spec == "timm-squash":
        model.pretrained_cfg = {**model.pretrained_cfg, "crop_mode": "squash"}
    if spec == "timm-wide":
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 192, 256)}
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (173, 301, 3), dtype=np.uint8))
    expected = _libraries_own_transform(spec, model)(photo)
    pre = Preprocess.from_model(model)
    torch.testing.assert_close(pre.model_input()(photo), expected, atol=1e-5, rtol=0)
    got = pre.normalize(pre.pixels()(photo))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    uint8 = (pre.pixels()(photo) * 255).round().to(torch.uint8)
    torch.testing.assert_close(pre.normalize(uint8[None])[0], expected, atol=0.01, rtol=0)


def _photo(path, left_red: bool, size=(40, 40), seed=0):
    """A photo whose left half is red (or not) over random green/blue."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    a[:, : size[0] // 2, 0] = 255 if left_red else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _mask(path, box, size=(40, 40)):
    """A mask PNG, white inside ``box`` = (x0, y0, x1, y1)."""
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


def test_masks_follow_the_photos_resize_and_crop(tmp_path):
    # a 80x120 (WxH) photo, resized to 40x60 and center-cropped to rows 10..50 of the resized image
    _photo(tmp_path / "photos" / "0" / "a.jpg", True, size=(80, 120))
    _mask(tmp_path / "masks" / "top" / "0" / "a.png", (0, 0, 80, 60), size=(80, 120))
    pre = Preprocess((0.5,) * 3, (0.5,) * 3, crop_pct=1.0)
    photos = load_labelled_photos(tmp_path / "photos", [["zero", "one"]], pre.pixels(40))
    assert photos.images.shape == (1, 3, 40, 40) and photos.sizes == [(120, 80)] and photos.labels.tolist() == [0]
    masks = load_concept_masks(tmp_path / "masks", photos, pre, 40)
    top = masks["top"][0]
    assert top.dtype == torch.bool and top[:19].all() and not top[21:].any()  # original rows 0..60 -> crop 0..20


def test_folder_errors_name_the_problem(tmp_path):
    pre = Preprocess((0.5,) * 3, (0.5,) * 3)
    _photo(tmp_path / "photos" / "one" / "a.png", True)
    photos = load_labelled_photos(tmp_path / "photos", [["zero", "one"]], pre.pixels(32))
    with pytest.raises(SurgeryError, match="does not exist"):
        load_concept_masks(tmp_path / "nowhere", photos, pre, 32)
    with pytest.raises(SurgeryError, match="no masks under"):
        load_concept_masks(tmp_path / "photos" / "one", photos, pre, 32)
    _mask(tmp_path / "typo" / "left" / "one" / "b.png", (0, 0, 20, 40))
    with pytest.raises(SurgeryError, match=r"names no photo.*did you mean 'one/a'"):
        load_concept_masks(tmp_path / "typo", photos, pre, 32)
    _mask(tmp_path / "wide" / "left" / "one" / "a.png", (0, 0, 20, 20), size=(80, 40))
    with pytest.raises(SurgeryError, match="a.png' is 80x40 \\(WxH\\) but its image is 40x40, another shape"):
        load_concept_masks(tmp_path / "wide", photos, pre, 32)
    _photo(tmp_path / "photos" / "one" / "a.jpg", True)
    twins = load_labelled_photos(tmp_path / "photos", [["zero", "one"]], pre.pixels(32))
    with pytest.raises(SurgeryError, match="differ only in their extension"):
        load_concept_masks(tmp_path / "wide", twins, pre, 32)
    _photo(tmp_path / "bad" / "two" / "a.png", True)
    with pytest.raises(SurgeryError, match="not one of the model's 2 class names"):
        load_labelled_photos(tmp_path / "bad", [["zero", "one"]], pre.pixels(32))


class RedLeft(nn.Module):
    """Class 1 ("redleft") when the left half's red channel is bright, else class 0 ("plain")."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([-1.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x[:, 0, :, : x.shape[3] // 2].mean((1, 2))[:, None]  # normalized: > 0 is bright


def _probe_tree(root, n: int = 6):
    for i in range(n):
        for folder, red in (("redleft", True), ("plain", False)):
            _photo(root / "photos" / folder / f"{i}.png", red, seed=i)
            _mask(root / "masks" / "left" / folder / f"{i}.png", (0, 0, 20, 40))
            _mask(root / "masks" / "right" / folder / f"{i}.png", (20, 0, 40, 40))
    (root / "black.png").parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(root / "black.png")
    (root / "names.txt").write_text("plain\nredleft\n")


def test_cli_probe_finds_the_rule_of_a_known_model(tmp_path, monkeypatch, capsys):
    """The model reads only the left half's red: blacking out "left" breaks class redleft, "right" nothing."""
    _probe_tree(tmp_path)
    monkeypatch.setattr(surgery.cli.probe, "model_from_args", lambda args: RedLeft().eval())
    out = tmp_path / "out"
    rc = main([
        "probe", "redleft-model", "--data", str(tmp_path / "photos"), "--masks", str(tmp_path / "masks"),
        "--texture", f"black={tmp_path / 'black.png'}", "--class-names", str(tmp_path / "names.txt"),
        "--size", "32", "--n-boot", "50", "--out", str(out),
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "12 photos of 2 classes (clean accuracy 100.0%), 2 concepts, styles black" in printed
    doc = json.loads((out / "probe.json").read_text())
    drops = {(c["class_name"], c["concept"]): c["drop"] for c in doc["cells"]}
    assert drops == {("plain", "left"): 0.0, ("plain", "right"): 0.0, ("redleft", "left"): 100.0, ("redleft", "right"): 0.0}
    assert "redleft: left +100.0" in printed
    for name in ("probe.csv", "probe.md", "probe.png", "probe_bars.png"):
        assert (out / name).stat().st_size > 0


def test_cli_probe_errors(tmp_path, monkeypatch, capsys):
    _probe_tree(tmp_path, n=1)
    monkeypatch.setattr(surgery.cli.probe, "model_from_args", lambda args: RedLeft().eval())
    base = ["probe", "m", "--data", str(tmp_path / "photos"), "--masks", str(tmp_path / "masks"), "--size", "32"]
    cases = [
        (["probe", "--data", "x"], "give a MODEL"),
        (["probe", "m", "--testbed", "vgg"], "not both"),
        (["probe", "m", "--data", str(tmp_path / "photos")], "needs --data DIR"),
        (["probe", "surgery:no_such_model", "--data", str(tmp_path / "nope"), "--masks", "x"], "nope' does not exist or is not a folder"),
        ([*base, "--styles", "sepia"], "unknown style(s) sepia"),
        ([*base, "--texture", "marble"], "bundled texture"),
        ([*base, "--texture", f"x={tmp_path / 'none.png'}"], "cannot read"),
        ([*base, "--styles", "gray", "--texture", "gray=" + str(tmp_path / "black.png")], "name of a pixel style"),
        ([*base, "--blend", "2"], "--blend must be in (0, 1]"),
        ([*base, "--n", "5"], "apply to --testbed only"),
        (["probe", "--testbed", "vgg", "--masks", "m"], "--masks apply to MODEL"),
        ([*base], "'plain' is not one of the model's 2 class names"),  # without --class-names: indices
        ([*base, "--class-names", str(tmp_path / "black.png")], "cannot read --class-names"),
        ([*base, "--class-names", str(tmp_path / "names.txt")], "fewer than 5 photos showing"),  # 1 per class
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "probe-output").exists() and not any(tmp_path.glob("*.json"))


def test_cli_probe_on_real_photos_with_the_real_lite0(tmp_path, capsys):
    """The bundled photos, each in the folder of the class the real EfficientNet-Lite0 predicts, with the
    walkthrough's hand-made masks as one concept, "background"."""
    from benchmarks.walkthrough.make_masks import MASKS, mask_path
    from surgery.inputs.photos import sample_photos

    folders = {"coffee": "espresso", "rocket": "missile", "stereo_motorcycle": "moped", "china": "palace"}
    photos = sample_photos(list(folders))
    for name, folder in folders.items():
        (tmp_path / "photos" / folder).mkdir(parents=True)
        photos[name].save(tmp_path / "photos" / folder / f"{name}.png")
        (tmp_path / "masks" / "background" / folder).mkdir(parents=True)
        shutil.copy(mask_path(name), tmp_path / "masks" / "background" / folder / f"{name}.png")
        assert MASKS[name][0] in ("table", "sky", "floor")
    out = tmp_path / "out"
    rc = main([
        "probe", "surgery:efficientnet_lite0", "--data", str(tmp_path / "photos"), "--masks", str(tmp_path / "masks"),
        "--texture", "gravel", "--min-images", "1", "--n-boot", "20", "--out", str(out),
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "4 photos of 4 classes (clean accuracy 100.0%)" in printed  # folder names map to the model's classes
    doc = json.loads((out / "probe.json").read_text())
    drops = {c["class_name"]: c["drop"] for c in doc["cells"]}
    assert set(drops) == {"espresso", "missile", "moped", "palace"}
    assert drops["missile"] == 100.0 and drops["espresso"] == 0.0  # gravel sky breaks the rocket, not the cup
