"""Random weights that still exercise every block: BatchNorm (affine and statistics, recalibrated on
the benchmark's images), other norms, layer-scales, and dense weights initialized to zero
(:mod:`surgery.models.random_init`)."""

from __future__ import annotations

import torch
from torch import nn

from surgery.models.random_init import (
    randomize_batchnorm,
    randomize_norms,
    randomize_scales,
    randomize_zero_weights,
    recalibrate_batchnorm,
)

__all__ = ["randomize_norms", "randomize_scales", "randomize_zero_weights", "recalibrate_batchnorm", "prepare_model"]


def prepare_model(model: nn.Module, calibration: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random weights that exercise every block: BN (affine and statistics), norms, layer-scales."""

    randomize_batchnorm(model, seed)
    randomize_norms(model, seed)
    randomize_scales(model, seed)
    randomize_zero_weights(model, seed)
    return recalibrate_batchnorm(model, calibration)
