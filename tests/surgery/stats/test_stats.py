"""surgery.stats: the second moment of keys, its fingerprint, files and cache (issue 3, point 1)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import surgery.stats.collect as stats_mod
from surgery.errors import SurgeryError
from surgery.identity import tensor_sha256
from surgery.inputs.images import ImageFolder
from surgery.layers import get_layer
from surgery.stats.collect import collect_key_stats
from surgery.stats.fingerprint import weights_fingerprint
from surgery.stats.keystats import KeyStats, key_sums, ridged_moment
from tests.tiny_models import randomize_batchnorm

LAYER = "layer3.0.conv3"  # a Bottleneck's editable 1x1 conv, as in the paper's ResNet-50 layers
REL = 1e-10


def _resnet(dtype: torch.dtype = torch.float32) -> nn.Module:
    """timm's tiny Bottleneck ResNet; at 32 px layer3.0.conv3 sees 48 channels at 2x2 positions."""
    return randomize_batchnorm(timm.create_model("test_resnet")).eval().to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _direct(model: nn.Module, layer: str, chunks: list[torch.Tensor]) -> torch.Tensor:
    """``sum k k^T`` from keys captured with ``EditableLayer.capture``, chunk by chunk."""
    lay = get_layer(model, layer)
    keys = [lay.capture(model, c).keys for c in chunks]
    dim = lay.key_channel_dim
    k = torch.cat([t.movedim(dim, -1).reshape(-1, t.shape[dim]) for t in keys]).double()
    return k.T @ k


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(10, 3, 32, 32)


# ------------------------------------------------------------------------------------ accumulation


def test_several_batches_equal_one_pass(images: torch.Tensor) -> None:
    # In float64 keys do not depend on the batch size, so batching must not change the result.
    model = _resnet(torch.float64)
    one = collect_key_stats(model, LAYER, images, batch_size=10, progress=False)
    many = collect_key_stats(model, LAYER, images, batch_size=3, progress=False)
    assert one.count == many.count == 10 * 2 * 2  # images x positions (2x2 at 32 px)
    assert one.sum.dtype == torch.float64 and one.sum.shape == (48, 48)
    assert _rel(many.sum, one.sum) < REL
    # Merging partial statistics is the same sum.
    a = collect_key_stats(model, LAYER, images[:4], progress=False)
    b = collect_key_stats(model, LAYER, images[4:], progress=False)
    merged = a.merge(b)
    assert merged.count == one.count and _rel(merged.sum, one.sum) < REL
    assert _rel(one.moment(), one.sum / one.count) == 0.0


def test_equals_keys_from_capture(images: torch.Tensor) -> None:
    model = _resnet()
    st = collect_key_stats(model, LAYER, images, batch_size=4, progress=False)
    direct = _direct(model, LAYER, list(images.split(4)))
    assert _rel(st.sum, direct) < REL
    assert st.dtype == "float32" and st.layer == LAYER
    lay = get_layer(model, LAYER)
    from_keys = KeyStats.from_keys(lay.capture(model, images[:4]).keys, 1, layer=LAYER)
    assert _rel(from_keys.sum, _direct(model, LAYER, [images[:4]])) < REL


def test_token_keys_of_a_linear_layer() -> None:
    model = timm.create_model("test_vit", img_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    st = collect_key_stats(model, "blocks.0.mlp.fc2", x, batch_size=2, progress=False)
    lay = get_layer(model, "blocks.0.mlp.fc2")
    assert lay.key_channel_dim == -1
    tokens = lay.capture(model, x[:1]).keys.shape[1]
    assert st.n == lay.weight.shape[1] == 192
    assert st.count == 3 * tokens
    assert _rel(st.sum, _direct(model, "blocks.0.mlp.fc2", list(x.split(2)))) < REL


def test_every_data_source_gives_the_same_stats(tmp_path: Path, images: torch.Tensor) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Conv2d(5, 6, 1)
    ).eval()
    ref = collect_key_stats(model, "2", images, batch_size=5, progress=False)
    assert ref.count == 10 * 30 * 30 and ref.n == 4
    loader = DataLoader(TensorDataset(images, torch.zeros(10)), batch_size=5)
    for data in (loader, TensorDataset(images), [images[:5], images[5:]]):
        st = collect_key_stats(model, "2", data, batch_size=5, progress=False)
        assert st.count == ref.count and _rel(st.sum, ref.sum) < REL
    part = collect_key_stats(model, "2", images, max_images=7, batch_size=5, progress=False)
    assert part.count == 7 * 30 * 30
    assert _rel(part.sum, _direct(model, "2", [images[:5], images[5:7]])) < REL


def test_key_sums_moves_channels_last() -> None:
    k = torch.randn(2, 3, 4, 5)
    s, c = key_sums(k, 1)
    flat = k.permute(0, 2, 3, 1).reshape(-1, 3).double()
    assert c == 40 and torch.allclose(s, flat.T @ flat, rtol=1e-12)
    s_last, c_last = key_sums(k.permute(0, 2, 3, 1), -1)
    assert c_last == 40 and torch.equal(s_last, s)


def test_ridged_moment_adds_a_share_of_the_mean_eigenvalue() -> None:
    k = torch.randn(2, 3, 4, 5)
    s, c = key_sums(k, 1)
    moment = ridged_moment(k, 1, share=0.5)
    mean_eigenvalue = float(torch.linalg.eigvalsh(s / c).mean())
    assert torch.allclose(moment - s / c, 0.5 * mean_eigenvalue * torch.eye(3, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.equal(ridged_moment(k, 1), s / c + 1e-2 * torch.trace(s / c) / 3 * torch.eye(3, dtype=torch.float64))


# ------------------------------------------------------------------------------ the stopped forward


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_nothing_after_the_key_site_runs(images: torch.Tensor) -> None:
    model = _resnet()
    after = ["layer3.0.bn3", "layer3.0.act3", "layer3.0.downsample", "layer4", "global_pool", "fc"]
    before = ["conv1", "layer3.0.conv2", "layer3.0.act2"]
    hooks_before = _hook_count(model)
    calls = {name: 0 for name in [*after, *before, LAYER]}
    handles = []

    def counter(name: str):
        def count(*_args) -> None:
            calls[name] += 1

        return count

    for name in [*after, *before]:
        m = model.get_submodule(name)
        handles += [m.register_forward_pre_hook(counter(name)), m.register_forward_hook(counter(name))]
    # The edited layer itself: its forward and its forward hook must never run (a pre-hook may see
    # its input: that is the key).
    conv = model.get_submodule(LAYER)
    handles.append(conv.register_forward_hook(counter(LAYER)))
    real_forward = conv.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls[LAYER] += 1
        return real_forward(x)

    conv.forward = forward
    try:
        collect_key_stats(model, LAYER, images, batch_size=4, progress=False)
        weights_fingerprint(model, LAYER, images)
    finally:
        for h in handles:
            h.remove()
        del conv.forward
    assert all(calls[n] == 0 for n in [*after, LAYER]), calls
    assert all(calls[n] > 0 for n in before), calls
    # Every hook the library added is gone.
    assert _hook_count(model) == hooks_before


def test_model_must_be_in_eval_mode(images: torch.Tensor) -> None:
    model = _resnet().train()
    with pytest.raises(SurgeryError, match=r"model\.eval\(\)"):
        collect_key_stats(model, LAYER, images, progress=False)
    model.eval()
    model.layer1.train()
    with pytest.raises(SurgeryError, match="layer1"):
        weights_fingerprint(model, LAYER, images)


def test_empty_and_bad_data(images: torch.Tensor) -> None:
    model = _resnet()
    with pytest.raises(SurgeryError, match="empty"):
        collect_key_stats(model, LAYER, [], progress=False)
    bad = images.clone()
    bad[7, 0, 0, 0] = float("nan")
    with pytest.raises(SurgeryError, match="NaN"):
        collect_key_stats(model, LAYER, bad, batch_size=4, progress=False)


# ------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_covers_exactly_the_upstream(images: torch.Tensor) -> None:
    model = _resnet()
    fp = weights_fingerprint(model, LAYER, images)
    assert len(fp) == 64
    with torch.no_grad():
        after = [f"{LAYER}.weight", "layer3.0.bn3.weight", "layer3.0.downsample.1.weight", "fc.weight"]
        for name in after:
            model.get_parameter(name).add_(1.0)
    assert weights_fingerprint(model, LAYER, images) == fp  # the layer itself and what follows
    with torch.no_grad():
        model.layer3[0].conv2.weight[0, 0, 0, 0] += 1e-3
    fp_conv = weights_fingerprint(model, LAYER, images)
    assert fp_conv != fp
    model.bn1.running_mean[0] += 1.0  # buffers count too
    assert weights_fingerprint(model, LAYER, images) != fp_conv


# -------------------------------------------------------------------------------------- files


def _stats(model: nn.Module, images: torch.Tensor) -> KeyStats:
    return collect_key_stats(model, LAYER, images, progress=False, dataset_id="ds", max_images=9)


def test_save_load_round_trip_is_bit_exact(tmp_path: Path, images: torch.Tensor) -> None:
    st = _stats(_resnet(), images)
    path = st.save(tmp_path / "sub" / "stats.safetensors")
    back = KeyStats.load(path)
    assert torch.equal(back.sum, st.sum) and tensor_sha256(back.sum) == tensor_sha256(st.sum)
    for attr in ("layer", "count", "dtype", "dataset_id", "fingerprint", "max_images", "n"):
        assert getattr(back, attr) == getattr(st, attr), attr
    assert back.dataset_id == "ds" and back.max_images == 9
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary left behind
    no_id = KeyStats(st.layer, st.sum, st.count, st.dtype)
    assert KeyStats.load(no_id.save(tmp_path / "b.safetensors")).dataset_id is None


def test_bad_files_raise(tmp_path: Path, images: torch.Tensor) -> None:
    st = _stats(_resnet(), images)
    good = st.save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    cases = {
        "missing": None,
        "garbage": b"this is not a safetensors file at all",
        "truncated": data[: len(data) // 2],
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(SurgeryError):
            KeyStats.load(tmp_path / name)

    meta = st.metadata()
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, foreign, metadata={"format": "pt"})
    with pytest.raises(SurgeryError, match="format"):
        KeyStats.load(foreign)
    variants = {
        "version": ({"sum": st.sum}, {**meta, "format_version": "999"}, "format version"),
        "tensors": ({"sum": st.sum, "x": torch.zeros(1)}, meta, "expected exactly"),
        "count": ({"sum": st.sum}, {**meta, "count": "many"}, "integer"),
        "zero": ({"sum": st.sum}, {**meta, "count": "0"}, "count"),
        "shape": ({"sum": st.sum[:4, :4].clone()}, meta, "float64"),
        "dtype": ({"sum": st.sum.float()}, meta, "float64"),
        "nan": ({"sum": st.sum.clone().fill_(float("nan"))}, meta, "NaN"),
        "asym": ({"sum": st.sum + torch.triu(torch.ones_like(st.sum), 1)}, meta, "symmetric"),
        "nolayer": ({"sum": st.sum}, {k: v for k, v in meta.items() if k != "layer"}, "lacks"),
    }
    for name, (tensors, md, match) in variants.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path, metadata=md)
        with pytest.raises(SurgeryError, match=match):
            KeyStats.load(path)


def test_merge_refuses_mismatches(images: torch.Tensor) -> None:
    st = _stats(_resnet(), images)
    other_layer = KeyStats("layer4.0.conv3", st.sum, st.count, st.dtype, "ds", st.fingerprint)
    with pytest.raises(SurgeryError, match="layer"):
        st.merge(other_layer)
    with pytest.raises(SurgeryError, match="fingerprint"):
        st.merge(KeyStats(st.layer, st.sum, st.count, st.dtype, "ds", "0" * 64))
    with pytest.raises(SurgeryError):
        KeyStats(st.layer, st.sum.float(), st.count, st.dtype)
    merged = st.merge(KeyStats(st.layer, st.sum, 3, st.dtype, "other", st.fingerprint))
    assert merged.count == st.count + 3 and merged.dataset_id.startswith("merged:")


# -------------------------------------------------------------------------------------- cache


def _cache_logs(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("surgery.stats"))


def test_cache_hits_and_misses(
    tmp_path: Path, images: torch.Tensor, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    caplog.set_level(logging.INFO, logger="surgery.stats")
    model = _resnet()
    cache = tmp_path / "cache"
    first = collect_key_stats(model, LAYER, images, cache_dir=cache, progress=False)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("layer3_0_conv3-")
    assert len(files[0].stem.split("-")[1]) == 16
    assert "miss" in _cache_logs(caplog)

    # Unchanged model, or changes at the layer or after it: a hit, computed by nobody.
    real_accumulate = stats_mod._accumulate

    def fail(*args, **kwargs):
        raise AssertionError("recomputed on a cache hit")

    monkeypatch.setattr(stats_mod, "_accumulate", fail)
    caplog.clear()
    hit = collect_key_stats(model, LAYER, images, cache_dir=cache, progress=False)
    assert "cache hit" in _cache_logs(caplog)
    assert torch.equal(hit.sum, first.sum) and hit.fingerprint == first.fingerprint
    with torch.no_grad():
        model.layer3[0].conv3.weight.mul_(2.0)
        model.fc.weight.zero_()
    after_edit = collect_key_stats(model, LAYER, images, cache_dir=cache, progress=False)
    assert torch.equal(after_edit.sum, first.sum)

    # An upstream change misses and recomputes.
    monkeypatch.setattr(stats_mod, "_accumulate", real_accumulate)
    with torch.no_grad():
        model.layer2[0].conv1.weight.mul_(1.5)
    caplog.clear()
    changed = collect_key_stats(model, LAYER, images, cache_dir=cache, progress=False)
    assert "miss" in _cache_logs(caplog) and "cache hit" not in _cache_logs(caplog)
    assert changed.fingerprint != first.fingerprint and not torch.equal(changed.sum, first.sum)
    assert len(list(cache.iterdir())) == 2

    # Other data, or another max_images, miss too.
    other = collect_key_stats(model, LAYER, images + 1, cache_dir=cache, progress=False)
    assert other.dataset_id != changed.dataset_id
    collect_key_stats(model, LAYER, images, cache_dir=cache, max_images=5, progress=False)
    assert len(list(cache.iterdir())) == 4


def test_cache_checks_saved_metadata(tmp_path: Path, images: torch.Tensor, caplog) -> None:
    caplog.set_level(logging.INFO, logger="surgery.stats")
    model = _resnet()
    cache = tmp_path / "cache"
    st = collect_key_stats(model, LAYER, images, cache_dir=cache, progress=False)
    (path,) = cache.iterdir()
    # A file at the right name but for other data is not used.
    KeyStats(st.layer, st.sum * 2, st.count, st.dtype, "someone else's", st.fingerprint).save(path)
    caplog.clear()
    again = collect_key_stats(model, LAYER, images, cache_dir=cache, progress=False)
    assert "dataset_id" in _cache_logs(caplog) and torch.equal(again.sum, st.sum)
    # A corrupted file is recomputed and replaced.
    path.write_bytes(b"junk")
    caplog.clear()
    again = collect_key_stats(model, LAYER, images, cache_dir=cache, progress=False)
    assert "unusable" in _cache_logs(caplog) and torch.equal(again.sum, st.sum)
    assert torch.equal(KeyStats.load(path).sum, st.sum)
    assert not [p for p in cache.iterdir() if p != path]


def test_cache_needs_a_dataset_id(tmp_path: Path, images: torch.Tensor, caplog) -> None:
    caplog.set_level(logging.INFO, logger="surgery.stats")
    model = _resnet()
    cache = tmp_path / "cache"
    st = collect_key_stats(model, LAYER, iter([images]), cache_dir=cache, progress=False)
    assert st.dataset_id is None and not cache.exists()
    assert any(r.levelno == logging.WARNING and "dataset_id" in r.getMessage() for r in caplog.records)
    named = collect_key_stats(
        model, LAYER, iter([images]), cache_dir=cache, dataset_id="mine", progress=False
    )
    assert named.dataset_id == "mine" and len(list(cache.iterdir())) == 1


def test_image_folder_statistics_are_cached(tmp_path: Path, caplog) -> None:
    from PIL import Image

    caplog.set_level(logging.INFO, logger="surgery.stats")
    root = tmp_path / "imgs"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i}.png")
    model = _resnet()
    ds = ImageFolder(root)
    st = collect_key_stats(model, LAYER, ds, batch_size=2, cache_dir=tmp_path / "c", progress=True)
    assert st.dataset_id == ds.dataset_id and st.count == 5 * 4
    caplog.clear()
    again = collect_key_stats(
        model, LAYER, ImageFolder(root), cache_dir=tmp_path / "c", progress=False
    )
    assert "cache hit" in _cache_logs(caplog) and torch.equal(again.sum, st.sum)


def test_without_a_cache_the_fingerprint_costs_no_extra_forward(tmp_path: Path, images: torch.Tensor) -> None:
    """With no cache to look up, the fingerprint and key dtype come from the first batch's forward:
    one forward per batch, and the same fingerprint as the cached path computes up front."""
    model = _resnet()
    stem = model.get_submodule("conv1")
    calls = [0]
    h = stem.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    hooks_before = _hook_count(model)
    try:
        plain = collect_key_stats(model, LAYER, images, batch_size=4, progress=False)
        assert calls[0] == 3  # 10 images in batches of 4: no peek forward
        assert _hook_count(model) == hooks_before
        cached = collect_key_stats(model, LAYER, images, batch_size=4, progress=False, cache_dir=tmp_path)
        assert calls[0] == 3 + 1 + 3  # the cached path peeks one image first
    finally:
        h.remove()
    assert plain.fingerprint == cached.fingerprint == weights_fingerprint(model, LAYER, images[:1])
    assert plain.dtype == cached.dtype == "float32"
    assert torch.equal(plain.sum, cached.sum)


# ------------------------------------------------------------------------------- several layers at once

SPAN = ["layer2.0.conv2", LAYER]  # two key sites, one in each of two stages


def test_a_list_of_layers_is_collected_in_one_pass(images: torch.Tensor) -> None:
    """The statistics of a span's layers come from one forward per batch, and equal (to the bit, in
    float64) what each layer's own collection gives."""
    model = _resnet(torch.float64)
    stem = model.get_submodule("conv1")
    calls = [0]
    h = stem.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    hooks_before = _hook_count(model)
    try:
        both = collect_key_stats(model, SPAN, images, batch_size=4, progress=False)
        assert calls[0] == 3  # 10 images in batches of 4, both layers read in the same forwards
        assert _hook_count(model) == hooks_before
    finally:
        h.remove()
    assert list(both) == SPAN
    for name in SPAN:
        alone = collect_key_stats(model, name, images, batch_size=4, progress=False)
        assert torch.equal(both[name].sum, alone.sum) and both[name].count == alone.count
        assert both[name].fingerprint == alone.fingerprint and both[name].layer == name


def test_a_list_of_layers_uses_the_cache_layer_by_layer(tmp_path: Path, images: torch.Tensor, monkeypatch) -> None:
    model = _resnet()
    cache = tmp_path / "cache"
    alone = collect_key_stats(model, LAYER, images, cache_dir=cache, progress=False)
    computed: list[list[str]] = []
    real_accumulate = stats_mod._accumulate

    def spy(model, layers, *args, **kwargs):
        computed.append([layer.name for layer in layers])
        return real_accumulate(model, layers, *args, **kwargs)

    monkeypatch.setattr(stats_mod, "_accumulate", spy)
    both = collect_key_stats(model, SPAN, images, cache_dir=cache, progress=False)
    assert computed == [["layer2.0.conv2"]]  # the cached layer is read from its file, not recomputed
    assert torch.equal(both[LAYER].sum, alone.sum)
    again = collect_key_stats(model, SPAN, images, cache_dir=cache, progress=False)
    assert computed == [["layer2.0.conv2"]] and len(list(cache.iterdir())) == 2
    assert all(torch.equal(again[n].sum, both[n].sum) for n in SPAN)


def test_a_list_of_layers_must_name_distinct_layers(images: torch.Tensor) -> None:
    model = _resnet()
    for bad in ([], [LAYER, LAYER]):
        with pytest.raises(SurgeryError, match="list of distinct layers"):
            collect_key_stats(model, bad, images, progress=False)
