"""Shared fixtures and hypothesis profiles.

Hypothesis loads its built-in ``ci`` profile when ``CI`` is set (no deadline, derandomized); the
``dev`` profile used otherwise keeps runs short.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("dev", max_examples=25, deadline=None)
if not os.environ.get("CI"):
    settings.load_profile("dev")

torch.set_num_threads(min(2, torch.get_num_threads()))


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
