"""Key statistics under torch.distributed: 2 gloo processes on CPU give the single-process result."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from safetensors.torch import load_file, save_file

from surgery.stats.collect import collect_key_stats
from surgery.stats.keystats import KeyStats
from tests.tiny_models import randomize_batchnorm

LAYER = "layer3.1.conv2"
DATA_KINDS = ("tensor", "dataset")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18()).eval().double()


def _data() -> torch.Tensor:
    return torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        original_save = KeyStats.save

        def logged_save(self, path):  # records which rank writes the cache
            with open(os.path.join(tmp, "writes.log"), "a") as f:
                f.write(f"{rank}\n")
            original_save(self, path)

        KeyStats.save = logged_save
        for kind in DATA_KINDS:  # one spawn for both: starting processes is the slow part
            data = _data() if kind == "tensor" else torch.utils.data.TensorDataset(_data())
            stats = collect_key_stats(
                _model(), LAYER, data, batch_size=2, cache_dir=os.path.join(tmp, f"cache-{kind}"),
                dataset_id="eleven-random-images", progress=False,
            )
            save_file(
                {"sum": stats.sum},
                os.path.join(tmp, f"rank{rank}-{kind}.safetensors"),
                metadata={"count": str(stats.count)},
            )
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path: Path):
    from safetensors import safe_open

    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    single = collect_key_stats(_model(), LAYER, _data(), batch_size=3, progress=False)
    for kind in DATA_KINDS:
        for rank in range(2):
            path = tmp_path / f"rank{rank}-{kind}.safetensors"
            got = load_file(path)["sum"]
            with safe_open(str(path), "pt") as f:
                count = int(f.metadata()["count"])
            assert count == single.count, (kind, rank)
            rel = ((got - single.sum).norm() / single.sum.norm()).item()
            assert rel < 1e-12, (kind, rank, rel)
        assert len(list((tmp_path / f"cache-{kind}").glob("*.safetensors"))) == 1
    assert (tmp_path / "writes.log").read_text().split() == ["0"] * len(DATA_KINDS)


def test_distributed_true_without_a_group_is_a_clear_error():
    from surgery import SurgeryError

    with pytest.raises(SurgeryError, match="init_process_group"):
        collect_key_stats(_model(), LAYER, _data(), distributed=True, progress=False)


def test_shard_splits_by_index_and_respects_max_images():
    from surgery.stats.distributed import shard

    data = torch.arange(10).float().reshape(10, 1, 1, 1).expand(10, 3, 1, 1)
    parts = [shard(data, r, 3, max_images=8) for r in range(3)]
    seen = sorted(int(v) for p in parts for v in p[:, 0, 0, 0])
    assert seen == list(range(8))
    ds = torch.utils.data.TensorDataset(data)
    assert [int(ds[i][0][0, 0, 0]) for i in shard(ds, 1, 3).indices] == [1, 4, 7]
