"""The ``surgery`` command: layer tables and the demo."""

from __future__ import annotations

import pytest

from surgery.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_layers_timm_resnet50(capsys):
    code, out, _ = run(capsys, "layers", "timm:resnet50", "--input-size", "64")
    assert code == 0
    row = next(l for l in out.splitlines() if l.startswith("layer4.2.conv3 "))
    assert "2048x512x1x1" in row and "1x512x2x2" in row and "+identity" in row


def test_layers_torchvision_vgg16_bn(capsys):
    code, out, _ = run(capsys, "layers", "torchvision:vgg16_bn", "--input-size", "32")
    assert code == 0
    row = next(l for l in out.splitlines() if l.startswith("features.40 "))
    assert "maxpool2d" in row and "512x512x3x3" in row


def test_layers_site_column_timm_convnext_atto(capsys):
    code, out, _ = run(capsys, "layers", "timm:convnext_atto", "--input-size", "64")
    assert code == 0
    lines = out.splitlines()
    assert "29 editable layers, 5 skip-free" in lines[0] and lines[1].split()[:3] == ["layer", "kind", "site"]
    site = {l.split()[0]: l.split()[2] for l in lines[3:]}
    assert site["stages.2.downsample.1"] == "skip-free" and site["stem.0"] == "skip-free"
    assert site["stages.2.blocks.0.mlp.fc2"] == "residual" and site["stages.2.blocks.0.mlp.fc1"] == "residual"
    code, out, _ = run(capsys, "layers", "timm:convnext_atto", "--input-size", "64", "--blocks-only")
    assert code == 0 and "12 editable layers, 0 skip-free" in out.splitlines()[0]


def test_layers_open_clip_rn50_blocks_only(capsys):
    code, out, _ = run(capsys, "layers", "open_clip:RN50", "--blocks-only")
    assert code == 0
    names = [l.split()[0] for l in out.splitlines()[3:]]
    assert len(names) == 16 and "visual.layer4.2.conv3" in names
    assert all(n.endswith("conv3") for n in names)


def test_layers_with_checkpoint(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_resnet")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    code, out, _ = run(capsys, "layers", "timm:test_resnet", "--checkpoint", str(path))
    assert code == 0 and "conv -> bn2 -> +identity" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["layers", "nosuch:resnet"], "torchvision:NAME"),
        (["layers", "timm:resnet50", "--checkpoint", "/nonexistent.pth"], "nonexistent"),
        (["layers", "timm:resnet18", "--device", "nosuchdevice"], "unknown device 'nosuchdevice'"),
    ],
)
def test_layers_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith("surgery: error:") and message in err
    assert "Traceback" not in err


def test_demo_runs_on_real_weights(capsys):
    code, out, _ = run(capsys, "demo", "--photos", "--top-k", "1")
    assert code == 0
    coffee = next(l for l in out.splitlines() if l.strip().startswith("coffee"))
    assert "espresso" in coffee
    assert "blocks.6.0.conv_pwl" in out


def test_a_reader_that_stops_early_is_not_an_error():
    """``surgery layers MODEL | head -3`` (CI's wheel smoke test, under ``set -o pipefail``): a reader that closes
    the pipe ends the command quietly with status 0. Here the reader (``true``) is gone before the first write."""
    import subprocess
    import sys

    cmd = f"set -o pipefail; {sys.executable} -m surgery layers timm:resnet18 | true"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BrokenPipeError" not in out.stderr and "Traceback" not in out.stderr
