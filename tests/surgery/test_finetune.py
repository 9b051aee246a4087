"""Fine-tuning baselines: which parameters train, the model stays untouched, the edit reproduces SGD."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery.edits.apply import edited
from surgery.errors import SurgeryError
from surgery.finetune import finetune, suffix_parameters
from surgery.identity import tensor_sha256
from surgery.layers import get_layer
from tests.tiny_models import randomize_batchnorm, tiny_vit

N_CLASSES = 5


def tiny_cnn() -> nn.Sequential:
    """Conv-BN-ReLU x2, pool, linear; the edited layer is ``"3"``."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 0
        nn.BatchNorm2d(4),  # 1
        nn.ReLU(),  # 2
        nn.Conv2d(4, 6, 3, padding=1),  # 3  <- edited
        nn.BatchNorm2d(6),  # 4
        nn.ReLU(),  # 5
        nn.AdaptiveAvgPool2d(1),  # 6
        nn.Flatten(),  # 7
        nn.Linear(6, N_CLASSES),  # 8
    )
    return randomize_batchnorm(model).eval()


# written by hand: every parameter of the edited conv and of the modules after it
TINY_SUFFIX = ["3.weight", "3.bias", "4.weight", "4.bias", "8.weight", "8.bias"]


class OutOfOrder(nn.Module):
    """Head defined first but run last; a parameter owned by the model itself; a module that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, N_CLASSES)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.scale = nn.Parameter(torch.full((1,), 1.5))
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x)) * self.scale
        return self.head(x.mean(dim=(2, 3)))


# head first: names come in named_parameters order; scale (owned by the enclosing model) is left out
OUT_OF_ORDER_SUFFIX = [
    "head.weight", "head.bias", "body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias"
]


def snapshot(model: nn.Module) -> dict[str, tuple[str, bool]]:
    state = {n: (tensor_sha256(p), p.requires_grad) for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": (tensor_sha256(b), False) for n, b in model.named_buffers()})
    return state


def data(n: int = 6, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, size, size), torch.randint(0, N_CLASSES, (n,))


def changed(edit) -> set[str]:
    return {name for name, d in edit.deltas.items() if d.abs().max() > 0}


def test_suffix_parameters_follow_forward_order():
    assert suffix_parameters(tiny_cnn(), "3", torch.randn(1, 3, 8, 8)) == TINY_SUFFIX
    model = OutOfOrder().eval()
    assert suffix_parameters(model, "body.0", torch.randn(1, 3, 8, 8)) == OUT_OF_ORDER_SUFFIX
    assert suffix_parameters(model, "head", torch.randn(1, 3, 8, 8)) == ["head.weight", "head.bias"]


def test_local_changes_exactly_the_layer_weight():
    model = tiny_cnn()
    x, y = data()
    edit = finetune(model, "3", x, y, scope="local", steps=5, lr=0.1)
    assert set(edit.deltas) == {"3.weight"}
    assert changed(edit) == {"3.weight"}
    assert edit.delta().dtype == model[3].weight.dtype and edit.delta().shape == model[3].weight.shape


@pytest.mark.parametrize(
    ("make", "layer", "expected"),
    [(tiny_cnn, "3", TINY_SUFFIX), (OutOfOrder, "body.0", OUT_OF_ORDER_SUFFIX)],
)
def test_global_changes_exactly_the_suffix(make, layer, expected):
    model = make().eval()
    x, y = data()
    edit = finetune(model, layer, x, y, scope="global", steps=5, lr=0.1)
    assert list(edit.deltas) == expected
    assert changed(edit) == set(expected)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_model_is_bit_identical_and_flags_restored(scope):
    model = tiny_cnn()
    model[8].bias.requires_grad_(False)  # a frozen parameter in the suffix keeps its flag
    model[0].weight.requires_grad_(False)
    before = snapshot(model)
    x, y = data()
    edit = finetune(model, "3", x, y, scope=scope, steps=10, lr=0.5)
    assert snapshot(model) == before
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert edit.base_fingerprints == {n: tensor_sha256(model.get_parameter(n)) for n in edit.deltas}


@pytest.mark.parametrize("scope", ["local", "global"])
def test_finetuning_lowers_the_loss(scope):
    model = tiny_cnn()
    x, _ = data()
    edit = finetune(model, "3", x, 2, scope=scope, steps=20, lr=0.5)
    assert edit.info["loss_after"] < edit.info["loss_before"] - 0.05
    with torch.no_grad():
        assert abs(F.cross_entropy(model(x), torch.full((6,), 2)).item() - edit.info["loss_before"]) < 1e-5
        with edited(model, edit):
            after = F.cross_entropy(model(x), torch.full((6,), 2)).item()
    assert abs(after - edit.info["loss_after"]) < 1e-5
    assert edit.method == "finetune"
    assert edit.hparams == {
        "scope": scope, "steps": 20, "lr": 0.5, "batch_size": None, "loss": "cross_entropy"
    }


def reference_sgd(model, names, x, y, *, steps, lr, batch_size=None):
    """Plain torch.optim.SGD on a deepcopy, training only ``names``."""
    ref = copy.deepcopy(model)
    for n, p in ref.named_parameters():
        p.requires_grad_(n in names)
    opt = torch.optim.SGD([p for n, p in ref.named_parameters() if n in names], lr=lr, momentum=0.0)
    n = x.shape[0]
    for step in range(steps):
        if batch_size is None:
            idx = torch.arange(n)
        else:
            idx = torch.arange(step * batch_size, (step + 1) * batch_size) % n
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    return ref


@pytest.mark.parametrize(
    ("scope", "batch_size"), [("local", None), ("global", None), ("global", 4)]
)
def test_applied_edit_reproduces_direct_sgd(scope, batch_size):
    model = tiny_cnn()
    x, y = data(n=7)
    edit = finetune(model, "3", x, y, scope=scope, steps=15, lr=0.3, batch_size=batch_size)
    ref = reference_sgd(model, set(edit.deltas), x, y, steps=15, lr=0.3, batch_size=batch_size)
    probe = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = ref(probe)
        with edited(model, edit):
            got = model(probe)
        assert not torch.allclose(model(probe), want, atol=1e-3)  # the training did something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for n, d in edit.deltas.items():
        torch.testing.assert_close(model.get_parameter(n) + d, ref.get_parameter(n), atol=1e-6, rtol=1e-5)


def test_resnet18_global_at_32px():
    torchvision = pytest.importorskip("torchvision")
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    before = snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    edit = finetune(model, "layer4.1.conv2", x, 3, scope="global", steps=3, lr=0.05)
    assert list(edit.deltas) == [
        "layer4.1.conv2.weight", "layer4.1.bn2.weight", "layer4.1.bn2.bias", "fc.weight", "fc.bias"
    ]
    assert edit.info["loss_after"] < edit.info["loss_before"]
    assert snapshot(model) == before


def test_errors():
    model = tiny_cnn()
    x, y = data()
    with pytest.raises(SurgeryError, match="scope"):
        finetune(model, "3", x, y, scope="everything")
    with pytest.raises(SurgeryError, match=r"\[0, 4\]"):
        finetune(model, "3", x, N_CLASSES, steps=1)
    with pytest.raises(SurgeryError, match=r"\[0, 4\]"):
        finetune(model, "3", x, torch.tensor([0, 1, 2, 3, 4, -1]), steps=1)
    with pytest.raises(SurgeryError, match="shape"):
        finetune(model, "3", x, torch.tensor([0, 1]), steps=1)
    with pytest.raises(SurgeryError, match="empty"):
        finetune(model, "3", x[:0], 1, steps=1)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(SurgeryError, match="NaN"):
        finetune(model, "3", bad, 1, steps=1)
    with pytest.raises(SurgeryError, match="lr"):
        finetune(model, "3", x, 1, lr=float("nan"))
    with pytest.raises(SurgeryError, match="non-finite|lower lr"):
        finetune(model, "3", x * 1e3, 1, scope="global", steps=20, lr=1e30)
    model.train()
    with pytest.raises(SurgeryError, match=r"model\.eval\(\)"):
        finetune(model, "3", x, 1, steps=1)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_from_cached_keys_equals_full_forwards(scope):
    """Training from keys captured once gives the same edit as full forward passes: VGG, ResNet, and a
    timm ViT's attention output (its skip is read at the block's input)."""
    import torchvision
    from torchvision.models.vgg import VGG

    from surgery.suffix import feeds_context

    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
    )
    vgg = VGG(features, num_classes=5, init_weights=False)
    vgg.avgpool, vgg.classifier = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)
    resnet = torchvision.models.resnet18(num_classes=5)
    vit = tiny_vit()
    attn = get_layer(vit, "blocks.1.attn.proj")
    assert not any(feeds_context(attn, n) for n in ("blocks.1.attn.proj.weight", "blocks.1.norm1.weight"))
    for model, layer, size in ((vgg, "features.4", 16), (resnet, "layer3.0.conv2", 32), (vit, "blocks.1.attn.proj", 32)):
        randomize_batchnorm(model).eval()
        x = torch.randn(3, 3, size, size)
        if model is vit:  # LayerNorm and softmax in float32 drift by ~1e-5 between the two orders of work
            model.double()
            x = x.double()
        a = finetune(model, layer, x, [0, 1, 2], scope=scope, steps=4, lr=0.01, use_suffix=True)
        b = finetune(model, layer, x, [0, 1, 2], scope=scope, steps=4, lr=0.01, use_suffix=False)
        assert not b.info["from_cached_keys"]
        if model is not resnet or scope == "local":  # a global ResNet edit trains the downsample, which feeds the skip
            assert a.info["from_cached_keys"]
        assert a.deltas.keys() == b.deltas.keys()
        for k in a.deltas:
            torch.testing.assert_close(a.deltas[k], b.deltas[k], rtol=1e-4, atol=1e-6)
        assert a.info["loss_after"] == pytest.approx(b.info["loss_after"], rel=1e-5)
        assert a.info["loss_after"] != a.info["loss_before"]  # it trained
