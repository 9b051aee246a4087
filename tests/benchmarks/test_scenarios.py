"""The scenario runners (benchmarks/scenarios): end to end on small random models and generated photos,
and the clear failure of ``--pretrained`` without network.

The photos are random images filed under the class the unedited model predicts for them, so that the
"correct originals" restriction keeps photos and every code path counts something.
"""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import surgery
from benchmarks.scenarios import common, snow, typographic
from surgery.errors import SurgeryError
from surgery.inputs.folders import resolve_class
from surgery.inputs.preprocess import Preprocess
from tests.tiny_models import randomize_batchnorm, tiny_clip

SIZE = 64


def tiny_vgg(seed: int = 0) -> nn.Module:
    """A torchvision ``VGG`` (so the VGG adapter applies) with narrow features and a small head."""
    from torchvision.models.vgg import VGG, make_layers

    torch.manual_seed(seed)
    model = VGG(make_layers([8, "M", 16, "M", 32, "M", 32, "M"], batch_norm=True), num_classes=1000)
    model.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 1000))
    return randomize_batchnorm(model).eval()


def _random_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)  # smooth blobs, not pixel noise
        out.append(Image.fromarray(low).resize((96, 72), Image.Resampling.BICUBIC))
    return out


def _write_photos(root, model: nn.Module, pre: Preprocess, n: int, seed: int) -> list[int]:
    """Save ``n`` images under ``root/<index the model predicts>/``; return their labels."""
    images = _random_images(n, seed)
    x = torch.stack([pre.pixels(SIZE)(im) for im in images])
    with torch.no_grad():
        labels = model(pre.normalize(x)).argmax(1).tolist()
    for i, (im, y) in enumerate(zip(images, labels)):
        d = root / str(y)
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"img{i}.png")
    return labels


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_results_common(res: dict, layer: str, conditions: list[str]) -> None:
    for key in ("scenario", "model", "weights", "layer", "exemplar", "photos", "conditions", "target_condition",
                "restricted_to_correct_originals", "methods", "seconds", "files"):
        assert key in res, key
    assert res["layer"] == layer
    assert list(res["methods"]) == list(common.METHODS)
    for m in res["methods"].values():
        assert set(m["accuracy"]) == set(conditions)
        assert set(m["errors"]) == {"n", "errors_before", "errors_after", "pct_corrected"}
        assert set(m["per_class"]) == set(res["photos"]["classes"])
    assert res["methods"]["unedited"]["changed_params"] == {}
    weight = f"{layer}.weight"
    edit = res["methods"]["edit"]["changed_params"]
    assert list(edit) == [weight] and edit[weight] > 0
    assert list(res["methods"]["finetune-local"]["changed_params"]) == [weight]
    glob = res["methods"]["finetune-global"]["changed_params"]
    assert weight in glob and len(glob) > 1
    assert res["model_restored_after_each_method"] is True


def _check_outputs(out, stdout: str, layer: str, model: nn.Module, before: dict[str, torch.Tensor]) -> dict:
    res = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert table.strip() in stdout
    for method in common.METHODS:
        assert f"| {method} |" in table
    assert "Per class" in table
    assert Image.open(out / "exemplar.png").size == (3 * SIZE, SIZE)
    # the model the runner got back is exactly the unedited one
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the saved edit changes the edited layer and nothing else
    edit = surgery.Edit.load(out / "edit.safetensors")
    assert edit.layer == layer and edit.method == "rewrite"
    with surgery.edited(model, edit):
        changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == [f"{layer}.weight"]
    return res


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------


def test_snow_end_to_end(tmp_path, capsys):
    model = tiny_vgg()
    pre = snow.PREPROCESS
    labels = _write_photos(tmp_path / "snowy", model, pre, 6, seed=1)
    _write_photos(tmp_path / "clean", model, pre, 4, seed=2)
    before = _state(model)
    out = tmp_path / "out"
    rc = snow.main(
        ["--photos", str(tmp_path / "snowy"), "--clean", str(tmp_path / "clean"), "--size", str(SIZE),
         "--layer", "features.12", "--max-steps", "2", "--out", str(out)],
        model=model,
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = _check_outputs(out, captured.out, "features.12", model, before)
    _check_results_common(res, "features.12", ["snowy", "clean"])
    assert res["scenario"] == "snow" and res["target_condition"] == "snowy"
    assert res["restricted_to_correct_originals"] is False
    assert res["exemplar"]["source"].startswith("synthetic road scene")
    # the unedited row is the model's own predictions, file by file (labels were its predictions)
    unedited = res["methods"]["unedited"]
    order = [labels[int(f.split("img")[1].split(".")[0])] for f in res["photos"]["files"]]
    assert unedited["predictions"]["snowy"] == order == res["photos"]["labels"]
    assert unedited["accuracy"]["snowy"] == 100.0 and unedited["accuracy"]["clean"] == 100.0
    assert unedited["errors"] == {"n": 6, "errors_before": 0, "errors_after": 0, "pct_corrected": None}
    # fine-tuning used the default label: the unedited prediction on the original exemplar
    assert res["exemplar"]["label"] == res["exemplar"]["unedited_prediction_original"]
    assert res["methods"]["finetune-local"]["hparams"]["steps"] == 2


def test_snow_user_exemplar_and_errors(tmp_path, capsys):
    model = tiny_vgg()
    _write_photos(tmp_path / "snowy", model, snow.PREPROCESS, 3, seed=3)
    ex = tmp_path / "van.png"
    _random_images(1, 4)[0].resize((100, 80)).save(ex)
    mask = np.zeros((80, 100), dtype=np.uint8)
    mask[50:, 10:90] = 255
    Image.fromarray(mask).save(tmp_path / "road.png")
    base = ["--photos", str(tmp_path / "snowy"), "--size", str(SIZE), "--layer", "features.12", "--max-steps", "1"]

    # user exemplar + mask: snow is pasted; the given class is the fine-tuning label
    rc = snow.main(base + ["--exemplar", str(ex), "--mask", str(tmp_path / "road.png"),
                           "--exemplar-class", "police_van", "--out", str(tmp_path / "o"),
                           "--stats-data", str(tmp_path / "snowy"), "--cache-dir", str(tmp_path / "cache")],
                   model=model)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "procedural snow pasted inside the road mask" in res["exemplar"]["source"]
    assert res["exemplar"]["label"] == 734 and res["exemplar"]["label_given"] is True
    assert "no clean accuracy: pass --clean DIR" in captured.out
    assert res["key_stats"]["dataset_id"].startswith("folder:") and any((tmp_path / "cache").iterdir())
    pic = np.asarray(Image.open(tmp_path / "o" / "exemplar.png"), dtype=np.float32)
    orig, snowy_ex = pic[:, :SIZE], pic[:, SIZE : 2 * SIZE]
    assert np.abs(orig[: SIZE // 3] - snowy_ex[: SIZE // 3]).max() <= 1  # above the road: unchanged
    assert snowy_ex[-4:].mean() > orig[-4:].mean()  # the road got whiter

    # bad input: one clear message, exit status 2, no traceback
    for extra, expected in [
        (["--exemplar", str(ex)], "give --mask"),
        (["--mask", str(tmp_path / "road.png")], "need --exemplar"),
        (["--exemplar-class", "army tank"], "is not one of the model's 1000 class names"),
    ]:
        assert snow.main(base + extra, model=model) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


def test_typographic_end_to_end(tmp_path, capsys):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from surgery.adapters import ZeroShotClassifier

    # Encoding 1000 class names costs a minute on a loaded CPU: encode two, then give the classifier
    # random unit embeddings for all 1000 ImageNet classes (it stays a real ZeroShotClassifier).
    clf = ZeroShotClassifier(tiny_clip(SIZE), IMAGENET_CLASSNAMES[:2], templates=["a photo of a {}."]).eval()
    emb = torch.randn(1000, clf.class_embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    clf.class_embeddings = torch.nn.functional.normalize(emb, dim=1)
    clf.class_names = list(IMAGENET_CLASSNAMES)
    layer = "visual.layer4.0.conv3"
    _write_photos(tmp_path / "photos", clf, typographic.PREPROCESS, 5, seed=5)
    before = _state(clf)
    out = tmp_path / "out"
    rc = typographic.main(
        ["--photos", str(tmp_path / "photos"), "--size", str(SIZE), "--layer", layer, "--max-steps", "2",
         "--out", str(out)],
        model=clf,
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = _check_outputs(out, captured.out, layer, clf, before)
    _check_results_common(res, layer, ["clean", "blank", "ipod"])
    assert res["target_condition"] == "ipod" and res["restricted_to_correct_originals"] is True
    assert res["watch_class"] == {"index": 605, "name": "iPod"}
    assert "% predicted 'iPod' on ipod" in captured.out
    unedited = res["methods"]["unedited"]
    assert unedited["accuracy"]["clean"] == 100.0  # the photos are filed under its predictions
    assert unedited["errors"]["n"] == 5  # so every photo counts
    for m in res["methods"].values():
        assert set(m["pct_predicted_watch_class"]) == {"clean", "blank", "ipod"}


def test_add_paper_draws_inside_the_box_only():
    x = torch.rand(2, 3, SIZE, SIZE)
    x = (x * 255).round() / 255
    box = (0.25, 0.5, 0.75, 0.75)
    blank, mask = typographic.add_paper(x, box, None)
    text, mask2 = typographic.add_paper(x, box, "iPod")
    assert torch.equal(mask, mask2) and mask.shape == (2, 1, SIZE, SIZE)
    assert int(mask[0].sum()) == (SIZE // 2) * (SIZE // 4)
    outside = mask.expand(-1, 3, -1, -1) == 0
    assert torch.allclose(blank[outside], x[outside], atol=1e-6)
    assert torch.allclose(text[outside], x[outside], atol=1e-6)
    assert (text - blank).abs().amax() > 0.5  # dark letters on the paper
    assert blank[~outside].min() > 0.7  # a blank, light paper


def test_resolve_class_and_snow_texture():
    names = surgery.models.imagenet_classes()
    assert resolve_class("fire_engine", names) == 555
    assert resolve_class("Fire-Engine", names) == 555
    assert resolve_class("751", names) == 751
    with pytest.raises(SurgeryError, match="out of range"):
        resolve_class("1000", names)
    with pytest.raises(SurgeryError, match="ambiguous"):
        resolve_class("crane", ["crane", "dog", "crane"])
    with pytest.raises(SurgeryError, match="Did you mean"):
        resolve_class("fire engin", names)
    tex = common.snow_texture(48, seed=1)
    assert tex.shape == (3, 48, 48) and 0 <= float(tex.min()) and float(tex.max()) <= 1
    assert float(tex.mean()) > 0.75  # white
    assert torch.equal(tex, common.snow_texture(48, seed=1))


# --------------------------------------------------------------------------------------------------
# --pretrained without network: one message naming the weights, exit status 2, no traceback
# --------------------------------------------------------------------------------------------------


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(common, "reachable", lambda url, timeout=3.0: "the test host cannot be reached (offline)")


def test_snow_pretrained_offline_message(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    (tmp_path / "p" / "racer").mkdir(parents=True)
    rc = snow.main(["--photos", str(tmp_path / "p"), "--pretrained"])
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err
    assert "VGG16_BN_Weights.IMAGENET1K_V1" in err
    assert "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth" in err
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / "vgg16_bn-6c64b313.pth") in err
    assert "--checkpoint PATH" in err and "offline" in err
    assert "Traceback" not in err + captured.out


def test_snow_pretrained_download_error_message(tmp_path, monkeypatch, capsys):
    """The host answers but the download fails: surgery's ModelLoadError becomes the same message."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(common, "reachable", lambda url, timeout=3.0: None)

    def fail(*args, **kwargs):
        raise urllib.error.URLError("connection refused (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    monkeypatch.setattr("torchvision.models.vgg.VGG.__init__", _tiny_vgg_init)  # no 138M-parameter build
    rc = snow.main(["--photos", str(tmp_path), "--pretrained"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "VGG16_BN_Weights.IMAGENET1K_V1" in captured.err and "connection refused (test)" in captured.err
    assert "Traceback" not in captured.err + captured.out


def _tiny_vgg_init(self, features, num_classes=1000, init_weights=True, dropout=0.5):
    nn.Module.__init__(self)
    self.features = nn.Sequential(nn.Conv2d(3, 4, 3))


def test_typographic_pretrained_offline_message(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    monkeypatch.setattr(typographic, "_cached_hf_file", lambda: None)
    rc = typographic.main(["--photos", str(tmp_path), "--pretrained"])
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err
    assert "RN50 'openai'" in err and "timm/resnet50_clip.openai" in err
    assert "open_clip_model.safetensors" in err and "--checkpoint PATH" in err
    assert "Traceback" not in err + captured.out
    # real weights need the real input size
    assert typographic.main(["--photos", str(tmp_path), "--pretrained", "--size", "64"]) == 2
    assert "use --size 224" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the real architectures (random weights): make test-slow
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_snow_real_vgg16_bn_random_weights(tmp_path, capsys):
    _write_photos(tmp_path / "snowy", tiny_vgg(), snow.PREPROCESS, 4, seed=6)
    rc = snow.main(["--photos", str(tmp_path / "snowy"), "--size", str(SIZE), "--max-steps", "2",
                    "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert common.RANDOM_WEIGHTS_WARNING in captured.err and common.RANDOM_WEIGHTS_WARNING in captured.out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["weights"] == "random" and res["layer"] == "features.40"
    assert list(res["methods"]["edit"]["changed_params"]) == ["features.40.weight"]


@pytest.mark.slow
def test_typographic_real_rn50_random_weights(tmp_path, capsys):
    _write_photos(tmp_path / "photos", tiny_vgg(), typographic.PREPROCESS, 4, seed=7)
    rc = typographic.main(["--photos", str(tmp_path / "photos"), "--size", str(SIZE), "--max-steps", "2",
                           "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["weights"] == "random" and res["layer"] == "visual.layer4.1.conv3"
    assert "simple templates" in res["model"]
    assert res["methods"]["edit"]["changed_params"]["visual.layer4.1.conv3.weight"] > 0
