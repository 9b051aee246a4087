"""Small models for fast tests; the weight randomization that keeps them from the zero-init pitfalls is the
library's (:mod:`surgery.models.random_init`), re-exported here beside the tests' own layer-scale draw."""

from __future__ import annotations

import torch
from torch import nn

from surgery.models.random_init import randomize_batchnorm, randomize_norms, randomize_scales

__all__ = ["randomize_batchnorm", "randomize_layer_scale", "randomize_norms", "randomize_scales", "tiny_clip", "tiny_vit"]


def randomize_layer_scale(model: nn.Module) -> nn.Module:
    """Layer-scale and ConvNeXt gammas start near 1e-6; make them matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


def tiny_clip(image_size: int = 64):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=(1, 2, 1, 1), width=8, image_size=image_size, head_width=8),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return randomize_batchnorm(model).eval()


def tiny_vit(seed: int = 0) -> nn.Module:
    """A 2-block timm ViT with a class-token head on 32 px images (4x4 patches of 8 px), eval mode."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=2, num_classes=5,
    ).eval()
