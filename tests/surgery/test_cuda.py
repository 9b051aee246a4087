"""The library on a GPU: the same edits, statistics and evaluations as on the CPU.

Marked ``gpu`` and deselected by default. Run with ``pytest -m gpu`` on a machine with CUDA; without
one these tests fail (they never skip). ``SURGERY_TEST_DEVICE=cpu pytest -m gpu`` runs them against
the CPU to check the tests themselves. TF32 is switched off so that GPU and CPU agree to float32
rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import torchvision

import surgery
from surgery.identity import tensor_sha256
from tests.tiny_models import randomize_batchnorm

pytestmark = pytest.mark.gpu

LAYER = "layer3.1.conv2"


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = torch.device(os.environ.get("SURGERY_TEST_DEVICE", "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device; SURGERY_TEST_DEVICE=cpu runs them on the CPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return dev


@pytest.fixture(scope="module")
def setup(device):
    torch.manual_seed(0)
    cpu = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    gpu = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(device)
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(16, 3, 64, 64, generator=g)
    x = torch.randn(2, 3, 64, 64, generator=g)
    x2 = x.clone()
    x2[:, :, 32:] = torch.randn(1, 3, 32, 64, generator=g)
    return cpu, gpu, clean, x, x2


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return (a - b).norm().item() <= tol * b.norm().item()


def test_statistics_and_rewrite_match_the_cpu(setup, device):
    cpu, gpu, clean, x, x2 = setup
    s_cpu = surgery.collect_key_stats(cpu, LAYER, clean, batch_size=8, progress=False)
    s_gpu = surgery.collect_key_stats(gpu, LAYER, clean, batch_size=8, progress=False)  # CPU images
    assert s_gpu.sum.device.type == "cpu" and s_gpu.count == s_cpu.count
    assert _close(s_gpu.sum, s_cpu.sum, 1e-5)
    e_cpu = surgery.rewrite(cpu, LAYER, x, x2, stats=s_cpu)
    e_gpu = surgery.rewrite(gpu, LAYER, x.to(device), x2.to(device), stats=s_gpu)
    # u is defined up to sign; the update lam (x) u is not
    assert _close(e_gpu.delta(), e_cpu.delta(), 1e-3)
    assert e_gpu.info["objective"] == pytest.approx(e_cpu.info["objective"], rel=1e-3)
    ref = surgery.rewrite(gpu, LAYER, x.to(device), x2.to(device), stats=s_gpu, solver="reference", steps=50)
    assert ref.info["objective"] < ref.info["objective_before"]


def test_files_apply_and_revert_on_the_gpu(setup, device, tmp_path):
    cpu, gpu, clean, x, x2 = setup
    stats = surgery.collect_key_stats(gpu, LAYER, clean.to(device), batch_size=8, progress=False)
    edit = surgery.rewrite(gpu, LAYER, x.to(device), x2.to(device), stats=stats)
    path = tmp_path / "edit.safetensors"
    edit.save(path)
    loaded = surgery.Edit.load(path)
    before = {n: tensor_sha256(p) for n, p in gpu.state_dict().items()}
    weight = surgery.get_layer(gpu, LAYER).weight
    handle = surgery.apply_edit(gpu, loaded)
    assert weight.device == device and weight.dtype == torch.float32
    assert tensor_sha256(weight) != before[f"{LAYER}.weight"]
    with torch.no_grad():
        edited_logits = gpu(x2.to(device)).cpu()
    surgery.revert_edit(gpu, handle)
    assert {n: tensor_sha256(p) for n, p in gpu.state_dict().items()} == before
    # the same file on the CPU model gives the same predictions
    with surgery.edited(cpu, loaded), torch.no_grad():
        assert _close(edited_logits, cpu(x2), 1e-4)


def test_evaluation_from_cached_keys_matches_full_forwards(setup, device):
    cpu, gpu, clean, x, x2 = setup
    stats = surgery.collect_key_stats(gpu, LAYER, clean, batch_size=8, progress=False)
    edit = surgery.rewrite(gpu, LAYER, x.to(device), x2.to(device), stats=stats)
    cached = surgery.evaluation.CachedImages(gpu, torch.cat([x2, clean]), batch_size=8)
    cand = surgery.evaluation.Candidate(edit, alpha=0.7)
    via_suffix = cached.logits(cand)
    via_full = cached.logits(cand, use_suffix=False)
    assert via_suffix.device.type == "cpu"
    assert _close(via_suffix, via_full, 1e-4)
    kw = dict(originals=x, clean_images=clean, clean_labels=torch.arange(16) % 10)
    on_gpu = surgery.evaluate_edit(gpu, edit, x2, 3, **kw)  # CPU images, moved batch by batch
    on_cpu = surgery.evaluate_edit(cpu, edit, x2, 3, **kw)
    assert torch.equal(on_gpu.preds_before.cpu(), on_cpu.preds_before)
    assert torch.equal(on_gpu.preds_after.cpu(), on_cpu.preds_after)
    assert on_gpu.clean_acc_after == on_cpu.clean_acc_after


def test_measured_layer_ranking_matches_the_cpu(setup, device):
    """CPU exemplars and clean images, a GPU model: the same ranking and scores as on the CPU."""
    cpu, gpu, clean, x, x2 = setup
    layers = ["layer4.1.conv2", LAYER, "layer2.1.conv2"]
    on_cpu = surgery.evaluation.rank_layers(cpu, x, x2, layers=layers, data=clean)
    on_gpu = surgery.evaluation.rank_layers(gpu, x, x2, layers=layers, data=clean)
    assert [l.name for l, _ in on_gpu] == [l.name for l, _ in on_cpu]
    for (_, a), (_, b) in zip(on_gpu, on_cpu):
        assert a == pytest.approx(b, rel=1e-3)
    assert [l.name for l, _ in surgery.evaluation.rank_layers(gpu, x, x2, layers=layers)] == [
        l.name for l, _ in surgery.evaluation.rank_layers(cpu, x, x2, layers=layers)
    ]


def test_segmentation_masks_with_a_gpu_model(device):
    """A segmentation model on the GPU, CPU images: the masks of the same model on the CPU, on the CPU."""
    from surgery.concepts.segmentation import VOC_CLASSES, masks_from_segmentation

    torch.manual_seed(0)
    seg = torch.nn.Conv2d(3, len(VOC_CLASSES), 3, padding=1)
    x = torch.rand(2, 3, 16, 20)
    on_cpu = masks_from_segmentation(x, ["person", "cat"], model=seg)
    on_gpu = masks_from_segmentation(x, ["person", "cat"], model=seg.to(device))
    assert on_gpu.device.type == "cpu" and 0 < int(on_cpu.sum()) < on_cpu.numel()
    assert int((on_gpu != on_cpu).sum()) <= 2  # argmax ties may round either way


@pytest.mark.parametrize("use_suffix", [True, False])
def test_finetune_on_the_gpu_matches_the_cpu(setup, device, use_suffix):
    cpu, gpu, clean, x, x2 = setup
    kw = dict(scope="local", steps=5, lr=1e-2, use_suffix=use_suffix)
    e_cpu = surgery.finetune(cpu, LAYER, x2, [3, 3], **kw)
    e_gpu = surgery.finetune(gpu, LAYER, x2.to(device), [3, 3], device=device, **kw)
    assert e_gpu.delta().abs().max().item() > 0
    assert _close(e_gpu.delta(), e_cpu.delta(), 1e-3)
