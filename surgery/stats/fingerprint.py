"""What computes a layer's keys, fingerprinted: the cache key of key statistics.

One forward (stopped at the key site) records, with forward pre-hooks, every module whose forward
started before the key site was reached; the fingerprint hashes each one's name, class and
``extra_repr`` and the bytes of the parameters and buffers it owns. Editing an earlier layer changes
it; editing the layer itself or anything after it does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from surgery._guards import model_device, require_eval
from surgery.editable import EditableLayer, Site
from surgery.errors import SurgeryError
from surgery.hooks import TraceDict
from surgery.identity import blank_addresses, dtype_name, hash_tensor, hasher
from surgery.layers import get_layer

__all__ = [
    "weights_fingerprint",
    "fingerprint_and_dtype",
    "UpstreamRecorder",
    "recording_first",
    "read_site",
    "read_sites",
    "prepare_batch",
    "model_float_dtype",
]


def model_float_dtype(model: nn.Module) -> torch.dtype | None:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


def prepare_batch(batch: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    if dtype is not None and batch.is_floating_point() and batch.dtype != dtype:
        batch = batch.to(dtype)
    return batch


def read_sites(model: nn.Module, sites: Sequence[Site], batch: torch.Tensor, what: str) -> list[torch.Tensor]:
    """One forward of ``batch`` that ends once every site of ``sites`` is reached; the tensor at each."""
    modules = list(dict.fromkeys(site.module for site in sites))
    with TraceDict(
        model,
        modules,
        retain_input=any(site.needs_input for site in sites),
        retain_output=not all(site.needs_input for site in sites),
        # one module: nothing runs after its hook (the forward stops there); several: a later in-place
        # operation could change what an earlier one captured
        clone=len(modules) > 1,
        stop=True,
    ) as traces:
        model(batch)
    out = []
    for site in sites:
        trace = traces[site.module]
        if not trace.fired:
            raise SurgeryError(
                f"the key site {site} was never reached in the forward pass ({what}); is the layer "
                "part of this model's forward path?"
            )
        keys = site.read(trace)  # a "call" site computes its keys from the module's call, here
        if not isinstance(keys, torch.Tensor):
            raise SurgeryError(f"the key site {site} carries a {type(keys).__name__}, not a tensor")
        out.append(keys)
    return out


def read_site(model: nn.Module, site: Site, batch: torch.Tensor, what: str) -> torch.Tensor:
    """One forward of ``batch`` that ends at ``site`` and returns the tensor found there."""
    return read_sites(model, [site], batch, what)[0]


class UpstreamRecorder:
    """Records, during one forward, the modules that start before a layer's key site and the keys'
    dtype: what the weights fingerprint hashes (:func:`fingerprint_and_dtype`)."""

    def __init__(self, model: nn.Module, site: Site) -> None:
        self.model, self.site = model, site
        self.key_module = model.get_submodule(site.module) if site.module else model
        self.started: dict[str, nn.Module] = {}
        self.key_dtype: torch.dtype | None = None
        self._handles: list[Any] = []

    def attach(self) -> None:
        def make_hook(name: str) -> Callable[[nn.Module, Any], None]:
            # a "call" site's keys are computed by its module and its children (rerun in Site.read): they
            # count, also the key module itself; otherwise, once the keys are there (a forward that goes on
            # to a later site), nothing more does
            call = self.site.port == "call"
            inside_call = call and (not self.site.module or name == self.site.module or name.startswith(self.site.module + "."))

            def hook(module: nn.Module, args: Any) -> None:
                reached = self.key_dtype is not None and not inside_call
                if not reached and (module is not self.key_module or call) and name not in self.started:
                    self.started[name] = module

            return hook

        def record(value: Any) -> None:
            if self.key_dtype is None and isinstance(value, torch.Tensor):
                self.key_dtype = value.dtype

        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(make_hook(name)))
        if self.site.port != "output":
            self._handles.append(self.key_module.register_forward_pre_hook(lambda m, args: record(args[0] if args else None)))
        else:
            self._handles.append(self.key_module.register_forward_hook(lambda m, args, out: record(out)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> tuple[str, str]:
        """``(fingerprint, key dtype name)`` of what the recorded forward saw."""
        if self.key_dtype is None:
            raise SurgeryError(f"the key site {self.site} was never reached in the forward pass")
        started = dict(self.started)
        if self.site.port == "output":  # the module at an output site runs before its keys exist
            started.pop(self.site.module, None)
        h = hasher()
        for name in sorted(started):
            module = started[name]
            desc = f"{type(module).__module__}.{type(module).__qualname__}({module.extra_repr()})"
            h.update(f"module\0{name}\0{blank_addresses(desc)}\n".encode())
            tensors = [("param", k, v) for k, v in module._parameters.items() if v is not None]
            tensors += [("buffer", k, v) for k, v in module._buffers.items() if v is not None]
            for kind, key, t in tensors:
                t = t.detach()
                h.update(f"{kind}\0{key}\0{dtype_name(t.dtype)}\0{tuple(t.shape)}\n".encode())
                hash_tensor(h, t)
        return h.hexdigest(), dtype_name(self.key_dtype)


def fingerprint_and_dtype(
    model: nn.Module, layer: EditableLayer, example_batch: torch.Tensor
) -> tuple[str, str]:
    """The weights fingerprint of ``layer``'s upstream, and the dtype of its keys, in one forward."""
    rec = UpstreamRecorder(model, layer.key_site)
    rec.attach()
    try:
        with torch.no_grad():
            read_site(model, layer.key_site, example_batch, "fingerprint")
    finally:
        rec.detach()
    return rec.result()


def recording_first(
    batches: Iterable[torch.Tensor], recorders: UpstreamRecorder | Sequence[UpstreamRecorder]
) -> Iterator[torch.Tensor]:
    """``batches``, with the recorder(s) attached while the first one is processed."""
    recorders = [recorders] if isinstance(recorders, UpstreamRecorder) else list(recorders)
    it = iter(batches)
    for rec in recorders:
        rec.attach()
    try:
        first = next(it, None)
        if first is None:
            return
        yield first
    finally:
        for rec in recorders:
            rec.detach()
    yield from it


def weights_fingerprint(
    model: nn.Module, layer: str | EditableLayer, example_batch: torch.Tensor
) -> str:
    """SHA-256 of everything that computes ``layer``'s keys.

    One forward of ``example_batch`` (stopped at the key site) records, with forward pre-hooks, every
    module whose forward started before the key site was reached; the hash covers each one's name,
    class and ``extra_repr`` (stride, eps, ...) and the names, dtypes, shapes and bytes of the
    parameters and buffers it owns directly. Editing an earlier layer changes the fingerprint; editing
    ``layer`` itself or anything after it does not. A parent module (e.g. the model) counts as
    started, so its own parameters count even when they act after the layer (conservative).

    Args:
        model: the model, in eval mode.
        layer: the editable layer or its name.
        example_batch: images the model accepts; one image is enough (only the first is used).

    Raises:
        SurgeryError: the model is in training mode, or the key site is never reached.
    """
    require_eval(model, "collect_key_stats")
    layer = get_layer(model, layer)
    if example_batch.ndim == 3:
        example_batch = example_batch.unsqueeze(0)
    batch = prepare_batch(example_batch[:1], model_device(model), model_float_dtype(model))
    return fingerprint_and_dtype(model, layer, batch)[0]
