"""Random weights that still exercise every block, for trying the library without pretrained weights
(and for its tests and benchmarks).

Freshly initialized models hide their blocks: timm ResNets and open_clip's CLIP zero-init the last
BatchNorm of each block, post-norm blocks their branch norms, layer-scales start near 1e-6, some heads
start at zero. An edit there changes nothing and a check of it is vacuous. These functions draw such
weights anew, in place, from seeded generators (the same seed, the same weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["randomize_batchnorm", "randomize_norms", "randomize_scales", "randomize_zero_weights", "recalibrate_batchnorm"]

_SCALE_NAMES = {"gamma", "gamma_1", "gamma_2", "ls1", "ls2", "layer_scale", "scale", "alpha"}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine weights and running statistics, in place.

    timm ResNets and open_clip's CLIP zero-init the last BN of each block, which would make a block's
    last conv irrelevant to its output (an edit there would change nothing, a check would be vacuous).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
                if m.running_mean is not None:
                    m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine weights for every non-BatchNorm norm layer (LayerNorm, GroupNorm, RMSNorm).

    Post-norm blocks (Swin V2, timm ``ResPostBlock``) zero-init their branch norms, which would make
    the branch, and any edit inside it, invisible.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or "norm" not in type(m).__name__.lower():
                continue
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.ndim >= 1 and w.is_floating_point():
                w.copy_(0.5 + torch.rand(w.shape, generator=g))
            b = getattr(m, "bias", None)
            if isinstance(b, torch.Tensor) and b.ndim >= 1 and b.is_floating_point():
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def randomize_scales(model: nn.Module, seed: int = 0) -> nn.Module:
    """Layer-scales (``gamma``, ``ls1``, ``layer_scale``, MetaFormer ``scale``, ResMLP ``alpha``) start
    near 1e-6 or 1; draw them from U(0.5, 1.5) so every branch matters."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last in _SCALE_NAMES and p.ndim >= 1 and p.numel() == max(p.shape):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def randomize_zero_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Dense weights initialized to zero (torchvision ViT's head) get a scaled normal draw."""
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.abs().sum() > 0:
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
    return model


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> nn.Module:
    """Running statistics of every BatchNorm from ``images`` (cumulative average), model left in eval."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    if not bns:
        return model
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    model.eval()
    return model
