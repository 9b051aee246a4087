"""The adapter base class and the helpers every family module builds its layers with.

An adapter answers two questions about a model: which of its weights can be edited, and how the value
of each edited layer's block is computed. Family modules express the second as *rules*: a rule looks
at one module (by class name and origin, never by importing timm or open_clip) and returns the
:class:`EditableLayer` objects it knows how to build inside it. Every other dense Conv2d or Linear is
still editable, with its own output as the value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from surgery.editable import BlockFn, EditableLayer, Site

__all__ = [
    "Adapter",
    "Rule",
    "class_from",
    "is_editable_module",
    "plain_layer",
    "chain",
    "join",
]

logger = logging.getLogger(__name__)

Rule = Callable[[str, nn.Module], Iterable[EditableLayer]]
"""``rule(name, module)`` -> the special editable layers found inside ``module`` (often none)."""


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


def plain_layer(name: str, module: nn.Module, *, family: str = "generic") -> EditableLayer:
    """An editable layer whose value is the module's own output."""
    kind = _kind(module)
    dim = 1 if kind == "conv" else -1
    return EditableLayer(
        name=name,
        module=module,
        kind=kind,  # type: ignore[arg-type]
        key_site=Site(name, "input"),
        value_site=Site(name, "output"),
        block=kind,
        family=family,
        key_channel_dim=dim,
        value_channel_dim=dim,
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
        """True for modules (and their children) that must not be offered for editing.

        By default ``nn.MultiheadAttention``: it calls its projections' weights functionally, so hooks
        on them never fire.
        """
        return isinstance(module, nn.MultiheadAttention)

    def _modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        root = self.root(model)
        base = model.get_submodule(root) if root else model
        skipped: list[str] = []
        for name, module in base.named_modules():
            full = join(root, name)
            if any(full == s or full.startswith(s + ".") for s in skipped):
                continue
            if self.skip(full, module):
                skipped.append(full)
                continue
            yield full, module

    def layers(self, model: nn.Module) -> list[EditableLayer]:
        """Every editable layer of ``model``, in module order."""
        modules = list(self._modules(model))
        special: dict[str, EditableLayer] = {}
        for name, module in modules:
            for rule in self.rules:
                for layer in rule(name, module):
                    special.setdefault(layer.name, layer)
        found = []
        for name, module in modules:
            if name in special:
                found.append(special.pop(name))
            elif is_editable_module(module):
                found.append(plain_layer(name, module, family=self.family))
        return found

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"
