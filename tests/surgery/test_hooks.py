"""trace / trace_dict: capture by name, stop early, and never leave a hook behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery import LayerNotFoundError, SurgeryError
from surgery.hooks import Trace, TraceDict


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=True)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)
        self.raise_in_b = False
        self.interrupt_in_b = False

    def forward(self, x):
        x = self.relu(self.a(x))
        x = self.b(x)
        if self.raise_in_b:
            raise ValueError("boom")
        if self.interrupt_in_b:
            raise KeyboardInterrupt
        x += 1.0  # in place, after b: a traced reference to b's output would change
        return self.c(x)


@pytest.fixture
def net() -> Net:
    return Net().eval()


def test_trace_captures_input_and_output(net):
    x = torch.randn(3, 4)
    with torch.no_grad(), Trace(net, "b", retain_input=True) as t:
        net(x)
    h = torch.relu(net.a(x))
    torch.testing.assert_close(t.input, h)
    torch.testing.assert_close(t.output, net.b(h))
    assert t.fired == 1


def test_clone_protects_from_later_inplace_ops(net):
    x = torch.randn(3, 4)
    with torch.no_grad():
        with Trace(net, "b") as kept:
            net(x)
        with Trace(net, "b", clone=False) as shared:
            net(x)
        expected = net.b(torch.relu(net.a(x)))
    torch.testing.assert_close(kept.output, expected)
    torch.testing.assert_close(shared.output, expected + 1.0)  # the forward's += reached it


def test_detach_false_keeps_graph(net):
    x = torch.randn(3, 4)
    with Trace(net, "b", detach=False, clone=False) as t:
        net(x)
    assert t.output.requires_grad and t.output.grad_fn is not None
    with Trace(net, "b") as t2:
        net(x)
    assert not t2.output.requires_grad


def test_stop_skips_later_modules(net):
    fired = []
    handle = net.c.register_forward_hook(lambda *a: fired.append("c"))
    try:
        with Trace(net, "b", stop=True) as t:
            result = net(torch.randn(2, 4))
            pytest.fail("the forward should not return")  # pragma: no cover
        assert "result" not in locals()
    finally:
        handle.remove()
    assert fired == []
    assert t.output is not None and t.fired == 1
    assert _hook_count(net) == 0


def test_stop_with_input_only_stops_before_the_module(net):
    calls = []
    handle = net.b.register_forward_hook(lambda *a: calls.append("b"))
    try:
        with Trace(net, "b", retain_input=True, retain_output=False, stop=True) as t:
            net(torch.randn(2, 4))
    finally:
        handle.remove()
    assert calls == [] and t.input.shape == (2, 4) and t.output is None


def test_trace_dict_stops_after_all_fired(net):
    later = []
    handle = net.c.register_forward_hook(lambda *a: later.append(1))
    try:
        with TraceDict(net, ["b", "a"], stop=True) as td:
            net(torch.randn(2, 4))
    finally:
        handle.remove()
    assert later == []
    assert td["a"].output.shape == (2, 4) and td["b"].output.shape == (2, 4)
    assert list(td) == ["b", "a"]


def test_nested_traces_swallow_only_their_own_stop(net):
    with Trace(net, "c") as outer:
        with Trace(net, "a", stop=True) as inner:
            net(torch.randn(2, 4))
        assert inner.fired == 1 and outer.fired == 0
        net(torch.randn(2, 4))
    assert outer.fired == 1
    assert _hook_count(net) == 0


def test_inner_stop_from_outer_propagates_to_outer(net):
    with Trace(net, "a", stop=True) as outer:
        with Trace(net, "c") as inner:
            net(torch.randn(2, 4))
    assert outer.fired == 1 and inner.fired == 0
    assert _hook_count(net) == 0


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("path", ["normal", "exception", "stop", "interrupt"])
def test_no_hook_survives_any_exit_path(net, path, multi):
    assert _hook_count(net) == 0
    net.raise_in_b = path == "exception"
    net.interrupt_in_b = path == "interrupt"
    kwargs = dict(retain_input=True, stop=path == "stop")
    ctx = TraceDict(net, ["a", "b"], **kwargs) if multi else Trace(net, "b", **kwargs)
    expected = {"exception": ValueError, "interrupt": KeyboardInterrupt}.get(path)
    if expected:
        with pytest.raises(expected):
            with ctx:
                net(torch.randn(2, 4))
    else:
        with ctx:
            net(torch.randn(2, 4))
    assert _hook_count(net) == 0
    assert not ctx.active


def test_close_without_with(net):
    t = Trace(net, "a")
    assert _hook_count(net) == 1
    net(torch.randn(1, 4))
    t.close()
    t.close()
    assert _hook_count(net) == 0 and t.fired == 1


def test_unknown_name_is_a_clear_error_and_adds_no_hook(net):
    with pytest.raises(LayerNotFoundError, match="no module named 'bb'"):
        Trace(net, "bb")
    with pytest.raises(LayerNotFoundError):
        TraceDict(net, ["a", "nope"])
    assert _hook_count(net) == 0
    with pytest.raises(SurgeryError):
        TraceDict(net, [])


def test_reused_module_keeps_last_call():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)
    x = torch.randn(2, 3)
    with torch.no_grad(), Trace(model, "1") as t:
        out = model(x)
    assert t.fired == 2
    torch.testing.assert_close(t.output, out)


def test_tuple_outputs_and_kwargs_are_captured():
    class Pair(nn.Module):
        def forward(self, x, *, scale=1.0):
            return x * scale, x + scale

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(x, scale=2.0)
            a.add_(100)  # in place after capture
            return a + b

    model = Outer()
    x = torch.ones(2)
    with Trace(model, "pair", retain_input=True) as t:
        model(x)
    assert isinstance(t.output, tuple)
    torch.testing.assert_close(t.output[0], 2 * x)
    assert t.kwargs == {"scale": 2.0}
    torch.testing.assert_close(t.input, x)
