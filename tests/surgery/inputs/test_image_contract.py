"""One image contract: the five public functions that take images refuse the same bad tensors the same way.

``rewrite``, ``evaluate_edit``, ``finetune``, ``collect_key_stats`` and ``probe`` all hold an image
tensor to :func:`surgery.inputs.images.check_images` (docs/api.md, "Images"): each bad input below
raises the same :class:`SurgeryError`, word for word after the argument's name, whose message names the
fix, and leaves the model as it was; a float batch ``(N, 3, H, W)`` passes all five.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery import SurgeryError, collect_key_stats, evaluate_edit, finetune, probe, rewrite
from surgery.identity import tensor_sha256
from surgery.inputs.images import check_images, pixels_to_float
from tests.tiny_models import randomize_batchnorm

N, SIZE, CLASSES, LAYER = 4, 8, 3, "3"


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),  # "3": the edited layer
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, CLASSES),
    )
    return randomize_batchnorm(model).eval()


def _images() -> torch.Tensor:
    return torch.randn(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _masks() -> dict[str, torch.Tensor]:
    top = torch.zeros(N, SIZE, SIZE, dtype=torch.bool)
    top[:, : SIZE // 2] = True
    return {"top": top}


@pytest.fixture(scope="module")
def setup():
    model = _model()
    x = _images()
    stats = collect_key_stats(model, LAYER, x, progress=False)
    x2 = x.clone()
    x2[:, :, : SIZE // 2] = 1.5  # a flat "concept" over the top half
    edit = rewrite(model, LAYER, x, x2, stats=stats)
    return model, stats, edit


def _flipped(images):
    return images.flip(-1) if isinstance(images, torch.Tensor) else images


# each entry point, called with `images` where it takes images (and good values for everything else)
ENTRY_POINTS = {
    "rewrite": lambda m, stats, edit, images: rewrite(m, LAYER, images, _flipped(images), stats=stats),
    "evaluate_edit": lambda m, stats, edit, images: evaluate_edit(m, edit, images, 0),
    "finetune": lambda m, stats, edit, images: finetune(m, LAYER, images, 0, steps=1),
    "collect_key_stats": lambda m, stats, edit, images: collect_key_stats(m, LAYER, images, progress=False),
    "probe": lambda m, stats, edit, images: probe(m, images, [0] * N, _masks(), n_boot=10, min_images=1),
}


def _nan() -> torch.Tensor:
    x = _images()
    x[1, 2, 3, 4] = float("nan")
    return x


def _inf() -> torch.Tensor:
    x = _images()
    x[0, 0, 0, 0] = float("-inf")
    return x


# bad input -> a fragment of the message that names the fix
BAD = {
    "uint8 pixels": (lambda: (_images() * 40 + 128).clamp(0, 255).to(torch.uint8), r"floating-point.*Preprocess\.from_model"),
    "one image, no batch dimension": (lambda: _images()[0], r"\(N, 3, H, W\).*unsqueeze\(0\)"),
    "channels-last": (lambda: _images().permute(0, 2, 3, 1).contiguous(), r"permute\(0, 3, 1, 2\)"),
    "grayscale": (lambda: _images()[:, :1], r"1 channels.*expand\(-1, 3, -1, -1\)"),
    "five dimensions": (lambda: _images()[None], r"must have shape \(N, 3, H, W\).*torch\.stack"),
    "two dimensions": (lambda: _images()[0, 0], r"must have shape \(N, 3, H, W\).*torch\.stack"),
    "empty": (lambda: _images()[:0], "empty: give at least one image"),
    "integers": (lambda: _images().round().long(), "dtype torch.int64; pass floating-point"),
    "NaN": (_nan, "1 NaN or infinite value"),
    "infinite": (_inf, "1 NaN or infinite value"),
}


def _state(model: nn.Module) -> dict[str, str]:
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_image_tensor_is_refused_the_same_way_by_every_entry_point(setup, entry, case):
    model, stats, edit = setup
    make, fix = BAD[case]
    with pytest.raises(SurgeryError, match=fix) as reference:
        check_images(make(), "images")
    before = _state(model)
    with pytest.raises(SurgeryError, match=fix) as refused:
        ENTRY_POINTS[entry](model, stats, edit, make())
    # the same message, after the name of the argument ("images", or rewrite's "originals")
    assert str(refused.value).split(" ", 1)[1] == str(reference.value).split(" ", 1)[1]
    assert _state(model) == before and not model.training


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_float_batch_passes_every_entry_point(setup, entry):
    model, stats, edit = setup
    assert ENTRY_POINTS[entry](model, stats, edit, _images()) is not None


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_something_other_than_a_tensor_is_refused(setup, entry):
    model, stats, edit = setup
    with pytest.raises(SurgeryError, match="tensor"):
        ENTRY_POINTS[entry](model, stats, edit, _images().numpy())


def test_uint8_tensors_in_a_list_are_refused_by_rewrite_too(setup):
    model, stats, _ = setup
    x8 = BAD["uint8 pixels"][0]()
    with pytest.raises(SurgeryError, match=r"originals\[1\] must be floating-point"):
        rewrite(model, LAYER, [_images()[0], x8[1]], _images()[:2], stats=stats)


def test_pixels_may_be_uint8_where_a_preprocessing_or_a_pixel_transformation_reads_them(setup):
    model, _, _ = setup
    x8 = BAD["uint8 pixels"][0]()
    result = probe(model, x8, [0] * N, _masks(), preprocess=lambda b: b.float() / 255, n_boot=10, min_images=1)
    assert result.rows
    assert check_images(x8, pixels=True) is x8  # kept as it is: the preprocessing reads it
    x, single = pixels_to_float(x8[0])
    assert single and x.shape == (1, 3, SIZE, SIZE) and torch.equal(x[0], x8[0].float() / 255)
    # the shape, channel and value rules are the same for pixels
    with pytest.raises(SurgeryError, match=r"permute\(0, 3, 1, 2\)"):
        probe(model, x8.permute(0, 2, 3, 1), [0] * N, _masks(), preprocess=lambda b: b.float() / 255)
