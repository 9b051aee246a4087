"""Capture what a module sees and produces, by module name, with hooks that never outlive their use.

In the spirit of baukit's ``nethook.Trace``::

    with surgery.Trace(model, "layer4.1.conv3", retain_input=True, stop=True) as t:
        model(images)          # ends right after layer4.1.conv3; the rest of the network never runs
    keys, out = t.input, t.output

Hooks are removed on every exit path (normal end, exception, stop, KeyboardInterrupt). Captured tensors
are cloned by default, because residual blocks add in place (``out += identity``) and ReLUs run in
place, so a tensor held by reference can change after the hook saw it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from surgery.errors import LayerNotFoundError, SurgeryError

__all__ = ["StopForward", "Trace", "TraceDict", "get_module"]

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised inside a forward pass to end it early; the trace that raised it swallows it on exit."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return ``model``'s submodule called ``name`` (``""`` is the model itself), with a clear error."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = [n for n in names if name.split(".")[-1] in n][:5]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise LayerNotFoundError(
            f"model {type(model).__name__} has no module named {name!r}.{hint} "
            "List the names with `dict(model.named_modules())` or `surgery layers MODEL`."
        ) from None


def _keep(value: Any, *, clone: bool, detach: bool) -> Any:
    """Detach and/or clone every tensor inside ``value`` (tensors, tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        if detach:
            value = value.detach()
        if clone:
            value = value.clone()
        return value
    if isinstance(value, (tuple, list)):
        kept = [_keep(v, clone=clone, detach=detach) for v in value]
        return type(value)(kept) if not hasattr(value, "_fields") else type(value)(*kept)
    if isinstance(value, dict):
        return {k: _keep(v, clone=clone, detach=detach) for k, v in value.items()}
    return value


class _StopSignal(StopForward):
    """The StopForward of one particular trace, so nested traces only swallow their own."""

    def __init__(self, owner: object) -> None:
        super().__init__(f"forward stopped by {owner!r}")
        self.owner = owner


class Trace:
    """Capture the input and/or output of the module ``name`` of ``model`` during a forward pass.

    Use as a context manager; hooks are removed when the block ends, however it ends.

    Args:
        model: any ``nn.Module``.
        name: module name as in ``model.named_modules()`` (``""`` is the model itself).
        retain_input: keep the positional inputs of the call (``t.input`` is the first one).
        retain_output: keep what the module returns (``t.output``).
        clone: copy captured tensors, so later in-place operations cannot change them.
        detach: detach captured tensors from the autograd graph.
        stop: end the forward as soon as what was asked for is captured: right after the module runs,
            or right before it when only its input is retained. The ``with`` block then continues
            normally after the model call.

    Raises:
        LayerNotFoundError: ``name`` is not a module of ``model``.

    Attributes:
        input: the first positional argument of the module's last call (when ``retain_input``).
        inputs: all positional arguments of that call.
        kwargs: its keyword arguments.
        output: what the call returned (when ``retain_output``).
        fired: how many times the module ran while traced.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        clone: bool = True,
        detach: bool = True,
        stop: bool = False,
        _stopper: object | None = None,
    ) -> None:
        self.name = name
        self.module = get_module(model, name)
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.clone = clone
        self.detach = detach
        self.stop = stop
        self.input: Any = None
        self.inputs: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] | None = None
        self.output: Any = None
        self.fired = 0
        self._stopper = self if _stopper is None else _stopper
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # Stop before the module runs when nothing it computes is wanted.
        self._stop_before = stop and not retain_output
        try:
            if retain_input or self._stop_before:
                self._handles.append(
                    self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                )
            self._handles.append(self.module.register_forward_hook(self._post_hook))
        except BaseException:
            self.close()
            raise

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.retain_input:
            self.inputs = _keep(tuple(args), clone=self.clone, detach=self.detach)
            self.kwargs = _keep(dict(kwargs), clone=self.clone, detach=self.detach)
            if self.inputs:
                self.input = self.inputs[0]
            elif self.kwargs:
                self.input = next(iter(self.kwargs.values()))
        if self._stop_before:
            self.fired += 1
            self._maybe_stop()

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._stop_before:
            return
        self.fired += 1
        if self.retain_output:
            self.output = _keep(output, clone=self.clone, detach=self.detach)
        self._maybe_stop()

    def _maybe_stop(self) -> None:
        if not self.stop:
            return
        if self._stopper is self:
            raise _StopSignal(self)
        self._stopper._child_fired()  # type: ignore[attr-defined]

    @property
    def active(self) -> bool:
        """True while hooks are registered."""
        return bool(self._handles)

    def close(self) -> None:
        """Remove every hook this trace added; safe to call more than once."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return isinstance(exc, _StopSignal) and exc.owner is self._stopper

    def __repr__(self) -> str:
        return f"Trace({self.name!r}, fired={self.fired})"


class TraceDict(OrderedDict):
    """Traces of several modules at once, keyed by module name (the arguments of :class:`Trace`).

    With ``stop=True`` the forward ends as soon as every traced module has fired at least once.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        clone: bool = True,
        detach: bool = True,
        stop: bool = False,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(names))
        if not names:
            raise SurgeryError("TraceDict needs at least one module name")
        self.stop = stop
        try:
            for name in names:
                self[name] = Trace(
                    model,
                    name,
                    retain_input=retain_input,
                    retain_output=retain_output,
                    clone=clone,
                    detach=detach,
                    stop=stop,
                    _stopper=self,
                )
        except BaseException:
            self.close()
            raise

    def _child_fired(self) -> None:
        if all(t.fired for t in self.values()):
            raise _StopSignal(self)

    @property
    def active(self) -> bool:
        """True while any hook is registered."""
        return any(t.active for t in self.values())

    def close(self) -> None:
        """Remove every hook of every trace."""
        for t in self.values():
            t.close()

    def __enter__(self) -> TraceDict:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return isinstance(exc, _StopSignal) and exc.owner is self

    def __hash__(self) -> int:  # used as a stop-signal owner; identity is what matters
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other
