"""The ``surgery stats`` and ``surgery edit`` commands, run in-process on timm's tiny ``test_resnet``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from surgery.cli.main import main
from surgery.edits.edit import Edit
from surgery.stats.keystats import KeyStats

MODEL = "timm:test_resnet"
LAYER = "layer2.0.conv2"  # BasicBlock conv2: conv -> bn2 -> +identity -> relu; keys 48 x 4 x 4 at 32 px
SIZE = "32"
POSITIONS = 16  # key positions per image at 32 px


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint (BN weights re-randomized: timm zero-inits each block's last BN, which would make
    every edit of conv2 a no-op), a folder of 8 random images (some in a subfolder), exemplars, a mask
    and key statistics."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cli_engine")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ckpt = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))

    rng = np.random.default_rng(0)
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    for i in range(8):
        folder = data / "sub" if i % 2 else data
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    exemplars = []
    for i in range(2):
        x = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        y = x.copy()
        y[8:32, 8:40] = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # the "transformed concept"
        Image.fromarray(x).save(root / f"x{i}.png")
        Image.fromarray(y).save(root / f"y{i}.png")
        exemplars.append((str(root / f"x{i}.png"), str(root / f"y{i}.png")))
    mask = np.zeros((40, 48), np.uint8)
    mask[8:32, 8:40] = 255
    Image.fromarray(mask).save(root / "m.png")

    stats = root / "stats.safetensors"
    code = main(
        ["stats", MODEL, "--checkpoint", str(ckpt), "--layer", LAYER, "--data", str(data),
         "--size", SIZE, "-o", str(stats)]
    )
    assert code == 0
    return {
        "root": root, "ckpt": str(ckpt), "data": str(data), "stats": str(stats),
        "x": [e[0] for e in exemplars], "y": [e[1] for e in exemplars], "mask": str(root / "m.png"),
    }


def base(files, command: str) -> list[str]:
    return [command, MODEL, "--checkpoint", files["ckpt"], "--layer", LAYER, "--size", SIZE]


def objectives(out: str) -> tuple[float, float]:
    m = re.search(r"objective: (\S+) -> (\S+)", out)
    assert m, out
    return float(m.group(1)), float(m.group(2))


def check_edit_file(path, layer: str = LAYER) -> Edit:
    edit = Edit.load(path)
    assert edit.layer == layer and edit.factored
    assert torch.isfinite(edit.lam).all() and torch.isfinite(edit.u).all()
    assert float(edit.lam.abs().max()) > 0
    return edit


# ------------------------------------------------------------------------------------------ stats


def test_stats_writes_keystats(files, tmp_path, capsys):
    out_path = tmp_path / "nested" / "s.safetensors"
    code, out, _ = run(capsys, *base(files, "stats"), "--data", files["data"], "-o", str(out_path))
    assert code == 0
    stats = KeyStats.load(out_path)
    assert stats.layer == LAYER and stats.n == 48 and stats.count == 8 * POSITIONS
    assert out.count("\n") == 1
    assert f"{LAYER}: 8 images, {8 * POSITIONS} key vectors, n=48" in out
    # the module fixture's file (same checkpoint, data and preprocessing) holds the same statistics
    assert torch.equal(stats.sum, KeyStats.load(files["stats"]).sum)


def test_stats_max_images_and_batch_size(files, tmp_path, capsys):
    out_path = tmp_path / "s3.safetensors"
    code, out, _ = run(
        capsys, *base(files, "stats"), "--data", files["data"], "--max-images", "3", "--batch-size", "2",
        "-o", str(out_path),
    )
    assert code == 0 and "3 images" in out
    stats = KeyStats.load(out_path)
    assert stats.count == 3 * POSITIONS and stats.max_images == 3


def test_stats_models_own_preprocessing(files, tmp_path, capsys):
    # no --size: timm's eval transform for test_resnet (160 px) -> 20 x 20 keys (stride 8)
    out_path = tmp_path / "s.safetensors"
    code, _, _ = run(
        capsys, "stats", MODEL, "--checkpoint", files["ckpt"], "--layer", LAYER, "--data", files["data"],
        "--max-images", "2", "-o", str(out_path),
    )
    assert code == 0
    assert KeyStats.load(out_path).count == 2 * 20 * 20


# ------------------------------------------------------------------------------------------- edit


def test_edit_with_stats_file(files, tmp_path, capsys):
    out_path = tmp_path / "edit.safetensors"
    code, out, err = run(
        capsys, *base(files, "edit"), "--original", *files["x"], "--transformed", *files["y"],
        "--stats", files["stats"], "--description", "noise patch -> clean", "-o", str(out_path),
    )
    assert code == 0, err
    before, after = objectives(out)
    assert after < before
    assert "||lam|| =" in out and "solver" in out and str(out_path) in out
    assert "differ" not in err  # the statistics match the checkpoint's weights
    edit = check_edit_file(out_path)
    assert edit.description == "noise patch -> clean"
    assert edit.hparams["solver"] == "fast" and edit.hparams["ntrain"] == 2


def test_edit_with_data_and_mask(files, tmp_path, capsys):
    out_path = tmp_path / "edit.safetensors"
    code, out, err = run(
        capsys, *base(files, "edit"), "--original", files["x"][0], "--transformed", files["y"][0],
        "--mask", files["mask"], "--use-mask", "--loss", "l2", "--ridge", "1e-3",
        "--data", files["data"], "--max-images", "6", "-o", str(out_path),
    )
    assert code == 0, err
    assert f"key statistics from 6 images, {6 * POSITIONS} key vectors" in out
    before, after = objectives(out)
    assert after < before
    edit = check_edit_file(out_path)
    assert edit.hparams["use_mask"] is True and edit.hparams["loss"] == "l2"
    assert edit.hparams["ridge"] == pytest.approx(1e-3)


def test_edit_reference_solver(files, tmp_path, capsys):
    out_path = tmp_path / "edit.safetensors"
    code, out, err = run(
        capsys, *base(files, "edit"), "--original", files["x"][0], "--transformed", files["y"][0],
        "--stats", files["stats"], "--solver", "reference", "--steps", "30", "--lr", "1e-3",
        "--device", "cpu", "-o", str(out_path),
    )
    assert code == 0, err
    before, after = objectives(out)
    assert after < before
    edit = check_edit_file(out_path)
    assert edit.hparams["solver"] == "reference" and edit.hparams["steps"] == 30


def test_masks_follow_the_image_crop(tmp_path):
    """A mask goes through the same resize and center crop as its image, without normalization."""
    from torchvision import transforms as T

    from surgery.cli.edit import masks_for_inputs
    from surgery.inputs.preprocess import Preprocess

    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    mask = np.zeros((40, 60), np.uint8)
    mask[:, :30] = 255  # left half
    Image.fromarray(mask).save(tmp_path / "m.png")
    # a model without preprocessing config: ImageNet's, resize to 32 / 0.875 = 36, crop 32
    got = masks_for_inputs([str(tmp_path / "m.png")], [str(image)], Preprocess.from_model(torch.nn.Linear(2, 2)), 32)
    geometry = T.Compose([T.Resize(36, antialias=True), T.CenterCrop(32), T.ToTensor()])
    expected = geometry(Image.fromarray(mask))
    assert got.shape == (1, 1, 32, 32)
    assert torch.allclose(got[0], expected, atol=2 / 255)
    assert float(got[0, 0, :, :10].min()) == pytest.approx(1.0, abs=1e-3)  # 60 -> 54 wide, crop 11 each side


# ----------------------------------------------------------------------------------------- errors


def test_edit_needs_exactly_one_of_stats_and_data(files, capsys):
    argv = [*base(files, "edit"), "--original", files["x"][0], "--transformed", files["y"][0], "-o", "e.st"]
    err = usage_error(capsys, *argv)
    assert "--stats" in err and "--data" in err
    err = usage_error(capsys, *argv, "--stats", files["stats"], "--data", files["data"])
    assert "not allowed with" in err


@pytest.mark.parametrize("command", ["stats", "edit"])
def test_unknown_layer_names_close_matches(files, tmp_path, capsys, command):
    argv = ["--data", files["data"], "-o", str(tmp_path / "out")]
    if command == "edit":
        argv += ["--original", files["x"][0], "--transformed", files["y"][0]]
    argv = [command, MODEL, "--checkpoint", files["ckpt"], "--layer", "layer2.0.conv9", "--size", SIZE, *argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgery: error:")
    assert "layer2.0.conv9" in lines[0] and "layer2.0.conv2" in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_image_file(files, tmp_path, capsys):
    missing = str(tmp_path / "nope.png")
    code, _, err = run(
        capsys, *base(files, "edit"), "--original", missing, "--transformed", files["y"][0],
        "--stats", files["stats"], "-o", str(tmp_path / "e.safetensors"),
    )
    assert code == 2 and err.startswith("surgery: error:") and "nope.png" in err
    assert len(err.strip().splitlines()) == 1


def test_mismatched_exemplar_counts(files, tmp_path, capsys):
    code, _, err = run(
        capsys, *base(files, "edit"), "--original", *files["x"], "--transformed", files["y"][0],
        "--stats", files["stats"], "-o", str(tmp_path / "e.safetensors"),
    )
    assert code == 2 and "2 --original image(s) but 1 --transformed" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--mask", "M", "M"], "2 --mask file(s) for 1 exemplar"),
        (["--use-mask"], "--use-mask needs masks"),
        (["--lr", "1e-3"], "lr is not an option of the fast solver"),
    ],
)
def test_edit_option_errors(files, tmp_path, capsys, extra, message):
    extra = [files["mask"] if a == "M" else a for a in extra]
    code, _, err = run(
        capsys, *base(files, "edit"), "--original", files["x"][0], "--transformed", files["y"][0],
        "--stats", files["stats"], *extra, "-o", str(tmp_path / "e.safetensors"),
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_stats_of_another_layer(files, tmp_path, capsys):
    code, _, err = run(
        capsys, "edit", MODEL, "--checkpoint", files["ckpt"], "--layer", "layer1.0.conv2", "--size", SIZE,
        "--original", files["x"][0], "--transformed", files["y"][0], "--stats", files["stats"],
        "-o", str(tmp_path / "e.safetensors"),
    )
    assert code == 2 and LAYER in err and "surgery stats" in err


def test_missing_data_folder_and_stats_file(files, tmp_path, capsys):
    code, _, err = run(
        capsys, *base(files, "stats"), "--data", str(tmp_path / "nodir"), "-o", str(tmp_path / "s")
    )
    assert code == 2 and "nodir" in err
    code, _, err = run(
        capsys, *base(files, "edit"), "--original", files["x"][0], "--transformed", files["y"][0],
        "--stats", str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "e"),
    )
    assert code == 2 and "none.safetensors" in err


@pytest.mark.parametrize("device", ["cuda", "nosuchdevice"])
def test_unusable_device(files, tmp_path, capsys, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run(
        capsys, *base(files, "stats"), "--data", files["data"], "--device", device, "-o", str(tmp_path / "s")
    )
    assert code == 2 and device in err and len(err.strip().splitlines()) == 1


def test_bad_numbers_are_usage_errors(files, capsys):
    err = usage_error(capsys, *base(files, "stats"), "--data", files["data"], "--max-images", "0", "-o", "s")
    assert "--max-images" in err and "positive" in err


def test_size_keeps_the_models_normalization():
    """--size changes the crop only: a model normalized with mean = std = 0.5 keeps that normalization."""
    from surgery.cli.args import model_transform as _transform

    model = torch.nn.Linear(2, 2)
    model.data_config = {"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    white = Image.new("RGB", (50, 40), (255, 255, 255))
    x = _transform(model, 32)(white)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5; ImageNet's: 2.2
    assert _transform(model, None)(white).shape == (3, 224, 224)


def test_edit_of_a_span_writes_one_file_with_every_layer(files, tmp_path, capsys):
    """``--layer`` twice: one span edit (conv1 and conv2 of one BasicBlock: values of one shape), key
    statistics for both from the same folder, one file that inspect and apply/revert handle as a whole."""
    out_path = tmp_path / "span.safetensors"
    first = "layer2.0.conv1"
    code, out, err = run(
        capsys, "edit", MODEL, "--checkpoint", files["ckpt"], "--layer", first, "--layer", LAYER, "--size", SIZE,
        "--original", *files["x"], "--transformed", *files["y"], "--data", files["data"], "--max-images", "6",
        "-o", str(out_path),
    )
    assert code == 0, err
    assert f"objective of {first}:" in out and f"objective of {LAYER}:" in out and f"mean |gap| at {LAYER}" in out
    edit = Edit.load(out_path)
    assert edit.layers == [first, LAYER] and edit.hparams["span"] == [first, LAYER]
    code, out, err = run(capsys, "inspect", str(out_path))
    assert code == 0, err
    assert f"layers:        {first}, {LAYER} (a span edit)" in out and "version 3" in out
    edited_ckpt = tmp_path / "edited.safetensors"
    code, _, err = run(capsys, "apply", files["ckpt"], str(out_path), "-o", str(edited_ckpt))
    assert code == 0, err
    back = tmp_path / "back.safetensors"
    code, _, err = run(capsys, "revert", str(edited_ckpt), str(out_path), "-o", str(back))
    assert code == 0, err
    from safetensors.torch import load_file

    original, edited_w, reverted = load_file(files["ckpt"]), load_file(str(edited_ckpt)), load_file(str(back))
    for name in (f"{first}.weight", f"{LAYER}.weight"):
        assert not torch.equal(edited_w[name], original[name])
        torch.testing.assert_close(reverted[name], original[name], rtol=0, atol=1e-6)


def test_a_span_needs_one_stats_file_per_layer(files, tmp_path, capsys):
    code, _, err = run(
        capsys, "edit", MODEL, "--checkpoint", files["ckpt"], "--layer", "layer2.0.conv1", "--layer", LAYER,
        "--original", files["x"][0], "--transformed", files["y"][0], "--stats", files["stats"],
        "-o", str(tmp_path / "e.safetensors"),
    )
    assert code == 2 and "1 --stats file(s) for 2 --layer(s)" in err


# ------------------------------------------------------------------------------ layers, measured


def test_layers_ranks_candidates_on_exemplars(files, capsys):
    """``surgery layers`` with exemplars prints the measured ranking: the same ratios as ``rank_layers`` on
    the same images (the command's crop, the folder's key statistics), best first."""
    from torch.utils.data import Subset

    from surgery.cli.args import model_transform
    from surgery.evaluation.layer_ranking import rank_layers
    from surgery.inputs.images import ImageFolder, load_images
    from surgery.models.loading import load_model

    code, out, err = run(
        capsys, "layers", MODEL, "--checkpoint", files["ckpt"], "--input-size", SIZE, "--original", *files["x"],
        "--transformed", *files["y"], "--data", files["data"], "--max-images", "6",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert "6 candidate layers measured on 2 exemplar(s); key statistics from 6 images" in lines[0]  # all of them
    assert lines[1].split()[:3] == ["rank", "layer", "site"]
    printed = [(l.split()[1], float(l.split()[3])) for l in lines[3:9]]
    model = load_model(MODEL, checkpoint=files["ckpt"])
    transform = model_transform(model, int(SIZE))
    data = Subset(ImageFolder(files["data"], transform), range(6))
    expected = rank_layers(model, load_images(files["x"], transform), load_images(files["y"], transform), data=data,
                           layers=[name for name, _ in printed])
    assert printed == [(layer.name, round(ratio, 3)) for layer, ratio in expected]
    assert [r for _, r in printed] == sorted(r for _, r in printed) and printed[0][1] < 1.0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--original", "X"], "both --original and --transformed"),
        (["--original", "X", "--transformed", "Y", "Y"], "1 --original image(s) but 2 --transformed"),
        (["--data", "D"], "--mask and --data rank layers on exemplars"),
        (["--original", "X", "--transformed", "Y", "--blocks-only"], "--blocks-only"),
    ],
)
def test_layers_ranking_errors(files, capsys, extra, message):
    extra = [{"X": files["x"][0], "Y": files["y"][0], "D": files["data"]}.get(a, a) for a in extra]
    code, _, err = run(capsys, "layers", MODEL, "--checkpoint", files["ckpt"], *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
