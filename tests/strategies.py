"""Hypothesis strategies: small editable models and random factored or dense edits of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

from surgery.edits.edit import Edit
from surgery.identity import architecture_id
from tests.tiny_models import randomize_batchnorm

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ModelRecipe:
    """How to build a small ``nn.Sequential``: the same recipe always builds the same weights."""

    channels: tuple[int, ...]  # input channels, then each conv's output channels
    kernels: tuple[int, ...]  # one per conv, 1 or 3
    batchnorm: tuple[bool, ...]  # one per conv
    bias: tuple[bool, ...]  # one per conv
    classes: int
    dtype: torch.dtype
    seed: int

    def build(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for c_in, c_out, k, bn, bias in zip(
                self.channels, self.channels[1:], self.kernels, self.batchnorm, self.bias
            ):
                layers.append(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias))
                if bn:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(nn.ReLU())
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.channels[-1], self.classes)]
            model = nn.Sequential(*layers)
        randomize_batchnorm(model, self.seed)
        return model.to(self.dtype).eval()


@st.composite
def model_recipes(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> ModelRecipe:
    """Recipes of ``Conv2d [BatchNorm2d] ReLU`` blocks (1-3, kernels 1 or 3) then a Linear head."""
    n = draw(st.integers(1, 3))
    return ModelRecipe(
        channels=tuple(draw(st.lists(st.integers(1, 6), min_size=n + 1, max_size=n + 1))),
        kernels=tuple(draw(st.lists(st.sampled_from([1, 3]), min_size=n, max_size=n))),
        batchnorm=tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
        bias=tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
        classes=draw(st.integers(1, 5)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def editable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d and Linear modules."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_dicts = st.dictionaries(
    st.text(max_size=8),
    st.one_of(_json_scalars, st.lists(_json_scalars, max_size=3)),
    max_size=4,
)
"""JSON-serializable dicts (no tuples, no NaN) that survive a JSON round trip unchanged."""


@st.composite
def _provenance(draw: st.DrawFn, model: nn.Module, layer: str, params: list[str], method: str) -> dict:
    return dict(
        layer=layer,
        method=method,
        hparams=draw(json_dicts),
        architecture=architecture_id(model),
        description=draw(st.text(max_size=30)),
        created=draw(st.sampled_from(["2026-01-02T03:04:05+00:00", ""]) | st.text(max_size=25)),
        info=draw(json_dicts),
    )


def _scale(draw: st.DrawFn, weight: torch.Tensor, numel: int) -> float:
    """A per-element scale giving an update of 1e-4 to 3 times the weight's norm (real edits are well
    below 10x, where applying one warns)."""
    relative = 10.0 ** draw(st.floats(-4.0, 0.5))
    return relative * max(float(weight.detach().double().norm()), 1e-3) / max(numel, 1) ** 0.5


def _factor_dtype(draw: st.DrawFn, weight: torch.Tensor) -> torch.dtype:
    return draw(st.sampled_from([torch.float32, torch.float64, weight.dtype]))


@st.composite
def factored_edits(draw: st.DrawFn, model: nn.Module, layer: str | None = None) -> Edit:
    """A factored edit (rank 1-3) of a Conv2d or Linear layer of ``model``, made on its current weights."""
    layer = layer if layer is not None else draw(st.sampled_from(editable_layers(model)))
    weight = model.get_parameter(f"{layer}.weight")
    rank = draw(st.integers(1, 3))
    dtype = _factor_dtype(draw, weight)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    m, n, *kernel = weight.shape
    lam = torch.randn(rank, m, *kernel, generator=g, dtype=torch.float64)
    lam = (lam * _scale(draw, weight, lam[0].numel() * rank)).to(dtype)
    u = torch.randn(rank, n, generator=g, dtype=torch.float64)
    u = (u / u.norm(dim=1, keepdim=True)).to(dtype)
    edit = Edit(lam=lam, u=u, **draw(_provenance(model, layer, [f"{layer}.weight"], "rewrite")))
    return edit.made_on({f"{layer}.weight": weight})


@st.composite
def span_edits(draw: st.DrawFn, model: nn.Module, layer: str | None = None) -> Edit:
    """A span edit: factors (rank 1-2) for two or more layers of ``model`` in forward order, starting at
    ``layer`` (a single-layer factored edit where no layer follows it), made on their current weights."""
    names = editable_layers(model)
    first = layer if layer is not None else draw(st.sampled_from(names[:-1]))
    later = names[names.index(first) + 1 :]
    if not later:
        return draw(factored_edits(model, first))
    layers = [first, *draw(st.lists(st.sampled_from(later), min_size=1, max_size=len(later), unique=True))]
    layers.sort(key=names.index)
    rank = draw(st.integers(1, 2))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    span = {}
    for name in layers:
        weight = model.get_parameter(f"{name}.weight")
        m, n, *kernel = weight.shape
        dtype = _factor_dtype(draw, weight)
        lam = torch.randn(rank, m, *kernel, generator=g, dtype=torch.float64)
        lam = (lam * _scale(draw, weight, lam[0].numel() * rank)).to(dtype)
        u = torch.randn(rank, n, generator=g, dtype=torch.float64)
        span[f"{name}.weight"] = (lam, (u / u.norm(dim=1, keepdim=True)).to(dtype))
    edit = Edit(span=span, **draw(_provenance(model, first, list(span), "rewrite")))
    return edit.made_on({p: model.get_parameter(p) for p in span})


@st.composite
def dense_edits(draw: st.DrawFn, model: nn.Module, layer: str | None = None) -> Edit:
    """A dense edit of a layer's weight (and, sometimes, its bias), made on its current weights."""
    layer = layer if layer is not None else draw(st.sampled_from(editable_layers(model)))
    module = model.get_submodule(layer)
    params = [f"{layer}.weight"]
    if getattr(module, "bias", None) is not None and draw(st.booleans()):
        params.append(f"{layer}.bias")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    deltas = {}
    for p in params:
        w = model.get_parameter(p)
        scale = _scale(draw, w, w.numel())
        deltas[p] = (torch.randn(w.shape, generator=g, dtype=torch.float64) * scale).to(_factor_dtype(draw, w))
    edit = Edit(deltas=deltas, **draw(_provenance(model, layer, params, "finetune")))
    return edit.made_on({p: model.get_parameter(p) for p in params})


def edits(model: nn.Module, layer: str | None = None) -> st.SearchStrategy[Edit]:
    """Factored (mostly), span or dense edits of ``model``."""
    return st.one_of(
        factored_edits(model, layer), factored_edits(model, layer), span_edits(model, layer), dense_edits(model, layer)
    )


def state_hashes(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every parameter and buffer."""
    from surgery.identity import tensor_sha256

    return {name: tensor_sha256(t) for name, t in model.state_dict().items()}
