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
from surgery.testbed.protocol import span_parts
from surgery.testbed.train import (
    WEIGHTS_DIR,
    TrainConfig,
    default_config,
    evaluate,
    load_trained,
    normalize,
    read_info,
    train,
    translate,
    weights_path,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def test_scenes():
    return make_dataset(300, "test", seed=0)


# val accuracy the committed weights were saved with is above these (weights/README.md: 90.2 / 84.6 /
# 69.0 / 83.1%); on 300 test scenes the accuracy floor leaves room for sampling noise
FLOORS = {"vgg": (0.8, 0.7), "resnet": (0.8, 0.7), "vit": (0.65, 0.55), "convnext": (0.8, 0.7)}


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
    val_floor, test_floor = FLOORS[arch]
    assert info["val_accuracy"] > val_floor
    res = evaluate(model, test_scenes)
    assert res["accuracy"] > test_floor, res
    ctx = res["context"]
    assert ctx["both"]["n"] + ctx["one"]["n"] + ctx["neither"]["n"] == len(test_scenes)
    # every testbed classifier relies on the context: both concepts preferred beats neither
    assert ctx["both"]["accuracy"] > ctx["neither"]["accuracy"] + 0.2, ctx


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_candidate_blocks(arch):
    model = build_model(arch).eval()
    adapter = get_adapter(model)
    assert adapter.family == arch  # each testbed model goes to its family's adapter
    layers = {l.name: l for l in surgery.editable_layers(model)}
    cands = candidate_layers(arch)
    names = list(dict.fromkeys(part for group in cands.values() for entry in group for part in span_parts(entry)))
    assert "+" not in cands["deep"][-1]  # the fine-tuning baselines train the last deep entry: one layer
    assert all(len(span_parts(entry)) >= 2 for entry in cands["span"])
    assert all(len(span_parts(entry)) >= 3 for entry in cands["long_span"])  # where the schedules differ
    for name in names:
        layer = layers[name]
        if name.endswith("downsample.1"):  # a ConvNeXt stage transition: skip-free, valued at its own output
            assert arch == "convnext" and layer.kind == "conv" and layer.block == "conv"
        elif arch == "vgg":
            assert layer.kind == "conv"
            assert layer.block.startswith("conv -> batchnorm2d -> relu")
        elif arch == "resnet":
            assert layer.kind == "conv"
            assert "+identity" in layer.block and layer.family == "resnet"
        else:
            assert layer.kind == "linear" and layer.family == arch
    shapes = {
        i.layer.name: (i.key_shape, i.value_shape)
        for i in surgery.layers.describe_layers(
            model, (3, 80, 80), layers=[layers[n] for n in names]
        )
    }
    if arch == "vit":  # tokens (N, 1 + 10 * 10, C) at every block
        for name in names:
            assert shapes[name][0][1] == 101 and shapes[name][1][1] == 101
        return
    # ConvNeXt keys are channels-last tokens (N, H, W, C), its values NCHW
    spatial = (lambda s: s[1:3]) if arch == "convnext" else (lambda s: s[-2:])
    for group, size in (("deep", 5), ("high_res", 10)):
        for name in (part for entry in cands[group] for part in span_parts(entry)):
            # the ConvNeXt's deep candidates span its last two stages (10x10, then 5x5)
            at = 10 if arch == "convnext" and name.startswith("stages.2.") else size
            if name.endswith("downsample.1"):  # a stride-2 stage transition: keys at twice the values' size
                assert shapes[name][0][-2:] == (2 * at, 2 * at) and shapes[name][1][-2:] == (at, at)
            elif group == "deep":
                assert spatial(shapes[name][0]) == (at, at) and shapes[name][1][-2:] == (at, at)
            else:  # (the VGG's features.18 value ends with its max-pool, 5x5)
                assert spatial(shapes[name][0]) == (10, 10)


def test_vit_and_convnext_are_the_documented_timm_models():
    from timm.models.convnext import ConvNeXt
    from timm.models.vision_transformer import VisionTransformer

    vit, cnx = build_model("vit"), build_model("convnext")
    assert isinstance(vit, VisionTransformer) and isinstance(cnx, ConvNeXt)
    assert vit.global_pool == "token" and vit.cls_token is not None
    assert vit.patch_embed.grid_size == (10, 10)
    assert 150_000 <= sum(p.numel() for p in vit.parameters()) <= 1_500_000
    assert 150_000 <= sum(p.numel() for p in cnx.parameters()) <= 1_000_000
    sizes = []
    x = cnx.stem(torch.zeros(1, 3, 80, 80))
    for stage in cnx.stages:
        x = stage(x)
        sizes.append(x.shape[-1])
    assert sizes == [40, 20, 10, 5]
    # timm's default layer-scale is kept
    assert float(cnx.stages[0].blocks[0].gamma.abs().max()) == pytest.approx(1e-6)


@pytest.mark.parametrize("arch, width", [("vit", 16), ("convnext", 4)])
def test_tiny_vit_and_convnext_train_and_reload(arch, width, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(arch, width=width)
    assert model(torch.randn(2, 3, 80, 80)).shape == (2, 20)
    tiny = {"n_train": 96, "epochs": 2, "n_val": 40, "width": width, "batch_size": 32}
    extra = {"translate": 4, "label_smoothing": 0.1, "grad_clip": 1.0, "warmup": 0.1}
    trained, info = train(arch, out_dir=tmp_path, **tiny, **extra)
    cfg = TrainConfig.from_json(info["config"])
    assert cfg.optimizer == "adamw" and cfg.translate == 4 and cfg.width == width
    assert [h["epoch"] for h in info["history"]] == [1, 2] and info["img_per_s"] > 0
    assert read_info(tmp_path / f"{arch}.safetensors")["history"] == info["history"]
    start = build_model(arch, width=width).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in trained.state_dict().items())

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("retrained"))
    reloaded, _ = load_trained(arch, weights_dir=tmp_path, train_if_missing=False, **tiny, **extra)
    x = normalize(make_dataset(4, "val", seed=0).images)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), trained(x))


def test_new_fields_default_to_how_vgg_and_resnet_were_trained():
    for arch in ("vgg", "resnet"):
        cfg = default_config(arch)
        assert (cfg.optimizer, cfg.warmup, cfg.label_smoothing, cfg.grad_clip, cfg.translate) == (
            "sgd", 0.25, 0.0, 0.0, 0
        )
        stored = json.loads(read_info(weights_path(arch))["config"])
        assert "optimizer" not in stored  # trained before the field existed
        assert TrainConfig.from_json(json.dumps(stored)) == cfg
    with pytest.raises(ValueError, match="optimizer"):
        default_config("vgg", optimizer="adam")


def test_translate_shifts_each_image_with_reflected_borders():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert translate(x, 0) is x
    gen = torch.Generator().manual_seed(0)
    out = translate(x, 2, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        assert any(
            torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
            for dy in range(5)
            for dx in range(5)
        )


def test_set_flag_types_config_fields_and_refuses_unknown_ones(monkeypatch, capsys):
    calls = []

    def fake_train(arch, **kwargs):
        calls.append(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "train", fake_train)
    with pytest.raises(SystemExit):
        train_module.main(["--arch", "vit", "--set", "lr=0.002", "--set", "translate=4",
                           "--set", "optimizer=sgd", "--set", "flip=false"])
    assert {k: calls[0][k] for k in ("lr", "translate", "optimizer", "flip")} == {
        "lr": 0.002, "translate": 4, "optimizer": "sgd", "flip": False
    }
    for bad in ("colour=red", "lr", "translate=two", "width=8"):
        with pytest.raises(SystemExit) as e:
            train_module.main(["--arch", "vit", "--set", bad])
        assert e.value.code == 2
    assert "--set 'translate=two': translate is int" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHS)
def test_network_suffix_on_candidates(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x = torch.randn(2, 3, 80, 80)
    cands = candidate_layers(arch)
    for name in dict.fromkeys(part for group in cands.values() for entry in group for part in span_parts(entry)):
        layer = surgery.get_layer(model, name)
        suffix = network_suffix(model, layer)
        site = layer.value_site  # the output of a module, or the input of the next one
        with torch.no_grad(), surgery.Trace(model, site.module, retain_input=True) as t:
            expected = model(x)
        with torch.no_grad():
            got = suffix(site.read(t))
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


def test_cli_probe_refuses_an_unknown_testbed(capsys):
    from surgery.cli.main import main

    assert main(["probe", "--testbed", "alexnet"]) == 2
    assert "choose from " + ", ".join(ARCHS) in capsys.readouterr().err
