"""surgery.inputs.images: image folders, images, masks and batches; every bad input is a SurgeryError."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torchvision import transforms as T

from surgery.errors import SurgeryError
from surgery.inputs.batches import count_images, data_id, iter_batches
from surgery.inputs.images import IMAGE_EXTENSIONS, ImageFolder, load_images
from surgery.inputs.masks import load_masks


def _write_image(
    path: Path, size: tuple[int, int] = (20, 16), seed: int = 0, mode: str = "RGB"
) -> Path:
    """Write a random image of ``size`` = (W, H) to ``path``."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _write_image(root / "b.png", seed=1)
    _write_image(root / "a.JPG", seed=2)
    _write_image(root / "sub" / "c.Png", seed=3, mode="L")
    _write_image(root / "sub" / "deeper" / "d.jpeg", seed=4)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "e.png.bak").write_text("not an image either")
    return root


# ------------------------------------------------------------------------------------ ImageFolder


def test_image_folder_finds_images_recursively_sorted_any_case(folder: Path) -> None:
    ds = ImageFolder(folder)
    rel = [p.relative_to(folder).as_posix() for p in ds.files]
    assert rel == ["a.JPG", "b.png", "sub/c.Png", "sub/deeper/d.jpeg"]
    assert len(ds) == 4
    x = ds[2]  # a grayscale PNG comes back as RGB
    assert x.shape == (3, 16, 20) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x[0], x[1])
    assert ".png" in IMAGE_EXTENSIONS and ".jpg" in IMAGE_EXTENSIONS


def test_image_folder_applies_transform(folder: Path) -> None:
    ds = ImageFolder(folder, transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]))
    assert ds[0].shape == (3, 8, 8)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(SurgeryError, match="no image files"):
        ImageFolder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SurgeryError, match="cannot read"):
        ImageFolder(bad)[0]


def test_dataset_id_is_stable_and_tracks_changes(folder: Path) -> None:
    a, b = ImageFolder(folder), ImageFolder(folder)
    assert a.dataset_id == b.dataset_id
    assert str(folder.resolve().as_posix()) in a.dataset_id and ":4:" in a.dataset_id
    # Another transform is other data for the statistics.
    assert ImageFolder(folder, T.Compose([T.Resize(8), T.ToTensor()])).dataset_id != a.dataset_id
    # A touched file (new mtime) changes the id.
    f = folder / "b.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert ImageFolder(folder).dataset_id != a.dataset_id
    # So does a new file.
    _write_image(folder / "z.png", seed=9)
    assert ":5:" in ImageFolder(folder).dataset_id


# ------------------------------------------------------------------------------------ load_images


def test_load_images_from_tensors() -> None:
    x = torch.rand(3, 8, 10)
    out = load_images(x)
    assert out.shape == (1, 3, 8, 10) and torch.equal(out[0], x)
    batch = torch.rand(2, 3, 8, 10, dtype=torch.float64)
    assert load_images(batch).dtype == torch.float64
    u8 = (torch.rand(2, 3, 4, 4) * 255).to(torch.uint8)
    assert torch.allclose(load_images(u8), u8.float() / 255)
    assert load_images([x, x]).shape == (2, 3, 8, 10)


def test_load_images_from_paths_and_pil(tmp_path: Path) -> None:
    p1 = _write_image(tmp_path / "one.png", (20, 16), seed=1)
    p2 = _write_image(tmp_path / "two.png", (20, 16), seed=2)
    out = load_images([p1, str(p2)])
    assert out.shape == (2, 3, 16, 20) and out.dtype == torch.float32
    expected = torch.from_numpy(np.array(Image.open(p1))).permute(2, 0, 1).float() / 255
    assert torch.equal(out[0], expected)
    assert torch.equal(load_images(Image.open(p1))[0], expected)
    assert load_images(p1, size=8).shape == (1, 3, 8, 8)
    assert load_images([p1, p2], size=(6, 9)).shape == (2, 3, 6, 9)
    tf = T.Compose([T.Resize((5, 7)), T.ToTensor()])
    assert load_images([p1, p2], tf).shape == (2, 3, 5, 7)


def test_load_images_errors(tmp_path: Path) -> None:
    small = _write_image(tmp_path / "small.png", (8, 8))
    big = _write_image(tmp_path / "big.png", (12, 10))
    with pytest.raises(SurgeryError, match="different sizes.*size="):
        load_images([small, big])
    assert load_images([small, big], size=8).shape == (2, 3, 8, 8)  # the fix the message names
    with pytest.raises(SurgeryError, match="does not exist"):
        load_images(tmp_path / "missing.png")
    nan = torch.rand(1, 3, 4, 4)
    nan[0, 1, 2, 2] = float("nan")
    with pytest.raises(SurgeryError, match="NaN"):
        load_images(nan)
    inf = torch.rand(3, 4, 4)
    inf[0, 0, 0] = float("inf")
    with pytest.raises(SurgeryError, match="infinite"):
        load_images(inf)
    with pytest.raises(SurgeryError, match="channels-last"):
        load_images(torch.rand(2, 4, 4, 3))
    with pytest.raises(SurgeryError, match="1 channels"):
        load_images(torch.rand(2, 1, 4, 4))
    with pytest.raises(SurgeryError, match="shape"):
        load_images(torch.rand(4, 4))
    with pytest.raises(SurgeryError, match="no images"):
        load_images([])


# ------------------------------------------------------------------------------------- load_masks


def test_load_masks_from_png(tmp_path: Path) -> None:
    arr = np.zeros((8, 12), dtype=np.uint8)
    arr[2:6, 3:9] = 255
    arr[0, 0] = 128
    Image.fromarray(arr, "L").save(tmp_path / "m.png")
    rgb = np.stack([arr] * 3, axis=-1)
    Image.fromarray(rgb, "RGB").save(tmp_path / "m_rgb.png")

    m = load_masks(tmp_path / "m.png", None)
    assert m.shape == (1, 1, 8, 12) and m.dtype == torch.float32
    assert torch.equal(m[0, 0], torch.from_numpy(arr).float() / 255)
    both = load_masks([tmp_path / "m.png", str(tmp_path / "m_rgb.png")], (8, 12))
    assert torch.equal(both[0], both[1])

    resized = load_masks(tmp_path / "m.png", (4, 6))
    assert resized.shape == (1, 1, 4, 6)
    assert 0.0 <= float(resized.min()) and float(resized.max()) <= 1.0
    assert float(resized[0, 0, 2, 3]) > 0.5 > float(resized[0, 0, 3, 0])
    with pytest.raises(SurgeryError, match="another shape"):  # a mask is drawn on its image: no stretching
        load_masks(tmp_path / "m.png", 5)


def test_load_masks_from_tensors() -> None:
    assert load_masks(torch.rand(6, 7), None).shape == (1, 1, 6, 7)
    assert load_masks(torch.rand(2, 6, 7), None).shape == (2, 1, 6, 7)
    m = torch.rand(2, 1, 6, 7)
    assert torch.equal(load_masks(m, (6, 7)), m)
    assert load_masks(m, (12, 14)).shape == (2, 1, 12, 14)  # same shape, another size: resized
    with pytest.raises(SurgeryError, match="another shape"):
        load_masks(m, 3)
    assert load_masks(torch.ones(4, 4, dtype=torch.bool), None).dtype == torch.float32


def test_load_masks_errors(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match=r"\[0, 1\].*255"):
        load_masks(torch.full((1, 1, 4, 4), 200.0), None)
    with pytest.raises(SurgeryError, match=r"\[0, 1\]"):
        load_masks(-torch.rand(4, 4), None)
    nan = torch.rand(4, 4)
    nan[1, 1] = float("nan")
    with pytest.raises(SurgeryError, match="NaN"):
        load_masks(nan, None)
    with pytest.raises(SurgeryError, match="shape"):
        load_masks(torch.rand(2, 3, 4, 4), None)
    with pytest.raises(SurgeryError, match="does not exist"):
        load_masks(tmp_path / "nope.png", 4)
    with pytest.raises(SurgeryError, match="different sizes"):
        load_masks([torch.rand(4, 4), torch.rand(5, 5)], None)


# ------------------------------------------------------------------------------------ iter_batches


class _Labelled(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i, "extra"


class _Stream(IterableDataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __iter__(self):
        yield from self.x


def _cat(batches) -> torch.Tensor:
    return torch.cat(list(batches))


def test_iter_batches_from_all_sources() -> None:
    x = torch.rand(10, 3, 4, 4)
    sizes = [b.shape[0] for b in iter_batches(x, batch_size=4)]
    assert sizes == [4, 4, 2]
    assert torch.equal(_cat(iter_batches(x, batch_size=4)), x)
    assert [b.shape[0] for b in iter_batches(_Labelled(x), batch_size=3)] == [3, 3, 3, 1]
    assert torch.equal(_cat(iter_batches(_Labelled(x), batch_size=3)), x)
    assert torch.equal(_cat(iter_batches(_Stream(x), batch_size=4)), x)
    loader = DataLoader(TensorDataset(x, torch.arange(10)), batch_size=6)
    assert [b.shape[0] for b in iter_batches(loader, batch_size=999)] == [6, 4]
    assert torch.equal(_cat(iter_batches(loader)), x)
    gen = ((x[i : i + 5], "label") for i in range(0, 10, 5))
    assert torch.equal(_cat(iter_batches(gen)), x)


def test_iter_batches_max_images_truncates() -> None:
    x = torch.rand(10, 3, 4, 4)
    assert [b.shape[0] for b in iter_batches(x, batch_size=4, max_images=6)] == [4, 2]
    loader = DataLoader(TensorDataset(x), batch_size=3)
    out = _cat(iter_batches(loader, max_images=7))
    assert torch.equal(out, x[:7])
    assert torch.equal(_cat(iter_batches(_Stream(x), batch_size=4, max_images=5)), x[:5])
    assert count_images(x, 6) == 6 and count_images(loader) == 10 and count_images(iter([x])) is None


def test_iter_batches_errors() -> None:
    with pytest.raises(SurgeryError, match="cannot read images"):
        list(iter_batches(42))
    with pytest.raises(SurgeryError, match="expected an image tensor"):
        list(iter_batches([["not", "images"]]))
    bad = torch.rand(4, 3, 4, 4)
    bad[3] = float("nan")
    with pytest.raises(SurgeryError, match="NaN"):
        list(iter_batches(bad, batch_size=2))

    class Ragged(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.rand(3, 4 + i, 4)

    with pytest.raises(SurgeryError, match="different shapes"):
        list(iter_batches(Ragged()))
    with pytest.raises(SurgeryError, match="max_images"):
        list(iter_batches(bad, max_images=0))


def test_data_id(folder: Path) -> None:
    x = torch.rand(4, 3, 4, 4)
    assert data_id(x) == data_id(x.clone())
    assert data_id(x) != data_id(x.reshape(2, 3, 8, 4)) != data_id(x + 1)
    ds = ImageFolder(folder, T.Compose([T.Resize((4, 4)), T.ToTensor()]))
    assert data_id(ds) == ds.dataset_id == data_id(DataLoader(ds, batch_size=2))
    # A shuffled loader reads another subset under max_images: no id.
    assert data_id(DataLoader(ds, batch_size=2, shuffle=True), max_images=2) is None
    assert data_id(iter([x])) is None
