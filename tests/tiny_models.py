"""Small models for fast tests, with the zero-init pitfalls of DESIGN.md section 5 removed."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial affine weights and running statistics.

    timm ResNets and open_clip's CLIP zero-init the last BN of each block, which would make a block's
    last conv irrelevant to its output and a block_forward check vacuous.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
                if m.running_mean is not None:
                    m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def tiny_clip(image_size: int = 64):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=(1, 2, 1, 1), width=8, image_size=image_size, head_width=8),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return randomize_batchnorm(model).eval()


def randomize_layer_scale(model: nn.Module) -> nn.Module:
    """Layer-scale and ConvNeXt gammas start near 1e-6; make them matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model
