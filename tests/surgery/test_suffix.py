"""network_suffix: the rest of the network from a layer's value, for fast evaluation of candidates."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from surgery import Trace, UnsupportedModelError, apply_edit, get_layer, revert_edit
from surgery.edits.edit import Edit, base_record
from surgery.suffix import network_suffix, suffix_logits
from tests.tiny_models import randomize_batchnorm, tiny_clip


@pytest.mark.parametrize(
    "factory,name,size",
    [
        (lambda: torchvision.models.vgg11_bn(), "features.25", 32),
        (lambda: torchvision.models.resnet18(), "layer4.1.conv2", 64),
        (lambda: torchvision.models.resnet50(), "layer3.2.conv3", 64),
        (lambda: timm.create_model("resnet18"), "layer4.0.conv2", 64),
        (lambda: tiny_clip().visual, "layer4.0.conv3", 64),
    ],
)
def test_suffix_reproduces_the_model_and_sees_candidate_weights(factory, name, size):
    model = randomize_batchnorm(factory()).eval()
    layer = get_layer(model, name)
    suffix = network_suffix(model, layer)
    x = torch.randn(2, 3, size, size)
    io = layer.capture(model, x)
    with torch.no_grad():
        torch.testing.assert_close(suffix_logits(suffix, layer, io.keys, layer.weight, io.context), model(x))
        lam = 0.1 * torch.randn(1, *layer.weight.shape[:1], *layer.weight.shape[2:])
        u = torch.nn.functional.normalize(torch.randn(1, layer.weight.shape[1]), dim=1)
        edit = Edit(layer=name, method="test", lam=lam, u=u, base=base_record({layer.param_name: layer.weight}))
        candidate = suffix_logits(suffix, layer, io.keys, edit.new_weight(layer.weight), io.context)
        handle = apply_edit(model, edit)
        try:
            expected = model(x)
        finally:
            revert_edit(model, handle)
    torch.testing.assert_close(candidate, expected, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in suffix.parameters()) < sum(p.numel() for p in model.parameters())


def test_suffix_shares_parameters_with_the_model():
    model = torchvision.models.resnet18().eval()
    suffix = network_suffix(model, "layer4")
    assert suffix.graph_module.fc.weight is model.fc.weight


@pytest.mark.parametrize(
    "factory,name,match",
    [
        (lambda: timm.create_model("test_vit"), "blocks.0.mlp.fc2", "cannot be split"),  # its output, before the add
        (lambda: torchvision.models.resnet50(), "layer3.2.conv2", "cannot be split"),
    ],
)
def test_unsplittable_models_are_clear_errors(factory, name, match):
    model = factory().eval()
    with pytest.raises(UnsupportedModelError, match=match):
        network_suffix(model, get_layer(model, name) if isinstance(model, torchvision.models.ResNet) else name)


def test_a_vit_splits_after_each_add_with_forward_arguments_left_at_their_default():
    # timm's ViT forward takes attn_mask=None (and is_causal=False): not the input, so not a reason to
    # refuse the cut; the branch output before the add is refused above, the value after it is not
    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    x = torch.randn(2, 3, 160, 160)
    for name in ("blocks.0.mlp.fc2", "blocks.1.attn.proj"):
        layer = get_layer(model, name)
        site = layer.value_site
        with torch.no_grad(), Trace(model, site.module, retain_input=True) as t:
            expected = model(x)
        with torch.no_grad():
            got = network_suffix(model, layer)(site.read(t))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
