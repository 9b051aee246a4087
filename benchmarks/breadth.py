"""Breadth: does an edit reach the prediction on today's architectures? (issue 17)

For each of ~40 architectures from torchvision, timm and open_clip (random weights, with norm scales
and layer-scales re-randomized and BatchNorm statistics recalibrated on the benchmark's images), a
synthetic concept -- one fixed texture pasted as a square into smooth images -- is rewritten away at
the adapter's recommended layers with the library's own ``collect_key_stats`` / ``rewrite`` /
``edited``. Reported per model: the adapter and the layer's block, ``block_forward``'s error against
the hooked value, and how far the edit moves

(a) the value and (b) the logits of the transformed exemplars toward the originals',
(c) the logits of held-out images carrying the same texture toward their originals' (generalization),
(d) the logits of clean images (the cost),

as ratios after/before (1 = no effect, 0 = the originals' exactly). ``--sweep`` measures many
candidate layers per model (attention and MLP outputs at several depths, and prefix-token weights)
and the two published layer-choice ideas: attention output vs MLP for ViTs, and ranking layers by an
attribution score before editing.

    python -m benchmarks.breadth            # every model, the recommended layers
    python -m benchmarks.breadth --quick    # 6 small models, 1 layer each
    python -m benchmarks.breadth --sweep    # candidate layers at several depths (slow)

Results: ``benchmarks/results/breadth.{md,json}`` (``breadth-sweep.*`` for ``--sweep``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
import torch.nn.functional as F
import torchvision
from surgery.adapters import GenericAdapter, ZeroShotClassifier, branch_of, get_adapter
from torch import nn

import surgery
from benchmarks.random_weights import randomize_batchnorm
from surgery import collect_key_stats, rewrite
from surgery.edits.apply import edited
from surgery.edits.edit import rank_one_delta
from surgery.rewrite import prepare_problem
from surgery.solvers import solve_fast

__all__ = [
    "MODELS",
    "ModelSpec",
    "randomize_norms",
    "randomize_scales",
    "randomize_zero_weights",
    "recalibrate_batchnorm",
    "prepare_model",
    "smooth_images",
    "concept_texture",
    "paste_concept",
    "measure_layer",
    "run",
    "main",
]

RESULTS = Path(__file__).parent / "results"
_SCALE_NAMES = {"gamma", "gamma_1", "gamma_2", "ls1", "ls2", "layer_scale", "scale", "alpha"}


# --------------------------------------------------------------------------- random weights


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


def prepare_model(model: nn.Module, calibration: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random weights that exercise every block: BN (affine and statistics), norms, layer-scales."""

    randomize_batchnorm(model, seed)
    randomize_norms(model, seed)
    randomize_scales(model, seed)
    randomize_zero_weights(model, seed)
    return recalibrate_batchnorm(model, calibration)


# --------------------------------------------------------------------------- the concept


def smooth_images(n: int, size: int | tuple[int, int], seed: int) -> torch.Tensor:
    """``n`` smooth random images ``(n, 3, H, W)``, about zero mean and unit variance (normalized
    pixel space): low-frequency noise upsampled from 4x4 and 8x8 grids."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    x = coarse + 0.5 * fine
    return (x - x.mean()) / x.std()


def concept_texture(size: int, seed: int = 1234, *, period: int = 2) -> torch.Tensor:
    """The concept: one fixed texture ``(3, size, size)``, a ``period x period`` tile of random colors
    repeated over the image (high-contrast, zero mean).

    With ``period`` 2 the tile's phase is the same in every patch of every even patch size (4, 14, 16,
    32): each patch the pasted square covers looks the same to a patch embedding. A random-weight ViT
    has no phase-invariant texture features (trained ones learn them), so a texture whose phase changes
    from patch to patch is a different input to every token; ``period=0`` gives such a texture
    (stripes of 5 px and checks of 7 px), for comparison (``--aperiodic``).
    """
    g = torch.Generator().manual_seed(seed)
    if period:
        tile = torch.randn(3, period, period, generator=g)
        tile = tile - tile.mean(dim=(1, 2), keepdim=True)
        reps = -(-size // period)
        tex = tile.repeat(1, reps, reps)[:, :size, :size]
    else:
        yy, xx = torch.meshgrid(
            torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
        )
        stripes = torch.sin(2 * math.pi * (xx + 0.6 * yy) / 5.0)
        checks = torch.sign(torch.sin(2 * math.pi * xx / 7.0) * torch.sin(2 * math.pi * yy / 7.0))
        colors = torch.randn(3, 2, generator=g)
        tex = colors[:, :1, None] * stripes + colors[:, 1:, None] * checks
    return 1.5 * tex / tex.std()


def paste_concept(
    images: torch.Tensor, seed: int, *, side: float = 1 / 3, period: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images with the concept texture pasted as a square of ``side`` of the image at a random
    place each (the texture stays aligned to the image, so it is the same texture everywhere); returns
    ``(transformed, masks)``, masks ``(N, 1, H, W)`` in {0, 1}."""
    n, _, h, w = images.shape
    s = max(4, int(round(side * min(h, w))))
    tex = concept_texture(max(h, w), period=period)
    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    masks = torch.zeros(n, 1, h, w)
    for i in range(n):
        top = int(torch.randint(0, h - s + 1, (1,), generator=g))
        left = int(torch.randint(0, w - s + 1, (1,), generator=g))
        out[i, :, top : top + s, left : left + s] = tex[:, top : top + s, left : left + s]
        masks[i, :, top : top + s, left : left + s] = 1
    return out, masks


# --------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark architecture: ``build()`` returns an image classifier (random weights)."""

    id: str
    source: str  # torchvision / timm / open_clip
    family: str  # the adapter family this row exercises
    build: Callable[[], nn.Module]
    size: int = 96
    small: bool = False  # cheap enough for --quick


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:

        return getattr(torchvision.models, name)(weights=None, **kw)

    return build


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:

        return timm.create_model(name, pretrained=False, **kw)

    return build


def _clip(name: str, size: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:


        clip = open_clip.create_model(name, pretrained=None, force_image_size=size)
        randomize_norms(randomize_scales(clip))
        classes = [f"class {i}" for i in range(16)]
        return ZeroShotClassifier(clip, classes, templates=["a photo of a {}."])

    return build


MODELS: tuple[ModelSpec, ...] = (
    # the paper's families, as the reference rows
    ModelSpec("tv_resnet50", "torchvision", "resnet", _tv("resnet50")),
    ModelSpec("timm_vgg11_bn", "timm", "vgg", _timm("vgg11_bn"), small=True),
    # torchvision
    ModelSpec("tv_convnext_tiny", "torchvision", "convnext", _tv("convnext_tiny")),
    ModelSpec("tv_vit_b_16", "torchvision", "vit", _tv("vit_b_16", image_size=96)),
    ModelSpec("tv_swin_t", "torchvision", "swin", _tv("swin_t")),
    ModelSpec("tv_swin_v2_t", "torchvision", "swin", _tv("swin_v2_t")),
    ModelSpec("tv_efficientnet_b0", "torchvision", "efficientnet", _tv("efficientnet_b0")),
    ModelSpec("tv_efficientnet_v2_s", "torchvision", "efficientnet", _tv("efficientnet_v2_s")),
    ModelSpec("tv_mobilenet_v2", "torchvision", "efficientnet", _tv("mobilenet_v2"), small=True),
    ModelSpec("tv_mobilenet_v3_small", "torchvision", "efficientnet", _tv("mobilenet_v3_small"), small=True),
    ModelSpec("tv_regnet_y_400mf", "torchvision", "regnet", _tv("regnet_y_400mf")),
    # timm
    ModelSpec("timm_resnet50", "timm", "resnet", _timm("resnet50")),
    ModelSpec("timm_seresnext26d_32x4d", "timm", "resnet", _timm("seresnext26d_32x4d")),
    ModelSpec("vit_tiny_patch16_224", "timm", "vit", _timm("vit_tiny_patch16_224", img_size=96), small=True),
    ModelSpec(
        "vit_tiny_reg4_gap", "timm", "vit",
        _timm("vit_tiny_patch16_224", img_size=96, reg_tokens=4, class_token=False, global_pool="avg"),
    ),
    ModelSpec("deit_tiny_distilled_patch16_224", "timm", "vit", _timm("deit_tiny_distilled_patch16_224", img_size=96)),
    ModelSpec("eva02_tiny_patch14_224", "timm", "vit", _timm("eva02_tiny_patch14_224", img_size=98), size=98),
    ModelSpec("cait_xxs24_224", "timm", "vit", _timm("cait_xxs24_224", img_size=96)),
    ModelSpec("beit_base_patch16_224", "timm", "vit", _timm("beit_base_patch16_224", img_size=96)),
    ModelSpec("swin_tiny_patch4_window7_224", "timm", "swin", _timm("swin_tiny_patch4_window7_224", img_size=96, window_size=6)),
    ModelSpec("swinv2_tiny_window8_256", "timm", "swin", _timm("swinv2_tiny_window8_256", img_size=96, window_size=6)),
    ModelSpec("maxvit_tiny_tf_224", "timm", "maxxvit", _timm("maxvit_tiny_tf_224", img_size=96)),
    ModelSpec("coatnet_0_rw_224", "timm", "maxxvit", _timm("coatnet_0_rw_224", img_size=96)),
    ModelSpec("mixer_s16_224", "timm", "mixer", _timm("mixer_s16_224", img_size=96)),
    ModelSpec("resmlp_12_224", "timm", "mixer", _timm("resmlp_12_224", img_size=96), small=True),
    ModelSpec("gmlp_s16_224", "timm", "mixer", _timm("gmlp_s16_224", img_size=96)),
    ModelSpec("poolformer_s12", "timm", "metaformer", _timm("poolformer_s12")),
    ModelSpec("convformer_s18", "timm", "metaformer", _timm("convformer_s18")),
    ModelSpec("caformer_s18", "timm", "metaformer", _timm("caformer_s18")),
    ModelSpec("convnext_atto", "timm", "convnext", _timm("convnext_atto"), small=True),
    ModelSpec("convnextv2_atto", "timm", "convnext", _timm("convnextv2_atto")),
    ModelSpec("efficientnet_b0", "timm", "efficientnet", _timm("efficientnet_b0")),
    ModelSpec("mobilenetv3_small_100", "timm", "efficientnet", _timm("mobilenetv3_small_100")),
    ModelSpec("regnety_002", "timm", "regnet", _timm("regnety_002")),
    ModelSpec("regnetx_002", "timm", "regnet", _timm("regnetx_002")),
    ModelSpec("resnetv2_50", "timm", "resnetv2", _timm("resnetv2_50")),
    ModelSpec("resnetv2_50x1_bit", "timm", "resnetv2", _timm("resnetv2_50x1_bit")),
    # open_clip (zero-shot classifiers over 16 class names; random towers)
    ModelSpec("clip_ViT-B-32", "open_clip", "clip", _clip("ViT-B-32", 96)),
    ModelSpec("clip_RN50", "open_clip", "clip", _clip("RN50", 96)),
)
QUICK = (
    "timm_vgg11_bn",
    "vit_tiny_patch16_224",
    "convnext_atto",
    "resmlp_12_224",
    "tv_mobilenet_v3_small",
    "tv_mobilenet_v2",
)


# --------------------------------------------------------------------------- measuring one layer


@dataclass
class Data:
    """The benchmark's images for one model size."""

    calibration: torch.Tensor  # BN recalibration and key statistics (clean)
    x: torch.Tensor  # exemplar originals
    x2: torch.Tensor  # exemplars with the concept
    masks: torch.Tensor
    h: torch.Tensor  # held-out originals
    h2: torch.Tensor  # held-out with the concept (other places)
    h_masks: torch.Tensor
    clean: torch.Tensor  # clean images for the cost


def make_data(
    size: int, *, exemplars: int = 4, held_out: int = 12, clean: int = 12, calibration: int = 48, period: int = 2
) -> Data:
    x = smooth_images(exemplars, size, seed=1)
    x2, masks = paste_concept(x, seed=2, period=period)
    h = smooth_images(held_out, size, seed=3)
    h2, h_masks = paste_concept(h, seed=4, period=period)
    return Data(
        calibration=smooth_images(calibration, size, seed=5),
        x=x, x2=x2, masks=masks, h=h, h2=h2, h_masks=h_masks,
        clean=smooth_images(clean, size, seed=6),
    )


def _logits(model: nn.Module, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch]).float() for i in range(0, len(images), batch)])


def _dist(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the L2 distance between rows (logits) or flattened maps (values)."""
    return float((a.flatten(1) - b.flatten(1)).norm(dim=1).mean())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inject(model: nn.Module, site, value: torch.Tensor):
    """A hook that replaces the tensor at ``site`` (an input or output site) by ``value``."""
    module = model.get_submodule(site.module) if site.module else model
    if site.port == "output":
        return module.register_forward_hook(lambda m, a, out: value)
    return module.register_forward_pre_hook(lambda m, a: (value, *a[1:]))


def attribution_scores(model: nn.Module, layer, data: Data, base: dict[str, torch.Tensor]) -> dict[str, float]:
    """Two layer-choice scores computed before editing (the "attribution-guided" idea).

    ``grad_x_act``: the first-order fraction of the exemplars' squared logit distance removed by moving
    the transformed exemplars' value to the originals' (gradient of the distance at the value site
    times the value difference, the activation patch).
    ``masked_patch``: the exact fraction removed by replacing the value only at the concept's positions
    (the mask pooled to value resolution) with the originals' value.
    """

    io_t = layer.capture(model, data.x2)
    io_o = layer.capture(model, data.x)
    target = base["x"]
    d0 = float((base["x2"] - target).square().sum())
    v = io_t.values.clone().requires_grad_(True)
    handle = _inject(model, layer.value_site, v)
    try:
        loss = (model(data.x2).float() - target).square().sum()
        (grad,) = torch.autograd.grad(loss, v)
    finally:
        handle.remove()
    delta = io_o.values - io_t.values
    gxa = float(-(grad * delta).sum()) / max(d0, 1e-30)
    lay = layer.value_layout.resolve(io_t.values)
    masked = float("nan")
    if lay.spatial:
        try:
            pooled, prefix = lay.pool_mask(data.masks, io_t.values)
            m = (pooled > 0.5).to(io_t.values.dtype)
            patched = io_t.values + m * delta
            handle = _inject(model, layer.value_site, patched)
            try:
                with torch.no_grad():
                    d1 = float((model(data.x2).float() - target).square().sum())
            finally:
                handle.remove()
            masked = 1 - d1 / max(d0, 1e-30)
        except Exception:  # noqa: BLE001 - a layout the mask does not map onto
            pass
    return {"grad_x_act": gxa, "masked_patch": masked}


def measure_layer(
    model: nn.Module,
    layer,
    data: Data,
    base: dict[str, torch.Tensor],
    *,
    stats=None,
    prefix_weight: float | str = "auto",
    scores: bool = False,
) -> dict[str, Any]:
    """Edit ``layer`` with the library's default rewrite and measure (a)-(d).

    ``stats`` (the layer's ``KeyStats``) are collected from the calibration images when not given.
    """

    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "layer": layer.name,
        "block": layer.block,
        "channelwise": layer.channelwise,
        "module_type": type(layer.module).__name__,
    }
    io_t = layer.capture(model, data.x2)
    with torch.no_grad():
        row["block_forward_rel_err"] = _rel_err(layer.block_forward(io_t.keys, layer.weight, io_t.context), io_t.values)
    v_orig = layer.capture(model, data.x).values
    if scores:
        row.update(attribution_scores(model, layer, data, base))
    if stats is None:
        stats = collect_key_stats(model, layer, data.calibration, batch_size=16, progress=False)
    edit = rewrite(model, layer, data.x, data.x2, data.masks, stats=stats, prefix_weight=prefix_weight)
    row["solver"] = edit.info.get("solver", "fast")
    row["prefix_weight"] = float(edit.hparams.get("prefix_weight", 1.0))
    row["prefix_weight_setting"] = prefix_weight
    row["value_objective_ratio"] = edit.info["objective"] / max(edit.info["objective_before"], 1e-30)
    with edited(model, edit):
        v_after = layer.capture(model, data.x2).values
        after = {k: _logits(model, getattr(data, k)) for k in ("x2", "h2", "clean")}
    row["value_before"] = _dist(io_t.values, v_orig)
    row["value_ratio"] = _dist(v_after, v_orig) / max(row["value_before"], 1e-30)
    row["exemplar_before"] = _dist(base["x2"], base["x"])
    row["exemplar_ratio"] = _dist(after["x2"], base["x"]) / max(row["exemplar_before"], 1e-30)
    row["heldout_before"] = _dist(base["h2"], base["h"])
    row["heldout_ratio"] = _dist(after["h2"], base["h"]) / max(row["heldout_before"], 1e-30)
    # per held-out image: does the edit move each one toward its original?
    per = (after["h2"] - base["h"]).norm(dim=1) / (base["h2"] - base["h"]).norm(dim=1).clamp_min(1e-30)
    row["heldout_improved_frac"] = float((per < 1).float().mean())
    row["clean_change"] = _dist(after["clean"], base["clean"]) / max(row["heldout_before"], 1e-30)
    row["seconds"] = time.perf_counter() - t0
    return row


# --------------------------------------------------------------------------- which layers


def _depth_positions(n: int, fractions: Sequence[float]) -> list[int]:
    return sorted({min(n - 1, max(0, round(f * (n - 1)))) for f in fractions})


def sweep_layers(model: nn.Module) -> list:
    """Candidate layers at several depths: for two-branch blocks both branch ends at each depth."""

    adapter = get_adapter(model)
    blocks = [l for l in adapter.layers(model) if l.post is not None and l.context_sites]
    if not blocks:
        blocks = [l for l in adapter.layers(model) if l.post is not None]
    groups: dict[str, list] = {}
    for l in blocks:
        groups.setdefault(_branch(l), []).append(l)
    chosen = []
    for branch, ls in groups.items():
        for i in _depth_positions(len(ls), (0.25, 0.5, 0.75, 1.0)):
            chosen.append(ls[i])
    order = {l.name: i for i, l in enumerate(adapter.layers(model))}
    return sorted(chosen, key=lambda l: order[l.name])


def _branch(layer) -> str:
    """``"attn"`` for attention/token-mixer outputs, ``"mlp"`` for MLP outputs, ``"conv"`` otherwise."""

    return branch_of(layer)


# --------------------------------------------------------------------------- the run


def run_model(
    spec: ModelSpec, *, mode: str, k: int, period: int = 2, images: dict[str, int] | None = None
) -> dict[str, Any]:

    torch.manual_seed(0)
    t0 = time.perf_counter()
    data = make_data(spec.size, period=period, **(images or {}))
    model = prepare_model(spec.build().eval(), data.calibration)
    adapter = get_adapter(model)
    layers_all = adapter.layers(model)
    out: dict[str, Any] = {
        "model": spec.id,
        "source": spec.source,
        "family": spec.family,
        "adapter": type(adapter).__name__,
        "generic_fallback": isinstance(adapter, GenericAdapter),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "size": spec.size,
        "editable_layers": len(layers_all),
        "block_valued_layers": sum(1 for l in layers_all if l.post is not None),
    }
    base = {k_: _logits(model, getattr(data, k_)) for k_ in ("x", "x2", "h", "h2", "clean")}
    if mode == "sweep":
        layers = sweep_layers(model)
    else:
        layers = surgery.recommended_layers(model, k=k)
    out["rows"] = []
    for layer in layers:
        try:
            stats = surgery.collect_key_stats(model, layer, data.calibration, batch_size=16, progress=False)
            has_prefix = layer.value_layout.kind == "tokens" and (layer.value_layout.prefix or 0) > 0
            # the sweep compares prefix weight 1 with the default ("auto") where there are prefix tokens
            settings = [1.0, "auto"] if (mode == "sweep" and has_prefix) else ["auto"]
            for i, pw in enumerate(settings):
                row = measure_layer(model, layer, data, base, stats=stats, prefix_weight=pw, scores=(mode == "sweep" and i == 0))
                row["branch"] = _branch(layer)
                row["depth"] = _relative_depth(layers_all, layer)
                out["rows"].append(row)
                _progress(spec.id, row)
        except Exception as e:  # noqa: BLE001 - report, keep going
            out["rows"].append({"layer": layer.name, "error": f"{type(e).__name__}: {e}"})
            _progress(spec.id, out["rows"][-1])
    out["seconds"] = time.perf_counter() - t0
    return out


def _relative_depth(layers: list, layer) -> float:
    names = [l.name for l in layers]
    return round(names.index(layer.name) / max(len(names) - 1, 1), 3)


def _progress(model_id: str, row: dict) -> None:
    if "error" in row:
        print(f"  {model_id} {row['layer']}: {row['error']}", file=sys.stderr, flush=True)
        return
    print(
        f"  {model_id:34s} {row['layer']:45s} pw={row['prefix_weight']:<5g} value {row['value_ratio']:.3f} "
        f"exemplars {row['exemplar_ratio']:.3f} held-out {row['heldout_ratio']:.3f} clean {row['clean_change']:.3f} "
        f"({row['seconds']:.0f}s)",
        file=sys.stderr,
        flush=True,
    )


def run(
    model_ids: Sequence[str] | None = None,
    *,
    mode: str = "recommended",
    k: int = 3,
    quick: bool = False,
    period: int = 2,
    images: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run the benchmark on ``model_ids`` (default: all, or the quick set) and return the results.

    ``images`` overrides how many images ``make_data`` draws (``exemplars``, ``held_out``, ``clean``,
    ``calibration``), for tests.
    """
    specs = {s.id: s for s in MODELS}
    ids = list(model_ids) if model_ids else list(QUICK if quick else specs)
    unknown = [i for i in ids if i not in specs]
    if unknown:
        raise SystemExit(f"unknown model ids {unknown}; known: {', '.join(specs)}")
    if quick:
        k = 1
    results = []
    for i in ids:
        print(f"[{len(results) + 1}/{len(ids)}] {i}", file=sys.stderr, flush=True)
        try:
            results.append(run_model(specs[i], mode=mode, k=k, period=period, images=images))
        except Exception as e:  # noqa: BLE001
            results.append({"model": i, "error": f"{type(e).__name__}: {e}"})
            print(f"  {i}: {results[-1]['error']}", file=sys.stderr, flush=True)
    return {
        "mode": mode,
        "k": k,
        "quick": quick,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "texture_period": period,
        "images": {**_IMAGES, **(images or {})},
        "models": results,
    }


# --------------------------------------------------------------------------- after the add vs the branch alone


BRANCH_CASES = (
    ("vit_tiny_patch16_224", "blocks.11.mlp.fc2"),
    ("vit_tiny_patch16_224", "blocks.11.attn.proj"),
    ("vit_tiny_reg4_gap", "blocks.3.mlp.fc2"),
    ("convnext_atto", "stages.1.blocks.1.mlp.fc2"),
    ("tv_convnext_tiny", "features.3.1.block.5"),
    ("swin_tiny_patch4_window7_224", "layers.1.blocks.1.mlp.fc2"),
    ("efficientnet_b0", "blocks.5.3.conv_pwl"),
    ("mixer_s16_224", "blocks.7.mlp_channels.fc2"),
)


def branch_only_row(model: nn.Module, layer, data: Data, base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The same edit solved against the branch's value before the add (the old adapters' value).

    The branch value is the block computed with a zero skip; keys, direction and solver are the
    library's; the solved factors are applied to the weight and the logits measured as for the
    default (after-the-add) edit.
    """

    stats = collect_key_stats(model, layer, data.calibration, batch_size=16, progress=False)
    problem = prepare_problem(model, layer, data.x, data.x2, data.masks, stats=stats)
    io_o = layer.capture(model, data.x)
    zero = {k: torch.zeros_like(v) for k, v in problem.context.items()}
    with torch.no_grad():
        problem.values = layer.block_forward(io_o.keys, layer.weight, {k: torch.zeros_like(v) for k, v in io_o.context.items()})
    problem.context = zero
    lam, info = solve_fast(problem)
    w = layer.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(rank_one_delta(lam.to(w.dtype), problem.u.to(w.dtype)))
        after = {k: _logits(model, getattr(data, k)) for k in ("x2", "h2", "clean")}
    finally:
        with torch.no_grad():
            w.copy_(saved)
    return {
        "exemplar_ratio": _dist(after["x2"], base["x"]) / max(_dist(base["x2"], base["x"]), 1e-30),
        "heldout_ratio": _dist(after["h2"], base["h"]) / max(_dist(base["h2"], base["h"]), 1e-30),
        "clean_change": _dist(after["clean"], base["clean"]) / max(_dist(base["h2"], base["h"]), 1e-30),
        "branch_objective_ratio": info["objective"] / max(info["objective_before"], 1e-30),
    }


def run_branch_comparison(cases: Sequence[tuple[str, str]] = BRANCH_CASES) -> dict[str, Any]:
    """After-the-add values (the default) vs branch-only values, on the same layers."""
    specs = {s.id: s for s in MODELS}
    rows = []
    built: dict[str, tuple] = {}
    for model_id, layer_name in cases:

        if model_id not in built:
            spec = specs[model_id]
            data = make_data(spec.size)
            torch.manual_seed(0)
            model = prepare_model(spec.build().eval(), data.calibration)
            base = {k: _logits(model, getattr(data, k)) for k in ("x", "x2", "h", "h2", "clean")}
            built = {model_id: (model, data, base)}
        model, data, base = built[model_id]
        layer = surgery.get_layer(model, layer_name)
        after_add = measure_layer(model, layer, data, base)
        branch = branch_only_row(model, layer, data, base)
        rows.append({"model": model_id, "layer": layer_name, "after_add": after_add, "branch_only": branch})
        print(
            f"  {model_id} {layer_name}: held-out after the add {after_add['heldout_ratio']:.3f}, "
            f"branch only {branch['heldout_ratio']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return {"cases": rows}


def branch_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Values after the residual add vs the branch alone",
        "",
        f"Command: `{res.get('command', 'python -m benchmarks.breadth --branch-only')}`. Same models, images and "
        "`rewrite` settings as `breadth.md`; the branch-only edit is solved against the block computed with a zero "
        "skip (the value the adapters read before issue 17), then measured the same way.",
        "",
        "| model | layer | exemplars: after the add / branch only | held-out: after the add / branch only | clean: after the add / branch only |",
        "|---|---|---|---|---|",
    ]
    for r in res["cases"]:
        a, b = r["after_add"], r["branch_only"]
        lines.append(
            f"| {r['model']} | `{r['layer']}` | {_fmt(a['exemplar_ratio'])} / {_fmt(b['exemplar_ratio'])} | "
            f"{_fmt(a['heldout_ratio'])} / {_fmt(b['heldout_ratio'])} | {_fmt(a['clean_change'])} / {_fmt(b['clean_change'])} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the report


def _fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{nd}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{nd}f}"
    return str(v)


def _ok_rows(m: dict) -> list[dict]:
    return [r for r in m.get("rows", []) if "error" not in r]


def summarize_sweep(res: dict[str, Any]) -> dict[str, Any]:
    """What the sweep says: best branch/depth per family, attention vs MLP, the scores' rankings."""
    fam: dict[str, list] = {}
    attn_vs_mlp = []
    ranking = {"grad_x_act": [], "masked_patch": [], "value_objective_ratio": [], "exemplar_ratio": []}
    prefix = []
    for m in res["models"]:
        rows = [r for r in _ok_rows(m) if r.get("prefix_weight_setting", "auto") == "auto"]
        if not rows:
            continue
        fam.setdefault(m["family"], []).append((m["model"], rows))
        by = {}
        for r in rows:
            by.setdefault(r["branch"], []).append(r)
        if "attn" in by and "mlp" in by and m["family"] in ("vit", "swin", "clip", "maxxvit"):
            a = min(by["attn"], key=lambda r: r["exemplar_ratio"])
            b = min(by["mlp"], key=lambda r: r["exemplar_ratio"])
            attn_vs_mlp.append(
                {
                    "model": m["model"],
                    "attn_best": a["layer"], "attn_exemplar": a["exemplar_ratio"], "attn_heldout": a["heldout_ratio"],
                    "mlp_best": b["layer"], "mlp_exemplar": b["exemplar_ratio"], "mlp_heldout": b["heldout_ratio"],
                    "attn_mean_heldout": sum(r["heldout_ratio"] for r in by["attn"]) / len(by["attn"]),
                    "mlp_mean_heldout": sum(r["heldout_ratio"] for r in by["mlp"]) / len(by["mlp"]),
                }
            )
        if len(rows) >= 3:
            truth = [r["heldout_ratio"] for r in rows]  # lower is better
            best = min(range(len(rows)), key=lambda i: truth[i])
            for key in ranking:
                score = [r.get(key, float("nan")) for r in rows]
                if any(isinstance(v, float) and math.isnan(v) for v in score):
                    continue
                # higher attribution = better; the ratios: lower = better
                sign = 1 if key in ("value_objective_ratio", "exemplar_ratio") else -1
                pick = min(range(len(rows)), key=lambda i: sign * score[i])
                ranking[key].append(
                    {"model": m["model"], "spearman": _spearman([sign * v for v in score], truth),
                     "top1_hit": pick == best, "regret": truth[pick] - truth[best]}
                )
        for r in _ok_rows(m):
            if r.get("prefix_weight_setting") == 1.0:
                same = next((q for q in rows if q["layer"] == r["layer"]), None)
                if same and same["prefix_weight"] != 1.0:  # "auto" chose another weight: compare
                    prefix.append({"model": m["model"], "layer": r["layer"], "prefix_weight": same["prefix_weight"],
                                   "exemplar_pw1": r["exemplar_ratio"], "exemplar_pw": same["exemplar_ratio"],
                                   "heldout_pw1": r["heldout_ratio"], "heldout_pw": same["heldout_ratio"],
                                   "clean_pw1": r["clean_change"], "clean_pw": same["clean_change"]})
    best = {}
    for f, items in fam.items():
        picks = []
        for model_id, rows in items:
            r = min(rows, key=lambda r: r["heldout_ratio"])
            picks.append({"model": model_id, "layer": r["layer"], "branch": r["branch"], "depth": r["depth"],
                          "heldout_ratio": r["heldout_ratio"], "exemplar_ratio": r["exemplar_ratio"]})
        best[f] = picks
    return {"best_per_family": best, "attn_vs_mlp": attn_vs_mlp, "ranking": ranking, "prefix_weight": prefix}


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")


def diagnose(row: dict[str, Any]) -> str:
    """Why an edit barely moved the held-out logits (held-out ratio above 0.9), from the measurements."""
    if "error" in row or row["heldout_ratio"] <= 0.9:
        return ""
    reasons = []
    if row["value_ratio"] > 0.8:
        reasons.append(
            f"the rank-one edit removes only {100 * (1 - row['value_ratio']):.0f}% of the value difference at this layer"
        )
    elif row["exemplar_ratio"] > 0.9:
        reasons.append(
            f"the value moves ({100 * (1 - row['value_ratio']):.0f}% closer) but the logits do not follow"
        )
    else:
        reasons.append(f"fits the exemplars (logits {row['exemplar_ratio']:.2f}) but does not generalize")
    if row["clean_change"] > 1.5 * max(1e-9, 1 - row["heldout_ratio"]) and row["clean_change"] > 0.1:
        reasons.append(f"and moves clean images as much ({row['clean_change']:.2f})")
    if "StdConv" in row.get("module_type", "") or row.get("weight_standardized"):
        reasons.append("(weight standardization: the stored rank-one update is re-standardized per output channel)")
    return "; ".join(reasons)


_IMAGES = {"exemplars": 4, "held_out": 12, "clean": 12, "calibration": 48}


def _acceptance(res: dict[str, Any]) -> list[str]:
    """Per model: does the edit at the first recommended layer reduce the exemplars' and the held-out
    images' logit distance; which models barely move (held-out ratio above 0.9), and why."""
    ok_ex = ok_ho = total = 0
    weak = []
    best = []
    for m in res["models"]:
        rows = _ok_rows(m)
        if not rows:
            continue
        total += 1
        first = rows[0]
        ok_ex += first["exemplar_ratio"] < 1
        ok_ho += first["heldout_ratio"] < 1
        b = min(rows, key=lambda r: r["heldout_ratio"])
        best.append(b["heldout_ratio"])
        if first["heldout_ratio"] > 0.9:
            weak.append((m["model"], first, b))
    lines = [
        "",
        "## Summary",
        "",
        f"At the first recommended layer the edit reduces the exemplars' logit distance in {ok_ex}/{total} models "
        f"and the held-out images' in {ok_ho}/{total}; median held-out ratio "
        f"{_fmt(sorted(r['heldout_ratio'] for m in res['models'] for r in _ok_rows(m)[:1])[len(best) // 2] if best else float('nan'))}"
        f" (best of the {res.get('k', 3)} recommended layers: median {_fmt(sorted(best)[len(best) // 2] if best else float('nan'))}).",
        "",
    ]
    if weak:
        lines += ["Models where the edit at the first recommended layer barely moves the held-out logits (ratio > 0.9):", ""]
        for model_id, first, b in weak:
            alt = f"; best recommended layer `{b['layer']}` {_fmt(b['heldout_ratio'])}" if b is not first else ""
            lines.append(f"- {model_id} (`{first['layer']}`, held-out {_fmt(first['heldout_ratio'])}): {diagnose(first)}{alt}")
    return lines


def _n(res: dict[str, Any], key: str) -> int:
    return (res.get("images") or {}).get(key, _IMAGES[key])


def markdown(res: dict[str, Any]) -> str:
    """The results as Markdown: the command, one row per model and layer, and (sweep) the analyses."""
    lines = [
        f"# Breadth: edits on {len(res['models'])} architectures ({res['mode']})",
        "",
        f"Command: `{res.get('command', 'python -m benchmarks.breadth')}`  ",
        f"torch {res['torch']}, {res['threads']} thread(s), {res['platform']}. Random weights (norms, layer-scales "
        "re-randomized, BatchNorm recalibrated on smooth images); the concept is one fixed texture "
        + ("(a 2x2 tile of random colors, the same in every even-sized patch)" if res.get("texture_period", 2) else "(5 px stripes and 7 px checks: its phase changes from patch to patch)")
        + " pasted as a square (1/3 of the side) into smooth images; "
        f"{_n(res, 'exemplars')} exemplars, {_n(res, 'held_out')} held-out images with the texture elsewhere, "
        f"{_n(res, 'clean')} clean images, key statistics from {_n(res, 'calibration')} clean images. Default "
        "`rewrite` (fast solver, L1, no loss mask; the mask weighs the direction; `prefix_weight=\"auto\"`).",
        "",
        "Ratios are after/before: **value** = distance of the transformed exemplars' value to the originals'; "
        "**exemplars** / **held-out** = mean logit distance of transformed images to their originals (1 = no effect, "
        "0 = the originals' logits); **improved** = fraction of held-out images moved closer; **clean** = mean logit "
        "change on clean images divided by the held-out distance before the edit. **bf err** = `block_forward` "
        "relative error against the hooked value.",
        "",
        "| model | source | adapter | layer | block | bf err | value | exemplars (before) | held-out (before) | improved | clean | solver | why it barely moves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in res["models"]:
        if "error" in m:
            lines.append(f"| {m['model']} | | | error: {m['error']} | | | | | | | | | |")
            continue
        auto_one = {r["layer"] for r in _ok_rows(m) if r.get("prefix_weight_setting", "auto") == "auto" and r["prefix_weight"] == 1.0}
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"| {m['model']} | {m['source']} | {m['adapter']} | {r['layer']} | error: {r['error']} | | | | | | | | |")
                continue
            if r.get("prefix_weight_setting") == 1.0 and r["layer"] in auto_one:
                continue  # "auto" resolved to 1 as well: the same edit
            pw = f" (prefix weight {r['prefix_weight']:g})" if r.get("prefix_weight", 1.0) != 1.0 or r.get("prefix_weight_setting") == 1.0 else ""
            lines.append(
                f"| {m['model']} | {m['source']} | {m['adapter']} | `{r['layer']}`{pw} | {r['block']} | "
                f"{r['block_forward_rel_err']:.1e} | {_fmt(r['value_ratio'])} | "
                f"{_fmt(r['exemplar_ratio'])} ({_fmt(r['exemplar_before'])}) | {_fmt(r['heldout_ratio'])} "
                f"({_fmt(r['heldout_before'])}) | {_fmt(r['heldout_improved_frac'], 2)} | {_fmt(r['clean_change'])} | "
                f"{r['solver']} |"
            )
    if res["mode"] == "recommended":
        lines += _acceptance(res)
    if res["mode"] == "sweep":
        s = summarize_sweep(res)
        lines += ["", "## Best layer per model (lowest held-out ratio)", "", "Depth: position among all the model's editable layers (0 first, 1 last). The sweep edits each branch end at a quarter, half, three quarters and all of the depth.", "", "| family | model | layer | branch | depth | held-out | exemplars |", "|---|---|---|---|---|---|---|"]
        for f, picks in s["best_per_family"].items():
            for p in picks:
                lines.append(f"| {f} | {p['model']} | `{p['layer']}` | {p['branch']} | {p['depth']} | {_fmt(p['heldout_ratio'])} | {_fmt(p['exemplar_ratio'])} |")
        lines += ["", "## Attention output vs MLP (transformer families)", "", "| model | best attn | exemplars | held-out | best MLP | exemplars | held-out | mean held-out attn / MLP |", "|---|---|---|---|---|---|---|---|"]
        for a in s["attn_vs_mlp"]:
            lines.append(
                f"| {a['model']} | `{a['attn_best']}` | {_fmt(a['attn_exemplar'])} | {_fmt(a['attn_heldout'])} | `{a['mlp_best']}` | "
                f"{_fmt(a['mlp_exemplar'])} | {_fmt(a['mlp_heldout'])} | {_fmt(a['attn_mean_heldout'])} / {_fmt(a['mlp_mean_heldout'])} |"
            )
        lines += [
            "",
            "## Choosing the layer: attribution scores vs measuring the edit",
            "",
            "Per model, candidates ranked by each score against their measured held-out ratio. `grad_x_act`: "
            "gradient of the exemplars' squared logit distance at the value site times the value difference (first "
            "order, the activation patch); `masked_patch`: the distance removed by patching the value with the "
            "originals' inside the concept mask only; `value_objective_ratio`: how much of the value loss the edit "
            "removes; `exemplar_ratio`: the edit's own logit ratio on the exemplars (what `surgery.evaluation.rank_layers` "
            "measures, there with a left-out exemplar). Regret: held-out ratio of the pick minus the best's.",
            "",
            "| score | models | mean Spearman (score vs held-out ratio) | top-1 hits | mean regret |",
            "|---|---|---|---|---|",
        ]
        for key, items in s["ranking"].items():
            if not items:
                continue
            sp = [i["spearman"] for i in items if not math.isnan(i["spearman"])]
            lines.append(
                f"| {key} | {len(items)} | {_fmt(sum(sp) / max(len(sp), 1))} | {sum(i['top1_hit'] for i in items)}/{len(items)} | "
                f"{_fmt(sum(i['regret'] for i in items) / len(items))} |"
            )
        if s["prefix_weight"]:
            lines += ["", "## Prefix (class/register) token weight", "", "| model | layer | auto weight w | exemplars 1 -> w | held-out 1 -> w | clean 1 -> w |", "|---|---|---|---|---|---|"]
            for p in s["prefix_weight"]:
                lines.append(
                    f"| {p['model']} | `{p['layer']}` | {p['prefix_weight']:g} | {_fmt(p['exemplar_pw1'])} -> {_fmt(p['exemplar_pw'])} | "
                    f"{_fmt(p['heldout_pw1'])} -> {_fmt(p['heldout_pw'])} | {_fmt(p['clean_pw1'])} -> {_fmt(p['clean_pw'])} |"
                )
    if res.get("note"):
        lines += ["", f"Note: {res['note']}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.breadth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 small models, the first recommended layer")
    ap.add_argument("--sweep", action="store_true", help="candidate layers at several depths, with layer-choice scores")
    ap.add_argument("--models", default="", help="comma-separated model ids (default: all)")
    ap.add_argument("-k", type=int, default=3, help="recommended layers per model")
    ap.add_argument("--out", default="", help="output stem (default benchmarks/results/breadth[-sweep|-quick])")
    ap.add_argument(
        "--aperiodic", action="store_true", help="a texture whose phase changes from patch to patch (5/7 px stripes)"
    )
    ap.add_argument("--branch-only", action="store_true", help="compare values after the add with branch-only values")
    args = ap.parse_args(argv)
    if args.branch_only:
        res = run_branch_comparison()
        res["command"] = "python -m benchmarks.breadth --branch-only"
        stem = Path(args.out) if args.out else RESULTS / "breadth-branch"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float) + "\n")
        stem.with_suffix(".md").write_text(branch_markdown(res))
        print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
        return 0
    mode = "sweep" if args.sweep else "recommended"
    ids = [m for m in args.models.split(",") if m]
    res = run(ids or None, mode=mode, k=args.k, quick=args.quick, period=0 if args.aperiodic else 2)
    res["command"] = "python -m benchmarks.breadth " + " ".join(argv if argv is not None else sys.argv[1:])
    stem = Path(args.out) if args.out else RESULTS / ("breadth" + ("-sweep" if args.sweep else "-quick" if args.quick else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
