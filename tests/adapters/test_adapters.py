"""Adapters: every family's block_forward reproduces the value the real forward produces."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torchvision
from surgery.adapters import (
    CLIPAdapter,
    ConvNeXtAdapter,
    EfficientNetAdapter,
    GenericAdapter,
    ResNetAdapter,
    VGGAdapter,
    ViTAdapter,
    ZeroShotClassifier,
    get_adapter,
)
from torch import nn

from surgery import LayerNotFoundError, SurgeryError, editable_layers, get_layer
from surgery.editable import EditableLayer, Site
from surgery.layout import Layout
from tests.tiny_models import randomize_batchnorm, randomize_layer_scale, tiny_clip

REL_TOL = 1e-5


def _models():
    """(id, factory, input size, adapter, layers that must be valued at a block end)."""
    tv = torchvision.models
    return [
        ("tv_vgg11_bn", lambda: tv.vgg11_bn(), 32, VGGAdapter, ["features.0", "features.25"]),
        ("tv_vgg11", lambda: tv.vgg11(), 32, VGGAdapter, ["features.18"]),
        ("tv_resnet18", lambda: tv.resnet18(), 64, ResNetAdapter, ["layer1.1.conv2", "layer4.1.conv2"]),
        ("tv_resnet50", lambda: tv.resnet50(), 64, ResNetAdapter, ["layer3.5.conv3", "layer4.2.conv3"]),
        ("timm_test_resnet", lambda: timm.create_model("test_resnet"), 64, ResNetAdapter, []),
        ("timm_vgg11", lambda: timm.create_model("vgg11_bn"), 32, VGGAdapter, ["features.25"]),
        ("timm_test_convnext", lambda: timm.create_model("test_convnext"), 64, ConvNeXtAdapter, []),
        (
            "timm_convnext_conv_mlp",
            lambda: timm.create_model("test_convnext", conv_mlp=True),
            64,
            ConvNeXtAdapter,
            [],
        ),
        ("timm_test_vit", lambda: timm.create_model("test_vit", init_values=1e-5), 64, ViTAdapter, []),
        ("timm_test_efficientnet", lambda: timm.create_model("test_efficientnet"), 64, EfficientNetAdapter, []),
        ("timm_efficientnet_lite0", lambda: timm.create_model("tf_efficientnet_lite0"), 64, EfficientNetAdapter, []),
        ("clip_visual", lambda: tiny_clip().visual, 64, CLIPAdapter, ["layer4.0.conv3"]),
        ("clip_model", lambda: tiny_clip(), 64, CLIPAdapter, ["visual.layer4.0.conv3"]),
    ]


MODELS = {m[0]: m[1:] for m in _models()}


def _build(key: str) -> tuple[nn.Module, torch.Tensor]:
    factory, size, _, _ = MODELS[key]
    model = randomize_layer_scale(randomize_batchnorm(factory())).eval()
    return model, torch.randn(2, 3, size, size)


def _stage_last_block_layers(layers: list[EditableLayer]) -> list[EditableLayer]:
    """Block-valued layers, plus the last editable layer of each top-level stage."""
    chosen = {l.name: l for l in layers if l.post is not None}
    last_by_stage: dict[str, EditableLayer] = {}
    for l in layers:
        parts = l.name.split(".")
        stage = ".".join(parts[: min(len(parts) - 1, 3)])
        last_by_stage[stage] = l
    chosen.update({l.name: l for l in last_by_stage.values()})
    return list(chosen.values())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_block_forward_matches(model: nn.Module, x: torch.Tensor, layers) -> None:
    for layer in layers:
        io = layer.capture(model, x)
        with torch.no_grad():
            value = layer.block_forward(io.keys, layer.weight, io.context)
        assert value.shape == io.values.shape, layer
        assert io.values.norm() > 0, f"{layer.name}: value is all zeros, the check would be vacuous"
        assert rel_err(value, io.values) < REL_TOL, layer


@pytest.mark.parametrize("key", list(MODELS))
def test_block_forward_equals_hooked_value(key):
    model, x = _build(key)
    _, _, adapter_cls, must_be_blocks = MODELS[key]
    assert type(get_adapter(model)) is adapter_cls
    layers = editable_layers(model)
    by_name = {l.name: l for l in layers}
    for name in must_be_blocks:
        assert by_name[name].post is not None, f"{name} should be valued at its block end"
    chosen = _stage_last_block_layers(layers)
    assert len(chosen) >= 3
    assert_block_forward_matches(model, x, chosen)


def test_block_forward_uses_the_candidate_weight_and_is_differentiable():
    model, x = _build("tv_resnet18")
    layer = get_layer(model, "layer4.1.conv2")
    io = layer.capture(model, x)
    w = layer.weight.detach().clone().requires_grad_(True)
    out = layer.block_forward(io.keys, w, io.context)
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    with torch.no_grad():
        other = layer.block_forward(io.keys, 2 * layer.weight, io.context)
    assert rel_err(other, io.values) > 1e-3
    assert layer.weight.grad is None  # the model's own parameter was not touched


def test_channels_last_models():
    model, x = _build("tv_resnet50")
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    layers = [get_layer(model, n) for n in ("layer2.3.conv3", "layer4.2.conv3", "fc")]
    assert_block_forward_matches(model, x, layers)


def test_token_layouts():
    model, x = _build("timm_test_convnext")
    fc2 = [l for l in editable_layers(model) if l.name.endswith("mlp.fc2")]
    assert fc2 and all(l.kind == "linear" and l.key_channel_dim == -1 for l in fc2)
    assert all(l.value_channel_dim == 1 and "gamma" in l.block for l in fc2)
    io = fc2[-1].capture(model, x)
    assert io.keys.ndim == 4 and io.keys.shape[-1] == fc2[-1].weight.shape[1]  # (N, H, W, C)
    vit, xv = _build("timm_test_vit")
    proj = get_layer(vit, "blocks.0.attn.proj")
    # valued after the residual add: the intermediate stream, read at the input of norm2
    assert proj.value_site == Site("blocks.0.norm2", "input") and proj.block == "linear -> ls1 -> +skip"
    assert proj.context_sites == {"skip": Site("blocks.0", "input")}
    assert proj.key_layout == Layout("tokens", prefix=vit.num_prefix_tokens)
    io = proj.capture(vit, xv)
    assert io.keys.ndim == 3  # (N, tokens, C)


def test_family_layer_names():
    resnet50 = torchvision.models.resnet50().eval()
    layer = get_layer(resnet50, "layer4.2.conv3")
    assert layer.value_site.module == "layer4.2" and layer.context_sites["identity"].module == "layer4.2"
    down = get_layer(resnet50, "layer4.0.conv3")
    assert down.context_sites["identity"].module == "layer4.0.downsample"

    vgg = torchvision.models.vgg11_bn().eval()
    conv = get_layer(vgg, "features.25")  # last conv: conv, BN, ReLU, MaxPool
    assert conv.value_site.module == "features.28" and conv.block.endswith("maxpool2d")
    assert get_layer(vgg, "features.22").value_site.module == "features.24"  # no pool follows

    effnet = timm.create_model("tf_efficientnet_lite0").eval()
    names = {l.name: l for l in editable_layers(effnet)}
    pwl = [n for n in names if n.endswith("conv_pwl")]
    assert len(pwl) == 15
    # blocks with a skip connection are valued after the add (the block output), others at bn3
    for n in pwl:
        block = effnet.get_submodule(n.rsplit(".", 1)[0])
        expected = n.rsplit(".", 1)[0] if block.has_skip else n.replace("conv_pwl", "bn3")
        assert names[n].value_site.module == expected, n
    assert names["blocks.2.1.conv_pwl"].block == "conv -> bn3 -> +skip"
    assert "blocks.0.0.conv_pw" in names and names["blocks.0.0.conv_pw"].block == "conv -> bn2"
    assert not any(n.endswith("conv_dw") for n in names)  # depthwise convs are not editable


def test_clip_layers_skip_attention_pool_and_name_visual():
    clip = tiny_clip()
    names = [l.name for l in editable_layers(clip)]
    assert all(n.startswith("visual.") for n in names)
    assert not any("attnpool" in n for n in names)
    assert "visual.layer4.0.conv3" in names and "visual.conv1" in names


def test_zero_shot_classifier_is_a_classifier_and_editable():
    clip = tiny_clip()
    classes = ["cat", "dog", "espresso", "ipod"]
    zs = ZeroShotClassifier(clip, classes, templates=["a photo of a {}.", lambda c: f"a {c}"]).eval()
    x = torch.randn(3, 3, 64, 64)
    logits = zs(x)
    assert logits.shape == (3, len(classes)) and torch.isfinite(logits).all()
    # the same as CLIP's own similarity, with the same prompts
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        text = torch.nn.functional.normalize(clip.encode_text(tok(["a photo of a cat.", "a cat"])), dim=-1)
        cat = torch.nn.functional.normalize(text.mean(0), dim=0)
        img = clip.encode_image(x, normalize=True)
    torch.testing.assert_close(logits[:, 0], clip.logit_scale.exp() * img @ cat, rtol=1e-4, atol=1e-4)
    assert type(get_adapter(zs)) is CLIPAdapter
    assert [l.name for l in editable_layers(zs)] == [l.name for l in editable_layers(clip)]
    assert_block_forward_matches(zs, x, [get_layer(zs, "visual.layer4.0.conv3")])
    with pytest.raises(SurgeryError, match="open_clip CLIP model"):
        ZeroShotClassifier(nn.Linear(2, 2), classes)


def test_wrapped_model_still_gets_block_values():
    inner = randomize_batchnorm(torchvision.models.resnet18())
    wrapped = nn.Sequential(nn.Identity(), inner).eval()
    assert type(get_adapter(wrapped)) is GenericAdapter
    layer = get_layer(wrapped, "1.layer4.1.conv2")
    assert layer.post is not None
    assert_block_forward_matches(wrapped, torch.randn(2, 3, 64, 64), [layer])


def test_generic_model_every_dense_layer_is_plain():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.LazyLinear(5)
    )
    model(torch.randn(1, 3, 8, 8))
    layers = editable_layers(model)
    assert [l.name for l in layers] == ["0", "3"]
    assert [l.kind for l in layers] == ["conv", "linear"]
    assert_block_forward_matches(model.eval(), torch.randn(2, 3, 8, 8), layers)


def test_errors_are_clear():
    model, x = _build("tv_resnet18")
    layer = get_layer(model, "layer4.1.conv2")
    io = layer.capture(model, x)
    with pytest.raises(SurgeryError, match="needs context"):
        layer.block_forward(io.keys, layer.weight)
    with pytest.raises(SurgeryError, match="shape"):
        layer.block_forward(io.keys, layer.weight[:, :3], io.context)
    model.train()
    with pytest.raises(SurgeryError, match=r"model\.eval\(\)"):
        layer.block_forward(io.keys, layer.weight, io.context)
    with pytest.raises(LayerNotFoundError, match="not an editable layer"):
        get_layer(model, "layer4.1.bn2")


def test_adapter_selection_imports_neither_timm_nor_open_clip():
    code = textwrap.dedent(
        """
        import sys, torch, torchvision, surgery
        # reachable as an attribute after `import surgery` alone (issue 17)
        assert surgery.adapters.ZeroShotClassifier.__name__ == "ZeroShotClassifier"
        from surgery.adapters import get_adapter
        m = torchvision.models.resnet18()
        assert type(get_adapter(m)).__name__ == "ResNetAdapter"
        assert len(surgery.editable_layers(m)) == 21
        get_adapter(torch.nn.Linear(2, 2))
        leaked = [n for n in ("timm", "open_clip") if n in sys.modules]
        assert not leaked, leaked
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_register_adapter_takes_priority():
    from surgery.adapters import Adapter, register_adapter
    from surgery.adapters._registry import _ADAPTERS

    class Marker(nn.Linear):
        pass

    before = list(_ADAPTERS)
    try:

        @register_adapter
        class MarkerAdapter(Adapter):
            family = "marker"
            priority = 100

            @classmethod
            def matches(cls, model):
                return isinstance(model, Marker)

        assert get_adapter(Marker(2, 2)).family == "marker"
        assert editable_layers(Marker(2, 2))[0].family == "marker"
        assert get_adapter(nn.Linear(2, 2)).family == "generic"
        with pytest.raises(TypeError):
            register_adapter(object)
    finally:
        _ADAPTERS[:] = before


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,factory,layers",
    [
        ("vgg16_bn", lambda: torchvision.models.vgg16_bn(), ["features.27", "features.34", "features.37", "features.40"]),
        ("resnet50", lambda: torchvision.models.resnet50(), ["layer3.1.conv3", "layer3.3.conv3", "layer4.1.conv3"]),
        ("clip_rn50", None, ["visual.layer4.1.conv3", "visual.layer3.5.conv3"]),
    ],
)
def test_full_size_models(name, factory, layers):
    if factory is None:
        import open_clip

        model = open_clip.create_model("RN50")
    else:
        model = factory()
    model = randomize_batchnorm(model).eval()
    size = 224
    x = torch.randn(2, 3, size, size)
    assert_block_forward_matches(model, x, [get_layer(model, n) for n in layers])
