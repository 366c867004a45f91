"""The toy world: coloured shapes on low-saturation backgrounds, rendered procedurally.

Real SDXL weights cannot be had everywhere, and random weights prove nothing about learning, so
the default profile runs the same data and training graph on this world. A scene is
one to three shapes (`SHAPES`), each in one of eight saturated colours (`PALETTE`), on one of
six background styles (`BACKGROUNDS`). Prompts follow a tiny grammar::

    "a small circle and a red square, striped style"
     <------------ content ------------>  <- style ->

Colour words are usually left out (`colour_word_probability`, 20% by default). That is the
point of the world: when the caption says "a circle" and the multimodal prompt inserts a crop
of a red circle before the word, the only place the model can learn "red" from is the crop.
Whether a trained model carries the crop's colour into its output is then a measurable,
model-free proof that multimodal conditioning works end to end (`colour_counts`,
`dominant_colour`, and the held-out suites of `mumu_model.toy.suites`).

Design choices that the rest of the pipeline relies on:

- Everything is deterministic: an image depends only on (text, seed), through
  `np.random.default_rng(seed)`, never on batch composition or call order.
- Objects are drawn with hard edges, so every object pixel is exactly its palette colour, and
  the renderer reports the tight box of the drawn pixels: it stands in for the detector.
- Palette colours are at least 2 x the probe tolerance apart in RGB, and every background
  pixel has HSV saturation <= `MAX_BACKGROUND_SATURATION`, which keeps it > 85 RGB units from
  every palette colour; so the probe never mistakes background for an object or one colour
  for another.
- `ToyRenderer` renders a share of rows wrong on purpose (wrong colour, missing object), so
  the scoring filter downstream has real defects to catch.

Command line::

    python -m mumu_model.toy.world prompts --count 3000 --seed 0 --out examples/prompts/toy_prompts.txt
    python -m mumu_model.toy.suites --out eval/suites/toy
"""

from __future__ import annotations

import argparse
import colorsys
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from mumu_model.atomic import write_bytes_atomic
from mumu_model.data.report import Skipped
from mumu_model.data.rows import row_id, row_problem

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")

# Saturated and far apart: the closest pairs (red/orange, orange/yellow) are 127 RGB units
# apart, more than twice the probe's default tolerance of 60, so no pixel can count for two
# colours. Order matters: it breaks ties in `dominant_colour` and balances the suite.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 10, 10),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (20, 170, 40),
    "cyan": (0, 220, 230),
    "blue": (20, 40, 230),
    "purple": (150, 20, 170),
    "pink": (255, 90, 200),
}

BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "gradient", "noisy")

# Optional size word; no word means medium.
SIZES: tuple[str, ...] = ("small", "big")

# Every background pixel is clamped to this HSV saturation. At <= 0.2 the nearest palette
# colour is ~89 RGB units away (pink vs a pale pink), well beyond the probe tolerance of 60.
MAX_BACKGROUND_SATURATION = 0.2

# Object side in pixels on a 32 px canvas, inclusive ranges, scaled with the canvas size.
# Objects of 7-17 px (a few 16x16 latent cells) were rarely drawn at all when a prompt asked
# for one of them: the denoiser never committed to so little evidence. These sizes are the
# scale of the 16x16 crops of the first toy experiment; a scene without room shrinks its biggest object.
_SIDE_RANGES: dict[str | None, tuple[int, int]] = {"small": (10, 12), None: (13, 16), "big": (17, 20)}
_REFERENCE_CANVAS = 32

# Share of objects with each size word in generated prompts (the rest: no word, medium).
_SIZE_WORD_PROBABILITY = {"small": 0.25, "big": 0.25}

# Relative weights of 1, 2, 3, ... objects per generated prompt.
_OBJECT_COUNT_WEIGHTS = (0.5, 0.35, 0.15, 0.08, 0.04, 0.02)

_ARTICLES = ("a", "an")


# -- scenes and the prompt grammar ---------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a prompt: a shape, and the colour and size words if the prompt has them."""

    shape: str
    colour: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for. `background` None lets the renderer pick one from the seed."""

    objects: tuple[ObjectSpec, ...]
    background: str | None = None


def _object_phrase(spec: ObjectSpec) -> str:
    words = [word for word in (spec.size, spec.colour, spec.shape) if word]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def format_prompt(scene: Scene) -> str:
    """The canonical text of `scene` (inverse of `parse_prompt`)."""
    content = " and ".join(_object_phrase(spec) for spec in scene.objects)
    return f"{content}, {scene.background} style" if scene.background else content


def parse_prompt(text: str) -> Scene:
    """Parse a toy prompt: `"{object} [and {object}]*[, {background} style]"`, where an object
    is `"a|an [small|big] [colour] shape"` and shapes are distinct. Case and extra whitespace
    do not matter. Anything else raises `ValueError` naming the offending word and the text.
    """
    if not isinstance(text, str):
        raise ValueError(f"toy prompt must be a string, got {type(text).__name__}")

    def fail(problem: str) -> ValueError:
        return ValueError(f"{problem} in toy prompt {text!r}")

    parts = text.lower().split(",")
    if len(parts) > 2:
        raise fail(f"unexpected ',' before {' '.join(parts[2].split())!r} (at most one comma)")
    background = None
    if len(parts) == 2:
        style = parts[1].split()
        if not style:
            raise fail("empty style after ','")
        if style[0] not in BACKGROUNDS:
            raise fail(f"unknown background {style[0]!r} (expected one of {', '.join(BACKGROUNDS)})")
        if len(style) == 1:
            raise fail(f"expected 'style' after {style[0]!r}")
        if style[1] != "style":
            raise fail(f"unexpected word {style[1]!r} (expected 'style')")
        if len(style) > 2:
            raise fail(f"unexpected word {style[2]!r} after 'style'")
        background = style[0]

    words = parts[0].split()
    if not words:
        raise fail("no object")
    objects: list[ObjectSpec] = []
    i = 0
    while True:
        if words[i] not in _ARTICLES:
            raise fail(f"unexpected word {words[i]!r} (expected 'a' or 'an')")
        i += 1
        size = colour = None
        if i < len(words) and words[i] in SIZES:
            size, i = words[i], i + 1
        if i < len(words) and words[i] in PALETTE:
            colour, i = words[i], i + 1
        if i == len(words):
            raise fail(f"missing shape after {words[i - 1]!r}")
        if words[i] not in SHAPES:
            raise fail(f"unexpected word {words[i]!r} (expected a size, a colour or a shape)")
        if any(spec.shape == words[i] for spec in objects):
            # Crops and boxes are matched to objects by their shape word, so it must be unique.
            raise fail(f"repeated shape {words[i]!r}")
        objects.append(ObjectSpec(words[i], colour, size))
        i += 1
        if i == len(words):
            break
        if words[i] != "and":
            raise fail(f"unexpected word {words[i]!r} (expected 'and' or ',')")
        i += 1
        if i == len(words):
            raise fail("missing object after 'and'")
    return Scene(tuple(objects), background)


def content_of(text: str) -> str:
    """The canonical content part of a toy prompt (no style): `"a red circle and a square"`."""
    return format_prompt(replace(parse_prompt(text), background=None))


def make_prompts(
    count: int, *, seed: int, colour_word_probability: float = 0.2, max_objects: int = 3
) -> list[str]:
    """`count` random toy prompts (repeats possible), deterministic in `seed`.

    Each has 1..`max_objects` objects with distinct shapes (1/2/3 objects weighted
    0.5/0.35/0.15), each naming its colour with probability `colour_word_probability` and a
    size word half the time, and one background style. Objects are joined with " and " only:
    the rule-based content/style splitter cuts at commas and at the word "style".
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0.0 <= colour_word_probability <= 1.0:
        raise ValueError(f"colour_word_probability must be in [0, 1], got {colour_word_probability}")
    if not 1 <= max_objects <= len(SHAPES):
        raise ValueError(f"max_objects must be in 1..{len(SHAPES)}, got {max_objects}")
    rng = np.random.default_rng(seed)
    weights = np.array(_OBJECT_COUNT_WEIGHTS[:max_objects])
    weights /= weights.sum()
    colours = list(PALETTE)
    prompts = []
    for _ in range(count):
        n_objects = int(rng.choice(np.arange(1, max_objects + 1), p=weights))
        shapes = rng.permutation(len(SHAPES))[:n_objects]
        objects = []
        for shape in shapes:
            draw = rng.random()
            size = "small" if draw < _SIZE_WORD_PROBABILITY["small"] else (
                "big" if draw < sum(_SIZE_WORD_PROBABILITY.values()) else None)
            colour = colours[rng.integers(len(colours))] if rng.random() < colour_word_probability else None
            objects.append(ObjectSpec(SHAPES[shape], colour, size))
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        prompts.append(format_prompt(Scene(tuple(objects), background)))
    return prompts


# -- rendering -----------------------------------------------------------------------------


def _side_range(size_word: str | None, canvas: int) -> tuple[int, int]:
    low, high = _SIDE_RANGES[size_word]
    scale = canvas / _REFERENCE_CANVAS
    low = max(3, round(low * scale))
    return low, max(low, round(high * scale))


def _polygon_mask(vertices: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of pixel centres (u, v) against `vertices` (n x 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y0 == y1:
            continue
        crosses = (y0 > v) != (y1 > v)
        x_at_v = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at_v)
    return inside


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask of `shape` in a `side` x `side` square, trimmed to its tight box.

    Pixels are tested at their centres, with no anti-aliasing: an object pixel is either
    exactly its colour or not drawn, which keeps the probe and the boxes exact.
    """
    centres = (np.arange(side) + 0.5) / side - 0.5  # in (-0.5, 0.5)
    v, u = np.meshgrid(centres, centres, indexing="ij")
    if shape == "circle":
        mask = u**2 + v**2 <= 0.25
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        mask = np.abs(u) <= (v + 0.5) / 2  # apex at the top centre, base along the bottom
    elif shape == "diamond":
        mask = np.abs(u) + np.abs(v) <= 0.5
    elif shape == "cross":
        # Arms a third of the side thick (>= 2 px, so that they hold solid 2x2 patches), with
        # the parity of the side so the arms sit exactly in the middle.
        width = max(2, round(side / 3))
        width += (side - width) % 2
        start = (side - width) // 2
        arm = np.zeros(side, dtype=bool)
        arm[start:start + width] = True
        mask = arm[None, :] | arm[:, None]
    elif shape == "star":
        # Five points, inner radius half the outer one: fatter than a regular star, so that
        # even a small star has a solid core; centred vertically (its bottom points are higher
        # than its top point is far).
        outer = 0.5 / math.sin(math.radians(72))
        angles = np.radians(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, outer, outer * 0.5)
        shift = outer * (1 - math.cos(math.radians(36))) / 2
        vertices = np.stack([radii * np.cos(angles), radii * np.sin(angles) + shift], axis=1)
        mask = _polygon_mask(vertices, u, v)
    else:
        raise ValueError(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _apart(a: Sequence[int], b: Sequence[int]) -> bool:
    """Boxes (x0, y0, x1, y1), x1/y1 exclusive, with at least one pixel of gap between them."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def _place(masks: list[np.ndarray], canvas: int, rng: np.random.Generator,
           tries: int = 60) -> list[tuple[int, int, int, int]] | None:
    """Random non-overlapping boxes for `masks`, or None after `tries` whole-scene attempts.

    A whole attempt restarts from scratch because an early object in the middle of the canvas
    can leave no room for a later big one, and moving only the later one would never fix that.
    """
    for _ in range(tries):
        boxes: list[tuple[int, int, int, int]] = []
        for mask in masks:
            height, width = mask.shape
            for _ in range(20):
                x0 = int(rng.integers(0, canvas - width + 1))
                y0 = int(rng.integers(0, canvas - height + 1))
                box = (x0, y0, x0 + width, y0 + height)
                if all(_apart(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(masks):
            return boxes
    return None


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255.0


def _clamp_saturation(pixels: np.ndarray, limit: float = MAX_BACKGROUND_SATURATION) -> np.ndarray:
    """Pull each pixel towards grey (keeping its HSV value) until its saturation <= `limit`.

    The background recipes are all low-saturation by construction; this is the guarantee,
    for the noise and blends whose saturation is only probably low.
    """
    top = pixels.max(axis=-1, keepdims=True)
    spread = top - pixels.min(axis=-1, keepdims=True)
    allowed = limit * top
    factor = np.where(spread > allowed, allowed / np.maximum(spread, 1e-9), 1.0)
    return top - (top - pixels) * factor


def _background(kind: str, rng: np.random.Generator, canvas: int) -> np.ndarray:
    """A `canvas` x `canvas` x 3 float image of background `kind` with a random pale tint."""
    hue, value = rng.random(), rng.uniform(0.6, 0.92)
    base = _hsv_to_rgb(hue, rng.uniform(0.0, 0.15), value)
    # A second tone of a nearby hue, clearly lighter or darker, for the patterns and gradient.
    shade = rng.uniform(0.12, 0.25) * (1 if rng.random() < 0.5 else -1)
    second = _hsv_to_rgb((hue + rng.uniform(-0.1, 0.1)) % 1.0, rng.uniform(0.0, 0.15),
                         float(np.clip(value + shade, 0.35, 1.0)))
    scale = canvas / _REFERENCE_CANVAS
    y, x = np.mgrid[0:canvas, 0:canvas]

    def px(low: int, high: int) -> int:  # a random length in pixels, scaled with the canvas
        return max(1, round(int(rng.integers(low, high + 1)) * scale))

    if kind == "plain":
        pattern = np.zeros((canvas, canvas), dtype=bool)
    elif kind == "striped":
        width = px(2, 4)
        coordinate = (y, x, x + y)[int(rng.integers(3))]  # horizontal, vertical, diagonal
        pattern = (coordinate // width) % 2 == 1
    elif kind == "dotted":
        spacing, dot = px(4, 6), px(1, 2)
        offset_x, offset_y = int(rng.integers(spacing)), int(rng.integers(spacing))
        pattern = ((x + offset_x) % spacing < dot) & ((y + offset_y) % spacing < dot)
    elif kind == "checkered":
        cell = px(3, 6)
        pattern = ((x // cell) + (y // cell)) % 2 == 1
    elif kind == "gradient":
        angle = rng.uniform(0.0, 2 * math.pi)
        along = x * math.cos(angle) + y * math.sin(angle)
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-9)
        return _clamp_saturation(base * (1 - t[..., None]) + second * t[..., None])
    elif kind == "noisy":
        # Mostly luminance noise (same on all channels), a little chroma noise.
        grey = rng.normal(0.0, 12.0, (canvas, canvas, 1))
        tint = rng.normal(0.0, 3.0, (canvas, canvas, 3))
        return _clamp_saturation(np.clip(base + grey + tint, 0.0, 255.0))
    else:
        raise ValueError(f"unknown background {kind!r} (expected one of {', '.join(BACKGROUNDS)})")
    return _clamp_saturation(np.where(pattern[..., None], second, base))


def _render(scene: Scene, rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict], str]:
    background = scene.background or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]

    # Unnamed colours avoid the colours already in the scene, so that each object's colour
    # identifies it (the per-object colour evaluation needs that).
    colours: list[str] = []
    named = {spec.colour for spec in scene.objects if spec.colour}
    for spec in scene.objects:
        if spec.colour:
            colours.append(spec.colour)
            continue
        free = [c for c in PALETTE if c not in named and c not in colours] or list(PALETTE)
        colours.append(free[int(rng.integers(len(free)))])

    sides = [int(rng.integers(low, high + 1)) for low, high in
             (_side_range(spec.size, size) for spec in scene.objects)]
    while True:
        masks = [shape_mask(spec.shape, side) for spec, side in zip(scene.objects, sides)]
        boxes = _place(masks, size, rng)
        if boxes is not None:
            break
        # No room (three big objects rarely fit): shrink the biggest object by a pixel.
        biggest = int(np.argmax(sides))
        if sides[biggest] <= 3:
            raise ValueError(f"cannot fit {len(sides)} objects on a {size} px canvas")
        sides[biggest] -= 1

    pixels = _background(background, rng, size)
    objects = []
    for spec, colour, mask, box in zip(scene.objects, colours, masks, boxes):
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1][mask] = PALETTE[colour]
        objects.append({"shape": spec.shape, "colour": colour, "box": [x0, y0, x1, y1]})
    image = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")
    return image, objects, background


def render_scene(scene: Scene, rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, list[dict]]:
    """Render `scene` on a `size` x `size` RGB canvas.

    Returns the image and, per drawn object, `{"shape", "colour", "box": [x0, y0, x1, y1]}`
    with the tight box of its pixels (x1, y1 exclusive). Colours and the background the scene
    leaves open are drawn from `rng`; objects never overlap (>= 1 px apart).
    """
    image, objects, _ = _render(scene, rng, size)
    return image, objects


# -- the synthesizer stand-in --------------------------------------------------------------


class ToyRenderer:
    """Drop-in for `SDXLSynthesizer`: renders rows `{"pair_id", "text", "seed"}` of toy prompts.

    Each yielded row is a copy of the input with `row["annotations"] = {"objects": [...],
    "background": ..., "defect": None | "wrong_colour" | "missing_object"}`, describing what was
    actually drawn. With probability `defect_probability` a render is deliberately wrong: an
    object with a named colour is drawn in another colour, or (when no colour is named) one
    object is left out, so the scoring filter downstream has real work to do.
    """

    def __init__(self, size: int = 32, defect_probability: float = 0.1):
        if size < 8:
            raise ValueError(f"size must be >= 8, got {size}")
        if not 0.0 <= defect_probability <= 1.0:
            raise ValueError(f"defect_probability must be in [0, 1], got {defect_probability}")
        self.size = size
        self.height = self.width = size
        self.defect_probability = defect_probability
        self.skipped = Skipped()

    def generate(
        self, rows: Iterable[dict], *, skipped: Skipped | None = None
    ) -> Iterator[tuple[dict, Image.Image]]:
        """Yield `(row copy with annotations, image)` per renderable row, in input order.
        Bad rows are counted in `skipped` (default `self.skipped`), never raised."""
        skipped = self.skipped if skipped is None else skipped
        for row in rows:
            problem = row_problem(row)
            if problem:
                skipped.add("bad_row", row_id(row), problem)
                continue
            try:
                scene = parse_prompt(row["text"])
            except ValueError as err:
                skipped.add("unparsable_prompt", row_id(row), str(err))
                continue
            image, annotations = self.render(scene, int(row["seed"]))
            yield {**row, "annotations": annotations}, image

    def render(self, scene: Scene, seed: int) -> tuple[Image.Image, dict]:
        """The image and annotations of `scene` at `seed` (what `generate` yields)."""
        rng = np.random.default_rng(seed)
        # Always drawn, so that a row's image does not depend on defect_probability unless
        # the row is the one made defective.
        defect = None
        if rng.random() < self.defect_probability and scene.objects:
            named = [i for i, spec in enumerate(scene.objects) if spec.colour]
            objects = list(scene.objects)
            if named:
                defect = "wrong_colour"
                index = named[int(rng.integers(len(named)))]
                others = [c for c in PALETTE if c != objects[index].colour]
                objects[index] = replace(objects[index], colour=others[int(rng.integers(len(others)))])
            else:
                defect = "missing_object"
                del objects[int(rng.integers(len(objects)))]
            scene = replace(scene, objects=tuple(objects))
        image, drawn, background = _render(scene, rng, self.size)
        return image, {"objects": drawn, "background": background, "defect": defect}


# -- the analytic colour probe -------------------------------------------------------------


def colour_counts(image: Image.Image | np.ndarray, *, tolerance: float = 60.0) -> dict[str, int]:
    """Per palette colour, the number of 2x2 pixel patches (stride 1) whose four pixels are all
    within `tolerance` (Euclidean RGB) of it.

    Patches rather than pixels: a generated image full of noise has plenty of single pixels
    near some palette colour, but almost never four neighbours near the same one.
    """
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    rgb = np.asarray(image, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {rgb.shape}")
    counts = {}
    for name, colour in PALETTE.items():
        near = ((rgb - np.array(colour, dtype=np.float32)) ** 2).sum(axis=-1) <= tolerance**2
        solid = near[:-1, :-1] & near[1:, :-1] & near[:-1, 1:] & near[1:, 1:]
        counts[name] = int(solid.sum())
    return counts


def dominant_colour(image: Image.Image | np.ndarray, *, min_patches: int = 2,
                    tolerance: float = 60.0) -> str | None:
    """The palette colour with the most solid 2x2 patches (ties: palette order), or None when
    the best has fewer than `min_patches`."""
    counts = colour_counts(image, tolerance=tolerance)
    best = max(PALETTE, key=lambda name: counts[name])
    return best if counts[best] >= min_patches else None


# -- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mumu_model.toy.world", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prompts = commands.add_parser("prompts", help="write random toy prompts, one per line")
    prompts.add_argument("--count", type=int, required=True)
    prompts.add_argument("--seed", type=int, required=True)
    prompts.add_argument("--out", type=Path, required=True)
    prompts.add_argument("--colour-word-probability", type=float, default=0.2)
    prompts.add_argument("--max-objects", type=int, default=3)
    args = parser.parse_args(argv)

    lines = make_prompts(args.count, seed=args.seed, max_objects=args.max_objects,
                         colour_word_probability=args.colour_word_probability)
    write_bytes_atomic(args.out, "".join(f"{line}\n" for line in lines).encode("utf-8"))
    print(f"wrote {len(lines)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
