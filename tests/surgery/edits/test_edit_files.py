"""Acceptance of issue 4: edits as files, applied, reverted and stacked safely and exactly."""

from __future__ import annotations

import functools
import json
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from surgery import (
    Edit,
    EditFormatError,
    IncompatibleEditError,
    SurgeryError,
    SurgeryWarning,
    apply_edit,
    edited,
    list_edits,
    revert_edit,
)
from surgery.edits.file import read_edit_metadata
from surgery.identity import architecture_id, tensor_sha256
from tests.strategies import ModelRecipe, editable_layers, edits, model_recipes, state_hashes

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
alphas = st.just(1.0) | st.floats(-3.0, 3.0, allow_nan=False)


def _tmpdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="surgery-test-")


def _fresh(recipe: ModelRecipe, state: dict[str, torch.Tensor]) -> nn.Module:
    model = recipe.build()
    model.load_state_dict(state)
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Exactness: handle, file on a fresh copy, stacks
# --------------------------------------------------------------------------------------------------


@FAST
@given(data=st.data(), alpha=alphas)
def test_apply_then_revert_through_handle_is_bit_exact(data, alpha: float) -> None:
    model = data.draw(model_recipes()).build()
    edit = data.draw(edits(model))
    before = state_hashes(model)
    handle = apply_edit(model, edit, alpha=alpha)
    assert list_edits(model) == [handle]
    assert revert_edit(model, handle).through_handle
    assert state_hashes(model) == before
    assert list_edits(model) == [] and not handle.active


@FAST
@given(data=st.data(), alpha=alphas)
def test_revert_from_the_saved_file_on_a_fresh_copy_is_within_rounding(data, alpha: float) -> None:
    recipe = data.draw(model_recipes())
    original = recipe.build()
    edit = data.draw(edits(original))
    with _tmpdir() as d:
        path = Path(d) / "edit.safetensors"
        edit.save(path)
        second = _fresh(recipe, original.state_dict())
        with warnings.catch_warnings():
            # same weights: no fingerprint warning, and no size warning (|alpha| <= 3 times what the edit was
            # made as, even where a drawn edit is > 10x a tiny weight)
            warnings.simplefilter("error", SurgeryWarning)
            apply_edit(second, path, alpha=alpha)
        third = _fresh(recipe, second.state_dict())  # another process: only the edited weights
        exact = revert_edit(third, path, alpha=alpha)

    deltas = edit.parameter_deltas()
    bit_exact = []
    for name, w_after in third.state_dict().items():
        w0 = original.state_dict()[name]
        if name not in deltas:
            assert tensor_sha256(w_after) == tensor_sha256(w0), name
            continue
        # Two roundings (apply, then revert), each within eps/2 of the exact float64 result, in the
        # parameter's dtype; the smallest normal number covers results in the subnormal range.
        fi = torch.finfo(w0.dtype)
        d = alpha * deltas[name].double()
        bound = 4 * fi.eps * (w0.double().abs() + d.abs()) + fi.tiny
        err = (w_after.double() - w0.double()).abs()
        assert (err <= bound).all(), f"{name}: max error {float((err - bound).max()):.3g} over the bound"
        bit_exact.append(tensor_sha256(w_after) == tensor_sha256(w0))
    assert bool(exact) == all(bit_exact)


@FAST
@given(data=st.data())
def test_a_stack_of_edits_reverts_in_any_order(data) -> None:
    recipe = data.draw(model_recipes())
    model = recipe.build()
    original = _snapshot(model)
    before = state_hashes(model)
    pool = data.draw(st.lists(st.sampled_from(editable_layers(model)), min_size=1, max_size=2, unique=True))
    n = data.draw(st.integers(1, 5))
    stack = [data.draw(edits(model, data.draw(st.sampled_from(pool)))) for _ in range(n)]
    strengths = [data.draw(alphas) for _ in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryWarning)  # hypothesis may draw one edit twice
        handles = [apply_edit(model, e, alpha=a) for e, a in zip(stack, strengths)]
        remaining = list(range(n))
        for i in data.draw(st.permutations(range(n))):
            assert revert_edit(model, handles[i]).through_handle
            remaining.remove(i)
            reference = _fresh(recipe, original)
            for j in remaining:  # the remaining edits, in their original order, on the original weights
                apply_edit(reference, stack[j], alpha=strengths[j])
            assert state_hashes(model) == state_hashes(reference)
            assert [h.edit for h in list_edits(model)] == [stack[j] for j in remaining]
    assert state_hashes(model) == before


def test_edited_restores_when_the_body_raises() -> None:
    recipe = ModelRecipe((3, 4, 5), (3, 1), (True, False), (True, True), 2, torch.float32, 0)
    model = recipe.build()
    before = state_hashes(model)
    one = _factored(model, "0", seed=1)
    two = _factored(model, "0", seed=2)
    with pytest.raises(RuntimeError, match="boom"), edited(model, one, two) as m:
        assert m is model and len(list_edits(model)) == 2
        assert state_hashes(model) != before
        raise RuntimeError("boom")
    assert state_hashes(model) == before and list_edits(model) == []


# --------------------------------------------------------------------------------------------------
# Save -> load
# --------------------------------------------------------------------------------------------------


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_sha256(a) == tensor_sha256(b)


@FAST
@given(data=st.data())
def test_save_load_preserves_every_bit_and_field(data) -> None:
    model = data.draw(model_recipes()).build()
    edit = data.draw(edits(model))
    with _tmpdir() as d:
        path = Path(d) / "edit.safetensors"
        edit.save(path)
        loaded = Edit.load(path)
        version = read_edit_metadata(path)["format_version"]
    assert loaded.factored == edit.factored
    if edit.factored:
        assert list(loaded.factors()) == list(edit.factors()) and loaded.layers == edit.layers
        for (lam, u), (lam2, u2) in zip(loaded.factors().values(), edit.factors().values()):
            assert _same_tensor(lam, lam2) and _same_tensor(u, u2)
        assert version == ("3" if edit.span else "2")  # version 3 only where it is needed
    else:
        assert loaded.deltas.keys() == edit.deltas.keys()
        assert all(_same_tensor(loaded.deltas[k], v) for k, v in edit.deltas.items())
    for field in ("layer", "method", "hparams", "base", "architecture", "description", "created", "info"):
        assert getattr(loaded, field) == getattr(edit, field), field


# --------------------------------------------------------------------------------------------------
# Corrupted and hostile files
# --------------------------------------------------------------------------------------------------

RECIPE = ModelRecipe((3, 4, 5), (3, 1), (True, False), (True, True), 3, torch.float32, 7)


def _factored(model: nn.Module, layer: str, seed: int = 0, scale: float = 0.1, **kw) -> Edit:
    w = model.get_parameter(f"{layer}.weight")
    g = torch.Generator().manual_seed(seed)
    m, n, *k = w.shape
    u = torch.randn(1, n, generator=g)
    provenance = dict(
        layer=layer,
        method="rewrite",
        hparams={"solver": "fast", "rank": 1},
        architecture=architecture_id(model),
        description="test edit",
        info={"objective": 0.5},
    )
    provenance.update(kw)
    edit = Edit(lam=scale * torch.randn(1, m, *k, generator=g), u=u / u.norm(), **provenance)
    return edit if "base" in kw else edit.made_on({f"{layer}.weight": w})


@functools.lru_cache(maxsize=1)
def _valid_file() -> bytes:
    model = RECIPE.build()
    with _tmpdir() as d:
        path = Path(d) / "edit.safetensors"
        _factored(model, "0").save(path)
        return path.read_bytes()


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(data)
    for op in ops:
        kind, pos = op[0], op[1] % (len(out) + 1)
        if kind == "xor" and pos < len(out):
            out[pos] ^= op[2]
        elif kind == "set" and pos < len(out):
            out[pos] = op[2]
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = op[2]
        elif kind == "delete":
            del out[pos : pos + op[2]]
    return bytes(out)


_position = st.integers(0, 1 << 16)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("xor"), _position, st.integers(1, 255)),
        st.tuples(st.just("set"), _position, st.integers(0, 255)),
        st.tuples(st.just("truncate"), _position),
        st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), _position, st.integers(1, 16)),
    ),
    min_size=1,
    max_size=4,
)


def _refused(data: bytes, error: type[SurgeryError] = SurgeryError, match: str | None = None) -> SurgeryError:
    """Write ``data`` as an edit file, apply it, check it raises ``error`` and changes nothing."""
    model = RECIPE.build()
    before = state_hashes(model)
    with _tmpdir() as d:
        path = Path(d) / "bad.safetensors"
        path.write_bytes(data)
        with pytest.raises(error, match=match) as info:
            apply_edit(model, path)
        with pytest.raises(SurgeryError):
            revert_edit(model, path)
    assert state_hashes(model) == before and list_edits(model) == []
    return info.value


def test_the_valid_file_applies() -> None:  # the base case of the corruption tests
    model = RECIPE.build()
    with _tmpdir() as d:
        path = Path(d) / "edit.safetensors"
        path.write_bytes(_valid_file())
        apply_edit(model, path)
    assert len(list_edits(model)) == 1


@settings(max_examples=50, deadline=None)
@given(ops=_ops)
def test_corrupted_bytes_are_refused_and_change_nothing(ops) -> None:
    bad = _mutate(_valid_file(), ops)
    assume(bad != _valid_file())
    _refused(bad)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=4096), framed=st.booleans())
def test_random_bytes_are_refused(data: bytes, framed: bool) -> None:
    if framed:  # a header length that fits, so the parser reads on
        data = struct.pack("<Q", len(data)) + data
    _refused(data, EditFormatError)


# Hand-written hostile files, checksummed like a real writer would (docs/edit-format.md), so that each
# reaches the check it is aimed at.

_PATTERN = b'"file_sha256":"' + b"0" * 64 + b'"'


def _with_checksum(data: bytes) -> bytes:
    import hashlib

    i = data.index(_PATTERN) + len(b'"file_sha256":"')
    return data[:i] + hashlib.sha256(data).hexdigest().encode() + data[i + 64 :]


def _parts() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with _tmpdir() as d:
        path = Path(d) / "edit.safetensors"
        path.write_bytes(_valid_file())
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def _file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], checksum: bool = True) -> bytes:
    meta = {**metadata, "file_sha256": "0" * 64}
    data = safetensors_bytes(tensors, metadata=meta)
    return _with_checksum(data) if checksum else data


def _raw(header: dict, data: bytes, checksum: bool = True) -> bytes:
    """A safetensors file from a header object as given (any JSON), padded like safetensors does."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    out = struct.pack("<Q", len(text)) + text + data
    return _with_checksum(out) if checksum else out


def _raw_parts() -> tuple[dict, bytes]:
    data = _valid_file()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["file_sha256"] = "0" * 64
    return header, data[8 + n :]


def _hostile() -> dict[str, tuple[bytes, str]]:
    tensors, meta = _parts()
    lam, u = tensors["0.weight.lambda"], tensors["0.weight.u"]
    header, body = _raw_parts()
    valid = _valid_file()
    cases: dict[str, tuple[bytes, str]] = {
        "empty file": (b"", "truncated"),
        "huge header length": (struct.pack("<Q", 1 << 63) + valid[8:], "header length"),
        "zero header length": (struct.pack("<Q", 0) + valid[8:], "header length"),
        "header longer than the file": (struct.pack("<Q", len(valid)) + valid[8:], "header length"),
        "header of 5 MB": (_file(tensors, {**meta, "description": " " * (5 << 20)}), "header length"),
        "header not JSON": (struct.pack("<Q", 8) + b"{nope}  ", "not valid JSON"),
        "header a JSON list": (struct.pack("<Q", 8) + b"[1,2,3] ", "not a JSON object"),
        "non-string metadata": (
            _raw({**header, "__metadata__": {**header["__metadata__"], "format_version": 1}}, body),
            "string metadata",
        ),
        "int tensors": (_file({"0.weight.lambda": lam.to(torch.int32), "0.weight.u": u}, meta), "floating-point"),
        "NaN in lambda": (
            _file({"0.weight.lambda": lam.index_fill(1, torch.tensor([0]), float("nan")), "0.weight.u": u}, meta),
            "NaN",
        ),
        "inf in u": (
            _file({"0.weight.lambda": lam, "0.weight.u": u.index_fill(1, torch.tensor([1]), float("inf"))}, meta),
            "NaN or infinite",
        ),
        "shape that does not fit the base": (
            _file({"0.weight.lambda": torch.ones(1, 5, 3, 3), "0.weight.u": u}, meta),
            "do not fit",
        ),
        "ranks that differ": (_file({"0.weight.lambda": torch.cat([lam, lam]), "0.weight.u": u}, meta), "do not fit"),
        "extra tensor": (_file({**tensors, "0.bias.delta": torch.zeros(4)}, meta), "holds tensors"),
        "missing tensor": (_file({"0.weight.lambda": lam}, meta), "holds tensors"),
        "foreign safetensors": (safetensors_bytes({"weight": torch.zeros(3, 3)}), "not a model-surgery edit"),
        "foreign metadata": (
            safetensors_bytes({"weight": torch.zeros(3)}, metadata={"format": "pt"}),
            "not a model-surgery edit",
        ),
        "newer format version": (_file(tensors, {**meta, "format_version": "4"}), "[Uu]pgrade"),
        "no checksum": (
            safetensors_bytes(tensors, metadata={k: v for k, v in meta.items() if k != "file_sha256"}),
            "lacks required metadata",
        ),
        "wrong checksum": (_file(tensors, meta, checksum=False), "checksum"),
        "unknown kind": (_file(tensors, {**meta, "kind": "lowrank"}), "unknown edit kind"),
        "params not a list": (_file(tensors, {**meta, "params": '"0.weight"'}), "params"),
        "hparams not JSON": (_file(tensors, {**meta, "hparams": "{solver: fast"}), "not valid JSON"),
        "base without sha256": (
            _file(tensors, {**meta, "base": json.dumps({"0.weight": {"shape": [4, 3, 3, 3], "dtype": "float32"}})}),
            "base record",
        ),
        "a parameter that is not the layer's weight": (
            _file(
                {"0.bias.lambda": lam, "0.bias.u": u},
                {**meta, "params": '["0.bias"]', "base": meta["base"].replace("0.weight", "0.bias")},
            ),
            "not the weight",
        ),
        "tensor offsets past the end": (
            _raw({**header, "0.weight.u": {**header["0.weight.u"], "data_offsets": [0, 10**6]}}, body),
            "bytes",
        ),
    }
    return cases


_HOSTILE = _hostile()


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_hostile_files_raise_edit_format_errors(case: str) -> None:
    data, match = _HOSTILE[case]
    error = _refused(data, EditFormatError, match)
    assert "\n" not in str(error) and len(str(error)) < 400


def test_missing_and_directory_paths(tmp_path: Path) -> None:
    model = RECIPE.build()
    for path in (tmp_path / "nope.safetensors", tmp_path):
        with pytest.raises(EditFormatError, match="does not exist"):
            apply_edit(model, path)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["factored", "dense", "x"]),
    params=st.lists(st.sampled_from(["0.weight", "0.bias", "3.weight", "weight", ""]), max_size=2),
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=4), min_size=2, max_size=2),
    names=st.lists(
        st.sampled_from(["0.weight.lambda", "0.weight.u", "0.weight.delta", "0.bias.delta", "x"]),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    dtype=st.sampled_from(["F32", "F64", "F16", "BF16", "I64"]),
    base_shape=st.lists(st.integers(0, 5), max_size=4),
    base_dtype=st.sampled_from(["float32", "float64", "int64"]),
    layer=st.sampled_from(["0", "3", "", "0.weight"]),
)
def test_crafted_files_with_a_valid_checksum_never_half_apply(
    kind, params, shapes, names, dtype, base_shape, base_dtype, layer
) -> None:
    """Structurally random edit files (valid checksum): they load and apply, or raise a SurgeryError and
    change nothing; never another exception."""
    size = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I64": 8}[dtype]
    header: dict = {}
    offset = 0
    for i, name in enumerate(names):
        shape = shapes[i % 2]
        nbytes = size * int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else size
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    _, meta = _parts()
    base = {p: {"shape": base_shape, "dtype": base_dtype, "sha256": "0" * 64} for p in params}
    header["__metadata__"] = {
        **meta,
        "kind": kind,
        "layer": layer,
        "params": json.dumps(params),
        "base": json.dumps(base),
        "file_sha256": "0" * 64,
    }
    data = _raw(header, bytes(range(256)) * (offset // 256) + bytes(offset % 256))
    model = RECIPE.build()
    before = state_hashes(model)
    with _tmpdir() as d:
        path = Path(d) / "crafted.safetensors"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SurgeryWarning)
                apply_edit(model, path)
        except SurgeryError:
            assert state_hashes(model) == before and list_edits(model) == []
        else:
            assert len(list_edits(model)) == 1


# --------------------------------------------------------------------------------------------------
# Files that do not fit the model
# --------------------------------------------------------------------------------------------------


def _incompatible() -> dict[str, tuple[Edit, str]]:
    model = RECIPE.build()
    other = ModelRecipe((3, 4, 5), (1, 1), (True, False), (True, True), 3, torch.float32, 7).build()
    bigger = ModelRecipe((3, 4, 5, 6), (3, 1, 1), (True, False, False), (True, True, True), 3, torch.float32, 7).build()
    wrong_shape = _factored(other, "0", architecture=None)  # (4, 3, 1, 1) for a (4, 3, 3, 3) weight
    missing = _factored(bigger, "5", architecture=None)  # layer 5 of the model is a pooling layer
    in64 = _factored(model.double(), "0", architecture=None)
    return {
        "shape": (wrong_shape, "has shape"),
        "missing parameter": (missing, "no parameter '5.weight'"),
        "dtype": (in64, "float64 weights"),
        "other architecture": (_factored(RECIPE.build(), "0", architecture="timm:resnet50"), "architecture"),
        "same class, other layers": (_factored(bigger, "0"), "other layers"),
    }


@pytest.mark.parametrize(
    "case", ["shape", "missing parameter", "dtype", "other architecture", "same class, other layers"]
)
def test_files_that_do_not_fit_raise_incompatible_edit_errors(case: str, tmp_path: Path) -> None:
    edit, match = _incompatible()[case]
    path = tmp_path / "edit.safetensors"
    edit.save(path)
    _refused(path.read_bytes(), IncompatibleEditError, match)


def test_an_update_that_overflows_the_dtype_is_refused() -> None:
    model = RECIPE.build()
    before = state_hashes(model)
    edit = _factored(model, "0", scale=1e30)
    edit.lam, edit.u = edit.lam.double() * 1e20, edit.u.double()
    with pytest.raises(SurgeryError, match="non-finite"):
        apply_edit(model, edit)
    assert state_hashes(model) == before


# --------------------------------------------------------------------------------------------------
# Sizes on disk of real layers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "builder, layer, limit",
    # lambda, u and the base weights along u (as large as lambda), float32
    [(torchvision.models.resnet50, "layer4.2.conv3", 24 << 10), (torchvision.models.vgg16_bn, "features.40", 48 << 10)],
)
def test_a_rank_one_edit_of_a_real_layer_is_small(builder, layer: str, limit: int, tmp_path: Path) -> None:
    with torch.device("meta"):  # the real module tree and shapes, without allocating 100M weights
        model = builder()
    shape = model.get_parameter(f"{layer}.weight").shape
    weight = torch.randn(shape)
    m, n, *k = shape
    edit = Edit(
        layer=layer,
        method="rewrite",
        hparams={
            "solver": "fast",
            "loss": "l1",
            "use_mask": False,
            "restrict_rank": True,
            "rank": 1,
            "ntrain": 4096,
            "ridge": 0.0,
            "max_iter": 100,
        },
        lam=torch.randn(1, m, *k),
        u=torch.nn.functional.normalize(torch.randn(1, n), dim=1),
        architecture=architecture_id(model),
        description="snow on the road looks like asphalt",
        info={
            "objective": 0.123,
            "objective_before": 0.456,
            "iterations": [12, 9, 30],
            "seconds": 0.8,
            "seconds_total": 3.2,
        },
    ).made_on({f"{layer}.weight": weight})
    path = tmp_path / "edit.safetensors"
    edit.save(path)
    size = path.stat().st_size
    assert size < limit, f"{size} bytes"
    assert size < weight.numel() * 4 / 100  # the dense layer is 4 MB (ResNet-50) and 9.4 MB (VGG16-BN)
    assert Edit.load(path).lam.shape == (1, m, *k)


# --------------------------------------------------------------------------------------------------
# Other checkpoints of the same architecture, other architectures
# --------------------------------------------------------------------------------------------------


def _resnet(name: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(torchvision.models, name)().eval()


@pytest.fixture(scope="module")
def resnets():
    return {"a": _resnet("resnet18", 0), "b": _resnet("resnet18", 1), "34": _resnet("resnet34", 0)}


def test_an_edit_applies_to_another_checkpoint_with_a_warning(resnets, tmp_path: Path) -> None:
    path = tmp_path / "edit.safetensors"
    _factored(resnets["a"], "layer1.0.conv1").save(path)
    model = resnets["b"]
    before = state_hashes(model)
    with pytest.raises(IncompatibleEditError, match="differs from the weights the edit was made on"):
        apply_edit(model, path, strict=True)
    assert state_hashes(model) == before and list_edits(model) == []
    with pytest.warns(SurgeryWarning, match="differs from the weights the edit was made on"):
        handle = apply_edit(model, path)
    assert state_hashes(model) != before
    revert_edit(model, handle)
    assert state_hashes(model) == before


def test_an_edit_is_refused_on_another_architecture(resnets, tmp_path: Path) -> None:
    path = tmp_path / "edit.safetensors"
    _factored(resnets["a"], "layer1.0.conv1").save(path)
    model = resnets["34"]  # has layer1.0.conv1.weight with the same shape
    assert (
        model.get_parameter("layer1.0.conv1.weight").shape == resnets["a"].get_parameter("layer1.0.conv1.weight").shape
    )
    before = state_hashes(model)
    with pytest.raises(IncompatibleEditError, match="architecture") as info:
        apply_edit(model, path)
    assert "resnet18 and resnet34" in str(info.value)
    small = RECIPE.build()  # lacks the parameter altogether
    with pytest.raises(IncompatibleEditError, match="architecture"):
        apply_edit(small, path)
    edit = Edit.load(path)
    edit.architecture = None  # skip the architecture check: the missing parameter is named
    with pytest.raises(IncompatibleEditError, match="no parameter 'layer1.0.conv1.weight'"):
        apply_edit(small, edit)
    assert state_hashes(model) == before


def test_applying_the_same_edit_twice_warns(tmp_path: Path) -> None:
    model = RECIPE.build()
    path = tmp_path / "edit.safetensors"
    _factored(model, "0").save(path)
    apply_edit(model, path)
    with pytest.warns(SurgeryWarning, match="already applied"):
        apply_edit(model, path)
    assert len(list_edits(model)) == 2
    assert revert_edit(model, path).through_handle  # an active edit reverts through its handle
    assert revert_edit(model, path).through_handle
    assert list_edits(model) == []
