"""Random-weight models that still exercise every block (timing runs, tests, scenario dry runs)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize_batchnorm"]


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
