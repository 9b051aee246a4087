"""How exact are reverts? Handle reverts restore the saved bytes; file reverts subtract the update.

    python -m benchmarks.revert_exactness          # the real EfficientNet-Lite0, offline, ~1 minute

For a few layers of the real ImageNet EfficientNet-Lite0, one edit is computed from a bundled photo
(its centre covered by a texture), applied to the checkpoint file and reverted from the file, as
`surgery apply` / `surgery revert` do in another process. Reported per layer: how many elements of
the weight differ from the original after the file revert, the largest difference in ulps of the
larger of the original and the edited value, the strength the revert found the edit at, and the
deviation along the edit after it. A handle revert (`revert_edit(model, handle)`) is compared too.
Writes ``benchmarks/results/revert_exactness.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery._files import write_text
from surgery.concepts.paste import paste_texture
from surgery.edits.on_checkpoints import apply_to_checkpoint, revert_from_checkpoint
from surgery.inputs.photos import sample_photos, sample_textures
from surgery.inputs.preprocess import Preprocess
from surgery.models.loading import efficientnet_lite0

LAYERS = ("blocks.2.1.conv_pwl", "blocks.4.2.conv_pwl", "blocks.6.0.conv_pwl", "conv_head")
RESULTS = Path(__file__).resolve().parent / "results"


def _ulps(w0: torch.Tensor, w1: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    big = torch.maximum(w0.abs(), w1.abs())
    ulp = torch.nextafter(big, torch.tensor(float("inf"))) - big
    return (w - w0).abs() / ulp


def measure(layers: tuple[str, ...] = LAYERS) -> list[dict]:
    torch.manual_seed(0)
    model = efficientnet_lite0()
    tf = Preprocess.from_model(model).model_input()
    photos = sample_photos()
    x = torch.stack([tf(p) for p in photos.values()])
    gravel = sample_textures(["gravel"])["gravel"]
    pixels = torch.stack([torch.from_numpy(np.asarray(p.convert("RGB").resize((224, 224)))).permute(2, 0, 1) / 255.0 for p in photos.values()])
    mask = torch.zeros(len(photos), 1, 224, 224)
    mask[:, :, 64:160, 64:160] = 1
    x2 = (paste_texture(pixels, mask[:, 0] > 0, gravel) - 0.5) / 0.5
    x1 = (pixels - 0.5) / 0.5
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "lite0.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
        for layer in layers:
            stats = surgery.collect_key_stats(model, layer, x, progress=False)
            edit = surgery.rewrite(model, layer, x1[:1], x2[:1], stats=stats)
            path = Path(d) / "edit.safetensors"
            edit.save(path)
            edited, back = Path(d) / "edited.safetensors", Path(d) / "back.safetensors"
            apply_to_checkpoint(ckpt, path, edited)
            report = revert_from_checkpoint(edited, path, back)
            name = f"{layer}.weight"
            w0, w1, w = (load_file(str(p))[name] for p in (ckpt, edited, back))
            ulps = _ulps(w0, w1, w)
            handle = surgery.apply_edit(model, path)
            surgery.revert_edit(model, handle)
            rows.append(
                {
                    "layer": layer,
                    "elements": w0.numel(),
                    "differ_after_file_revert": int((w != w0).sum()),
                    "differ_pct": round(100.0 * float((w != w0).float().mean()), 2),
                    "max_ulps": round(float(ulps.max()), 3),
                    "max_abs": float((w - w0).abs().max()),
                    "exact": bool(report),
                    "found_strength": report.found.strength if report.found else None,
                    "strength_after": report.after.strength if report.after else None,
                    "handle_revert_exact": torch.equal(model.get_parameter(name).detach(), w0),
                }
            )
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Revert exactness: the real EfficientNet-Lite0",
        "",
        f"`{command}`",
        "",
        "| layer | elements | differ after a file revert | max difference (ulps) | strength found | strength after | handle revert |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['elements']:,} | {r['differ_after_file_revert']:,} ({r['differ_pct']:.2f}%) | "
            f"{r['max_ulps']:.3g} | {r['found_strength']:.6f} | {r['strength_after']:.2e} | "
            f"{'bit-exact' if r['handle_revert_exact'] else 'NOT exact'} |"
        )
    lines += [
        "",
        "ulps are of the larger of the original and the edited value. A file revert subtracts the update "
        "in float64 and rounds once: each element ends within 1.5 ulps of its original (half an ulp from "
        "the apply, half an ulp from the revert, which may land one binade up). A handle revert restores "
        "the bytes saved at apply time.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.revert_exactness", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = measure()
    command = "python -m benchmarks.revert_exactness"
    write_text(args.out / "revert_exactness.json", json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    text = markdown(rows, command)
    write_text(args.out / "revert_exactness.md", text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
