"""``surgery evaluate``: an edit file measured on labelled folders, in-process on timm's tiny ``test_resnet``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import surgery
from surgery.cli.args import model_transform as _transform
from surgery.cli.main import main
from surgery.identity import tensor_sha256
from surgery.inputs.folders import load_labelled_photos

MODEL = "timm:test_resnet"
LAYER = "layer2.0.conv2"
SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # timm zero-inits each block's last BN
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ckpt = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    model.eval()
    t = _transform(model, SIZE)
    rng = np.random.default_rng(0)
    for i in range(6):
        x = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        y = x.copy()
        y[20:, :] = 255  # the "concept": a white floor
        with torch.no_grad():  # label each photo with the class the model gives its original
            cls = str(int(model(t(Image.fromarray(x))[None]).argmax()))
        for folder, img, ext in (("dry", x, "png"), ("snowy", y, "jpg"), ("clean", x[:, ::-1], "png")):
            (root / folder / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(img)).save(root / folder / cls / f"p{i}.{ext}")
    ckpt_args = ["--checkpoint", str(ckpt), "--size", str(SIZE)]
    edit = root / "edit.safetensors"
    (p0,) = (root / "dry").glob("*/p0.png")
    code = main(["edit", MODEL, *ckpt_args, "--layer", LAYER, "--original", str(p0),
                 "--transformed", str(root / "snowy" / p0.parent.name / "p0.jpg"), "--data", str(root / "clean"),
                 "-o", str(edit)])
    assert code == 0
    return root, ckpt_args, edit


def test_evaluate_reports_what_the_edit_changes(setup, capsys):
    root, ckpt_args, edit = setup
    before = tensor_sha256(torch.from_numpy(np.frombuffer((root / "model.safetensors").read_bytes(), np.uint8).copy()))
    out = root / "report.json"
    code = main(["evaluate", MODEL, *ckpt_args, "--edit", str(edit), "--data", str(root / "snowy"),
                 "--originals", str(root / "dry"), "--clean", str(root / "clean"), "--alpha", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    doc = json.loads(out.read_text())
    folders = sorted((p.name for p in (root / "snowy").iterdir()), key=int)  # named by class index
    assert len(folders) > 1 and doc["alpha"] == 3.0
    assert doc["files"] == sorted(p.relative_to(root / "snowy").as_posix() for p in (root / "snowy").glob("*/*.jpg"))
    assert [g["name"] for g in doc["groups"]] == ["all", *folders]  # classes in index order
    # the same numbers from the library on the same tensors
    model = surgery.load_model(MODEL, checkpoint=str(root / "model.safetensors")).eval()
    t = _transform(model, SIZE)
    names = surgery.models.imagenet_classes()
    snowy, dry, clean = (load_labelled_photos(root / f, [names], t) for f in ("snowy", "dry", "clean"))
    e = surgery.Edit.load(edit)
    with torch.no_grad():
        p0, c0, d0 = (model(x.images).argmax(1) for x in (snowy, clean, dry))
        with surgery.edited(model, e, alpha=3.0):
            p1, c1 = (model(x.images).argmax(1) for x in (snowy, clean))
    assert doc["preds_before"] == p0.tolist() and doc["preds_after"] == p1.tolist()
    counted = d0 == dry.labels  # originals the unedited model gets right
    all_row = doc["groups"][0]
    assert all_row["n"] == int(counted.sum()) == 6  # every folder is the class the model gives the original
    assert all_row["errors_before"] == 6 and all_row["errors_after"] < 6  # the floor fools it; the edit helps
    assert all_row["errors_before"] == int(((p0 != snowy.labels) & counted).sum())
    assert all_row["errors_after"] == int(((p1 != snowy.labels) & counted).sum())
    assert doc["clean"]["acc_after"] == pytest.approx(100.0 * float((c1 == clean.labels).float().mean()))
    assert "clean accuracy (6 images)" in printed and f"wrote {out}" in printed
    assert tensor_sha256(torch.from_numpy(np.frombuffer((root / "model.safetensors").read_bytes(), np.uint8).copy())) == before


def test_evaluate_errors_name_the_problem(setup, capsys, tmp_path):
    root, ckpt_args, edit = setup
    (tmp_path / "dry" / "tench").mkdir(parents=True)
    Image.new("RGB", (48, 40)).save(tmp_path / "dry" / "tench" / "p0.png")
    base = ["evaluate", MODEL, *ckpt_args, "--edit", str(edit), "--data", str(root / "snowy")]
    cases = [
        ([*base, "--originals", str(tmp_path / "dry")], "have no original under"),
        ([*base, "--clean", str(tmp_path / "nowhere")], "--clean"),
        ([*base, "--alpha", "-1"], "--alpha must be in [0, 10], got -1"),
        (["evaluate", MODEL, "--edit", str(tmp_path / "none.safetensors"), "--data", str(root / "snowy")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_evaluate_a_strength_grid(setup, capsys, tmp_path):
    root, ckpt_args, edit = setup
    argv = ["evaluate", MODEL, *ckpt_args, "--edit", str(edit), "--data", str(root / "snowy"),
            "--originals", str(root / "dry"), "--clean", str(root / "clean")]
    assert main([*argv, "--alpha", "0,1", "--json", str(tmp_path / "grid.json")]) == 0
    printed = capsys.readouterr().out
    assert main([*argv, "--json", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    grid = json.loads((tmp_path / "grid.json").read_text())["reports"]
    one = json.loads((tmp_path / "one.json").read_text())
    assert [r["alpha"] for r in grid] == [0.0, 1.0]
    assert grid[0]["preds_after"] == grid[0]["preds_before"]  # strength 0 is no edit
    assert grid[0]["groups"][0]["pct_corrected"] == 0.0 and grid[0]["clean"]["acc_change_pp"] == 0.0
    assert grid[1]["groups"] == one["groups"] and grid[1]["preds_after"] == one["preds_after"]
    assert "strength  % corrected (all)  clean change (pp)" in printed
    assert re.search(r"\n\s+1\s+" + re.escape(f"{one['groups'][0]['pct_corrected']:.1f}"), printed)
    for bad, message in (("x", "comma-separated numbers"), ("1,11", "must be in [0, 10], got 1,11")):
        assert main([*argv, "--alpha", bad]) == 2
        assert message in capsys.readouterr().err


def test_evaluate_refuses_a_checkpoint_that_carries_the_edit(setup, capsys, tmp_path):
    """``evaluate`` applies the edit itself: a checkpoint written by ``surgery apply`` is refused before any
    photo is read, and the message says what to do (issue 27)."""
    root, ckpt_args, edit = setup
    edited_ckpt = tmp_path / "edited.safetensors"
    assert main(["apply", str(root / "model.safetensors"), str(edit), "-o", str(edited_ckpt)]) == 0
    capsys.readouterr()
    argv = ["evaluate", MODEL, "--checkpoint", str(edited_ckpt), "--size", str(SIZE), "--edit", str(edit),
            "--data", str(root / "snowy")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already carries it" in err and "strength 1" in err
    assert "pass the unedited model (its checkpoint), or revert the edit first" in err.lower()
    assert f"surgery revert CHECKPOINT {edit}" in err
