"""Solvers on the new blocks: values after the residual add (fast, per channel) and blocks that mix
channels or are not linear in the weight (joint Gauss-Newton): no worse than the reference solver."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from surgery.solvers import JointSolver, linear_in_weight, solve_fast, solve_reference
from tests.surgery.solvers.harness import exemplar_problem as _problem
from tests.surgery.solvers.harness import tiny_bit, tiny_swin

REFERENCE_STEPS = 300  # tiny problems; the reference only has to be matched, not beaten by much


CASES = {
    # channelwise blocks, valued after the add: the fast per-channel solver
    "vit_mlp": (lambda: timm.create_model("test_vit", init_values=1e-5), "blocks.1.mlp.fc2", 32, "fast"),
    "convnext_fc2": (lambda: timm.create_model("test_convnext"), "stages.1.blocks.0.mlp.fc2", 32, "fast"),
    "swin_attn_call_site": (lambda: tiny_swin(False), "layers.1.blocks.0.attn.proj", 32, "fast"),
    "tv_mbconv_skip": (lambda: torchvision.models.mobilenet_v3_small(), "features.5.block.3.0", 32, "fast"),
    # squeeze-excite after the edited conv, post-norm branches, weight standardization: the joint solver
    "se_resnet": (lambda: timm.create_model("test_resnet", block_args=dict(attn_layer="se")), "layer3.0.conv3", 32, "explicit"),
    "swinv2_post_norm": (lambda: tiny_swin(True), "layers.1.blocks.0.mlp.fc2", 32, "explicit"),
    "bit_std_conv": (lambda: tiny_bit(), "stages.0.blocks.0.conv3", 32, "per-channel blocks"),
}


@pytest.mark.parametrize("loss", ["l1", "l2"])
@pytest.mark.parametrize("key", list(CASES))
def test_no_worse_than_reference(key, loss):
    factory, layer, size, expected = CASES[key]
    torch.manual_seed(0)
    problem = _problem(factory(), layer, size, loss)
    lam, info = solve_fast(problem, max_iter=30)
    assert info.get("jacobian", "fast") == expected
    got = float(problem.objective(lam).detach())
    assert got == pytest.approx(info["objective"], rel=1e-5)
    assert got < info["objective_before"]
    _, ref = solve_reference(problem, steps=REFERENCE_STEPS, lr=1e-3)
    assert got <= ref["objective"] * (1 + 1e-5), (got, ref["objective"])


def test_conjugate_gradients_on_a_squeeze_excite_block():
    """The matrix-free path (large problems) reaches what the exact normal equations reach."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", block_args=dict(attn_layer="se"))
    problem = _problem(model, "layer3.0.conv3", 32, "l2")  # a bottleneck's 1x1 conv3, SE after bn3
    exact = JointSolver(problem)
    cg = JointSolver(problem, explicit_limit=0, cg_iters=40, cg_tol=1e-4)
    assert (exact.mode, cg.mode) == ("explicit", "conjugate gradients")
    _, info_exact = exact.solve(max_iter=5)
    _, info_cg = cg.solve(max_iter=5)
    assert info_cg["objective"] < info_cg["objective_before"]
    assert info_cg["objective"] <= info_exact["objective"] * 1.02
    _, ref = solve_reference(problem, steps=REFERENCE_STEPS, lr=1e-3)
    assert info_cg["objective"] <= ref["objective"] * (1 + 1e-5)


def test_linearity_check_tells_standardized_weights_apart():
    conv = _problem(timm.create_model("test_resnet"), "layer1.0.conv2", 32, "l2")
    std = _problem(tiny_bit(), "stages.0.blocks.0.conv3", 32, "l2")
    assert linear_in_weight(conv) and not linear_in_weight(std)
    assert std.layer.channelwise  # standardization is per output channel: the Jacobian is block-diagonal


def test_a_plain_conv_is_linear_in_its_weight_even_along_a_dead_channel():
    # A direction u in the keys' near-null space (a channel that is almost always zero, as dead ReLUs of random
    # networks give) makes z(W + D) - z(W) pure rounding; the check must still see a plain conv and
    # send it to the fast solver (it sent VGG16-BN features.40 of the speed benchmark to the joint one).
    problem = _problem(torchvision.models.vgg11_bn(), "features.8", 32, "l1")
    dead = torch.zeros_like(problem.u)
    dead[0, 0] = 1.0
    problem.keys[:, 0] *= 1e-7  # nearly dead: what reaches z through u is below float32 rounding
    problem.u = dead
    assert linear_in_weight(problem)
