"""Speed: the fast solver, key statistics, suffix evaluation and edit files, side by side with what they
replace, as ratios measured in one run.

    python -m benchmarks.speed --quick            # ~10 minutes on 2 CPU cores
    python -m benchmarks.speed                    # the reference solver runs its full 20,000 steps
    python -m benchmarks.speed --device cuda

Prints a markdown table and writes JSON (and the table) to ``benchmarks/results/``. Weights are random
(timing does not depend on them); BN statistics are randomized so that every block matters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

import surgery
from surgery.editable import EditableLayer
from surgery.models.random_init import randomize_batchnorm
from surgery.problems import prepare_problem
from surgery.rewrite import rewrite
from surgery.solvers import solve_fast, solve_reference
from surgery.stats.collect import collect_key_stats
from surgery.stats.keystats import KeyStats
from surgery.stats.whitening import inverse_sqrt
from surgery.suffix import network_suffix, suffix_logits


logger = logging.getLogger("benchmarks.speed")

RESULTS = Path(__file__).parent / "results"
REFERENCE_STEPS = 20_000
QUICK_STEPS = 2_000  # --quick: steps run, their time per step scaled to REFERENCE_STEPS
# the fast solve and one objective evaluation are timed again this many times during the reference's run,
# evenly spaced, so that the machine's drifts over the run hit both sides of the ratio alike
INTERLEAVED = 10
CASES = {
    "vgg16_bn features.40": (lambda: torchvision.models.vgg16_bn(), "features.40"),
    "resnet50 layer4.1.conv3": (lambda: torchvision.models.resnet50(), "layer4.1.conv3"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

# Layers with 3072 input channels, where decomposing the key moment dominated an edit (issue 16):
# (model, layer, image size).
WIDE_CASES = {
    "vit_b_16 encoder_layer_11.mlp.3": (
        lambda: torchvision.models.vit_b_16(), "encoder.layers.encoder_layer_11.mlp.3", 224
    ),
    "convnext_tiny features.7.2.block.5": (lambda: torchvision.models.convnext_tiny(), "features.7.2.block.5", 224),
    "swin_t features.7.1.mlp.3": (lambda: torchvision.models.swin_t(), "features.7.1.mlp.3", 224),
}


def timed_side_by_side(
    fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 3, warmup: bool = True
) -> dict[str, float]:
    """Median wall time of each function, measured in alternating rounds so that drifts in the
    machine's load hit every function alike."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class _CountCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called from Python while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def torch_calls(fn: Callable[[], object]) -> int:
    """How many torch operations one call of ``fn`` dispatches from Python. Where each is small, their
    fixed cost, not arithmetic, sets the time."""
    with _CountCalls() as counter:
        fn()
    return counter.calls


def build(case: str, device: torch.device) -> tuple[nn.Module, EditableLayer]:
    """A randomly initialized model of ``case`` with non-trivial BN statistics, in eval mode."""
    factory, layer_name = {**CASES, **AFFINE_L2_CASES}[case]
    torch.manual_seed(0)
    model = randomize_batchnorm(factory()).eval().to(device)
    return model, surgery.get_layer(model, layer_name)


def exemplar(size: int, device: torch.device, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images and copies whose lower half (the "floor") is replaced."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    x2 = x.clone()
    x2[:, :, size // 2 :] = torch.randn(n, 3, size - size // 2, size, generator=g)
    return x.to(device), x2.to(device)


# Well-posed solver cases (issue 16): the trained testbed classifiers on real testbed scenes, statistics from
# 2,000 training scenes, one exemplar (a test scene with grass and the same scene with the grass snowed over).
TRAINED_CASES = {
    "testbed vgg features.25": ("vgg", "features.25"),
    "testbed resnet layer4.0.conv2": ("resnet", "layer4.0.conv2"),
}


# A block affine in the weight (fc2, then the residual add) under the L2 loss: the solve is one exact step.
AFFINE_L2_CASES = {
    "vit_b_16 encoder_layer_11.mlp.3, L2": (lambda: torchvision.models.vit_b_16(), "encoder.layers.encoder_layer_11.mlp.3"),
}


def _random_weight_problem(case: str, device: torch.device, size: int, n_stats: int):
    model, layer = build(case, device)
    x, x2 = exemplar(size, device)
    data = torch.randn(n_stats, 3, size, size, generator=torch.Generator().manual_seed(2))
    stats = collect_key_stats(model, layer, data.to(device), batch_size=4, progress=False)
    loss = "l2" if case in AFFINE_L2_CASES else "l1"
    return prepare_problem(model, layer, x, x2, stats=stats, loss=loss), stats, n_stats


def _trained_problem(case: str, device: torch.device):
    from surgery.testbed import Testbed, TestbedConfig
    from surgery.testbed.train import load_trained, normalize

    arch, layer_name = TRAINED_CASES[case]
    model, _ = load_trained(arch, train_if_missing=False)
    model = model.eval().to(device)
    tb = Testbed(TestbedConfig())
    train, test = tb.make_dataset(2000, "train"), tb.make_dataset(200, "test")
    stats = collect_key_stats(model, layer_name, normalize(train.images).to(device), batch_size=100, progress=False)
    i = int(test.has_concept("grass").nonzero()[0])
    snowy, _ = tb.render_batch([test.specs[i]], restyle={"grass": ("snow", 0)})
    x, x2 = normalize(test.images[i : i + 1]).to(device), normalize(snowy).to(device)
    return prepare_problem(model, layer_name, x, x2, stats=stats, loss="l1"), stats, len(train)


def bench_solver(case: str, device: torch.device, *, quick: bool, size: int, n_stats: int = 64) -> dict:
    """Fast vs reference on the same keys, values and u (one exemplar, L1 loss; L2 for AFFINE_L2_CASES)."""
    if case in TRAINED_CASES:
        problem, stats, n_stats = _trained_problem(case, device)
    else:
        problem, stats, n_stats = _random_weight_problem(case, device, size, n_stats)
    # How well posed the problem is: near-null eigenvalues of C, and how much of C's top energy u sees
    # (random weights: ~120 near-zero eigenvalues of 512 and u'Cu / lambda_max ~1e-7, whatever the images).
    evals = torch.linalg.eigvalsh(stats.moment())
    u = problem.u.to(torch.float64).cpu()
    conditioning = {
        "stats_images": n_stats,
        "near_zero_eigenvalues": int((evals < 1e-6 * evals[-1]).sum()),
        "u_energy_vs_top": float((u @ stats.moment() @ u.T).diagonal().max() / evals[-1]),
    }
    _sync(device)
    start = time.perf_counter()
    _, fast_info = solve_fast(problem)  # the first call pays one-time costs (CUDA/cuSOLVER start-up)
    _sync(device)
    first_s = time.perf_counter() - start
    lam0 = torch.zeros(problem.lam_shape, dtype=problem.weight0.dtype, device=device)

    def evaluate() -> object:  # one evaluation of the objective: the limit a solver cannot beat
        with torch.no_grad():
            return problem.objective(lam0)

    fns = {"fast": lambda: solve_fast(problem), "objective": evaluate}
    evaluate()  # warm-up
    side: dict[str, list[float]] = {name: [] for name in fns}

    def time_beside(steps_taken: int = 0) -> None:  # one round of each; the reference's time excludes it
        for name, t in timed_side_by_side(fns, device, repeats=1, warmup=False).items():
            side[name].append(t)

    for _ in range(3):  # before the reference's run, then INTERLEAVED rounds during it
        time_beside()
    steps = QUICK_STEPS if quick else REFERENCE_STEPS
    _, ref_info = solve_reference(
        problem, steps=steps, progress=True, callback=time_beside, callback_every=max(1, steps // INTERLEAVED)
    )
    fast_s, eval_s = statistics.median(side["fast"]), statistics.median(side["objective"])
    per_step = ref_info["seconds"] / steps
    ref_full_s = per_step * REFERENCE_STEPS
    calls = {name: torch_calls(fn) for name, fn in fns.items()}
    return {
        "case": case,
        "fast_seconds": fast_s,
        "fast_timings": len(side["fast"]),
        "fast_seconds_first_call": first_s,
        "objective_eval_seconds": eval_s,
        "fast_in_objective_evals": fast_s / eval_s,
        "fast_torch_calls": calls["fast"],
        "objective_torch_calls": calls["objective"],
        "fast_iterations": fast_info.get("iterations"),
        "fast_closed_form": fast_info.get("closed_form", False),
        "loss": problem.loss,
        "fast_objective": fast_info["objective"],
        "objective_before": fast_info["objective_before"],
        "reference_steps_run": steps,
        "reference_seconds_run": ref_info["seconds"],
        "reference_objective": ref_info["objective"],
        "reference_seconds_per_step": per_step,
        "reference_seconds_20000": ref_full_s,
        "reference_20000_measured": not quick,
        "speedup_vs_20000_steps": ref_full_s / fast_s,
        "fast_objective_no_worse": fast_info["objective"] <= ref_info["objective"],
        "reference_trajectory": ref_info.get("trajectory"),
        **conditioning,
    }


def bench_stats(case: str, device: torch.device, *, size: int, n_images: int, batch: int) -> dict:
    """collect_key_stats vs a forward that stops at the key site (the limit) vs a full forward."""
    model, layer = build(case, device)
    data = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)

    def stats() -> None:
        collect_key_stats(model, layer, data, batch_size=batch, progress=False)

    def stop_at_site() -> None:
        with torch.no_grad():
            for i in range(0, n_images, batch):
                with surgery.Trace(model, layer.key_site.module, retain_input=True, retain_output=False, stop=True):
                    model(data[i : i + batch])

    def full() -> None:
        with torch.no_grad():
            for i in range(0, n_images, batch):
                model(data[i : i + batch])

    t = timed_side_by_side({"stats": stats, "limit": stop_at_site, "full": full}, device)
    ips = {k: n_images / v for k, v in t.items()}
    return {
        "case": case,
        "images": n_images,
        "images_per_second": ips,
        "stats_vs_limit": ips["stats"] / ips["limit"],
        "stats_vs_full_forward": ips["stats"] / ips["full"],
    }


def bench_suffix(case: str, device: torch.device, *, size: int, n_images: int, batch: int) -> dict:
    """Evaluating one candidate weight: cached keys + the network suffix vs full forward passes."""
    model, layer = build(case, device)
    data = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(4)).to(device)
    suffix = network_suffix(model, layer)
    cached = [layer.capture(model, data[i : i + batch]) for i in range(0, n_images, batch)]
    candidate = layer.weight.detach() * 1.01
    original = layer.weight.detach().clone()

    def with_suffix() -> None:
        with torch.no_grad():
            for io in cached:
                suffix_logits(suffix, layer, io.keys, candidate, io.context)

    def with_full_forward() -> None:
        with torch.no_grad():
            layer.weight.copy_(candidate)
            for i in range(0, n_images, batch):
                model(data[i : i + batch])
            layer.weight.copy_(original)

    t = timed_side_by_side({"suffix": with_suffix, "full": with_full_forward}, device)
    t_suffix, t_full = t["suffix"], t["full"]
    return {"case": case, "images": n_images, "suffix_seconds": t_suffix, "full_seconds": t_full, "speedup": t_full / t_suffix}


def bench_files(case: str, device: torch.device) -> dict:
    """Edit file size vs the dense layer; apply / revert time vs a plain copy of the weight."""
    model, layer = build(case, device)
    w = layer.weight
    lam = torch.randn(1, w.shape[0], *w.shape[2:]) * 1e-3
    u = torch.nn.functional.normalize(torch.randn(1, w.shape[1]), dim=1)
    edit = surgery.Edit(
        layer=layer.name,
        method="rewrite",
        lam=lam,
        u=u,
        base=surgery.edits.edit.base_record({layer.param_name: w}),
        architecture=surgery.identity.architecture_id(model),
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "edit.safetensors")
        edit.save(path)
        size = os.path.getsize(path)
    other = w.detach().clone()

    def apply_revert() -> None:
        surgery.revert_edit(model, surgery.apply_edit(model, edit))

    def plain_copy() -> None:
        with torch.no_grad():
            w.copy_(other)

    t = timed_side_by_side({"apply": apply_revert, "copy": plain_copy}, device, repeats=5)
    t_apply, t_copy = t["apply"], t["copy"]
    return {
        "case": case,
        "edit_bytes": size,
        "dense_bytes": w.numel() * w.element_size(),
        "size_ratio": w.numel() * w.element_size() / size,
        "apply_revert_seconds": t_apply,
        "plain_copy_seconds": t_copy,
        "apply_revert_vs_copy": t_apply / t_copy,
    }


def bench_wide(case: str, device: torch.device) -> dict:
    """A whole ``rewrite`` (one exemplar) on a 3072-channel layer, with statistics that carry their
    whitening (computed once, as a saved statistics file holds it) vs statistics that must decompose
    the moment on every edit (as before), side by side; and the decomposition alone."""
    factory, layer_name, size = WIDE_CASES[case]
    torch.manual_seed(0)
    model = randomize_batchnorm(factory()).eval().to(device)
    layer = surgery.get_layer(model, layer_name)
    x, x2 = exemplar(size, device)
    n = layer.weight.shape[1]
    # A well-conditioned moment from more key vectors than channels; the timing does not depend on
    # its content.
    keys = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    total, count = keys.T @ keys, 2 * n
    cached = KeyStats(layer.name, total, count, "float32")
    cached.whitening()

    def uncached() -> object:
        return rewrite(model, layer, x, x2, stats=KeyStats(layer.name, total, count, "float32"))

    times = timed_side_by_side(
        {
            "cached": lambda: rewrite(model, layer, x, x2, stats=cached),
            "uncached": uncached,
            "decomposition": lambda: inverse_sqrt(total / count),
        },
        device,
    )
    return {
        "case": case,
        "channels": n,
        "rewrite_cached_seconds": times["cached"],
        "rewrite_uncached_seconds": times["uncached"],
        "decomposition_seconds": times["decomposition"],
        "speedup": times["uncached"] / times["cached"],
    }


def markdown(results: dict) -> str:
    """The results as markdown tables (one per part that ran)."""
    lines = [f"Speed, {results['device']} ({results['mode']} run, torch {results['torch']}, {results['threads']} threads)"]
    if "solver" in results:
        lines += [
            "",
            "| solver | fast (s) | fast, first call (s) | fast / one objective evaluation | reference, 20,000 steps (s) | speed-up | objective fast / reference |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["solver"]:
            ref = f"{r['reference_seconds_20000']:.1f}" + ("" if r["reference_20000_measured"] else " (est.)")
            lines.append(
                f"| {r['case']} | {r['fast_seconds']:.2f} | {r['fast_seconds_first_call']:.2f} | "
                f"{r['fast_in_objective_evals']:.0f} | {ref} | "
                f"{r['speedup_vs_20000_steps']:.0f}x | "
                f"{r['fast_objective']:.4g} / {r['reference_objective']:.4g} ({r['reference_steps_run']} steps) |"
            )
        lines.append("")
        for r in results["solver"]:
            if r.get("reference_trajectory"):
                steps = ", ".join(f"{k}: {v:.4g}" for k, v in r["reference_trajectory"])
                lines.append(f"- {r['case']}, reference objective after (steps: objective) {steps}; unedited {r['objective_before']:.4g}.")
            if "fast_torch_calls" in r:
                lines.append(
                    f"- {r['case']}: the solve calls {r['fast_torch_calls']:,} torch operations from Python, one evaluation "
                    f"{r['objective_torch_calls']} ({r['fast_torch_calls'] / r['objective_torch_calls']:.0f}x, against "
                    f"{r['fast_in_objective_evals']:.0f}x in time; {r['fast_seconds'] / r['fast_torch_calls'] * 1e6:.1f} us per operation)."
                )
            if "near_zero_eigenvalues" in r:
                lines.append(
                    f"- {r['case']}, statistics from {r['stats_images']} images: {r['near_zero_eigenvalues']} near-zero "
                    f"eigenvalues of C (below 1e-6 of the largest), u'Cu / lambda_max = {r['u_energy_vs_top']:.2g}."
                )
    if "stats" in results:
        lines += ["", "| statistics | stats img/s | stop-at-site img/s | full forward img/s | vs limit | vs full |", "|---|---|---|---|---|---|"]
        for r in results["stats"]:
            i = r["images_per_second"]
            lines.append(
                f"| {r['case']} | {i['stats']:.1f} | {i['limit']:.1f} | {i['full']:.1f} | "
                f"{r['stats_vs_limit']:.2f} | {r['stats_vs_full_forward']:.2f} |"
            )
    if "suffix" in results:
        lines += ["", "| candidate evaluation | suffix (s) | full forward (s) | speed-up |", "|---|---|---|---|"]
        for r in results["suffix"]:
            lines.append(f"| {r['case']} ({r['images']} images) | {r['suffix_seconds']:.2f} | {r['full_seconds']:.2f} | {r['speedup']:.1f}x |")
    if "wide" in results:
        lines += [
            "",
            "| rewrite on a wide layer | channels | statistics carry C^-1/2 (s) | recomputed per edit (s) | C^-1/2 alone (s) | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["wide"]:
            lines.append(
                f"| {r['case']} | {r['channels']} | {r['rewrite_cached_seconds']:.2f} | "
                f"{r['rewrite_uncached_seconds']:.2f} | {r['decomposition_seconds']:.2f} | {r['speedup']:.1f}x |"
            )
    if "files" in results:
        lines += ["", "| edit file | file | dense layer | smaller by | apply+revert / plain copy |", "|---|---|---|---|---|"]
        for r in results["files"]:
            lines.append(
                f"| {r['case']} | {r['edit_bytes'] / 1024:.1f} KB | {r['dense_bytes'] / 2**20:.1f} MB | "
                f"{r['size_ratio']:.0f}x | {r['apply_revert_vs_copy']:.1f}x |"
            )
    return "\n".join(lines) + "\n"


PARTS = ("files", "stats", "suffix", "solver", "wide")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 reference steps, timed per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32, help="images for the statistics and evaluation")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--solver-images", type=int, default=64,
        help="images for the solver cases' statistics (more key vectors than channels: a well-posed problem)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default all)"
    )
    args = parser.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    results: dict = {
        "mode": "quick" if args.quick else "full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": args.size,
        "command": " ".join(
            [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", "python -m benchmarks.speed"]
            + list(sys.argv[1:] if argv is None else argv)
        ),
    }
    for key, fn in (
        ("files", lambda c: bench_files(c, device)),
        ("stats", lambda c: bench_stats(c, device, size=args.size, n_images=args.images, batch=args.batch)),
        ("suffix", lambda c: bench_suffix(c, device, size=args.size, n_images=args.images, batch=args.batch)),
        ("solver", lambda c: bench_solver(c, device, quick=args.quick, size=args.size, n_stats=args.solver_images)),
        ("wide", lambda c: bench_wide(c, device)),
    ):
        if key not in parts:
            continue
        results[key] = []
        for case in {"wide": WIDE_CASES, "solver": {**CASES, **AFFINE_L2_CASES, **TRAINED_CASES}}.get(key, CASES):
            logger.info("%s: %s", key, case)
            results[key].append(fn(case))
    table = markdown(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"speed-{results['mode']}-{device.type}" + ("" if set(parts) == set(PARTS) else "-" + "+".join(parts))
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    return results


if __name__ == "__main__":
    main()
