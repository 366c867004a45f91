"""The toy world's evaluation suites: held-out multimodal prompts whose crops carry a colour and a
shape that only the crop can supply, in two splits generated from different seeds.

- `validation` is for choosing settings; `test` is what the main job reports. Nothing is tuned
  on `test`. Both are generated, never edited: `python -m mumu_model.toy.suites --out
  eval/suites/toy` writes them byte for byte the same on every run.
- Four kinds of suite per split (`KINDS`):
  - `one`: one object; its crop is cut from its own single-object render, and the prompt names
    the shape but not the colour.
  - `two`, `three`: two or three objects of distinct shapes and colours, every crop cut from a
    different render, so the model must compose crops that never appeared together.
  - `outside`: one object whose crop is drawn by `draw_outside_crop`, code that shares nothing
    with the renderer: antialiased edges, outlines, margins, a colour up to 15 RGB units off the
    palette, and backgrounds the renderer never draws.
  The text-only ablation of each is made by the evaluation (`text_only_ablation`), not stored.
- Every object names its `colour` (a `PALETTE` name) and its `shape`, which the analytic
  probes check in the output (`eval.metrics`).

Crop scenes draw from `np.random.default_rng((seed, entry, object))`, a three-word seed, so they
are never one of the training renders (seeded with one integer).
"""

from __future__ import annotations

import argparse
import colorsys
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from mumu_model.atomic import atomic_dir, write_bytes_atomic
from mumu_model.data.shards import encode_image

from .world import BACKGROUNDS, PALETTE, SHAPES, SIZES, ObjectSpec, Scene, render_scene

KINDS: tuple[str, ...] = ("one", "two", "three", "outside")
OBJECTS_PER_KIND = {"one": 1, "two": 2, "three": 3, "outside": 1}
SPLITS: dict[str, int] = {"validation": 20_000, "test": 30_000}  # base seeds, far apart
SPLIT_PREFIX = {"validation": "val", "test": "test"}
# Multiples of 24, so that the first object's 8 colours and 6 shapes are exactly balanced.
COUNTS: dict[str, dict[str, int]] = {
    "validation": {"one": 72, "two": 48, "three": 24, "outside": 72},
    "test": {"one": 120, "two": 120, "three": 72, "outside": 120},
}
SUITE_VERSION = 1

# Outside-the-renderer crops: what differs from the renderer's tight, hard-edged crops.
OUTSIDE_COLOUR_JITTER = 15  # per channel, RGB units
OUTSIDE_SIDES = (9, 26)  # object side in pixels (the renderer's: 10-20)
OUTSIDE_MARGINS = (0, 4)  # background pixels around the object
OUTSIDE_LINE_WIDTHS = (0, 2)  # outline in a darker shade of the fill, pixels
OUTSIDE_BACKGROUNDS = ("white", "light", "dark", "tint", "grain")
_SUPERSAMPLE = 4


def suite_name(kind: str, split: str) -> str:
    return f"{SPLIT_PREFIX[split]}_{kind}"


# -- crops ---------------------------------------------------------------------------------


def renderer_crop(shape: str, colour: str, size_word: str | None, rng: np.random.Generator,
                  canvas: int = 32) -> Image.Image:
    """The tight crop of one object cut from its own single-object render, as the caption steps
    cut training crops from renderer boxes."""
    image, objects = render_scene(Scene((ObjectSpec(shape, colour, size_word),)), rng, canvas)
    return image.crop(tuple(objects[0]["box"]))


def _outline(shape: str, side: float, rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Vertices of `shape` in a `side` square at the origin; None for the circle (an ellipse)."""
    s = side
    if shape == "circle":
        return None
    if shape == "square":
        return [(0, 0), (s, 0), (s, s), (0, s)]
    if shape == "triangle":
        return [(s / 2, 0), (s, s), (0, s)]
    if shape == "diamond":
        return [(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)]
    if shape == "cross":
        arm = s * rng.uniform(0.28, 0.4)
        a, b = (s - arm) / 2, (s + arm) / 2
        return [(a, 0), (b, 0), (b, a), (s, a), (s, b), (b, b), (b, s), (a, s), (a, b), (0, b), (0, a), (a, a)]
    if shape == "star":
        inner = rng.uniform(0.42, 0.55)
        points = []
        for k in range(10):
            radius = s / 2 if k % 2 == 0 else s / 2 * inner
            angle = math.radians(-90 + 36 * k)
            points.append((s / 2 + radius * math.cos(angle), s / 2 + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")


def _outside_background(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "white":
        return np.full((side, side, 3), 255.0)
    if kind == "light":
        return np.full((side, side, 3), rng.uniform(190, 235))
    if kind == "dark":
        return np.full((side, side, 3), rng.uniform(30, 80))
    if kind == "tint":
        rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.2), rng.uniform(0.7, 0.95))
        return np.tile(np.array(rgb) * 255.0, (side, side, 1))
    if kind == "grain":
        grey = rng.uniform(120, 200) + rng.normal(0, 14, (side, side, 1))
        return np.clip(np.repeat(grey, 3, axis=2), 0, 255)
    raise ValueError(f"unknown outside background {kind!r} (expected one of {', '.join(OUTSIDE_BACKGROUNDS)})")


def draw_outside_crop(shape: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """A crop of `shape` in `colour` drawn the way another program would: PIL's polygon and
    ellipse at 4x, box-downsampled (antialiased edges), an outline 0-2 px wide in a darker shade,
    a margin of 0-4 px of a background the renderer never draws, and the fill up to
    `OUTSIDE_COLOUR_JITTER` RGB units off the palette per channel."""
    if colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r} (expected one of {', '.join(PALETTE)})")
    side = int(rng.integers(OUTSIDE_SIDES[0], OUTSIDE_SIDES[1] + 1))
    margin = int(rng.integers(OUTSIDE_MARGINS[0], OUTSIDE_MARGINS[1] + 1))
    line = int(rng.integers(OUTSIDE_LINE_WIDTHS[0], OUTSIDE_LINE_WIDTHS[1] + 1))
    background = OUTSIDE_BACKGROUNDS[int(rng.integers(len(OUTSIDE_BACKGROUNDS)))]
    jitter = rng.integers(-OUTSIDE_COLOUR_JITTER, OUTSIDE_COLOUR_JITTER + 1, 3)
    fill = tuple(int(v) for v in np.clip(np.array(PALETTE[colour]) + jitter, 0, 255))
    outline = tuple(int(v * rng.uniform(0.7, 0.85)) for v in fill)
    total = side + 2 * margin

    big = Image.fromarray(np.round(_outside_background(background, total, rng)).astype(np.uint8), "RGB")
    big = big.resize((total * _SUPERSAMPLE,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    offset, scale = margin * _SUPERSAMPLE, side * _SUPERSAMPLE
    points = _outline(shape, scale, rng)
    width = line * _SUPERSAMPLE
    if points is None:
        box = (offset, offset, offset + scale - 1, offset + scale - 1)
        draw.ellipse(box, fill=fill, outline=outline if line else None, width=width)
    else:
        moved = [(offset + x, offset + y) for x, y in points]
        draw.polygon(moved, fill=fill, outline=outline if line else None, width=width)
    return big.resize((total, total), Image.Resampling.BOX)


# -- suites --------------------------------------------------------------------------------


def _balanced(values: Sequence[str], count: int, rng: np.random.Generator) -> list[str]:
    """`count` values cycling through `values`, shuffled: each appears count/len times."""
    out = [values[i % len(values)] for i in range(count)]
    rng.shuffle(out)
    return out


def write_suite(out_dir: str | Path, kind: str, *, name: str, count: int, seed: int, canvas: int = 32) -> Path:
    """Write suite `name` of `kind` (one of `KINDS`): `out_dir/<name>.yaml` and its crops in
    `out_dir/images/<name>/`. Returns the YAML path. Deterministic in its arguments.

    The first object's colour and shape are balanced over the entries (count/8 and count/6 of
    each when they divide); the other objects take distinct shapes and colours at random.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown suite kind {kind!r} (expected one of {', '.join(KINDS)})")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out_dir = Path(out_dir)
    plan = np.random.default_rng(seed)
    n_objects = OBJECTS_PER_KIND[kind]
    first_colours = _balanced(list(PALETTE), count, plan)
    first_shapes = _balanced(list(SHAPES), count, plan)
    width = max(3, len(str(count - 1)))
    entries, crops = [], {}
    for i in range(count):
        colours = [first_colours[i]] + [c for c in plan.permutation(list(PALETTE)) if c != first_colours[i]]
        shapes = [first_shapes[i]] + [s for s in plan.permutation(list(SHAPES)) if s != first_shapes[i]]
        background = BACKGROUNDS[int(plan.integers(len(BACKGROUNDS)))]
        phrases, objects = [], []
        for k in range(n_objects):
            colour, shape = str(colours[k]), str(shapes[k])
            rng = np.random.default_rng((seed, i, k))
            if kind == "outside":
                crop = draw_outside_crop(shape, colour, rng)
            else:
                size_word = (None, *SIZES)[int(rng.integers(len(SIZES) + 1))]
                crop = renderer_crop(shape, colour, size_word, rng, canvas)
            image = f"{i:0{width}d}{'abc'[k]}.png"
            crops[image] = encode_image(crop, image)
            article = "an" if shape[0] in "aeiou" else "a"
            phrases.append((f"{article} <img:{image}> {shape}", f"{article} {shape}"))
            objects.append({"image": image, "phrase": shape, "shape": shape, "colour": colour})
        entries.append({
            "id": f"{kind[0]}{i:0{width}d}",
            "prompt": " and ".join(p for p, _ in phrases) + f", {background} style",
            "text": " and ".join(t for _, t in phrases) + f", {background} style",
            "objects": objects,
            "references": [o["image"] for o in objects],
        })

    with atomic_dir(out_dir / "images" / name) as images_dir:
        for image, data in crops.items():
            (images_dir / image).write_bytes(data)
    header = (
        "# Generated, do not edit:\n"
        f"#   python -m mumu_model.toy.suites --out eval/suites/toy   ({kind}, {count} entries, seed {seed})\n"
        "# Every crop comes from a different render (or, for `outside`, from other drawing code); the\n"
        "# prompt names shapes but never colours, so a colour can only come from its crop.\n"
    )
    document = {"name": name, "version": SUITE_VERSION, "world": "toy", "image_root": f"images/{name}",
                "entries": entries}
    path = out_dir / f"{name}.yaml"
    write_bytes_atomic(path, (header + yaml.safe_dump(document, sort_keys=False)).encode("utf-8"))
    return path


def write_suites(out_dir: str | Path, split: str, *, counts: dict[str, int] | None = None) -> list[Path]:
    """Every kind of suite of `split` (`validation` or `test`) into `out_dir/<split>/`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    counts = {**COUNTS[split], **(counts or {})}
    return [write_suite(Path(out_dir) / split, kind, name=suite_name(kind, split), count=counts[kind],
                        seed=SPLITS[split] + index)
            for index, kind in enumerate(KINDS)]


def suite_paths(root: str | Path, split: str) -> list[Path]:
    """The suite files `write_suites(root, split)` writes, in `KINDS` order."""
    return [Path(root) / split / f"{suite_name(kind, split)}.yaml" for kind in KINDS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mumu_model.toy.suites", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="e.g. eval/suites/toy")
    parser.add_argument("--split", choices=[*SPLITS, "all"], default="all")
    args = parser.parse_args(argv)
    for split in SPLITS if args.split == "all" else [args.split]:
        for path in write_suites(args.out, split):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
