"""Small classifiers for the concept testbed (80 px scenes, 20 classes), recognized by the adapters.

The convolutional networks keep four 2x down-samplings so that their deepest layers run at 10x10
and 5x5 on an 80 px scene (the ViT runs on a 10x10 token grid throughout): there, most concept pixels
lie in cells free of the object (see the testbed README), which is what an edit of a concept (not of
the object) needs.

``testbed_vgg`` is a torchvision :class:`~torchvision.models.vgg.VGG` (VGG adapter: each conv of
``features`` is valued after BN -> ReLU [-> MaxPool]) with ``features`` from
:func:`torchvision.models.vgg.make_layers`, global average pooling and one linear layer. At
``width=w`` (the trained model: ``w=8``, channels 8..64)::

    features.0   w   ch at 80x80 -> pool 40       features.15  8w ch at 10x10
    features.4   2w  ch at 40x40 -> pool 20       features.18  8w ch at 10x10 -> pool 5
    features.8   4w  ch at 20x20                  features.22  8w ch at 5x5
    features.11  4w  ch at 20x20 -> pool 10       features.25  8w ch at 5x5

Edit candidates: ``features.22`` and ``features.25`` (the deepest, keys and values at 5x5), and the
higher-resolution ``features.15`` (10x10) and ``features.18`` (keys at 10x10; its value ends with
the max-pool, 5x5, like the paper's VGG16 layer 12).

``testbed_resnet`` is a timm :class:`~timm.models.resnet.ResNet` with BasicBlocks, one per stage,
channels ``(w, 2w, 4w, 8w)`` (the trained model: ``w=12``), a "deep" stem of three 3x3 convs
(stride 2, ending at ``w`` channels; timm's default stem has 64), no stem max-pool, so the
stages run at 40, 20, 10 and 5 px, and ResNet-D shortcuts (``avg_down``: 2x2 average pool, then the
1x1 conv), with ``bn2`` not zero-initialized. (The first version, with timm's default 1x1 stride-2
shortcuts and zero-initialized ``bn2``, learned only the context: 99.6% on scenes with both
preferred concepts, 0.5% with neither.) Edit candidates (ResNet adapter: ``conv2`` valued at the block output,
``ReLU(bn2(conv2(k)) + identity)``): ``layer4.0.conv2`` (5x5) and ``layer3.0.conv2`` (10x10).

``testbed_vit`` is a timm :class:`~timm.models.vision_transformer.VisionTransformer`: 8 px patches
(10x10 tokens plus a class token), learned position embeddings, the class-token head (what pretrained
ViT, DeiT and CLIP models use), pre-norm blocks without layer-scale, ``embed_dim=w`` (trained:
``w=96``), ``w // 32`` heads, 6 blocks. Edit candidates: ``mlp.fc2`` and ``attn.proj`` of the last
two blocks ("deep") and of block 2 ("high_res": every block sees the same grid, so this means early).

``testbed_convnext`` is a timm :class:`~timm.models.convnext.ConvNeXt` with a 2x2 patch stem,
channels ``(w, 2w, 4w, 8w)`` (trained: ``w=16``), depths ``(2, 2, 4, 2)``, timm's layer-scale
(``1e-6``) and head. timm down-samples again in stage 0 when the stem stride is 2 (stages at 20..2
px); ``stages.0.downsample`` is replaced by an identity, so the stages run at 40, 20, 10 and 5 px.
Edit candidates: ``mlp.fc2`` of the last two blocks of stage 3 (5x5) and of stage 2 (10x10).
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "ARCHS",
    "build_model",
    "candidate_layers",
    "testbed_convnext",
    "testbed_resnet",
    "testbed_vgg",
    "testbed_vit",
    "vgg_cfg",
]

ARCHS = ("vgg", "resnet", "vit", "convnext")

VIT_DEPTH = 6
VIT_PATCH = 8
CONVNEXT_DEPTHS = (2, 2, 4, 2)


def vgg_cfg(width: int = 16) -> list[int | str]:
    """The ``make_layers`` config: 8 convs, 4 max-pools (80 -> 5 px), channels ``width .. 8*width``."""
    w = width
    return [w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w, 8 * w, "M", 8 * w, 8 * w]


def testbed_vgg(
    num_classes: int = 20, width: int = 8, dropout: float = 0.0
) -> nn.Module:
    """A narrow VGG-BN (torchvision ``VGG``) with global average pooling and a linear head."""
    from torchvision.models.vgg import VGG, make_layers

    cfg = vgg_cfg(width)
    model = VGG(
        make_layers(cfg, batch_norm=True), num_classes=num_classes, init_weights=True
    )
    channels = int(cfg[-1])
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    # VGG.forward flattens after avgpool, so the head needs no Flatten.
    head: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    model.classifier = nn.Sequential(*head, nn.Linear(channels, num_classes))
    nn.init.normal_(model.classifier[-1].weight, 0, 0.01)
    nn.init.zeros_(model.classifier[-1].bias)
    return model


def testbed_resnet(num_classes: int = 20, width: int = 12) -> nn.Module:
    """A timm ``ResNet`` of BasicBlocks ``[1, 1, 1, 1]``, channels ``(w, 2w, 4w, 8w)``, no stem pool."""
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(
        block=BasicBlock,
        layers=(1, 1, 1, 1),
        num_classes=num_classes,
        stem_width=max(width // 2, 1),
        stem_type="deep",  # three 3x3 convs ending at `width` channels (the default stem has 64)
        channels=(width, 2 * width, 4 * width, 8 * width),
        avg_down=True,  # shortcuts average-pool before their 1x1 conv instead of dropping 3/4 of the pixels
        zero_init_last=False,
    )
    # No stem max-pool: the last two stages run at 10x10 and 5x5 on an 80 px scene.
    model.maxpool = nn.Identity()
    return model


def testbed_vit(
    num_classes: int = 20,
    width: int = 96,
    depth: int = VIT_DEPTH,
    patch_size: int = VIT_PATCH,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    """A small timm ``VisionTransformer`` on 80 px scenes: ``patch_size`` px patches, class-token head."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=80,
        patch_size=patch_size,
        num_classes=num_classes,
        global_pool="token",
        class_token=True,
        embed_dim=width,
        depth=depth,
        num_heads=max(width // 32, 1),
        mlp_ratio=mlp_ratio,
    )


def testbed_convnext(
    num_classes: int = 20,
    width: int = 16,
    depths: tuple[int, int, int, int] = CONVNEXT_DEPTHS,
    layer_scale: float | None = 1e-6,
) -> nn.Module:
    """A small timm ``ConvNeXt``, channels ``(w, 2w, 4w, 8w)``, stages at 40, 20, 10 and 5 px on 80 px."""
    from timm.models.convnext import ConvNeXt

    model = ConvNeXt(
        num_classes=num_classes,
        depths=depths,
        dims=(width, 2 * width, 4 * width, 8 * width),
        patch_size=2,
        ls_init_value=layer_scale,
    )
    # timm down-samples again in stage 0 when the stem stride is 2 (to reach stride 4); without it the
    # stages run at 40, 20, 10 and 5 px like the VGG's and ResNet's.
    model.stages[0].downsample = nn.Identity()
    return model


def build_model(
    arch: str, num_classes: int = 20, width: int | None = None
) -> nn.Module:
    """A testbed model by name (one of :data:`ARCHS`)."""
    if arch == "vgg":
        return testbed_vgg(num_classes, width or 8)
    if arch == "resnet":
        return testbed_resnet(num_classes, width or 12)
    if arch == "vit":
        return testbed_vit(num_classes, width or 96)
    if arch == "convnext":
        return testbed_convnext(num_classes, width or 16)
    raise ValueError(
        f"unknown testbed architecture {arch!r}; choose from {', '.join(ARCHS)}"
    )


def candidate_layers(arch: str) -> dict[str, list[str]]:
    """Natural edit candidates: ``{"deep": [...5x5 layers], "high_res": [...10x10 layers], "span": [...]}``.

    For the ViT (one 10x10 grid throughout), "deep" is the last two blocks and "high_res" an early
    one. The ConvNeXt's residual stream carries most of a concept's change past any one block of its last
    stage (benchmarks/results/efficacy_anatomy.md), so its "deep" candidates are the last two stages'
    transitions (``downsample.1``: skip-free, the whole representation passes through it) and last two
    ``fc2``: the selection on validation chooses among them. "span" lists span edits (``"A+B"``, see
    :func:`surgery.testbed.protocol.span_parts`) of a stage's last two blocks; "long_span" one span of four
    blocks (where MEMIT's share schedule and the first-and-last schedule differ). The last entry of "deep"
    is the one layer the fine-tuning baselines train. The efficacy benchmark measures which candidate works.
    """
    if arch == "vgg":
        return {
            "deep": ["features.22", "features.25"],
            "high_res": ["features.15", "features.18"],
            "span": [],
            "long_span": [],
        }
    if arch == "resnet":
        return {"deep": ["layer4.0.conv2"], "high_res": ["layer3.0.conv2"], "span": [], "long_span": []}
    if arch == "vit":
        last, early = (VIT_DEPTH - 2, VIT_DEPTH - 1), VIT_DEPTH // 2 - 1
        return {
            "deep": [f"blocks.{k}.{m}" for k in last for m in ("mlp.fc2", "attn.proj")],
            "high_res": [f"blocks.{early}.mlp.fc2", f"blocks.{early}.attn.proj"],
            "span": ["+".join(f"blocks.{k}.mlp.fc2" for k in last)],
            "long_span": ["+".join(f"blocks.{k}.mlp.fc2" for k in range(VIT_DEPTH - 4, VIT_DEPTH))],
        }
    if arch == "convnext":
        sites, spans = {}, []
        for stage in (2, 3):
            n = CONVNEXT_DEPTHS[stage]
            fc2 = [f"stages.{stage}.blocks.{k}.mlp.fc2" for k in range(max(n - 2, 0), n)]
            sites[stage] = [f"stages.{stage}.downsample.1", *fc2]
            spans.append("+".join(fc2))
        stage2 = "+".join(f"stages.2.blocks.{k}.mlp.fc2" for k in range(CONVNEXT_DEPTHS[2]))
        return {"deep": sites[2] + sites[3], "high_res": sites[2], "span": spans, "long_span": [stage2]}
    raise ValueError(
        f"unknown testbed architecture {arch!r}; choose from {', '.join(ARCHS)}"
    )
