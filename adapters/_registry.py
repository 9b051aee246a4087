"""The adapter registry: ``register_adapter`` adds a family, ``get_adapter`` picks one for a model."""

from __future__ import annotations

import logging

from torch import nn

from ._base import Adapter

__all__ = ["register_adapter", "get_adapter", "list_adapters"]

logger = logging.getLogger(__name__)

_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator that makes an :class:`Adapter` available to :func:`get_adapter`.

    Adapters are tried from the highest ``priority`` down; registering a class again replaces it.
    """
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"register_adapter expects an Adapter subclass, got {cls!r}")
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.__qualname__ != cls.__qualname__ or a.__module__ != cls.__module__]
    _ADAPTERS.append(cls)
    _ADAPTERS.sort(key=lambda a: -a.priority)
    return cls


def list_adapters() -> list[type[Adapter]]:
    """Registered adapter classes, in the order they are tried."""
    return list(_ADAPTERS)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter of the highest priority whose ``matches(model)`` is true.

    Matching looks at class names and the modules they come from, so it never imports timm or
    open_clip; the generic adapter matches any ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for cls in _ADAPTERS:
        if cls.matches(model):
            logger.debug("adapter %s for %s", cls.__name__, type(model).__name__)
            return cls()
    raise LookupError("no adapter registered")  # unreachable once the generic adapter is registered
