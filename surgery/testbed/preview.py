"""A preview grid of the testbed: every class, every concept, the masks and every style variant."""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from surgery._files import atomic_write

from .objects import CLASS_NAMES
from .scenes import Testbed
from .procedural_styles import STYLES
from .textures import CONCEPTS, REGIONS

__all__ = ["preview_grid", "write_preview"]

logger = logging.getLogger(__name__)

_SEG_COLOURS = np.array([[230, 40, 40], [60, 110, 230], [70, 190, 70]], np.uint8)  # object, regions


def _cell(image: np.ndarray, label: str, font: ImageFont.ImageFont, band: int) -> Image.Image:
    h, w = image.shape[:2]
    cell = Image.new("RGB", (w, h + band), "white")
    cell.paste(Image.fromarray(image), (0, 0))
    ImageDraw.Draw(cell).text((1, h), label[:14], fill="black", font=font)
    return cell


def preview_grid(testbed: Testbed, columns: int = 10) -> Image.Image:
    """Rows of labelled scenes: classes, concepts, masks, then a row per style (floor, backdrop)."""
    font = ImageFont.load_default()
    band = 11
    rows: list[list[tuple[np.ndarray, str]]] = []
    specs = testbed.sample(2 * columns, "train")
    by_class = {s.label: s for s in testbed.sample(len(CLASS_NAMES), "train")}
    cells = [(testbed.render(by_class[k])[0], CLASS_NAMES[k]) for k in range(len(CLASS_NAMES))]
    rows += [cells[i : i + columns] for i in range(0, len(cells), columns)]
    # every concept, swapped into one scene
    base = specs[0]
    rows.append([(testbed.render(base.with_concept(c))[0], c) for c in CONCEPTS][:columns])
    # segmentation: object red, backdrop blue, floor green
    masks = []
    for s in specs[1:6]:
        image, m = testbed.render(s)
        seg = np.zeros(image.shape[:2], np.int64)
        for i, r in enumerate(REGIONS):
            seg[m[r]] = 1 + i
        masks += [(image, f"{s.concepts[0]}/{s.concepts[1]}"), (_SEG_COLOURS[seg], "masks")]
    rows.append(masks[:columns])
    # styles: the original, then each variant on the floor, then each variant on the backdrop
    a, b = specs[2], specs[3]
    for style, variants in STYLES.items():
        row = [(testbed.render(a)[0], "b&w:" if style == "black-and-white" else f"{style}:")]
        row += [
            (testbed.render(a, restyle={"floor": (style, v)})[0], f"{v} (fl)") for v in variants
        ]
        row.append((testbed.render(b)[0], ""))
        row += [
            (testbed.render(b, restyle={"backdrop": (style, v)})[0], f"{v} (bd)") for v in variants
        ]
        rows.append(row[:columns])
    size = testbed.size
    grid = Image.new("RGB", (columns * size, len(rows) * (size + band)), "white")
    for y, row in enumerate(rows):
        for x, (image, label) in enumerate(row):
            grid.paste(_cell(image, label, font, band), (x * size, y * (size + band)))
    return grid


def write_preview(
    path: str | os.PathLike[str], testbed: Testbed | None = None, colours: int = 256
) -> Image.Image:
    """Write :func:`preview_grid` as a palette PNG (``colours`` colours, small enough to commit)."""
    grid = preview_grid(testbed or Testbed(seed=0))
    small = grid.quantize(colors=colours, method=Image.Quantize.FASTOCTREE)  # keeps object colours
    atomic_write(path, lambda tmp: small.save(tmp, format="PNG", optimize=True))
    logger.info(
        "wrote %s (%d x %d, %d KB)", path, grid.width, grid.height, os.path.getsize(path) // 1024
    )
    return grid
