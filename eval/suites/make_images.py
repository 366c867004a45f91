"""Write the reference images of the evaluation suites into `eval/suites/images/`.

Run from the repository root: `python eval/suites/make_images.py`. The output is committed;
this script is how it was made, so anyone can check or regenerate it. Photos are scikit-image's
sample data (public domain / CC0: NASA's astronaut photo of Eileen Collins, Chelsea the cat,
the coffee cup, the Falcon 9 rocket, the brick texture); the rest is drawn with PIL and numpy.
Every image is small (<= 192 px) so the suites stay a few hundred KB.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
OUT = HERE / "images"
MAX_SIDE = 192


def _small(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.LANCZOS)


def _photo(name: str, box: tuple[int, int, int, int]) -> Image.Image:
    array = getattr(skimage.data, name)()
    image = Image.fromarray(array).convert("RGB")
    return _small(image.crop(box))


def _stripes() -> Image.Image:
    # Diagonal bands in a fixed palette: a "style" no photo has.
    palette = np.array([[230, 57, 70], [241, 250, 238], [168, 218, 220], [69, 123, 157], [29, 53, 87]])
    y, x = np.mgrid[0:160, 0:160]
    bands = ((x + y) // 20) % len(palette)
    return Image.fromarray(palette[bands].astype(np.uint8))


def _mosaic() -> Image.Image:
    # Voronoi tiles of random saturated colours with dark grout, seeded.
    rng = np.random.default_rng(7)
    side, count = 160, 40
    points = rng.uniform(0, side, (count, 2))
    colours = rng.integers(40, 256, (count, 3))
    y, x = np.mgrid[0:side, 0:side]
    distance = (x[..., None] - points[:, 0]) ** 2 + (y[..., None] - points[:, 1]) ** 2
    order = np.sort(distance, axis=-1)
    nearest = np.argmin(distance, axis=-1)
    image = colours[nearest].astype(np.uint8)
    grout = (np.sqrt(order[..., 1]) - np.sqrt(order[..., 0])) < 2.0
    image[grout] = (30, 30, 30)
    return Image.fromarray(image)


def _brick() -> Image.Image:
    return _small(Image.fromarray(skimage.data.brick()).convert("RGB").crop((0, 0, 320, 320)), 160)


def _red_circle() -> Image.Image:
    image = Image.new("RGB", (128, 128), (0, 0, 0))
    ImageDraw.Draw(image).ellipse((14, 14, 114, 114), fill=(220, 30, 30))
    return image


def _blue_square() -> Image.Image:
    image = Image.new("RGB", (128, 128), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((20, 20, 108, 108), fill=(30, 60, 220))
    return image


IMAGES = {
    # (left, top, right, bottom) boxes in the original sample photos
    "cat.jpg": lambda: _photo("chelsea", (0, 0, 360, 300)),
    "cup.jpg": lambda: _photo("coffee", (60, 0, 480, 400)),
    "rocket.jpg": lambda: _photo("rocket", (240, 100, 400, 427)),
    # The face with margin so a face detector finds it (dlib needs ~80 px of face).
    "astronaut_face.jpg": lambda: _photo("astronaut", (100, 0, 340, 240)),
    "brick.jpg": _brick,
    "stripes.png": _stripes,
    "mosaic.png": _mosaic,
    "red_circle.png": _red_circle,
    "blue_square.png": _blue_square,
}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in IMAGES.items():
        image = make()
        buffer = io.BytesIO()
        if name.endswith(".jpg"):
            image.save(buffer, format="JPEG", quality=90)
        else:
            image.save(buffer, format="PNG", optimize=True)
        (OUT / name).write_bytes(buffer.getvalue())
        print(f"{name}: {image.width}x{image.height}, {len(buffer.getvalue()) // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
