"""What an editable layer is: its weight, where its keys and values live, and how its block computes.

An :class:`EditableLayer` is architecture-agnostic; the adapters in ``surgery.adapters`` build them
for each family. The edited weight is a Conv2d or Linear weight. Keys are the layer's input; values
are the output of the layer *block* (for a ResNet block: ``act(bn(conv(k)) + identity)``), and
``block_forward`` recomputes that value from keys with a candidate weight, differentiably.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError
from surgery.hooks import TraceDict

__all__ = ["Site", "LayerIO", "EditableLayer", "BlockFn"]

Port = Literal["input", "output"]
BlockFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
"""The part of a block after the edited conv/linear: ``(layer_output, context) -> value``."""


@dataclass(frozen=True)
class Site:
    """A place in the forward pass: the input or the output of the module called ``module``."""

    module: str
    port: Port = "output"

    def __str__(self) -> str:
        return f"{self.module or '<model>'}:{self.port}"


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
        key_channel_dim: the channel axis of keys (1 for NCHW maps, -1 for tokens/channels-last).
        value_channel_dim: the channel axis of values.
        eval_modules: modules whose train/eval mode changes ``block_forward``; they must be in eval mode.
        channelwise: True when ``post`` acts on each output channel separately (BN, ReLU, pooling,
            residual add, layer-scale); the fast solver relies on it. Squeeze-excite breaks it.
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
    key_channel_dim: int = 1
    value_channel_dim: int = 1
    eval_modules: tuple[nn.Module, ...] = ()
    channelwise: bool = True

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
            t = traces[site.module]
            return t.input if site.port == "input" else t.output

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
