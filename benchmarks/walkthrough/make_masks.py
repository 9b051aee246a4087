"""Draw the walkthrough's hand-made concept masks (run once; the PNGs are committed).

Every mask marks the *background* of a bundled photo (the table under the espresso cup, the sky
behind the rocket, the garage floor under the motorcycle, ...): the concept whose texture the
walkthrough changes. The shapes were chosen by eye on a 50-pixel grid over each photo, in the
photo's own pixel coordinates (x right, y down), as polygons and ellipses: white = concept.

    python -m benchmarks.walkthrough.make_masks
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
MASK_DIR = HERE / "masks"

# photo -> (concept name, (width, height), shapes). A shape is ("poly", points, fill) or
# ("ellipse", (x0, y0, x1, y1), fill); fill 255 adds to the concept, 0 removes from it.
MASKS: dict[str, tuple[str, tuple[int, int], list[tuple]]] = {
    "coffee": ("table", (600, 400), [
        ("poly", [(0, 0), (600, 0), (600, 400), (0, 400)], 255),
        ("ellipse", (72, 62, 484, 392), 0),          # saucer
        ("ellipse", (168, 8, 418, 230), 0),          # cup
        ("poly", [(395, 70), (412, 62), (426, 75), (410, 160), (395, 160)], 0),  # spoon handle
    ]),
    "chelsea": ("background", (451, 300), [
        ("poly", [(392, 0), (451, 0), (451, 300), (385, 300), (395, 210), (365, 165), (372, 70)], 255),
    ]),
    "rocket": ("sky", (640, 427), [
        ("poly", [(0, 0), (640, 0), (640, 350), (0, 350)], 255),
        ("poly", [(40, 0), (92, 0), (92, 350), (0, 350), (0, 250)], 0),       # left tower
        ("poly", [(555, 0), (605, 0), (640, 200), (640, 350), (548, 350)], 0),  # right tower
        ("poly", [(166, 120), (212, 120), (212, 350), (166, 350)], 0),       # small tower, left
        ("poly", [(432, 118), (478, 118), (478, 350), (432, 350)], 0),       # small tower, right
        ("poly", [(298, 122), (348, 122), (348, 350), (298, 350)], 0),       # rocket
    ]),
    "astronaut": ("background", (512, 512), [
        ("poly", [(0, 0), (170, 0), (150, 60), (140, 150), (110, 190), (60, 250), (30, 330), (15, 420),
                  (0, 430)], 255),
        ("poly", [(170, 0), (385, 0), (372, 80), (355, 200), (318, 215), (302, 120), (290, 60),
                  (250, 14), (200, 22)], 255),
    ]),
    "stereo_motorcycle": ("floor", (741, 500), [
        ("poly", [(0, 295), (125, 295), (125, 400), (560, 400), (560, 300), (741, 300), (741, 500),
                  (0, 500)], 255),
        ("ellipse", (112, 228, 290, 408), 0),        # rear wheel
        ("ellipse", (505, 255, 690, 455), 0),        # front wheel
        ("poly", [(315, 380), (348, 380), (348, 442), (315, 442)], 0),       # kickstand
    ]),
    "china": ("sky", (640, 427), [
        ("poly", [(0, 0), (640, 0), (640, 140), (590, 138), (560, 170), (548, 200), (345, 205),
                  (330, 178), (300, 160), (322, 122), (292, 100), (240, 62), (216, 28), (194, 28),
                  (172, 62), (102, 102), (96, 132), (102, 152), (84, 178), (40, 200), (0, 150)], 255),
    ]),
    "flower": ("background", (640, 427), [
        ("poly", [(0, 0), (640, 0), (640, 427), (0, 427)], 255),
        ("ellipse", (160, 78, 452, 368), 0),         # dahlia
        ("ellipse", (282, 365, 462, 500), 0),        # the second flower, bottom
        ("ellipse", (565, 385, 630, 440), 0),        # bud, bottom right
    ]),
    "grace_hopper": ("background", (512, 600), [
        ("poly", [(0, 0), (170, 0), (160, 115), (150, 200), (158, 300), (138, 340), (60, 380),
                  (20, 430), (0, 480)], 255),
        ("poly", [(352, 0), (512, 0), (512, 440), (470, 400), (400, 345), (348, 312), (362, 190),
                  (372, 110)], 255),
    ]),
}


def draw(photo: str) -> Image.Image:
    """The mask of ``photo`` as an 8-bit grayscale image of the photo's size."""
    _, size, shapes = MASKS[photo]
    im = Image.new("L", size, 0)
    d = ImageDraw.Draw(im)
    for kind, geom, fill in shapes:
        if kind == "poly":
            d.polygon(geom, fill=fill)
        else:
            d.ellipse(geom, fill=fill)
    return im


def mask_path(photo: str) -> Path:
    return MASK_DIR / f"{photo}_{MASKS[photo][0]}.png"


def main() -> None:
    MASK_DIR.mkdir(parents=True, exist_ok=True)
    for photo in MASKS:
        draw(photo).save(mask_path(photo), optimize=True)
        print(mask_path(photo))


if __name__ == "__main__":
    main()
