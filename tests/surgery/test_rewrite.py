"""rewrite(): end to end on small models, and clear errors on degenerate input."""

from __future__ import annotations

import pytest
import torch
import torchvision
from PIL import Image

from surgery import LayerNotFoundError, SurgeryError, get_layer
from surgery.edits.apply import edited
from surgery.identity import tensor_sha256
from surgery.rewrite import rewrite
from surgery.solvers import FastConfig, ReferenceConfig
from surgery.stats.collect import collect_key_stats
from tests.tiny_models import randomize_batchnorm

LAYER = "layer3.1.conv2"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18()).eval()
    stats = collect_key_stats(model, LAYER, torch.randn(24, 3, 64, 64), progress=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 64, 64, generator=g)
    x2 = x.clone()
    x2[:, :, 32:] = torch.randn(1, 3, 32, 64, generator=g)  # one "concept" pasted on every exemplar
    mask = torch.zeros(3, 1, 64, 64)
    mask[:, :, 32:] = 1
    return model, stats, x, x2, mask


def _value_gap(model, x, x2) -> float:
    layer = get_layer(model, LAYER)
    return (layer.capture(model, x2).values - layer.capture(model, x).values).abs().mean().item()


def test_rewrite_makes_transformed_values_match_and_leaves_model_alone(setup):
    model, stats, x, x2, mask = setup
    before = {n: tensor_sha256(p) for n, p in model.state_dict().items()}
    edit = rewrite(model, LAYER, x, x2, mask, stats=stats)
    assert {n: tensor_sha256(p) for n, p in model.state_dict().items()} == before
    assert edit.layer == LAYER and edit.method == "rewrite" and edit.rank == 1
    assert edit.lam.shape == (1, 256, 3, 3) and edit.u.shape == (1, 256)
    assert edit.u.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert edit.base_fingerprints == {f"{LAYER}.weight": before[f"{LAYER}.weight"]}
    assert edit.hparams["solver"] == "fast" and edit.hparams["loss"] == "l1"
    # a random network: one rank-one update removes a good part of the gap, not all of it
    assert edit.info["objective"] < 0.8 * edit.info["objective_before"]
    # Values are read from the unedited model for the originals: compare against those.
    layer = get_layer(model, LAYER)
    target = layer.capture(model, x).values
    gap0 = (layer.capture(model, x2).values - target).abs().mean().item()
    with edited(model, edit):
        gap1 = (layer.capture(model, x2).values - target).abs().mean().item()
    assert gap1 == pytest.approx(edit.info["objective"], rel=1e-4)
    assert gap1 < 0.8 * gap0


def test_reference_solver_and_dense_ablation(setup):
    model, stats, x, x2, mask = setup
    e = rewrite(model, LAYER, x, x2, stats=stats, solver="reference", steps=20)
    assert e.factored and e.hparams["lr"] == 1e-4 and e.hparams["steps"] == 20
    dense = rewrite(model, LAYER, x, x2, stats=stats, solver="reference", steps=20, restrict_rank=False)
    assert not dense.factored and dense.delta().shape == get_layer(model, LAYER).weight.shape


def test_rank_ntrain_mask_and_l2(setup):
    model, stats, x, x2, mask = setup
    e = rewrite(model, LAYER, x, x2, mask, stats=stats, rank=2, ntrain=1, use_mask=True, loss="l2")
    assert e.rank == 2 and e.lam.shape == (2, 256, 3, 3) and e.hparams["ntrain"] == 1
    flat = e.delta().transpose(0, 1).reshape(256, -1).double()
    assert torch.linalg.matrix_rank(flat, rtol=1e-5) == 2


def test_paths_are_loaded_with_the_transform(setup, tmp_path):
    model, stats, x, x2, mask = setup
    paths = []
    for i, img in enumerate((x[0], x2[0])):
        arr = (img.clamp(-2, 2) + 2) / 4
        p = tmp_path / f"{i}.png"
        Image.fromarray((arr.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(p)
        paths.append(p)
    Image.fromarray((mask[0, 0].numpy() * 255).astype("uint8")).save(tmp_path / "m.png")
    to_tensor = torchvision.transforms.ToTensor()
    e = rewrite(model, LAYER, [paths[0]], [paths[1]], [tmp_path / "m.png"], stats=stats, transform=to_tensor)
    assert e.lam.shape == (1, 256, 3, 3) and torch.isfinite(e.lam).all()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(masks="zero", use_mask=True), SurgeryError, "all zero"),
        (dict(use_mask=True), SurgeryError, "needs masks"),
        (dict(transformed="small"), SurgeryError, "same shape"),
        (dict(transformed="nan"), SurgeryError, "NaN"),
        (dict(layer="layer3.1.bn2"), LayerNotFoundError, "layer3.1.conv2"),
        (dict(layer="layer3.1.conv1", stats_layer=True), SurgeryError, "collected at"),
        (dict(solver="adam"), SurgeryError, "solver must be"),
        (dict(lr=1e-3), SurgeryError, "lr is not an option of the fast solver.*solver='reference'"),
        (dict(restrict_rank=False), SurgeryError, "restrict_rank is not an option of the fast solver"),
        (dict(solver="reference", ridge=1e-3), SurgeryError, "ridge is not an option of the reference solver"),
        (dict(solver="reference", max_iter=5), SurgeryError, "max_iter is not an option of the reference solver.*'fast'"),
        (dict(solver=FastConfig(), ridge=1e-3), SurgeryError, "set them on the config"),
        (dict(solver=ReferenceConfig(steps=5), steps=5), SurgeryError, "set them on the config"),
        (dict(ntrain=5), SurgeryError, "ntrain"),
        (dict(train_mode=True), SurgeryError, r"model\.eval\(\)"),
    ],
)
def test_degenerate_input_is_a_clear_error(setup, kwargs, error, match):
    model, stats, x, x2, mask = setup
    kwargs = dict(kwargs)
    layer = kwargs.pop("layer", LAYER)
    masks = {"zero": torch.zeros_like(mask)}.get(kwargs.pop("masks", None), None)
    t = kwargs.pop("transformed", None)
    transformed = {"small": x2[:, :, :32, :32], "nan": x2.clone().fill_(float("nan"))}.get(t, x2)
    if kwargs.pop("stats_layer", False):
        pass  # stats were collected at LAYER, the layer asked for differs
    train = kwargs.pop("train_mode", False)
    if train:
        model.train()
    try:
        with pytest.raises(error, match=match):
            rewrite(model, layer, x, transformed, masks, stats=stats, **kwargs)
    finally:
        model.eval()


def test_configs_are_the_named_solvers_with_their_options(setup):
    model, stats, x, x2, _ = setup
    by_name = rewrite(model, LAYER, x, x2, stats=stats, solver="fast", ridge=1e-3, steps=7)
    by_config = rewrite(model, LAYER, x, x2, stats=stats, solver=FastConfig(ridge=1e-3, max_iter=7))
    assert torch.equal(by_name.lam, by_config.lam)
    assert by_config.hparams["solver"] == "fast"
    assert (by_config.hparams["ridge"], by_config.hparams["max_iter"]) == (1e-3, 7)
    ref = rewrite(model, LAYER, x, x2, stats=stats, solver=ReferenceConfig(steps=5, lr=1e-3))
    assert ref.hparams["solver"] == "reference" and (ref.hparams["steps"], ref.hparams["lr"]) == (5, 1e-3)
    assert "ridge" not in ref.hparams and "steps" not in by_config.hparams


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: FastConfig(ridge=-1.0), "ridge"),
        (lambda: FastConfig(max_iter=0), "max_iter"),
        (lambda: ReferenceConfig(steps=0), "steps"),
        (lambda: ReferenceConfig(lr=float("nan")), "lr"),
    ],
)
def test_bad_solver_settings_are_clear_errors(make, match):
    with pytest.raises(SurgeryError, match=match):
        make()


def test_the_edit_records_the_joint_solver_when_it_ran():
    """A squeeze-excite gate after the edited conv mixes output channels: the fast solver hands the block to
    the joint solver, and the edit's hparams say so."""
    import timm

    from tests.tiny_models import randomize_norms

    torch.manual_seed(0)
    model = randomize_norms(randomize_batchnorm(timm.create_model("test_resnet", block_args=dict(attn_layer="se")))).eval()
    layer = "layer3.0.conv3"
    stats = collect_key_stats(model, layer, torch.randn(8, 3, 32, 32), progress=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[:, :, 16:] = 0.0
    edit = rewrite(model, layer, x, x2, stats=stats, steps=5)
    assert edit.hparams["solver"] == "joint" and edit.info["solver"] == "joint"
    assert edit.hparams["max_iter"] == 5
