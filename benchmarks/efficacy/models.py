"""The classifiers an efficacy run edits: the trained testbed models, or a tiny one trained in seconds."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import VGG, make_layers

from surgery.testbed import Testbed
from surgery.testbed.models import candidate_layers
from surgery.testbed.train import load_trained, normalize

__all__ = ["tiny_classifier", "load_model", "preprocessor", "logits_of"]


# --------------------------------------------------------------------------- models
def tiny_classifier(tb: Testbed, seed: int = 0, n: int = 300, epochs: int = 2) -> tuple[nn.Module, dict]:
    """A tiny VGG-BN trained for a few seconds on ``n`` training scenes (for tests and --tiny)."""
    torch.manual_seed(seed)
    model = VGG(make_layers([8, "M", 16, "M", 16, "M", 32, 32], batch_norm=True), num_classes=20, init_weights=True)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(32, 20)
    data = tb.make_dataset(n, "train")
    x, y = data.float_images(), data.labels
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    layers = {"deep": ["features.15"], "high_res": ["features.12"]}
    return model, {"arch": "tiny", "candidate_layers": layers, "train_scenes": n, "epochs": epochs}


def load_model(arch: str) -> tuple[nn.Module, dict]:
    """The trained testbed classifier (``surgery/testbed/weights``), never retrained here."""
    try:
        model, info = load_trained(arch, train_if_missing=False)
    except FileNotFoundError as e:
        raise SystemExit(
            f"no trained testbed {arch} classifier ({e}); train it with "
            f"`python -m surgery.testbed.train --arch {arch}`, or run with --tiny"
        ) from None
    info = dict(info or {})
    info.setdefault("candidate_layers", candidate_layers(arch))
    info["normalize"] = "surgery.testbed.train.normalize"
    return model.eval(), info


def preprocessor(info: dict):
    """uint8 images -> model inputs: the trained models' normalization, or [0, 1] floats (tiny model)."""
    if info.get("normalize") == "surgery.testbed.train.normalize":
        return normalize
    return lambda images: images.float() / 255.0


def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])
