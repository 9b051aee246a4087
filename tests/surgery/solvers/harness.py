"""The solver harness: fixed edit problems whose solves are held to the bit across refactors.

Every family's tiny block (the fast solver, L1/L2, with and without ridge), the blocks the joint solver
takes, the paper's VGG16-BN/ResNet-50 layers, the two trained testbed cases of the speed benchmark and a
short reference run. ``python -m tests.surgery.solvers.harness`` writes each solve's objective (as
``float.hex``) and the SHA-256 of its factors' bytes to ``harness_objectives.json`` beside this file;
``test_harness.py`` (slow suite) solves them again and compares. A change that moves a solve by one
ulp fails it: say why in its commit and write the file again.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from surgery import get_layer
from surgery.layout import channels_last_rows
from surgery.problems import prepare_problem
from surgery.solvers import EditProblem, solve_fast, solve_reference
from tests.tiny_models import randomize_batchnorm, randomize_layer_scale, randomize_norms, tiny_clip

RESULTS = Path(__file__).with_name("harness_objectives.json")

# (factory, layer, image size): the fast solver's per-channel blocks
FAMILIES = {
    "vgg_block": (lambda: torchvision.models.vgg11_bn(), "features.4", 32),
    "resnet_basic": (lambda: torchvision.models.resnet18(), "layer1.1.conv2", 32),
    "resnet_bottleneck": (lambda: torchvision.models.resnet50(), "layer1.2.conv3", 32),
    "clip_block": (lambda: tiny_clip().visual, "layer4.0.conv3", 64),
    "efficientnet_pwl": (lambda: timm.create_model("tf_efficientnet_lite0"), "blocks.2.1.conv_pwl", 64),
    "vit_mlp": (lambda: timm.create_model("test_vit", init_values=1e-5), "blocks.1.mlp.fc2", 32),
    "convnext_fc2": (lambda: timm.create_model("test_convnext"), "stages.1.blocks.0.mlp.fc2", 32),
}
PAPER_LAYERS = {
    "vgg16_bn_features40": (lambda: torchvision.models.vgg16_bn(), "features.40", 224),
    "resnet50_layer4.1.conv3": (lambda: torchvision.models.resnet50(), "layer4.1.conv3", 224),
}


def tiny_swin(v2: bool) -> nn.Module:
    name = "swinv2_tiny_window8_256" if v2 else "swin_tiny_patch4_window7_224"
    return timm.create_model(name, img_size=32, window_size=4, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2))


def tiny_bit() -> nn.Module:
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=(1, 1, 1, 1),
        channels=(32, 32, 64, 64),
        stem_chs=16,
        stem_type="fixed",
        conv_layer=StdConv2d,
        norm_layer=lambda c, **kw: GroupNormAct(c, num_groups=8, **kw),
    )


# blocks that mix channels or are not linear in the weight: the joint solver
JOINT = {
    "se_resnet": (lambda: timm.create_model("test_resnet", block_args=dict(attn_layer="se")), "layer3.0.conv3", 32),
    "swinv2_post_norm": (lambda: tiny_swin(True), "layers.1.blocks.0.mlp.fc2", 32),
    "bit_std_conv": (lambda: tiny_bit(), "stages.0.blocks.0.conv3", 32),
}

RIDGE = 1e-3


def random_problem(factory: Callable[[], nn.Module], layer: str, size: int, loss: str, ridge: float = 0.0) -> EditProblem:
    """A model from ``factory`` with seeded random weights and two exemplars (:func:`exemplar_problem`)."""
    torch.manual_seed(0)
    return exemplar_problem(factory(), layer, size, loss, ridge)


def exemplar_problem(model: nn.Module, layer: str, size: int, loss: str, ridge: float = 0.0) -> EditProblem:
    """``model`` with its zero-init pitfalls removed, two exemplars whose lower half changes, and the second
    moment of six random images' keys (kept well-conditioned)."""
    model = randomize_norms(randomize_layer_scale(randomize_batchnorm(model))).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g)
    x2 = x.clone()
    x2[:, :, size // 2 :] = torch.randn(2, 3, size - size // 2, size, generator=g)
    lay = get_layer(model, layer)
    keys = channels_last_rows(lay.capture(model, torch.randn(6, 3, size, size, generator=g)).keys, lay.key_channel_dim)
    k = keys.double()
    moment = k.T @ k / len(k) + 0.05 * torch.eye(k.shape[1], dtype=torch.float64)
    return prepare_problem(model, lay, x, x2, stats=moment, loss=loss, ridge=ridge)


def _trained_problem(case: str) -> EditProblem:
    from benchmarks.speed import _trained_problem as trained

    problem, _, _ = trained(case, torch.device("cpu"))
    return problem


def _fast(problem: EditProblem) -> tuple[torch.Tensor, dict]:
    return solve_fast(problem)


def _joint(problem: EditProblem) -> tuple[torch.Tensor, dict]:
    return solve_fast(problem, max_iter=30)


def _reference(problem: EditProblem) -> tuple[torch.Tensor, dict]:
    return solve_reference(problem, steps=200, lr=1e-3)


def cases() -> dict[str, tuple[Callable[[], EditProblem], Callable[[EditProblem], tuple[torch.Tensor, dict]]]]:
    """Name -> (problem builder, solve)."""
    out = {}
    for loss in ("l1", "l2"):
        for ridge in (0.0, RIDGE):
            for name, (f, layer, size) in FAMILIES.items():
                out[f"{name} {loss} ridge={ridge:g}"] = (
                    lambda f=f, layer=layer, size=size, loss=loss, ridge=ridge: random_problem(f, layer, size, loss, ridge),
                    _fast,
                )
        for name, (f, layer, size) in {**JOINT, **PAPER_LAYERS}.items():
            out[f"{name} {loss}"] = (
                lambda f=f, layer=layer, size=size, loss=loss: random_problem(f, layer, size, loss, 0.0),
                _joint if name in JOINT else _fast,
            )
        out[f"reference vgg_block {loss}"] = (lambda loss=loss: random_problem(*FAMILIES["vgg_block"], loss, 0.0), _reference)
    for case in ("testbed vgg features.25", "testbed resnet layer4.0.conv2"):
        out[case] = (lambda case=case: _trained_problem(case), _fast)
    return out


def solve_case(name: str) -> dict[str, str]:
    """One case's objective (``float.hex``) and the SHA-256 of its factors."""
    build, solve = cases()[name]
    problem = build()
    lam, info = solve(problem)
    lam = lam.detach().contiguous()
    return {
        "objective": float(info["objective"]).hex(),
        "lam_sha256": hashlib.sha256(lam.cpu().numpy().tobytes()).hexdigest(),
    }


def main() -> int:
    torch.set_num_threads(1)  # the file holds one-thread solves (as the slow test runs them)
    results = {}
    for name in cases():
        results[name] = solve_case(name)
        print(name, float.fromhex(results[name]["objective"]), flush=True)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
