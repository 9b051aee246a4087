"""The network after a site: run only the rest of a model from a tensor captured there, and which
parameters lie after a layer.

Evaluating many candidate edits of one layer over a test set does not need the part of the network
before the layer: cache the keys (and the block's context) once, recompute the block's value with each
candidate weight, and run only the suffix. :func:`network_suffix` cuts the model with ``torch.fx`` at a
module's output (the module is kept whole as a leaf), keeping every node downstream of it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import fx, nn

from surgery.editable import EditableLayer, Site
from surgery.errors import SurgeryError, UnsupportedModelError
from surgery.hooks import get_module
from surgery.layers import get_layer

__all__ = ["network_suffix", "NetworkSuffix", "suffix_logits", "suffix_parameters", "parameters_after_keys", "feeds_context"]

logger = logging.getLogger(__name__)


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """timm's own untraceable modules and functions, when timm is already imported."""
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is None:
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


class _LeafAt(fx.Tracer):
    """Trace through everything except standard leaves, timm's no-trace modules and the cut module."""

    def __init__(self, cut: str) -> None:
        self.leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self.cut = cut

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            qualname == self.cut
            or isinstance(m, self.leaf_types)
            or super().is_leaf_module(m, qualname)
        )


class NetworkSuffix(nn.Module):
    """``model`` from the output of module ``site`` on: ``suffix(value) == model(x)``."""

    def __init__(self, graph_module: fx.GraphModule, site: str) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.site = site

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self.graph_module(value)


def network_suffix(model: nn.Module, site: str | Site | EditableLayer) -> NetworkSuffix:
    """The part of ``model`` after module ``site``'s output (or input), or an editable layer's value site.

    The suffix shares the model's parameters (nothing is copied), so it sees edits applied to them.

    Raises:
        UnsupportedModelError: the model cannot be traced by ``torch.fx``, the module is called more
            than once, or a later part of the network also reads tensors from before the cut.
    """
    if isinstance(site, EditableLayer):
        site = site.value_site
    port = "output"
    if isinstance(site, Site):
        port, site = site.port, site.module
    get_module(model, site)
    try:
        graph = _LeafAt(site).trace(model)
    except Exception as e:  # fx raises many kinds of errors on untraceable code
        raise UnsupportedModelError(
            f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); evaluate with full "
            "forward passes instead"
        ) from None
    cut_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == site]
    if len(cut_nodes) != 1:
        raise UnsupportedModelError(
            f"module {site!r} is called {len(cut_nodes)} times in the traced forward; a suffix needs exactly one"
        )
    cut = cut_nodes[0]
    if port == "input" and len(cut.all_input_nodes) != 1:
        raise UnsupportedModelError(f"module {site!r} takes several inputs; cut at its output instead")
    downstream: set[fx.Node] = {cut}
    for node in graph.nodes:  # nodes are in topological order
        if any(a in downstream for a in node.all_input_nodes):
            downstream.add(node)
    # Nodes the suffix needs that are not downstream must not depend on the model's input. Arguments
    # of forward() with a default (timm ViT's attn_mask=None) are not the input: they keep their default.
    required = {n for n in graph.nodes if n.op == "placeholder" and not n.args}
    depends_on_input: set[fx.Node] = set(required)
    for node in graph.nodes:
        if any(a in depends_on_input for a in node.all_input_nodes):
            depends_on_input.add(node)
    new = fx.Graph()
    value = new.placeholder("value")
    env: dict[fx.Node, Any] = {cut.all_input_nodes[0]: value} if port == "input" else {cut: value}

    def copy(node: fx.Node, reader: fx.Node) -> fx.Node:
        """Copy ``node`` and, recursively, the constants it is computed from."""
        if node not in env:
            if node not in downstream and node in depends_on_input:
                raise UnsupportedModelError(
                    f"{reader.name} after {site!r} also reads {node.name}, computed before the cut; "
                    "the network cannot be split there"
                )
            if node.op == "placeholder":  # an argument left at its default: the suffix uses the default
                env[node] = node.args[0]
                return env[node]
            for a in node.all_input_nodes:
                copy(a, node)
            env[node] = new.node_copy(node, lambda x: env[x])
        return env[node]

    output = None
    for node in graph.nodes:
        if node.op == "output":
            output = node
        elif node in downstream and node not in env:
            copy(node, node)
    assert output is not None
    if not all(a in env for a in output.all_input_nodes):
        raise UnsupportedModelError(f"the model's output does not depend on {site!r}")
    new.node_copy(output, lambda x: env[x])
    new.lint()
    return NetworkSuffix(_sharing_modules(fx.GraphModule(model, new), model), site)


def _sharing_modules(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Make ``gm`` read every parameter and buffer through the model's own modules.

    ``fx.GraphModule`` keeps the modules it calls, but for a tensor read directly (``get_attr``, as
    when fx traces into timm's ``LayerNorm``) it builds an empty holder module carrying the tensor.
    Swapping the model's parameters (``torch.func.functional_call``, fine-tuning from cached keys)
    would then miss it; putting the model's module in the holder's place makes the swap reach it.
    """
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." in node.target:
            owner, _, _ = node.target.rpartition(".")
            parent, _, name = owner.rpartition(".")
            holder = gm.get_submodule(parent) if parent else gm
            setattr(holder, name, model.get_submodule(owner))
    return gm


def suffix_logits(
    suffix: NetworkSuffix,
    layer: EditableLayer,
    keys: torch.Tensor,
    weight: torch.Tensor,
    context: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Model outputs from cached ``keys`` (and context) with ``weight`` in place of the layer's."""
    return suffix(layer.block_forward(keys, weight, context))


def suffix_parameters(
    model: nn.Module, layer: str | EditableLayer, example_input: torch.Tensor
) -> list[str]:
    """Names of the parameters from ``layer`` to the output, found from the forward order.

    Runs one forward pass on ``example_input`` (no grad) with pre-hooks on every module, and keeps the
    parameters owned directly (``recurse=False``) by every module whose first forward call started at
    or after the first call of the layer's module. Modules that started earlier are left out: those
    that ran only before the layer, and enclosing modules still running when the layer started (the
    model itself, a ``Sequential`` or block containing the layer). Parameters such modules own
    directly are therefore never included, even when they are used after the layer (e.g. a
    projection matrix held by the top-level model); they are logged. Modules that never ran, or that
    were called without ``__call__`` (``module.forward(x)``), are left out too.

    Args:
        model: the model, in any mode (the pass runs without gradients).
        layer: the edited layer or its module name.
        example_input: one batch the model accepts, e.g. a single image ``(1, 3, H, W)``.

    Returns:
        Parameter names in ``model.named_parameters()`` order; the layer's own weight is among them.
    """
    layer = get_layer(model, layer)
    modules = list(model.named_modules())
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    clock = [0]

    def pre_hook(mod: nn.Module, _args: object) -> None:
        starts.setdefault(id(mod), clock[0])
        clock[0] += 1

    def post_hook(mod: nn.Module, _args: object, _out: object) -> None:
        ends[id(mod)] = clock[0]
        clock[0] += 1

    handles = []
    try:
        for _, mod in modules:
            handles.append(mod.register_forward_pre_hook(pre_hook))
            handles.append(mod.register_forward_hook(post_hook))
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()

    t0 = starts.get(id(layer.module))
    if t0 is None:
        raise SurgeryError(
            f"layer {layer.name!r} did not run in the forward pass, so no parameters follow it; "
            "is it used by model.forward?"
        )
    selected: set[int] = set()
    for name, mod in modules:
        t = starts.get(id(mod))
        if t is None:
            continue
        own = list(mod.named_parameters(recurse=False))
        if t >= t0:
            selected.update(id(p) for _, p in own)
        elif own and ends.get(id(mod), -1) > t0:
            logger.info(
                "module %s encloses %s and owns parameters directly (%s); they are not counted as "
                "after the layer",
                name or "<model>", layer.name, ", ".join(n for n, _ in own),
            )
    return [n for n, p in model.named_parameters() if id(p) in selected]


def parameters_after_keys(
    model: nn.Module, layer: EditableLayer, example_input: torch.Tensor
) -> frozenset[str]:
    """Parameters that can change without changing the layer's captured keys and block context.

    :func:`suffix_parameters` minus those of the modules the block's context is read from (e.g. a
    ResNet shortcut's downsample, which runs after the layer but feeds the residual add).
    """
    return frozenset(
        n for n in suffix_parameters(model, layer, example_input) if not feeds_context(layer, n)
    )


def feeds_context(layer: EditableLayer, param: str) -> bool:
    """Whether parameter ``param`` belongs to a module the layer's block context is read from.

    A context read at a module's *input* (a ViT block's input, the skip of its attention output) is
    computed before that module runs, so the module's own parameters do not feed it.
    """
    return any(
        site.port != "input" and (site.module == "" or param.startswith(site.module + "."))
        for site in layer.context_sites.values()
    )
