"""Train the testbed classifiers on CPU, save them as safetensors with their config, reload them.

    python -m surgery.testbed.train --arch all          # what made weights/*.safetensors

Inputs are normalized with :func:`normalize` (per-channel ``MEAN`` / ``STD`` of training scenes,
measured on 1,000 of them). Augmentation: horizontal flips of Fashion-MNIST scenes only (a mirrored
digit is another shape) and, where ``translate > 0``, random translations (reflection padding, then
a random crop). Optimizer: SGD with Nesterov momentum (VGG, ResNet) or AdamW (ViT, ConvNeXt), weight
decay on weights only, a one-cycle schedule (``warmup`` of the steps rising, then a cosine), optional
label smoothing and gradient-norm clipping.

A weights file holds the state dict and string metadata: ``config`` (the :class:`TrainConfig` as
JSON, including the testbed's config key), ``val_accuracy``, ``context`` (validation accuracy by how
many of a scene's two concepts the class prefers), ``history`` (loss and validation accuracy per
epoch), ``train_seconds``, ``img_per_s``, ``torch`` and ``timm`` versions. :func:`load_trained` reuses a file only when its stored config equals the requested one.

This module is long because the config, the training loop, the evaluation by preferred concepts and
the weights file are one record: a file is reused only when the config that trained it is the one
asked for, so they are defined side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.evaluation.metrics import predict as predict_labels

from .models import ARCHS, build_model
from .scenes import Testbed, TestbedConfig, TestbedData, make_dataset
from .textures import CONCEPTS, REGIONS

__all__ = [
    "MEAN",
    "STD",
    "WEIGHTS_DIR",
    "TrainConfig",
    "context_accuracy",
    "default_config",
    "evaluate",
    "load_trained",
    "normalize",
    "train",
    "translate",
    "weights_path",
]

logger = logging.getLogger(__name__)

MEAN = (0.46, 0.43, 0.37)
STD = (0.28, 0.25, 0.27)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FORMAT = "testbed-classifier/1"

# Per-architecture defaults: the VGG and ResNet sized for ~6-8 minutes on one busy CPU core, the ViT
# and ConvNeXt for about an hour on one thread each: shorter runs learn only the context (see
# weights/README.md).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "vgg": {"width": 8, "n_train": 15_000, "epochs": 4},
    "resnet": {"width": 12, "n_train": 12_000, "epochs": 4},
    "vit": {"width": 96, "n_train": 40_000, "epochs": 7, "optimizer": "adamw", "lr": 1e-3,
            "weight_decay": 0.05},
    "convnext": {"width": 16, "n_train": 40_000, "epochs": 8, "optimizer": "adamw", "lr": 2e-3,
                 "weight_decay": 0.05},
}
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model. Two equal configs give the same weights.

    Fields added after the VGG and ResNet were trained default to what they were trained with, so
    that their stored configs (which lack them) still equal :func:`default_config`.
    """

    arch: str
    width: int
    n_train: int
    epochs: int
    seed: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    n_val: int = 2_000
    flip: bool = True
    testbed: str = dataclasses.field(default_factory=lambda: TestbedConfig().key())
    testbed_seed: int = 0
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    optimizer: str = "sgd"  # "sgd" (Nesterov, cycled momentum) or "adamw"
    warmup: float = 0.25  # fraction of the steps spent warming up (at least 2 steps)
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    translate: int = 0  # random translation of the scene by up to this many px per axis

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def default_config(arch: str, **overrides: Any) -> TrainConfig:
    """The config that made ``weights/<arch>.safetensors``, with ``overrides`` (None values ignored)."""
    if arch not in _DEFAULTS:
        raise ValueError(
            f"unknown testbed architecture {arch!r}; choose from {', '.join(ARCHS)}"
        )
    fields = {
        **_DEFAULTS[arch],
        **{k: v for k, v in overrides.items() if v is not None},
    }
    return TrainConfig(arch=arch, **fields)


def weights_path(arch: str, out_dir: str | Path | None = None) -> Path:
    return Path(out_dir or WEIGHTS_DIR) / f"{arch}.safetensors"


def translate(
    x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each image of ``x`` ``(N, C, H, W)`` shifted by its own random ``dx, dy`` in ``[-max_shift, max_shift]``;
    the uncovered border is the reflection of the image (so it shows the same textures)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)`` (or float in ``[0, 1]``) -> the float input the testbed models expect."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Predicted labels of uint8 images (:func:`surgery.evaluation.metrics.predict` in eval mode, the
    model's mode restored afterwards: this also runs between training epochs)."""
    was_training = model.training
    model.eval()
    try:
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.long)
        return predict_labels(model, images, batch_size=batch_size, preprocess=normalize)
    finally:
        model.train(was_training)


def context_accuracy(
    data: TestbedData, predictions: torch.Tensor, testbed: Testbed | None = None
) -> dict[str, dict[str, float]]:
    """Accuracy by how many of a scene's concepts its class prefers: ``both``, ``one``, ``neither``.

    Returns ``{group: {"accuracy": ..., "n": ...}}``. A model that uses context is less accurate on
    ``neither`` than on ``both``.
    """
    tb = testbed or Testbed()
    n_pref = torch.tensor(
        [
            sum(tb.prefers(int(y), CONCEPTS[int(c)]) for c in cs)
            for y, cs in zip(data.labels, data.concepts)
        ]
    )
    correct = predictions.cpu() == data.labels
    groups = {"both": len(REGIONS), "one": 1, "neither": 0}
    out: dict[str, dict[str, float]] = {}
    for name, k in groups.items():
        sel = n_pref == k
        n = int(sel.sum())
        out[name] = {
            "accuracy": float(correct[sel].float().mean()) if n else float("nan"),
            "n": n,
        }
    return out


def evaluate(
    model: nn.Module, data: TestbedData, testbed: Testbed | None = None
) -> dict[str, Any]:
    """Clean accuracy and :func:`context_accuracy` of ``model`` on ``data``."""
    pred = predict(model, data.images)
    return {
        "accuracy": float((pred == data.labels).float().mean()),
        "context": context_accuracy(data, pred, testbed),
    }


def _config_of(info: dict[str, str]) -> TrainConfig | None:
    try:
        return TrainConfig.from_json(info["config"])
    except (KeyError, TypeError, ValueError):
        return None


def train(
    arch: str,
    *,
    n_train: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    config: TrainConfig | None = None,
    num_threads: int = 1,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``arch`` (one of :data:`~.models.ARCHS`) on ``n_train`` testbed scenes; save ``<out_dir>/<arch>.safetensors``.

    ``config`` replaces every other setting; else :func:`default_config` with the given ones. On a
    2-core machine shared with other jobs one thread was faster than two. ``progress`` receives one
    line per epoch. Returns the model (eval mode) and the saved metadata (decoded).
    """
    from safetensors.torch import save_file

    cfg = config or default_config(
        arch, n_train=n_train, epochs=epochs, seed=seed, **overrides
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        t0 = time.perf_counter()
        tb_config = TestbedConfig()
        if tb_config.key() != cfg.testbed:
            raise ValueError(
                f"config is for testbed {cfg.testbed}, this generator is {tb_config.key()}"
            )
        train_data = make_dataset(
            cfg.n_train, "train", seed=cfg.testbed_seed, cache_dir=cache_dir
        )
        val_data = make_dataset(
            cfg.n_val, "val", seed=cfg.testbed_seed, cache_dir=cache_dir
        )
        render_s = time.perf_counter() - t0
        logger.info(
            "testbed: rendered %d train + %d val scenes in %.1fs",
            cfg.n_train,
            cfg.n_val,
            render_s,
        )

        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = build_model(cfg.arch, width=cfg.width)
        # No decay on biases, norms, layer-scales, nor what timm names (a ViT's pos_embed, cls_token).
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in skip]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in skip]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if cfg.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        else:
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
        steps_per_epoch = -(-cfg.n_train // cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        # Warm-up over `warmup` of the steps (at least 2), then cosine annealing. (With SGD the
        # one-cycle schedule also cycles the momentum, 0.95 -> 0.85 -> 0.95, as the VGG and ResNet
        # were trained; AdamW keeps its betas.)
        if total_steps >= 4:
            sched: Any = torch.optim.lr_scheduler.OneCycleLR(
                opt,
                max_lr=cfg.lr,
                total_steps=total_steps,
                pct_start=max(cfg.warmup, 2.0 / total_steps),
                cycle_momentum=cfg.optimizer == "sgd",
            )
        else:  # too few steps for a cycle
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        # Flip Fashion-MNIST items only: a mirrored digit is another shape.
        flippable = train_data.labels < 10
        t_train = time.perf_counter()
        seen = 0
        history: list[dict[str, float]] = []
        val_s = 0.0
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(cfg.n_train, generator=gen)
            total_loss = 0.0
            for i in range(0, cfg.n_train, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                x = normalize(train_data.images[idx])
                y = train_data.labels[idx]
                if cfg.flip:
                    flip = flippable[idx] & (torch.rand(len(idx), generator=gen) < 0.5)
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                if cfg.translate:
                    x = translate(x, cfg.translate, gen)
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                total_loss += float(loss.detach()) * len(idx)
                seen += len(idx)
            t_val = time.perf_counter()
            val = evaluate(model, val_data)
            elapsed = time.perf_counter() - t_train
            val_s += time.perf_counter() - t_val
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": round(total_loss / cfg.n_train, 4),
                    "val_accuracy": val["accuracy"],
                    "seconds": round(elapsed, 1),
                }
            )
            line = (
                f"{cfg.arch} epoch {epoch + 1}/{cfg.epochs}: loss {total_loss / cfg.n_train:.3f}, "
                f"val acc {val['accuracy']:.1%}, {seen / elapsed:.0f} img/s, {elapsed:.0f}s"
            )
            logger.info(line)
            if progress is not None:
                progress(line)
        model.eval()
        train_s = time.perf_counter() - t0
        info: dict[str, Any] = {
            "format": FORMAT,
            "config": cfg.to_json(),
            "val_accuracy": val["accuracy"],
            "context": val["context"],
            "history": history,
            "train_seconds": round(train_s, 1),
            # training images per second, not counting the validation after each epoch
            "img_per_s": round(seen / (time.perf_counter() - t_train - val_s), 1),
            "torch": torch.__version__,
            "timm": _timm_version(),
        }
        path = weights_path(cfg.arch, out_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(
            state,
            str(path),
            metadata={
                k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()
            },
        )
        logger.info(
            "testbed: saved %s (val acc %.1f%%, %.0fs)",
            path,
            100 * val["accuracy"],
            train_s,
        )
        return model, info
    finally:
        torch.set_num_threads(threads)


def _timm_version() -> str:
    try:
        import timm

        return timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency of the resnet model
        return "none"


def read_info(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of a weights file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    info: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            info[k] = v if k in ("config", "format", "torch", "timm") else json.loads(v)
        except ValueError:
            info[k] = v
    return info


def load_trained(
    arch: str,
    *,
    train_if_missing: bool = True,
    weights_dir: str | Path | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained ``arch`` model (eval mode) and its metadata, reloaded when the stored config matches.

    The requested config is ``config`` or :func:`default_config` with ``overrides`` (``n_train``,
    ``epochs``, ``seed``, ...). When the file is missing or was trained with another config, the model
    is retrained (and the file overwritten) if ``train_if_missing``, else :class:`FileNotFoundError`.
    """
    from safetensors.torch import load_file

    cfg = config or default_config(arch, **overrides)
    path = weights_path(arch, weights_dir)
    reason = None
    if not path.is_file():
        reason = f"{path} does not exist"
    else:
        info = read_info(path)
        stored = _config_of(info)
        if stored != cfg:
            diff = _diff(stored, cfg)
            reason = f"{path} was trained with another config ({diff})"
        else:
            # Build on the meta device: VGG's __init__ would allocate and initialize a 25088x4096
            # Linear (seconds) that the testbed head replaces anyway; the state dict fills everything.
            with torch.device("meta"):
                model = build_model(cfg.arch, width=cfg.width)
            model = model.to_empty(device="cpu")
            model.load_state_dict(load_file(str(path)))
            model.eval()
            logger.info(
                "testbed: loaded %s (val acc %.1f%%)",
                path,
                100 * info.get("val_accuracy", float("nan")),
            )
            return model, info
    if not train_if_missing:
        raise FileNotFoundError(
            f"no trained {arch} model: {reason}; run python -m surgery.testbed.train --arch {arch}"
        )
    logger.warning("testbed: retraining %s: %s", arch, reason)
    return train(arch, config=cfg, out_dir=path.parent, progress=progress)


def _diff(stored: TrainConfig | None, wanted: TrainConfig) -> str:
    if stored is None:
        return "no readable config"
    a, b = dataclasses.asdict(stored), dataclasses.asdict(wanted)
    return ", ".join(f"{k}: {a[k]!r} != {b[k]!r}" for k in b if a.get(k) != b[k])


def _format_context(ctx: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} {v['accuracy']:.1%} (n={v['n']})" for k, v in ctx.items())


def _parse_sets(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``["lr=0.002", "optimizer=adamw"]`` -> typed :class:`TrainConfig` overrides."""
    # Fields with their own flag (--width, --n-train, --epochs, --seed) or not settable from here.
    fixed = ("arch", "mean", "std", "testbed", "width", "n_train", "epochs", "seed")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig) if f.name not in fixed}
    casts: dict[str, Callable[[str], Any]] = {
        "int": int, "float": float, "str": str, "bool": lambda v: v.lower() in ("1", "true", "yes")
    }
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        try:
            out[key] = casts[types[key]](value.strip())
        except ValueError:
            parser.error(f"--set {item!r}: {key} is {types[key]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m surgery.testbed.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--arch", choices=[*ARCHS, "all"], default="all")
    p.add_argument("--epochs", type=int, default=None, help="default: per architecture")
    p.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="training scenes (default: per architecture)",
    )
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help=f"default: {WEIGHTS_DIR}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--n-test",
        type=int,
        default=2_000,
        help="test scenes for the final report (0: skip)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainConfig field (e.g. --set lr=0.002 --set translate=4); repeatable",
    )
    args = p.parse_args(argv)
    sets = _parse_sets(args.set, p)
    logging.basicConfig(level=logging.WARNING)
    for arch in ARCHS if args.arch == "all" else (args.arch,):
        print(f"training {arch} ...", flush=True)
        model, info = train(
            arch,
            n_train=args.n_train,
            epochs=args.epochs,
            seed=args.seed,
            width=args.width,
            out_dir=args.out_dir,
            num_threads=args.threads,
            progress=lambda line: print(line, flush=True),
            **sets,
        )
        print(
            f"{arch}: val accuracy {info['val_accuracy']:.1%} in {info['train_seconds']:.0f}s"
        )
        print(
            f"{arch}: val accuracy by preferred concepts: {_format_context(info['context'])}"
        )
        if args.n_test:
            test = make_dataset(
                args.n_test,
                "test",
                seed=TrainConfig.from_json(info["config"]).testbed_seed,
            )
            res = evaluate(model, test)
            print(
                f"{arch}: test accuracy {res['accuracy']:.1%}; by preferred concepts: {_format_context(res['context'])}"
            )
        print(f"{arch}: saved {weights_path(arch, args.out_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
