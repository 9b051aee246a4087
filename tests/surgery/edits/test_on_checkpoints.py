"""Edits on checkpoints on disk (surgery.edits.on_checkpoints) and the inspect / apply / revert commands."""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from surgery import (
    Edit,
    EditFormatError,
    IncompatibleEditError,
    ModelLoadError,
    SurgeryError,
    SurgeryWarning,
    apply_edit,
    revert_edit,
)
from surgery.cli.edit_files import add_command
from surgery.edits.on_checkpoints import apply_to_checkpoint, inspect_edit, revert_from_checkpoint
from surgery.identity import architecture_id, tensor_sha256
from surgery.models.checkpoints import read_checkpoint
from tests.strategies import ModelRecipe

RECIPE = ModelRecipe((3, 4, 5), (3, 1), (True, False), (True, True), 3, torch.float32, 11)
OTHER_WEIGHTS = ModelRecipe((3, 4, 5), (3, 1), (True, False), (True, True), 3, torch.float32, 12)


def _factored(model: nn.Module, layer: str, seed: int, scale: float = 0.3) -> Edit:
    w = model.get_parameter(f"{layer}.weight")
    g = torch.Generator().manual_seed(seed)
    m, n, *k = w.shape
    return Edit(
        layer=layer,
        method="rewrite",
        hparams={"solver": "fast", "rank": 2},
        lam=scale * torch.randn(2, m, *k, generator=g),
        u=torch.nn.functional.normalize(torch.randn(2, n, generator=g), dim=1),
        architecture=architecture_id(model),
        description="a test edit",
        info={"objective": 0.25, "objective_before": 1.0},
    ).made_on({f"{layer}.weight": w})


def _dense(model: nn.Module, layer: str, seed: int) -> Edit:
    names = [f"{layer}.weight", f"{layer}.bias"]
    g = torch.Generator().manual_seed(seed)
    params = {p: model.get_parameter(p) for p in names}
    return Edit(
        layer=layer,
        method="finetune",
        deltas={p: 0.01 * torch.randn(v.shape, generator=g) for p, v in params.items()},
        architecture=architecture_id(model),
    ).made_on(params)


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(state: dict) -> dict[str, str]:
    return {k: tensor_sha256(v) for k, v in state.items()}


@pytest.fixture
def setup(tmp_path: Path):
    """A model, its checkpoint in both formats, and three edit files (two on one layer, one dense)."""
    model = RECIPE.build()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"producer": "test", "epoch": "3"})
    torch.save(sd, tmp_path / "model.pth")
    edits = [_factored(model, "0", 1), _factored(model, "0", 2), _dense(model, "7", 3)]
    paths = []
    for i, e in enumerate(edits):
        paths.append(tmp_path / f"edit{i}.safetensors")
        e.save(paths[-1])
    return model, sd, paths


def _in_memory(sd: dict, edits: list[Path], alpha: float = 1.0) -> nn.Module:
    model = RECIPE.build()
    model.load_state_dict(sd)
    for e in edits:
        apply_edit(model, e, alpha=alpha)
    return model


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_apply_and_revert_on_a_checkpoint_match_the_in_memory_results(setup, tmp_path: Path, suffix: str) -> None:
    _, sd, paths = setup
    ckpt = tmp_path / f"model{suffix}"
    before = _file_sha(ckpt)
    out = tmp_path / "out" / f"edited{suffix}"

    changed = apply_to_checkpoint(ckpt, paths, out, alpha=0.7)
    assert sorted(changed) == ["0.weight", "7.bias", "7.weight"]
    edited = read_checkpoint(out)
    assert _hashes(edited) == _hashes(_in_memory(sd, paths, alpha=0.7).state_dict())
    assert _file_sha(ckpt) == before
    if suffix == ".safetensors":
        with safe_open(str(out), framework="pt") as f:
            assert f.metadata() == {"producer": "test", "epoch": "3"}
    else:
        plain = torch.load(out, weights_only=True)
        assert type(plain) is dict and plain.keys() == sd.keys()

    # Revert in another order than applied, each time from the previous output, as another process would.
    current = out
    for k, i in enumerate((1, 2, 0)):
        reverted = tmp_path / f"reverted{k}{suffix}"
        exact = revert_from_checkpoint(current, paths[i], reverted, alpha=0.7)
        model = RECIPE.build()
        model.load_state_dict(read_checkpoint(current))
        assert exact == revert_edit(model, paths[i], alpha=0.7)
        assert _hashes(read_checkpoint(reverted)) == _hashes(model.state_dict())
        current = reverted
    final = read_checkpoint(current)
    for name, w0 in sd.items():
        fi = torch.finfo(w0.dtype) if w0.is_floating_point() else None
        tol = 0 if fi is None else 8 * fi.eps * (w0.abs().max() + 1)
        assert (final[name].double() - w0.double()).abs().max() <= tol, name


def test_apply_to_checkpoint_accepts_edit_objects_and_keeps_prefixes_out(tmp_path: Path) -> None:
    model = RECIPE.build()
    sd = model.state_dict()
    ckpt = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, ckpt)
    edit = _factored(model, "3", 4)
    out = tmp_path / "edited.pth"
    assert apply_to_checkpoint(ckpt, edit, out) == ["3.weight"]
    plain = torch.load(out, weights_only=True)
    assert plain.keys() == sd.keys()
    assert _hashes(plain) == _hashes(_in_memory(sd, [edit]).state_dict())


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("problem", ["shape", "missing tensor", "corrupted file", "overflow", "dtype"])
def test_a_bad_edit_writes_nothing_and_leaves_the_input_untouched(
    setup, tmp_path: Path, suffix: str, problem: str
) -> None:
    model, _, paths = setup
    ckpt = tmp_path / f"model{suffix}"
    bad = tmp_path / "bad.safetensors"
    if problem == "shape":
        other = ModelRecipe((3, 4, 5), (1, 1), (True, False), (True, True), 3, torch.float32, 11).build()
        _factored(other, "0", 5).save(bad)
        error, match = IncompatibleEditError, "has shape"
    elif problem == "missing tensor":
        bigger = ModelRecipe(
            (3, 4, 5, 6), (3, 1, 1), (True, False, False), (True, True, True), 3, torch.float32, 1
        ).build()
        _factored(bigger, "5", 5).save(bad)  # the checkpoint has no 5.weight
        error, match = IncompatibleEditError, "no tensor '5.weight'"
    elif problem == "corrupted file":
        data = bytearray(paths[0].read_bytes())
        data[-3] ^= 0x40
        bad.write_bytes(bytes(data))
        error, match = EditFormatError, "checksum"
    elif problem == "overflow":
        edit = _factored(model, "0", 5)
        edit.lam, edit.u = edit.lam.double() * 1e40, edit.u.double()
        edit.save(bad)
        error, match = SurgeryError, "non-finite"
    else:
        _factored(RECIPE.build().double(), "0", 5).save(bad)
        error, match = IncompatibleEditError, "float64 weights"
    before, listing = _file_sha(ckpt), _listing(tmp_path)
    out = tmp_path / "out" / f"edited{suffix}"
    with pytest.raises(error, match=match):
        apply_to_checkpoint(ckpt, [paths[0], paths[2], bad], out)  # the bad one last: still nothing written
    with pytest.raises(error if problem != "corrupted file" else EditFormatError):
        revert_from_checkpoint(ckpt, bad, out)
    assert not out.exists() and _listing(tmp_path) == listing and _file_sha(ckpt) == before


def test_a_checkpoint_with_other_weights_warns_and_is_refused_under_strict(setup, tmp_path: Path) -> None:
    _, _, paths = setup
    ckpt = tmp_path / "other.safetensors"
    save_file(OTHER_WEIGHTS.build().state_dict(), str(ckpt))
    out = tmp_path / "edited.safetensors"
    with pytest.raises(IncompatibleEditError, match="differs from the weights the edit was made on"):
        apply_to_checkpoint(ckpt, paths[0], out, strict=True)
    assert not out.exists()
    with pytest.warns(SurgeryWarning, match="differs from the weights the edit was made on"):
        apply_to_checkpoint(ckpt, paths[0], out)
    assert out.exists()
    with pytest.warns(SurgeryWarning) as caught:
        apply_to_checkpoint(ckpt, [paths[2], paths[2]], out, overwrite=True)
    assert any("given twice" in str(w.message) for w in caught)


def test_a_pickled_object_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    ckpt = tmp_path / "evil.pth"
    torch.save({"0.weight": torch.zeros(4, 3, 3, 3), "payload": Payload()}, ckpt)
    edit = _factored(RECIPE.build(), "0", 1)
    out = tmp_path / "edited.pth"
    with pytest.raises(ModelLoadError, match="pickled"):
        apply_to_checkpoint(ckpt, edit, out)
    with pytest.raises(ModelLoadError, match="pickled"):
        revert_from_checkpoint(ckpt, edit, out)
    assert not marker.exists() and not out.exists()


def test_the_output_must_differ_from_the_input_unless_overwrite(setup, tmp_path: Path) -> None:
    _, sd, paths = setup
    ckpt = tmp_path / "model.safetensors"
    before = _file_sha(ckpt)
    for target in (ckpt, tmp_path / "." / "model.safetensors"):
        with pytest.raises(SurgeryError, match="overwrite"):
            apply_to_checkpoint(ckpt, paths[0], target)
    assert _file_sha(ckpt) == before
    apply_to_checkpoint(ckpt, paths[0], ckpt, overwrite=True)
    assert _hashes(read_checkpoint(ckpt)) == _hashes(_in_memory(sd, paths[:1]).state_dict())
    with pytest.raises(SurgeryError, match="same format"):
        apply_to_checkpoint(ckpt, paths[0], tmp_path / "out.pth")
    with pytest.raises(SurgeryError, match="finite"):
        apply_to_checkpoint(ckpt, paths[0], tmp_path / "out.safetensors", alpha=float("nan"))


def test_inspect_edit_summarizes_the_file(setup) -> None:
    _, _, paths = setup
    text = inspect_edit(paths[0])
    for needle in (
        "layer:         0",
        "rewrite (factored, rank 2)",
        "lambda:",
        "2x4x3x3",
        "u:",
        "2x3",
        "0.weight 4x3x3x3 float32",
        "a test edit",
        "model-surgery/edit version 2",
            "revert check:  the original weights along the edit are recorded",
        '"solver": "fast"',
    ):
        assert needle in text, needle
    assert "row norms" in text and "the dense update it encodes is 432 bytes" in text
    dense = inspect_edit(paths[2])
    assert "finetune (dense)" in dense and "7.bias" in dense and "7.weight 3x5 float32" in dense


# --------------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    """Like ``surgery.cli.main``, on a parser with only these commands."""
    from surgery.cli.main import one_line

    parser = argparse.ArgumentParser(prog="surgery")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SurgeryError as e:
        print(f"surgery: error: {one_line(str(e))}", file=sys.stderr)
        return 2


def test_cli_inspect_apply_revert(setup, tmp_path: Path, capsys) -> None:
    _, sd, paths = setup
    assert _run(["inspect", str(paths[0])]) == 0
    assert "rank 2" in capsys.readouterr().out

    ckpt, out, back = tmp_path / "model.pth", tmp_path / "edited.pth", tmp_path / "back.pth"
    assert _run(["apply", str(ckpt), str(paths[0]), str(paths[2]), "-o", str(out), "--alpha", "0.5"]) == 0
    assert "applied 2 edit(s) (alpha=0.5)" in capsys.readouterr().out
    assert _hashes(read_checkpoint(out)) == _hashes(_in_memory(sd, [paths[0], paths[2]], alpha=0.5).state_dict())

    assert _run(["revert", str(out), str(paths[2]), "-o", str(back), "--alpha", "0.5"]) == 0
    assert "reverted" in capsys.readouterr().out and back.exists()


def test_cli_errors_and_warnings(setup, tmp_path: Path, capsys) -> None:
    _, _, paths = setup
    ckpt = tmp_path / "model.safetensors"
    assert _run(["apply", str(ckpt), str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgery: error: ") and "does not exist" in err
    assert _run(["apply", str(ckpt), str(paths[0]), "-o", str(ckpt)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    other = tmp_path / "other.safetensors"
    save_file(OTHER_WEIGHTS.build().state_dict(), str(other))
    assert _run(["apply", str(other), str(paths[0]), "-o", str(tmp_path / "o.safetensors")]) == 0
    assert "surgery: warning: '0.weight'" in capsys.readouterr().err
    assert _run(["apply", str(other), str(paths[0]), "-o", str(tmp_path / "s.safetensors"), "--strict"]) == 2
    assert "strict" in capsys.readouterr().err and not (tmp_path / "s.safetensors").exists()
    with pytest.raises(SystemExit):
        _run(["apply", str(ckpt), str(paths[0]), "-o", "x.safetensors", "--alpha", "inf"])
