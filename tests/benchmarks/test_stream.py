"""benchmarks.efficacy.stream: the change a concept leaves along the network after one edit."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.efficacy.stream import change_left, figure, markdown, stream_layers
from surgery import collect_key_stats, editable_layers, rewrite
from surgery.testbed.models import ARCHS, build_model


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_layers_are_the_blocks_in_forward_order(arch):
    model = build_model(arch).eval()
    stream = stream_layers(model, arch)
    order = [layer.name for layer in editable_layers(model)]
    assert len(stream) >= 4 and stream == [n for n in order if n in stream]
    assert not any(n.endswith(("fc1", "qkv")) or n.startswith(("head", "fc", "classifier")) for n in stream)
    if arch == "convnext":
        assert {"stages.2.downsample.1", "stages.3.blocks.1.mlp.fc2"} <= set(stream)


def test_change_left_is_one_below_the_edit_and_drops_at_it(tmp_path):
    torch.manual_seed(0)
    model = build_model("convnext").eval()
    x0 = torch.randn(24, 3, 80, 80)
    x1 = x0.clone()
    x1[:, :, 40:] += 1.0  # the same change in every scene's lower half
    layer = "stages.2.downsample.1"
    edit = rewrite(model, layer, x0[:8], x1[:8], stats=collect_key_stats(model, layer, x0, progress=False))
    stream = stream_layers(model, "convnext")
    left = change_left(model, stream, edit, x0[8:], x1[8:])
    at = stream.index(layer)
    assert len(left) == len(stream) + 1  # and the logits
    assert all(v == 1.0 for v in left[:at])  # nothing below the edited site moves
    assert left[at] < 0.9  # the skip-free site removes part of the change on held-out scenes
    out = {
        "command": "test", "seconds": 1.0,
        "archs": {"convnext": {"stream": [*stream, "logits"], "kinds": ["residual"] * len(stream) + ["logits"],
                               "rows": [{"pair": "a/b", "candidate": layer, "left": left}]}},
    }
    text = markdown(json.loads(json.dumps(out)))
    assert f"| convnext | `{layer}` |" in text
    figure(out, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
