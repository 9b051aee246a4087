"""The adapter base class and the helpers every family module builds its layers with.

An adapter answers two questions about a model: which of its weights can be edited, and how the value
of each edited layer's block is computed. Family modules express the second as *rules*: a rule looks
at one module (by class name and origin, never by importing timm or open_clip) and returns the
:class:`EditableLayer` objects it knows how to build inside it, and :class:`NotEditable` markers for
modules that must not be listed (their weight is used functionally, e.g. through ``F.linear``, so
hooks on them never fire). Every other dense Conv2d or Linear is still editable, with its own output
as the value.

Adapters also say where to edit: :meth:`Adapter.candidates` lists the layers valued after a residual
add and the skip-free sites, in the order the breadth benchmark (``benchmarks/breadth/``) measured to
work best for the family.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from surgery.editable import BlockFn, EditableLayer, Site
from surgery.layout import Layout

__all__ = [
    "Adapter",
    "NotEditable",
    "branch_of",
    "site_branch",
    "skip_free_sites",
    "Rule",
    "class_from",
    "is_editable_module",
    "plain_layer",
    "chain",
    "join",
]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class NotEditable:
    """A rule's marker: the module ``name`` is a Conv2d/Linear that must not be listed, and why."""

    name: str
    reason: str


Rule = Callable[[str, nn.Module], Iterable["EditableLayer | NotEditable"]]
"""``rule(name, module)`` -> the special editable layers (and :class:`NotEditable` markers) found
inside ``module`` (often none)."""


def join(*names: str) -> str:
    """Join module-name parts, ignoring empty ones: ``join("", "layer1")`` is ``"layer1"``."""
    return ".".join(n for n in names if n)


def class_from(module: object, package: str, *class_names: str) -> bool:
    """True when ``module``'s class is one of ``class_names`` and is defined under ``package``.

    Lets adapters recognize timm or open_clip classes without importing those packages.
    """
    cls = type(module)
    return cls.__name__ in class_names and (
        cls.__module__ == package or cls.__module__.startswith(package + ".")
    )


def is_editable_module(module: nn.Module) -> bool:
    """Dense Conv2d (``groups == 1``) or Linear modules, subclasses included.

    Grouped and depthwise convolutions are left out: the rank-one update acts along the input-channel
    axis, which a depthwise filter does not mix.
    """
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def _kind(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


def plain_layer(
    name: str, module: nn.Module, *, family: str = "generic", layout: Layout | None = None
) -> EditableLayer:
    """An editable layer whose value is the module's own output.

    ``layout`` defaults to NCHW for a conv and ``"last"`` (channels last, structure from the rank) for
    a Linear.
    """
    kind = _kind(module)
    if layout is None:
        layout = Layout("nchw") if kind == "conv" else Layout("last")
    return EditableLayer(
        name=name,
        module=module,
        kind=kind,  # type: ignore[arg-type]
        key_site=Site(name, "input"),
        value_site=Site(name, "output"),
        block=kind,
        family=family,
        key_layout=layout,
        value_layout=layout,
    )


def chain(*steps: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None) -> BlockFn:
    """A block tail that applies ``steps`` in order (``None`` steps are skipped); ignores context."""
    live = [s for s in steps if s is not None]

    def post(x: torch.Tensor, context: Mapping[str, torch.Tensor]) -> torch.Tensor:
        for step in live:
            x = step(x)
        return x

    return post


class Adapter:
    """Finds the editable layers of one family of models.

    Subclasses set ``family``, ``priority`` (higher is tried first) and ``rules``, and override
    :meth:`matches`; :meth:`root` and :meth:`skip` restrict which modules are considered.
    """

    family: ClassVar[str] = "generic"
    priority: ClassVar[int] = 0
    rules: ClassVar[Sequence[Rule]] = ()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter knows ``model``'s family."""
        raise NotImplementedError

    def root(self, model: nn.Module) -> str:
        """Module name under which editable layers are looked for (``""``: the whole model)."""
        return ""

    def skip(self, name: str, module: nn.Module) -> bool:
        """True for modules (and their children) that must not be offered as plain layers.

        By default ``nn.MultiheadAttention``: it calls its projections' weights functionally, so hooks
        on them never fire. Rules can still offer a layer inside a skipped module when they read its
        keys functionally (a ``"call"`` site), as the ViT rules do for ``out_proj``.
        """
        return isinstance(module, nn.MultiheadAttention)

    def prefix_tokens(self, model: nn.Module) -> int:
        """How many class/register/distillation tokens precede the patch grid in ``model``'s tokens.

        timm's ``num_prefix_tokens`` when the model (or its root) has one; 1 for torchvision's
        ``VisionTransformer`` and open_clip's ``VisionTransformer`` (the class token); 0 otherwise.
        Token layouts whose rule left the count open get this one.
        """
        root = self.root(model)
        base = model.get_submodule(root) if root else model
        n = getattr(base, "num_prefix_tokens", None)
        if isinstance(n, int):
            return n
        if class_from(base, "torchvision.models.vision_transformer", "VisionTransformer"):
            return 1
        if class_from(base, "open_clip.transformer", "VisionTransformer"):
            return 1
        return 0

    def head_reads_prefix(self, model: nn.Module) -> bool:
        """Whether ``model``'s classifier head reads the prefix tokens (class-token pooling).

        timm models with ``global_pool == "token"``, torchvision's ``VisionTransformer`` and
        open_clip's ``VisionTransformer`` with ``pool_type == "tok"``; average-pooled heads (and
        register tokens, which no head reads) do not. ``rewrite``'s ``prefix_weight="auto"`` uses it.
        """
        root = self.root(model)
        base = model.get_submodule(root) if root else model
        if class_from(base, "torchvision.models.vision_transformer", "VisionTransformer"):
            return True
        if class_from(base, "open_clip.transformer", "VisionTransformer"):
            return getattr(base, "pool_type", "tok") == "tok" and getattr(base, "attn_pool", None) is None
        return getattr(base, "global_pool", None) == "token"

    def _modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
        """``(name, module, skipped)`` for every module under the root, in module order."""
        root = self.root(model)
        base = model.get_submodule(root) if root else model
        skipped: list[str] = []
        for name, module in base.named_modules():
            full = join(root, name)
            inside = any(full == s or full.startswith(s + ".") for s in skipped)
            if not inside and self.skip(full, module):
                skipped.append(full)
                inside = True
            yield full, module, inside

    def layers(self, model: nn.Module) -> list[EditableLayer]:
        """Every editable layer of ``model``, in module order.

        Each says whether a skip connection bypasses it (:attr:`EditableLayer.skip`): layers valued after
        a residual add do, and so does every other layer inside a block whose rule valued a layer after
        its add (the first conv of a ResNet block, ``mlp.fc1``, a shortcut's projection); the rest are
        skip-free. A block no rule recognizes counts as no residual block.
        """
        return [layer for layer, _ in self._scan(model)]

    def _scan(self, model: nn.Module) -> list[tuple[EditableLayer, bool]]:
        """Every editable layer with whether it is a *site*: a layer a rule built, or a plain layer in no
        block a rule recognized. Plain layers inside a recognized block (the expansion and
        squeeze-excite convs of an MBConv block) are not: their output is neither the block's value
        nor the representation."""
        modules = list(self._modules(model))
        special: dict[str, EditableLayer] = {}
        hidden: set[str] = set()
        blocks: set[str] = set()  # modules a rule found layers in
        residual: set[str] = set()  # those among them with a layer valued after a residual add
        for name, module, skipped in modules:
            if skipped:
                continue
            for rule in self.rules:
                for found_layer in rule(name, module):
                    if isinstance(found_layer, NotEditable):
                        hidden.add(found_layer.name)
                        continue
                    special.setdefault(found_layer.name, found_layer)
                    blocks.add(name)
                    if found_layer.valued_after_add:
                        residual.add(name)
        prefix = self.prefix_tokens(model)
        found = []
        for name, module, skipped in modules:
            if name in special:
                layer, site = special.pop(name), True
            elif not skipped and name not in hidden and is_editable_module(module):
                layer, site = plain_layer(name, module, family=self.family), not _inside(name, blocks)
            else:
                continue
            if _inside(name, residual):
                layer.skip = True
            found.append((_with_prefix(layer, prefix), site))
        return found

    preference: ClassVar[Sequence[tuple[str, float]]] = (("any", 1.0),)
    """Where the family's edits worked best, best first: ``(branch, relative depth)`` pairs, where
    branch is ``"attn"`` (attention / token-mixer output), ``"mlp"`` (MLP output), ``"conv"`` (the
    last conv of a CNN block), ``"skip-free"`` (a skip-free site: a stage transition, the projection
    of a block without a residual add, a VGG conv) or ``"any"``, and depth runs from 0 (the first
    layer of that branch) to 1 (the last); in a model with residual blocks, a skip-free site's depth is
    its position among all the model's editable layers (0.5: half-way through the network)."""

    def candidates(self, model: nn.Module) -> list[EditableLayer]:
        """Where to edit, best first: the layers valued after a residual add and the skip-free sites.

        Skip-free sites (:func:`skip_free_sites`) are stage transitions (ConvNeXt ``downsample``, Swin
        patch merging), the projections of MBConv blocks without a skip, VGG convs (in a model without
        residual adds, only its block-valued layers when it has some: not VGG's classifier). One layer per
        ``preference`` entry (the closest in depth of that branch; ``"any"`` is any layer valued after
        an add, or any skip-free site in a model without residual adds), then every other candidate by
        its depth distance to the first preference. The default (the deepest first) is what the paper
        found for CNNs; family adapters set the order the breadth benchmark measured for them.
        """
        found = self._scan(model)
        residual = [l for l, _ in found if l.valued_after_add and l.post is not None]
        free = skip_free_sites(found)
        if not residual:  # no residual add anywhere (VGG, a plain CNN): its block-valued layers, if any
            free = [l for l in free if l.post is not None] or free
        keep = set(residual) | set(free)
        pool = [l for l, _ in found if l in keep]
        if not pool:
            return []
        anything = residual or free
        by_branch: dict[str, list[EditableLayer]] = {}
        for l in pool:
            by_branch.setdefault(site_branch(l), []).append(l)
        depth = {}
        for ls in by_branch.values():
            for i, l in enumerate(ls):
                depth[l.name] = i / max(len(ls) - 1, 1)
        position = {l.name: i / max(len(found) - 1, 1) for i, (l, _) in enumerate(found)}
        for l in by_branch.get("skip-free", []) if residual else []:
            depth[l.name] = position[l.name]  # beside residual blocks, a lone stem conv is not "deep"
        chosen: list[EditableLayer] = []
        for branch, target in self.preference:
            options = [l for l in (anything if branch == "any" else pool) if l not in chosen]
            if branch != "any":
                options = [l for l in options if site_branch(l) == branch]
            if options:
                chosen.append(min(options, key=lambda l: (abs(depth[l.name] - target), -depth[l.name])))
        first = self.preference[0][1] if self.preference else 1.0
        rest = sorted((l for l in pool if l not in chosen), key=lambda l: (abs(depth[l.name] - first), -depth[l.name]))
        return chosen + rest

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"


def site_branch(layer: EditableLayer) -> str:
    """``"skip-free"`` for a skip-free layer, else :func:`branch_of`: how ``Adapter.preference`` groups
    candidates."""
    return "skip-free" if not layer.skip else branch_of(layer)


def skip_free_sites(found: Sequence[tuple[EditableLayer, bool]]) -> list[EditableLayer]:
    """The skip-free layers of an adapter's scan (``(layer, is_site)`` pairs, in module order) that are
    places to edit: sites (built by a rule, or in no recognized block) with spatial keys (convs,
    channels-last or token linears). Left out: stems, whose keys are pixels (at most 3 channels: the
    direction ``u`` would be a color), and the model's last layer when it is a plain layer (the
    classifier; heads whose keys are pooled vectors are left out by their layout already)."""
    last = found[-1][0] if found else None
    return [
        l
        for l, site in found
        if not l.skip
        and site
        and _spatial_keys(l)
        and l.weight.shape[1] > 3
        and not (l is last and l.post is None)
    ]


def _inside(name: str, blocks: set[str]) -> bool:
    """Whether the module ``name`` lies strictly inside one of the modules ``blocks``."""
    return any(name.startswith(b + ".") for b in blocks if b)


def _spatial_keys(layer: EditableLayer) -> bool:
    """Keys laid out as maps or tokens: a conv, or a linear whose rule gave it a spatial layout."""
    return layer.key_layout is not None and layer.key_layout.kind in ("nchw", "nhwc", "tokens")


def branch_of(layer: EditableLayer) -> str:
    """``"attn"`` for attention outputs and token mixers, ``"mlp"`` for MLP outputs, ``"conv"``
    otherwise (the last conv of a CNN block), read from the layer's module name."""
    n = layer.name
    if "mlp_tokens" in n or "linear_tokens" in n:  # Mixer/ResMLP token mixing
        return "attn"
    if any(s in n for s in ("mlp", "block.5", "c_proj")):  # also MaxViT's attn_block.mlp.fc2
        return "mlp"
    if any(s in n for s in ("attn", "token_mixer", "self_attention")):
        return "attn"
    return "conv"


def _with_prefix(layer: EditableLayer, prefix: int) -> EditableLayer:
    """``layer`` with the model's prefix-token count filled into token layouts that left it open."""
    changes = {}
    for attr in ("key_layout", "value_layout"):
        lay = getattr(layer, attr)
        if lay is not None and lay.kind in ("tokens", "last") and lay.prefix is None:
            changes[attr] = dataclasses.replace(lay, prefix=prefix)
    if changes:
        for attr, lay in changes.items():
            setattr(layer, attr, lay)
    return layer
