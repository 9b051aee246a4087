"""CLIP ResNets from open_clip (``ModifiedResNet``), and a zero-shot classifier around them.

The edited weight of each block is ``conv3``, whose keys come after the block's anti-aliasing
avgpool; the value is ``act3(bn3(conv3(k)) + downsample(x))`` with the avgpool-conv-BN downsample
(see :func:`surgery.adapters.resnet.residual_block_rule`). CLIP ViTs (open_clip ``VisionTransformer``)
edit ``attn.out_proj`` and ``mlp.c_proj`` of each ``ResidualAttentionBlock``, valued after their
residual adds (see :func:`surgery.adapters.vit.clip_vit_block_rule`). The adapter accepts the CLIP
model (layers under ``visual.``), its ``visual`` tower, or a :class:`ZeroShotClassifier`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError

from ._base import Adapter, class_from
from ._registry import register_adapter
from .resnet import residual_block_rule
from .vit import clip_vit_block_rule

__all__ = ["CLIPAdapter", "ZeroShotClassifier"]

logger = logging.getLogger(__name__)


def _is_clip_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("open_clip") and hasattr(model, "visual")


class ZeroShotClassifier(nn.Module):
    """An image -> logits classifier made of a CLIP image tower and text embeddings of class names.

    The text tower runs once, at construction: each class embedding is the normalized mean of the
    normalized embeddings of its prompts. Only ``visual`` (the image tower) is kept as a submodule,
    so its layers are named ``visual.layer4.1.conv3`` as in the CLIP model itself.

    Args:
        clip_model: an open_clip ``CLIP`` model.
        class_names: one name per class, in label order.
        templates: prompt templates, as format strings with ``{}`` or callables ``name -> prompt``;
            defaults to open_clip's 80 OpenAI ImageNet templates.
        tokenizer: callable ``list[str] -> LongTensor``; defaults to open_clip's CLIP BPE tokenizer
            with the model's context length.
        batch_size: prompts encoded per text-tower call.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        class_names: Sequence[str],
        *,
        templates: Sequence[str | Callable[[str], str]] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if not _is_clip_model(clip_model) or not hasattr(clip_model, "encode_text"):
            raise SurgeryError(
                f"ZeroShotClassifier needs an open_clip CLIP model (with .visual and .encode_text), "
                f"got {type(clip_model).__name__}"
            )
        if not class_names:
            raise SurgeryError("ZeroShotClassifier needs at least one class name")
        import open_clip  # only here: the text side needs open_clip's tokenizer and templates

        if templates is None:
            from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

            templates = OPENAI_IMAGENET_TEMPLATES
        if tokenizer is None:
            tokenizer = open_clip.tokenizer.SimpleTokenizer(
                context_length=getattr(clip_model, "context_length", 77)
            )
        self.visual = clip_model.visual
        self.class_names = list(class_names)
        self.templates = [t if callable(t) else t.format for t in templates]
        device = next(clip_model.parameters()).device
        embeddings = []
        with torch.no_grad():
            for name in self.class_names:
                prompts = [t(name) for t in self.templates]
                feats = torch.cat(
                    [
                        clip_model.encode_text(tokenizer(prompts[i : i + batch_size]).to(device))
                        for i in range(0, len(prompts), batch_size)
                    ]
                )
                mean = F.normalize(feats.float(), dim=-1).mean(dim=0)
                embeddings.append(F.normalize(mean, dim=0))
        self.register_buffer("class_embeddings", torch.stack(embeddings))
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().exp().float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``: scaled cosine similarity of image and class embeddings."""
        features = F.normalize(self.visual(images).float(), dim=-1)
        return self.logit_scale * features @ self.class_embeddings.T


@register_adapter
class CLIPAdapter(Adapter):
    """open_clip ``CLIP`` models, ``ModifiedResNet`` towers and :class:`ZeroShotClassifier`."""

    family = "clip"
    priority = 30
    rules = (residual_block_rule, clip_vit_block_rule)
    # CLIP ViTs as the other ViTs (the MLP output of the last block first); ResNet towers have no MLP
    # or attention branches, so their candidates run from the deepest block up, as the paper's
    preference = (("mlp", 1.0), ("mlp", 0.25), ("attn", 1.0))

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            isinstance(model, ZeroShotClassifier)
            or _is_clip_model(model)
            or class_from(model, "open_clip.modified_resnet", "ModifiedResNet")
            or class_from(model, "open_clip.transformer", "VisionTransformer")
        )

    def root(self, model: nn.Module) -> str:
        return "visual" if (isinstance(model, ZeroShotClassifier) or _is_clip_model(model)) else ""

    def skip(self, name: str, module: nn.Module) -> bool:
        # The attention pool computes its projections with F.multi_head_attention_forward on their
        # weights; hooks on those Linear modules never fire.
        return super().skip(name, module) or class_from(
            module, "open_clip.modified_resnet", "AttentionPool2d"
        )
