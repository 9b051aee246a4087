"""benchmarks.speed end to end on small layers: every part runs, and the JSON and table agree."""

from __future__ import annotations

import json

import pytest
import torchvision

from benchmarks import speed


def test_quick_run_writes_every_part(tmp_path, monkeypatch):
    monkeypatch.setattr(
        speed,
        "CASES",
        {
            "resnet18 layer2.1.conv2": (lambda: torchvision.models.resnet18(num_classes=10), "layer2.1.conv2"),
            "vgg11_bn features.4": (lambda: torchvision.models.vgg11_bn(num_classes=10), "features.4"),
        },
    )
    monkeypatch.setattr(
        speed, "WIDE_CASES", {"resnet18 layer4.1.conv2": (lambda: torchvision.models.resnet18(num_classes=10), "layer4.1.conv2", 32)}
    )
    monkeypatch.setattr(speed, "AFFINE_L2_CASES", {})  # the solver tests cover the affine L2 solve
    monkeypatch.setattr(speed, "TRAINED_CASES", {})  # test_trained_solver_case_is_well_posed covers them
    monkeypatch.setattr(speed, "REFERENCE_STEPS", 400)
    monkeypatch.setattr(speed, "QUICK_STEPS", 100)
    results = speed.main(["--quick", "--device", "cpu", "--size", "32", "--images", "4", "--batch", "2", "--solver-images", "4", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "speed-quick-cpu.json").read_text())
    table = (tmp_path / "speed-quick-cpu.md").read_text()
    assert saved["mode"] == "quick" and saved["size"] == 32
    assert saved["command"].endswith("python -m benchmarks.speed --quick --device cpu --size 32 --images 4 --batch 2 --solver-images 4 --out " + str(tmp_path))
    for part in speed.PARTS:
        assert [r["case"] for r in saved[part]] == list(speed.WIDE_CASES if part == "wide" else speed.CASES), part
    for r in saved["wide"]:
        assert r["channels"] == 512 and r["rewrite_cached_seconds"] > 0 and r["decomposition_seconds"] > 0
        assert f"| {r['case']} | 512 |" in table
    for r in saved["solver"]:
        assert r["reference_steps_run"] == 100 and not r["reference_20000_measured"]
        assert r["reference_seconds_20000"] == pytest.approx(r["reference_seconds_per_step"] * 400)
        assert 0 < r["fast_seconds"] and 0 < r["fast_seconds_first_call"]
        assert r["fast_timings"] == 3 + speed.INTERLEAVED  # three rounds before the reference, the rest during it
        assert r["fast_torch_calls"] > 10 * r["objective_torch_calls"] > 0
        assert f"- {r['case']}: the solve calls {r['fast_torch_calls']:,} torch operations from Python" in table
        assert r["fast_in_objective_evals"] == pytest.approx(r["fast_seconds"] / r["objective_eval_seconds"])
        assert r["fast_in_objective_evals"] > 1, "a solve cannot cost less than one evaluation"
        traj = r["reference_trajectory"]
        assert traj[0][0] == 0 and traj[-1] == [100, r["reference_objective"]] and [k for k, _ in traj] == sorted(k for k, _ in traj)
        assert r["stats_images"] == 4 and r["near_zero_eigenvalues"] >= 0 and 0 <= r["u_energy_vs_top"] <= 1 + 1e-9
        assert f"- {r['case']}, reference objective after (steps: objective) 0: " in table
        assert r["fast_objective"] < r["objective_before"]
        assert f"| {r['case']} | {r['fast_seconds']:.2f} |" in table
    for r in saved["stats"]:
        assert set(r["images_per_second"]) == {"stats", "limit", "full"}
    for r in saved["files"]:
        assert r["edit_bytes"] < r["dense_bytes"]
    assert all(r["speedup"] > 0 for r in saved["suffix"])
    assert results["solver"][0]["case"] == saved["solver"][0]["case"]


def test_torch_calls_counts_operations_called_from_python():
    import torch

    assert speed.torch_calls(lambda: None) == 0
    assert speed.torch_calls(lambda: torch.zeros(3) + 1) == 2
    assert speed.torch_calls(lambda: torch.zeros(3).reshape(3, 1).sum()) == 3


@pytest.mark.parametrize("case", list(speed.TRAINED_CASES))
def test_trained_solver_case_is_well_posed(case):
    """The trained testbed cases, unlike random weights (~120 near-null directions of 512, u'Cu / lambda_max
    ~1e-7), have a full-rank key moment that u reaches."""
    import torch

    problem, stats, n = speed._trained_problem(case, torch.device("cpu"))
    evals = torch.linalg.eigvalsh(stats.moment())
    u = problem.u.to(torch.float64)
    assert n == 2000 and int((evals < 1e-6 * evals[-1]).sum()) == 0
    assert float((u @ stats.moment() @ u.T).diagonal().max() / evals[-1]) > 1e-3
    assert problem.objective(torch.zeros(problem.lam_shape)) > 0  # the snow changes the values
