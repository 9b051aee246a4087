"""The testbed classifiers: committed weights, adapters, suffixes, and train / reload by config."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from surgery.adapters import get_adapter

import surgery
import surgery.testbed.train as train_module
from surgery.suffix import network_suffix
from surgery.testbed import make_dataset
from surgery.testbed.models import ARCHS, build_model, candidate_layers
from surgery.testbed.train import (
    WEIGHTS_DIR,
    TrainConfig,
    default_config,
    evaluate,
    load_trained,
    normalize,
    read_info,
    train,
    weights_path,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def test_scenes():
    return make_dataset(300, "test", seed=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_committed_weights_classify_test_scenes(arch, test_scenes):
    path = weights_path(arch)
    assert path.is_file(), (
        f"{path} missing: python -m surgery.testbed.train --arch {arch}"
    )
    assert path.stat().st_size < 5_000_000
    model, info = load_trained(arch, train_if_missing=False)
    assert not model.training
    assert TrainConfig.from_json(info["config"]) == default_config(arch)
    assert info["val_accuracy"] > 0.8
    res = evaluate(model, test_scenes)
    assert res["accuracy"] > 0.7, res
    ctx = res["context"]
    assert ctx["both"]["n"] + ctx["one"]["n"] + ctx["neither"]["n"] == len(test_scenes)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_candidate_blocks(arch):
    model = build_model(arch).eval()
    adapter = get_adapter(model)
    assert adapter.family == arch
    layers = {l.name: l for l in surgery.editable_layers(model)}
    cands = candidate_layers(arch)
    for name in cands["deep"] + cands["high_res"]:
        layer = layers[name]
        assert layer.kind == "conv"
        if arch == "vgg":
            assert layer.block.startswith("conv -> batchnorm2d -> relu")
        else:
            assert "+identity" in layer.block and layer.family == "resnet"
    shapes = {
        i.layer.name: (i.key_shape, i.value_shape)
        for i in surgery.layers.describe_layers(
            model, (3, 80, 80), layers=[layers[n] for n in layers]
        )
    }
    for name in cands["deep"]:
        assert shapes[name][0][-2:] == (5, 5) and shapes[name][1][-2:] == (5, 5)
    for name in cands["high_res"]:
        assert shapes[name][0][-2:] == (10, 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_network_suffix_on_candidates(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x = torch.randn(2, 3, 80, 80)
    cands = candidate_layers(arch)
    for name in cands["deep"] + cands["high_res"]:
        layer = surgery.get_layer(model, name)
        suffix = network_suffix(model, layer)
        site = layer.value_site.module
        with (
            torch.no_grad(),
            surgery.hooks.TraceDict(model, [site], retain_output=True) as tr,
        ):
            expected = model(x)
        with torch.no_grad():
            got = suffix(tr[site].output)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_normalize_matches_documented_constants():
    img = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(img)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out[0, :, 0, 0],
        (1 - torch.tensor(train_module.MEAN)) / torch.tensor(train_module.STD),
    )


def test_tiny_training_saves_config_and_reloads_by_config(
    tmp_path, monkeypatch, caplog
):
    tiny = {"n_train": 160, "epochs": 1, "n_val": 60, "seed": 3}
    model, _ = train("vgg", out_dir=tmp_path, **tiny)
    path = tmp_path / "vgg.safetensors"
    assert path.is_file()
    stored = read_info(path)
    cfg = json.loads(stored["config"])
    assert (
        cfg["arch"] == "vgg"
        and cfg["n_train"] == 160
        and cfg["epochs"] == 1
        and cfg["seed"] == 3
    )
    assert (
        cfg["testbed"] and cfg["mean"] and cfg["std"] and "lr" in cfg and "width" in cfg
    )
    assert 0.0 <= stored["val_accuracy"] <= 1.0
    assert set(stored["context"]) == {"both", "one", "neither"}
    assert (
        stored["torch"] == torch.__version__
        and "timm" in stored
        and stored["train_seconds"] > 0
    )

    calls: list[TrainConfig] = []
    real_train = train_module.train

    def spy(arch, **kwargs):
        calls.append(kwargs["config"])
        return real_train(arch, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    reloaded, _ = load_trained("vgg", weights_dir=tmp_path, **tiny)
    assert calls == []
    assert not reloaded.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v)

    with pytest.raises(FileNotFoundError, match="another config"):
        load_trained(
            "vgg", weights_dir=tmp_path, train_if_missing=False, **{**tiny, "seed": 4}
        )
    with caplog.at_level(logging.WARNING, logger="surgery.testbed.train"):
        load_trained("vgg", weights_dir=tmp_path, **{**tiny, "seed": 4})
    assert len(calls) == 1 and calls[0].seed == 4
    assert "seed: 3 != 4" in caplog.text
    assert TrainConfig.from_json(read_info(path)["config"]).seed == 4


def test_default_weights_dir_is_in_the_package():
    assert WEIGHTS_DIR.name == "weights" and WEIGHTS_DIR.parent.name == "testbed"
