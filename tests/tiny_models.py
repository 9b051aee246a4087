"""Small models for fast tests, and the weight randomization that keeps them from the zero-init pitfalls
(timm and open_clip zero-init the last BatchNorm of a block, post-norm blocks their branch norms,
layer-scales start near 1e-6).

The randomizations are the tests' own: fixtures live in tests/, which does not import benchmark code
for them (the benchmarks have the same draws in benchmarks/random_weights.py and
benchmarks/breadth/weights.py, and never import tests)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize_batchnorm", "randomize_layer_scale", "randomize_norms", "randomize_scales", "tiny_clip", "tiny_vit"]

_SCALE_NAMES = {"gamma", "gamma_1", "gamma_2", "ls1", "ls2", "layer_scale", "scale", "alpha"}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine weights and running statistics, in place."""
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
    """Non-trivial affine weights for every non-BatchNorm norm layer (LayerNorm, GroupNorm, RMSNorm)."""
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
    """Layer-scales (``gamma``, ``ls1``, ``layer_scale``, MetaFormer ``scale``, ResMLP ``alpha``) from U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last in _SCALE_NAMES and p.ndim >= 1 and p.numel() == max(p.shape):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


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
