"""Nothing lost, nothing runaway (issue 14): inputs never overwritten, bounded memory, atomic writes,
reverts that know what they revert, edits that touch only what they may."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from surgery import (
    Edit,
    IncompatibleEditError,
    SurgeryError,
    SurgeryWarning,
    apply_edit,
    collect_key_stats,
    edited,
    revert_edit,
    rewrite,
)
from surgery._files import atomic_write, refuse_overwrite, remove_stale_temporaries
from surgery.cli.args import warnings_on_stderr as _warnings_on_stderr
from surgery.cli.main import main
from surgery.edits.on_checkpoints import apply_to_checkpoint, revert_from_checkpoint
from surgery.identity import architecture_id, tensor_sha256
from surgery.testbed import Testbed, TestbedConfig
from surgery.testbed.train import load_trained, normalize
from tests.strategies import ModelRecipe

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ModelRecipe((3, 6, 8), (3, 1), (True, False), (True, True), 3, torch.float32, 5)
SURGERY = [sys.executable, "-m", "surgery"]


def _factored(model: nn.Module, layer: str = "0", seed: int = 0, scale: float = 0.2) -> Edit:
    w = model.get_parameter(f"{layer}.weight")
    g = torch.Generator().manual_seed(seed)
    m, n, *k = w.shape
    u = torch.nn.functional.normalize(torch.randn(1, n, generator=g), dim=1)
    lam = scale * float(w.norm()) / (m * max(1, int(np.prod(k)))) ** 0.5 * torch.randn(1, m, *k, generator=g)
    edit = Edit(layer=layer, method="rewrite", lam=lam, u=u, architecture=architecture_id(model))
    return edit.made_on({f"{layer}.weight": w})


def _hashes(model: nn.Module) -> dict[str, str]:
    return {k: tensor_sha256(v) for k, v in model.state_dict().items()}


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ckpt(tmp_path: Path):
    """A checkpoint, an edit file made on it, and the model."""
    model = RECIPE.build()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    edit = tmp_path / "edit.safetensors"
    _factored(model).save(edit)
    return model, path, edit


# ------------------------------------------------------------------------------------ the wheel


def test_the_package_list_holds_every_package_of_the_source_tree() -> None:
    """A wheel built from pyproject.toml carries every subpackage (`.ci/run` also installs one)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"surgery." + ".".join(p.parent.relative_to(ROOT / "surgery").parts) for p in (ROOT / "surgery").rglob("__init__.py")}
    found = {f.rstrip(".") for f in found} | {"surgery.adapters"}
    found |= {
        "surgery.adapters." + ".".join(p.parent.relative_to(ROOT / "adapters").parts)
        for p in (ROOT / "adapters").rglob("__init__.py")
        if p.parent != ROOT / "adapters"
    }
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"


# ------------------------------------------------------------------------- warnings and memory


def test_warnings_from_other_libraries_are_shown_once_and_do_not_loop(capsys) -> None:
    with _warnings_on_stderr():
        warnings.warn("from another library", UserWarning)
        warnings.warn("ours", SurgeryWarning)
    err = capsys.readouterr().err
    assert "surgery: warning: ours" in err


def _limit_memory() -> None:  # runs in the child before exec
    limit = 6 << 30  # address space: a CPU torch import reserves ~3.3 GB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_apply_on_a_protocol_4_checkpoint_ends_with_a_clear_error_under_a_memory_limit(tmp_path: Path, ckpt) -> None:
    model, _, edit = ckpt
    p4 = tmp_path / "p4.pth"
    torch.save(model.state_dict(), p4, pickle_protocol=4)
    before = _sha(p4)
    out = tmp_path / "out.pth"
    proc = subprocess.run(
        [*SURGERY, "apply", str(p4), str(edit), "-o", str(out)],
        capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pickle protocol 4" in proc.stderr and "weights_only" in proc.stderr
    assert not out.exists() and _sha(p4) == before
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_layers_names_the_pickle_protocol_not_pickled_objects(tmp_path: Path, capsys) -> None:
    import timm

    model = timm.create_model("test_resnet")
    p4 = tmp_path / "p4.pth"
    torch.save(model.state_dict(), p4, pickle_protocol=4)
    assert main(["layers", "timm:test_resnet", "--checkpoint", str(p4)]) == 2
    err = capsys.readouterr().err
    assert "pickle protocol 4" in err and "pickled Python objects" not in err


# --------------------------------------------------------------------------- inputs never overwritten


def test_refuse_overwrite_sees_through_dot_paths_symlinks_and_hard_links(tmp_path: Path) -> None:
    src = tmp_path / "input.bin"
    src.write_bytes(b"precious")
    (tmp_path / "link").symlink_to(src)
    os.link(src, tmp_path / "hard")
    (tmp_path / "folder").mkdir()
    inside = tmp_path / "folder" / "a.png"
    inside.write_bytes(b"png")
    os.link(inside, tmp_path / "alias.png")
    for out in (src, tmp_path / "." / "input.bin", tmp_path / "link", tmp_path / "hard"):
        with pytest.raises(SurgeryError, match="one of the inputs"):
            refuse_overwrite(out, [src])
    with pytest.raises(SurgeryError, match="under"):
        refuse_overwrite(tmp_path / "alias.png", [tmp_path / "folder"])
    refuse_overwrite(tmp_path / "new.bin", [src])  # a new file is fine
    refuse_overwrite(tmp_path / "other.png", [tmp_path / "folder"])
    assert src.read_bytes() == b"precious"


@pytest.fixture
def photos(tmp_path: Path):
    """A checkpoint of timm's test_resnet (BN re-randomized), a data folder, an exemplar pair, a mask."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    x = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    y = x.copy()
    y[8:24, 8:24] = 255
    Image.fromarray(x).save(tmp_path / "x.png")
    Image.fromarray(y).save(tmp_path / "y.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    return tmp_path, ckpt, data


def _edit_argv(root: Path, ckpt: Path, data: Path, out: Path, **over: str) -> list[str]:
    args = {
        "--original": str(root / "x.png"), "--transformed": str(root / "y.png"), "--data": str(data),
        "--size": "32", "--layer": "layer2.0.conv2", "-o": str(out), **over,
    }
    argv = ["edit", "timm:test_resnet", "--checkpoint", str(ckpt)]
    for k, v in args.items():
        argv += [k, v]
    return argv


def test_commands_refuse_to_write_over_their_inputs(photos, capsys) -> None:
    root, ckpt, data = photos
    before = {p: _sha(p) for p in [ckpt, root / "x.png", root / "y.png", *data.iterdir()]}
    stats = ["stats", "timm:test_resnet", "--checkpoint", str(ckpt), "--layer", "layer2.0.conv2", "--data", str(data), "--size", "32"]
    assert main([*stats, "-o", str(ckpt)]) == 2
    assert main([*stats, "-o", str(data / "0.png")]) == 2
    assert main(_edit_argv(root, ckpt, data, root / "x.png")) == 2
    assert main(_edit_argv(root, ckpt, data, root / "y.png")) == 2
    (root / "xlink.png").symlink_to(root / "x.png")
    assert main(_edit_argv(root, ckpt, data, root / "xlink.png")) == 2
    err = capsys.readouterr().err
    assert err.count("one of the inputs") == 5
    assert all(_sha(p) == h for p, h in before.items())
    assert main(_edit_argv(root, ckpt, data, root / "edit.safetensors")) == 0
    # apply / revert never write over the edit files either
    edit = root / "edit.safetensors"
    assert main(["apply", str(ckpt), str(edit), "-o", str(edit)]) == 2
    assert main(["revert", str(ckpt), str(edit), "-o", str(edit)]) == 2
    assert Edit.load(edit).layer == "layer2.0.conv2"
    # evaluate --json over a photo
    folders = root / "labelled" / "0"
    folders.mkdir(parents=True)
    Image.open(root / "y.png").save(folders / "y.png")
    ev = ["evaluate", "timm:test_resnet", "--checkpoint", str(ckpt), "--edit", str(edit), "--data", str(root / "labelled"), "--size", "32"]
    assert main([*ev, "--json", str(folders / "y.png")]) == 2
    assert main([*ev, "--json", str(edit)]) == 2
    assert Edit.load(edit).layer == "layer2.0.conv2"


def test_edit_original_folder_and_mask_sizes(photos, capsys) -> None:
    root, ckpt, data = photos
    assert main(_edit_argv(root, ckpt, data, root / "e.safetensors", **{"--original": str(data)})) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    Image.fromarray(np.full((20, 40), 255, np.uint8)).save(root / "wide.png")  # another aspect ratio
    assert main(_edit_argv(root, ckpt, data, root / "e.safetensors", **{"--mask": str(root / "wide.png")})) == 2
    assert "another shape" in capsys.readouterr().err and not (root / "e.safetensors").exists()


def test_a_same_shape_smaller_mask_is_resized_with_a_warning(photos, caplog) -> None:
    root, ckpt, data = photos
    Image.open(root / "m.png").resize((16, 16)).save(root / "small.png")
    with caplog.at_level("WARNING"):
        assert main(_edit_argv(root, ckpt, data, root / "e.safetensors", **{"--mask": str(root / "small.png")})) == 0
    assert "resized to its image's 32x32" in caplog.text


def test_a_zero_edit_is_refused_by_the_command_and_warned_by_the_api(tmp_path: Path, capsys) -> None:
    import timm

    import surgery

    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()  # zero-initialised last BN of every block
    ckpt = tmp_path / "zero.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    x = torch.randn(2, 3, 32, 32)
    stats = surgery.collect_key_stats(model, "layer2.0.conv2", torch.randn(8, 3, 32, 32), progress=False)
    with pytest.warns(SurgeryWarning, match="is zero"):
        surgery.rewrite(model, "layer2.0.conv2", x, x.flip(-1), stats=stats)
    rng = np.random.default_rng(1)
    (tmp_path / "d").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "d" / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "y.png")
    out = tmp_path / "e.safetensors"
    assert main(_edit_argv(tmp_path, ckpt, tmp_path / "d", out)) == 2
    assert "is zero" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------- reverts


def test_reverting_an_edit_that_was_never_applied_is_refused(ckpt, tmp_path: Path, capsys) -> None:
    model, path, edit = ckpt
    before = _hashes(model)
    with pytest.raises(SurgeryError, match="not applied"):
        revert_edit(model, edit)
    assert _hashes(model) == before
    out = tmp_path / "out.safetensors"
    assert main(["revert", str(path), str(edit), "-o", str(out)]) == 2
    assert "not applied" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SurgeryError, match="not applied"):
        revert_from_checkpoint(path, edit, out)
    with pytest.warns(SurgeryWarning, match="anyway"):
        report = revert_from_checkpoint(path, edit, out, force=True)
    assert report.forced and out.exists()


def test_reverting_at_another_strength_is_refused_and_names_the_strength(ckpt, tmp_path: Path, capsys) -> None:
    _, path, edit = ckpt
    edited_ckpt = tmp_path / "edited.safetensors"
    assert main(["apply", str(path), str(edit), "-o", str(edited_ckpt), "--alpha", "1"]) == 0
    out = tmp_path / "back.safetensors"
    assert main(["revert", str(edited_ckpt), str(edit), "-o", str(out), "--alpha", "2"]) == 2
    err = capsys.readouterr().err
    assert "strength 1" in err and "not at the 2" in err and not out.exists()
    assert main(["revert", str(edited_ckpt), str(edit), "-o", str(out)]) == 0
    assert "restored" in capsys.readouterr().out


def test_a_file_revert_is_within_one_ulp_and_reports_its_deviation(ckpt, tmp_path: Path) -> None:
    model, path, edit = ckpt
    w0 = model.get_parameter("0.weight").detach().clone()
    edited_ckpt, back = tmp_path / "edited.safetensors", tmp_path / "back.safetensors"
    apply_to_checkpoint(path, edit, edited_ckpt, alpha=1.5)
    report = revert_from_checkpoint(edited_ckpt, edit, back, alpha=1.5)
    assert report.found is not None and abs(report.found.strength - 1.5) < 1e-4
    assert report.after is not None and abs(report.after.strength) < 1e-4
    w = load_file(str(back))["0.weight"]
    w1 = load_file(str(edited_ckpt))["0.weight"]
    # two roundings: half an ulp of the edited value, half an ulp of the result (which may lie one binade
    # above the original): within 1.5 ulps of the larger of the original and the edited value
    big = torch.maximum(w0.abs(), w1.abs())
    ulp = torch.nextafter(big, torch.tensor(float("inf"))) - big
    assert ((w - w0).abs() <= 1.5 * ulp).all()
    assert bool(report) == torch.equal(w, w0)


def test_a_handle_revert_after_an_outside_change_is_refused_unless_forced() -> None:
    model = RECIPE.build()
    before = _hashes(model)
    handle = apply_edit(model, _factored(model))
    with torch.no_grad():
        model.get_parameter("0.weight")[0, 0, 0, 0] += 1.0  # e.g. an optimizer step
    changed = _hashes(model)
    with pytest.raises(SurgeryError, match="changed since the edit was applied"):
        revert_edit(model, handle)
    assert _hashes(model) == changed and handle.active
    with pytest.warns(SurgeryWarning, match="discards that change"):
        assert revert_edit(model, handle, force=True).through_handle
    assert _hashes(model) == before


def test_edited_always_restores_and_reports_a_change_made_inside() -> None:
    model = RECIPE.build()
    before = _hashes(model)
    with pytest.warns(SurgeryWarning, match="changed since"):
        with edited(model, _factored(model)):
            with torch.no_grad():
                model.get_parameter("0.weight").mul_(2)
    assert _hashes(model) == before


# -------------------------------------------------------------------------- what edits may touch


def _crafted_dense(model: nn.Module, name: str, value: torch.Tensor) -> Edit:
    return Edit(layer="1", method="finetune", deltas={name: value}, architecture=architecture_id(model),
                base={name: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."), "sha256": "0" * 64}})


def test_dense_edits_of_buffers_or_counters_are_refused_with_the_real_reason(ckpt, tmp_path: Path) -> None:
    model, path, _ = ckpt
    before, file_before = _hashes(model), _sha(path)
    running_var = _crafted_dense(model, "1.running_var", torch.full((6,), -10.0))
    counter = _crafted_dense(model, "1.num_batches_tracked", torch.tensor(5))
    for edit in (running_var, counter):
        with pytest.raises(IncompatibleEditError, match="only floating-point parameters"):
            apply_edit(model, edit)
        with pytest.raises(IncompatibleEditError, match="only floating-point parameters"):
            apply_to_checkpoint(path, edit, tmp_path / "out.safetensors")
    assert _hashes(model) == before and _sha(path) == file_before and not (tmp_path / "out.safetensors").exists()


def _huge(model: nn.Module, made_here: bool, seed: int = 0) -> Edit:
    """An update a million times larger than a normal one, recorded as made on these weights or on others."""
    edit = _factored(model, seed=seed, scale=1.0)
    edit.lam = edit.lam * 1e6
    if not made_here:
        edit.base["0.weight"]["sha256"] = "0" * 64
    return edit


def test_an_update_far_larger_than_its_weight_made_elsewhere_warns_and_is_refused_under_strict(ckpt, tmp_path: Path) -> None:
    model, path, _ = ckpt
    before, file_before = _hashes(model), _sha(path)
    huge = _huge(model, made_here=False)
    with pytest.raises(IncompatibleEditError, match="times the norm.*not made on these weights"):
        apply_edit(model, huge, strict=True)
    with pytest.raises(IncompatibleEditError, match="times the norm.*not made on these weights"):
        apply_to_checkpoint(path, huge, tmp_path / "o.safetensors", strict=True)
    assert _hashes(model) == before and _sha(path) == file_before and not (tmp_path / "o.safetensors").exists()
    with pytest.warns(SurgeryWarning, match="times the norm.*not made on these weights"):
        apply_to_checkpoint(path, huge, tmp_path / "o.safetensors")


def test_an_update_its_solver_made_for_these_weights_is_judged_against_itself(ckpt, tmp_path: Path) -> None:
    """A layer-scaled layer takes legitimate updates far larger than its weight: only alpha above 10 warns,
    also for a second such edit stacked on the first (judged on the weights before the first)."""
    model, path, _ = ckpt
    first, second = _huge(model, made_here=True), _huge(model, made_here=True, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SurgeryWarning)
        handles = [apply_edit(model, first), apply_edit(model, second)]
        apply_to_checkpoint(path, [first, second], tmp_path / "o.safetensors")
    for h in reversed(handles):
        revert_edit(model, h)
    before = _hashes(model)
    with pytest.raises(IncompatibleEditError, match="more than 10 times the update the edit was made as"):
        apply_edit(model, first, alpha=20.0, strict=True)
    assert _hashes(model) == before
    with pytest.warns(SurgeryWarning, match="far too large alpha"):
        apply_to_checkpoint(path, first, tmp_path / "o2.safetensors", alpha=-20.0)


# ---------------------------------------------------------------------------- small input checks


def test_small_cli_input_checks(ckpt, tmp_path: Path, capsys) -> None:
    _, path, edit = ckpt
    out = tmp_path / "o.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["apply", "--alpha=--", str(path), str(edit), "-o", str(out)])
    assert exc.value.code == 2 and "expected one value" in capsys.readouterr().err
    assert main(["apply", str(path), str(edit), "-o", str(out), "--alpha", "0"]) == 2
    assert "--alpha 0 applies nothing" in capsys.readouterr().err and not out.exists()
    from surgery.cli.evaluate import _alphas

    for bad in ("1,,2", ",1", "1,", "a"):
        with pytest.raises(SurgeryError, match="comma-separated"):
            _alphas(bad)
    assert _alphas("0.5, 1,2") == [0.5, 1.0, 2.0]


# ------------------------------------------------------------------------- atomic writes, SIGKILL


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.safetensors.{dead.pid}-0123456789ab.tmp"
    live = tmp_path / f".out.safetensors.{os.getpid()}-0123456789ab.tmp"
    other = tmp_path / f".other.bin.{dead.pid}-0123456789ab.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"complete"))
    assert target.read_bytes() == b"complete"
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "other.bin") == 1


def test_sigkill_during_apply_leaves_the_output_absent_or_complete(tmp_path: Path) -> None:
    big = nn.Sequential(nn.Conv2d(64, 512, 3), nn.Linear(512, 4096), nn.Linear(4096, 1024))  # ~22 MB
    ckpt = tmp_path / "big.safetensors"
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(ckpt))
    edit = tmp_path / "e.safetensors"
    _factored(big, "1").save(edit)
    expected_file = tmp_path / "expected.safetensors"
    apply_to_checkpoint(ckpt, edit, expected_file)
    expected = {k: tensor_sha256(v) for k, v in load_file(str(expected_file)).items()}
    rng = random.Random(0)
    out = tmp_path / "out.safetensors"
    start = time.perf_counter()
    subprocess.run([*SURGERY, "inspect", str(edit)], check=True, capture_output=True)
    startup = time.perf_counter() - start  # how long the command takes to get going here
    outcomes = []
    for trial in range(4):
        out.unlink(missing_ok=True)
        proc = subprocess.Popen([*SURGERY, "apply", str(ckpt), str(edit), "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 1.6) * startup)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            assert {k: tensor_sha256(v) for k, v in load_file(str(out)).items()} == expected
            outcomes.append("complete")
        else:
            outcomes.append("absent")
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.safetensors.")]
    out.unlink(missing_ok=True)
    subprocess.run([*SURGERY, "apply", str(ckpt), str(edit), "-o", str(out)], check=True, capture_output=True)
    assert {k: tensor_sha256(v) for k, v in load_file(str(out)).items()} == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.safetensors.")], (outcomes, leftovers)


def test_a_rewrite_behind_a_small_layer_scale_applies_without_a_size_warning(tmp_path: Path) -> None:
    """The trained testbed ConvNeXt: a rewrite of ``mlp.fc2`` (whose output ``gamma`` scales down) is
    hundreds of times its weight's norm, as its solver made it; applying it is not an oversized update."""
    model, _ = load_trained("convnext", train_if_missing=False)
    images = normalize(Testbed(TestbedConfig()).make_dataset(72, "train").images)
    layer = "stages.3.blocks.1.mlp.fc2"
    x = images[64:67]
    x2 = x.clone()
    x2[:, :, 40:] = images[67:70, :, 40:]  # another scene's lower half
    edit = rewrite(model.eval(), layer, x, x2, stats=collect_key_stats(model, layer, images[:64], progress=False))
    assert float(edit.delta().norm()) > 10 * float(model.get_parameter(f"{layer}.weight").norm())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SurgeryWarning)
        revert_edit(model, apply_edit(model, edit))
        apply_to_checkpoint(path, edit, tmp_path / "edited.safetensors")
