"""What an editable layer is: its weight, where its keys and values live, and how its block computes.

An :class:`EditableLayer` is architecture-agnostic; the adapters in ``surgery.adapters`` build them
for each family. The edited weight is a Conv2d or Linear weight. Keys are the layer's input; values
are the output of the layer *block* (for a ResNet block: ``act(bn(conv(k)) + identity)``), and
``block_forward`` recomputes that value from keys with a candidate weight, differentiably.

Each layer also says how its keys and values are laid out (:class:`Layout`): NCHW or NHWC maps,
tokens ``(N, L, C)`` with a number of class/register/distillation tokens before a row-major patch
grid, or flat vectors. Image masks are mapped onto the first three (:meth:`Layout.pool_mask`).

A site is normally the input or the output of a module call. A ``"call"`` site is a tensor computed
from a module's call (its captured arguments) by a function: this is how keys are read for a layer
whose weight a module uses functionally (``nn.MultiheadAttention``'s ``out_proj``, torchvision Swin's
``attn.proj``): the module's call is rerun with that layer's weight replaced by the identity and its
bias by zeros, which returns exactly the layer's input (:func:`call_with_identity`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError
from surgery.hooks import TraceDict
from surgery.layout import Layout

__all__ = ["Site", "LayerIO", "EditableLayer", "BlockFn", "call_with_identity"]

Port = Literal["input", "output", "call"]
Derive = Callable[[nn.Module, tuple, dict], torch.Tensor]
"""``derive(module, args, kwargs)`` -> the tensor a ``"call"`` site denotes, from the module's call."""
BlockFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
"""The part of a block after the edited conv/linear: ``(layer_output, context) -> value``."""


@dataclass(frozen=True)
class Site:
    """A place in the forward pass: the input or the output of the module called ``module``.

    With ``port="call"`` the site is ``derive(module, args, kwargs)`` computed from that module's call
    (its first positional argument is what a plain input site would read); ``what`` names it.
    """

    module: str
    port: Port = "output"
    derive: Derive | None = field(default=None, compare=False, repr=False)
    what: str = ""

    def __post_init__(self) -> None:
        if self.port not in ("input", "output", "call"):
            raise SurgeryError(f"a site's port is 'input', 'output' or 'call', got {self.port!r}")
        if (self.port == "call") != (self.derive is not None):
            raise SurgeryError("a 'call' site needs a derive function, and only a 'call' site takes one")

    @property
    def needs_input(self) -> bool:
        """Whether reading the site needs the module's call arguments (``"input"`` and ``"call"``)."""
        return self.port != "output"

    def read(self, trace: Any) -> torch.Tensor:
        """The tensor at this site, from a :class:`surgery.hooks.Trace` of ``module`` that retained
        what :attr:`needs_input` says (inputs for ``"input"``/``"call"``, the output otherwise).

        This is the one place that turns a trace into a site's tensor; ``surgery.stats`` reads key
        sites through it too.
        """
        if self.port == "input":
            return trace.input
        if self.port == "output":
            return trace.output
        assert self.derive is not None
        with torch.no_grad():
            return self.derive(trace.module, tuple(trace.inputs or ()), dict(trace.kwargs or {}))

    def __str__(self) -> str:
        port = f"call({self.what})" if self.port == "call" else self.port
        return f"{self.module or '<model>'}:{port}"


class _Call(nn.Module):
    """Runs ``fn(*args, **kwargs)`` with ``root`` registered as a submodule, for functional_call."""

    def __init__(self, root: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.root = root
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(*args, **kwargs)


def call_with_identity(
    root: nn.Module, linear: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``fn(*args, **kwargs)`` with ``root.<linear>``'s weight replaced by the identity, its bias by 0.

    ``linear`` is a square Linear or 1x1 Conv2d inside ``root`` that ``fn`` uses, possibly through
    ``F.linear`` on its weight. Whatever ``fn`` computes after that layer must act per token/position
    (dropout in eval, window reversal, cropping): the result is then exactly the layer's input, laid
    out as ``fn``'s output. The parameters are swapped with ``torch.func.functional_call`` and are
    back in place afterwards, also when ``fn`` raises.
    """
    layer = root.get_submodule(linear)
    w = layer.weight
    if w.shape[0] != w.shape[1] or (w.ndim == 4 and tuple(w.shape[2:]) != (1, 1)):
        raise SurgeryError(
            f"{linear} has weight shape {tuple(w.shape)}: reading its input through the identity needs a "
            "square Linear or 1x1 Conv2d"
        )
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device).reshape(w.shape)
    params = {f"root.{linear}.weight": eye}
    if getattr(layer, "bias", None) is not None:
        params[f"root.{linear}.bias"] = torch.zeros_like(layer.bias)
    return torch.func.functional_call(_Call(root, fn), params, args, kwargs, strict=False)


@dataclass(frozen=True)
class LayerIO:
    """Keys, values and context of one layer, captured in one forward pass."""

    keys: torch.Tensor
    values: torch.Tensor
    context: dict[str, torch.Tensor]


@dataclass(eq=False)
class EditableLayer:
    """A Conv2d or Linear whose weight can be rewritten, with the sites and block around it.

    Attributes:
        name: module name of the edited conv/linear.
        module: that module.
        kind: ``"conv"`` or ``"linear"``.
        key_site: where keys are read (the input of ``module``).
        value_site: where values are read (the end of the block).
        context_sites: other tensors the block needs, e.g. ``{"identity": Site("layer4.1.downsample")}``.
        post: the block after ``module``; ``None`` when the value is ``module``'s own output.
        block: a short human-readable description, e.g. ``"conv -> bn -> +identity -> relu"``.
        family: which adapter built it.
        key_layout: how keys are laid out (:class:`Layout`); by default NCHW for a conv, ``"last"``
            for a Linear.
        value_layout: how values are laid out; by default the key layout.
        key_channel_dim: the channel axis of keys (1 for NCHW maps, -1 for tokens/channels-last);
            derived from ``key_layout`` (passing it alone picks NCHW for 1 and ``"last"`` for -1).
        value_channel_dim: the axis of values indexed by the edited layer's output channels; derived
            from ``value_layout``.
        eval_modules: modules whose train/eval mode changes ``block_forward``; they must be in eval mode.
        channelwise: True when ``post`` acts on each output channel separately (BN, ReLU, pooling,
            residual add, layer-scale); the fast solver relies on it. Squeeze-excite after the edited
            conv and post-norm transformer blocks (LayerNorm on the branch) break it.
        skip: True when a skip connection carries the input around the layer: the layer is the end of a
            residual branch valued after the add (the skip is part of the value), or a layer inside a
            residual block (the skip bypasses its value). False for a *skip-free* site, whose output is
            the whole representation (VGG convs, stems, stage transitions, heads, the projection of a
            block without a residual add). By default True exactly when the block adds a ``"skip"`` or
            ``"identity"`` context tensor; the adapters also mark the layers inside residual blocks.
    """

    name: str
    module: nn.Module
    kind: Literal["conv", "linear"]
    key_site: Site
    value_site: Site
    context_sites: Mapping[str, Site] = field(default_factory=dict)
    post: BlockFn | None = None
    block: str = "conv"
    family: str = "generic"
    key_channel_dim: int | None = None
    value_channel_dim: int | None = None
    eval_modules: tuple[nn.Module, ...] = ()
    channelwise: bool = True
    key_layout: Layout | None = None
    value_layout: Layout | None = None
    skip: bool | None = None

    def __post_init__(self) -> None:
        def from_dim(dim: int | None) -> Layout | None:
            if dim is None:
                return None
            return Layout("nchw") if dim == 1 else Layout("last", channel_dim=None if dim == -1 else dim)

        if self.key_layout is None:
            self.key_layout = from_dim(self.key_channel_dim) or (
                Layout("nchw") if self.kind == "conv" else Layout("last")
            )
        if self.value_layout is None:
            self.value_layout = from_dim(self.value_channel_dim) or self.key_layout
        self.key_channel_dim = self.key_layout.channel_axis
        self.value_channel_dim = self.value_layout.channel_axis
        if self.skip is None:
            self.skip = self.valued_after_add

    @property
    def valued_after_add(self) -> bool:
        """Whether the value is read after a residual add: the block adds a ``"skip"`` or ``"identity"``
        context tensor (the conventions of ``surgery.adapters``)."""
        return any(k in self.context_sites for k in ("skip", "identity"))

    @property
    def weight(self) -> nn.Parameter:
        """The parameter an edit rewrites."""
        return self.module.weight

    @property
    def param_name(self) -> str:
        """Fully qualified parameter name, as in ``model.state_dict()``."""
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def sites(self) -> tuple[Site, ...]:
        """Every site this layer reads: keys, values, then context."""
        return (self.key_site, self.value_site, *self.context_sites.values())

    @property
    def plain(self) -> bool:
        """Whether the edited module is a plain ``nn.Conv2d`` or ``nn.Linear``, whose output is affine in its
        weight by construction (subclasses may standardize or reparametrize the weight)."""
        return type(self.module) in (nn.Conv2d, nn.Linear)

    def update_response(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """How the layer's output on ``keys`` moves when its weight moves by ``delta``, for a layer affine in
        its weight: ``layer(k, W + D) - layer(k, W) = layer(k, D) - layer(k, 0)`` (the bias taken out)."""
        out = self.layer_forward(keys, delta)
        if not self.plain:
            return out - self.layer_forward(keys, torch.zeros_like(delta))
        bias = self.module.bias
        if bias is None:
            return out
        return out - (bias[:, None, None] if type(self.module) is nn.Conv2d else bias)

    def layer_forward(self, keys: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The edited module alone applied to ``keys`` with ``weight`` in place of its own."""
        m = self.module
        if type(m) is nn.Conv2d:  # the common case, without functional_call's overhead
            return m._conv_forward(keys, weight, m.bias)
        if type(m) is nn.Linear:
            return F.linear(keys, weight, m.bias)
        return torch.func.functional_call(m, {"weight": weight}, (keys,), strict=False)

    def block_forward(
        self,
        keys: torch.Tensor,
        weight: torch.Tensor | None = None,
        context: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The block's output computed from ``keys`` with a candidate ``weight``.

        Differentiable in ``weight``. ``context`` holds the tensors named in ``context_sites`` (for a
        residual block, the identity branch). The model must be in eval mode.
        """
        if weight is None:
            weight = self.weight
        if weight.shape != self.weight.shape:
            raise SurgeryError(
                f"candidate weight for {self.name!r} has shape {tuple(weight.shape)}, "
                f"the layer's weight has {tuple(self.weight.shape)}"
            )
        context = dict(context or {})
        missing = [k for k in self.context_sites if k not in context]
        if missing:
            raise SurgeryError(
                f"block_forward of {self.name!r} needs context {missing}; "
                "capture it with layer.capture(model, images).context"
            )
        if any(m.training for m in (self.module, *self.eval_modules)):
            raise SurgeryError(
                f"the block of {self.name!r} has modules in training mode (BatchNorm would use batch "
                "statistics); call model.eval() first"
            )
        out = self.layer_forward(keys, weight)
        return out if self.post is None else self.post(out, context)

    def capture(self, model: nn.Module, inputs: torch.Tensor, *, stop: bool = True) -> LayerIO:
        """Run ``model(inputs)`` and return this layer's keys, values and context.

        With ``stop`` the forward ends once every site has been seen. Tensors are detached clones.
        """
        names = [s.module for s in self.sites]
        with torch.no_grad(), TraceDict(
            model, names, retain_input=True, retain_output=True, stop=stop
        ) as traces:
            model(inputs)
        missing = [n for n, t in traces.items() if not t.fired]
        if missing:
            raise SurgeryError(
                f"modules {missing} never ran in the forward pass, so layer {self.name!r} cannot be "
                "captured; is the layer part of this model's forward path?"
            )

        def read(site: Site) -> torch.Tensor:
            value = site.read(traces[site.module])
            if not isinstance(value, torch.Tensor):
                raise SurgeryError(f"the site {site} of layer {self.name!r} carries a {type(value).__name__}, not a tensor")
            return value

        return LayerIO(
            keys=read(self.key_site),
            values=read(self.value_site),
            context={k: read(s) for k, s in self.context_sites.items()},
        )

    def capture_keys(
        self,
        model: nn.Module,
        images: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device | None = None,
        store: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Keys and block context of all ``images``, captured ``batch_size`` at a time.

        Batches run on ``device`` (default: where ``images`` are); the results are concatenated on
        ``store`` (default: where they were computed).
        """
        keys, context = [], []
        for i in range(0, images.shape[0], batch_size):
            batch = images[i : i + batch_size]
            io = self.capture(model, batch if device is None else batch.to(device))
            keys.append(io.keys if store is None else io.keys.to(store))
            context.append({k: v if store is None else v.to(store) for k, v in io.context.items()})
        return torch.cat(keys), {k: torch.cat([c[k] for c in context]) for k in self.context_sites}

    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in self.weight.shape)
        return f"EditableLayer({self.name!r}, {self.kind} {shape}, block='{self.block}')"
