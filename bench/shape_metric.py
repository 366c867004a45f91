"""Validation of the analytic shape and count metrics (`mumu_model.toy.shapes`) on the toy world's renders.

No model: the toy renderer draws scenes whose shapes, colours and boxes are known, and the
metric must recover them. Per canvas size (32 px, the toy default, and 48 / 64 px):

- clean: single-object scenes, every shape x size word (small / medium / big) x background,
  at `--seeds` seeds each (6 x 3 x 6 x 6 = 648 per canvas by default). `classify_shape` on the
  largest object found; accuracy overall and per shape, and the confusion matrix (rows: the
  shape drawn, columns: the shape found, "none" when no object was found). The target is
  >= 95% on clean renders.
- clean, templates only: the same masks classified by templates alone (`ShapeTemplates.from_masks`,
  no rasteriser), the fallback for a world that gives only template masks.
- degraded copies of a third of the clean scenes, the kind of image a generator returns:
  antialiased (rendered at 4x and box-downsampled), noisy (Gaussian, sigma 15 per channel),
  blurred + noisy (Gaussian blur sigma 0.6 px at 32 px, scaled with the canvas, then sigma 15),
  and a strong version of it (blur sigma 1.0 px, noise sigma 25) to show where the metric
  starts to fail: blur rounds corners, so squares, crosses and stars drift towards circles.
- counts: 2- and 3-object scenes (distinct shapes, distinct colours, random sizes and
  backgrounds): `count_objects` exact, and `match_objects` with the drawn (colour, shape)
  list: per-object colour and shape accuracy, and all objects right.

Writes `bench/results/shape_metric.json` (atomically): every figure as a ratio in [0, 1] with
its count, the confusion matrices, the settings and the environment.

    python bench/shape_metric.py [--seeds 6] [--multi 150] [--canvases 32 48 64] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
from PIL import Image
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mumu_model.toy.shapes import ShapeTemplates, classify_shape, count_objects, match_objects, object_masks  # noqa: E402
from mumu_model.atomic import write_bytes_atomic  # noqa: E402
from mumu_model.toy.world import (  # noqa: E402
    BACKGROUNDS,
    PALETTE,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    render_scene,
    shape_mask,
)

DEFAULT_OUT = REPO / "bench" / "results" / "shape_metric.json"
TARGET = 0.95
SIZE_WORDS = (None, *SIZES)


def render(scene: Scene, seed: tuple[int, ...], canvas: int, antialias: bool = False) -> tuple[np.ndarray, list[dict]]:
    """The scene at `canvas` px; antialiased: drawn at 4x and box-downsampled."""
    rng = np.random.default_rng(seed)
    if not antialias:
        image, objects = render_scene(scene, rng, canvas)
        return np.asarray(image), objects
    image, objects = render_scene(scene, rng, canvas * 4)
    return np.asarray(image.resize((canvas, canvas), Image.BOX)), objects


def noisy(rgb: np.ndarray, seed: int, sigma: float = 15.0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, rgb.shape)
    return np.clip(rgb + noise, 0, 255).round().astype(np.uint8)


def blurred(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(ndimage.gaussian_filter(rgb.astype(np.float64), (sigma, sigma, 0)), 0, 255).round().astype(np.uint8)


class Tally:
    """Accuracy overall, per shape, and the confusion matrix of single-object scenes."""

    def __init__(self) -> None:
        self.confusion: Counter[tuple[str, str]] = Counter()

    def add(self, drawn: str, rgb: np.ndarray, templates: ShapeTemplates) -> None:
        masks = object_masks(rgb)
        found = classify_shape(max(masks, key=lambda m: int(m.sum())), templates)[0] if masks else "none"
        self.confusion[drawn, found] += 1

    def report(self) -> dict:
        total = sum(self.confusion.values())
        right = sum(n for (drawn, found), n in self.confusion.items() if drawn == found)
        per_shape = {}
        for shape in SHAPES:
            n = sum(v for (drawn, _), v in self.confusion.items() if drawn == shape)
            per_shape[shape] = round(self.confusion[shape, shape] / n, 4) if n else None
        columns = [*SHAPES, "none"]
        return {
            "n": total,
            "accuracy": round(right / total, 4) if total else None,
            "per_shape": per_shape,
            "confusion": {"rows_drawn_columns_found": columns,
                          "matrix": {s: [self.confusion[s, c] for c in columns] for s in SHAPES}},
        }


def single_object_scenes(seeds: int) -> list[tuple[Scene, tuple[int, ...]]]:
    """Every shape x size word x background, at `seeds` seeds each."""
    return [(Scene((ObjectSpec(shape, None, size),), background), (7, s, i))
            for s in range(seeds)
            for i, (shape, size, background) in enumerate(
                (sh, sz, bg) for sh in SHAPES for sz in SIZE_WORDS for bg in BACKGROUNDS)]


def single_object(canvas: int, seeds: int, templates: ShapeTemplates) -> dict:
    template_only = ShapeTemplates.from_masks(templates.masks)
    scenes = single_object_scenes(seeds)
    tallies = {name: Tally() for name in
               ("clean", "clean_templates_only", "antialiased", "noisy", "blurred_noisy", "blurred_noisy_strong")}
    degrade: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
        "noisy": lambda rgb, k: noisy(rgb, k),
        "blurred_noisy": lambda rgb, k: noisy(blurred(rgb, 0.6 * canvas / 32), k),
        "blurred_noisy_strong": lambda rgb, k: noisy(blurred(rgb, 1.0 * canvas / 32), k, 25.0),
    }
    for k, (scene, seed) in enumerate(scenes):
        shape = scene.objects[0].shape
        rgb, _ = render(scene, seed, canvas)
        tallies["clean"].add(shape, rgb, templates)
        tallies["clean_templates_only"].add(shape, rgb, template_only)
        if k % 3 == 0:  # a third of the scenes, for each degraded copy
            tallies["antialiased"].add(shape, render(scene, seed, canvas, antialias=True)[0], templates)
            for name, fn in degrade.items():
                tallies[name].add(shape, fn(rgb, k), templates)
    return {name: tally.report() for name, tally in tallies.items()}


def multi_object(canvas: int, objects: int, count: int, templates: ShapeTemplates) -> dict:
    rng = np.random.default_rng((11, canvas, objects))
    counted = colour = shape = all_right = 0
    miscounts: Counter[int] = Counter()
    for k in range(count):
        shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))[:objects]]
        specs = tuple(ObjectSpec(s, None, SIZE_WORDS[int(rng.integers(3))]) for s in shapes)
        scene = Scene(specs, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
        rgb, drawn = render(scene, (13, canvas, objects, k), canvas)
        found = count_objects(rgb)
        counted += found == len(drawn)
        miscounts[found - len(drawn)] += found != len(drawn)
        result = match_objects(rgb, [(PALETTE[o["colour"]], o["shape"]) for o in drawn], templates, palette=PALETTE)
        colour += sum(m.colour_right for m in result.objects)
        shape += sum(m.shape_right for m in result.objects)
        all_right += result.all_right
    return {
        "n": count,
        "count_accuracy": round(counted / count, 4),
        "miscounts_by_error": {str(e): n for e, n in sorted(miscounts.items()) if n},
        "match_colour_accuracy": round(colour / (count * objects), 4),
        "match_shape_accuracy": round(shape / (count * objects), 4),
        "match_all_right": round(all_right / count, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6, help="seeds per shape x size x background")
    parser.add_argument("--multi", type=int, default=150, help="scenes per canvas of 2 and of 3 objects")
    parser.add_argument("--canvases", type=int, nargs="+", default=[32, 48, 64])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    templates = ShapeTemplates.from_renderer(SHAPES, shape_mask)
    per_canvas, multi = {}, {}
    for canvas in args.canvases:
        per_canvas[str(canvas)] = single_object(canvas, args.seeds, templates)
        multi[str(canvas)] = {f"{n}_objects": multi_object(canvas, n, args.multi, templates) for n in (2, 3)}
        single = "; ".join(f"{name} {r['accuracy']:.4f} of {r['n']}" for name, r in per_canvas[str(canvas)].items())
        counts = ", ".join(f"{k} {v['count_accuracy']:.4f} (all right {v['match_all_right']:.4f})"
                           for k, v in multi[str(canvas)].items())
        print(f"{canvas} px: {single}; counts {counts}")

    # Overall clean accuracy, pooled over the canvases.
    pooled = Tally()
    for canvas in per_canvas.values():
        matrix = canvas["clean"]["confusion"]
        for drawn, row in matrix["matrix"].items():
            for found, n in zip(matrix["rows_drawn_columns_found"], row):
                pooled.confusion[drawn, found] += n
    overall = pooled.report()
    wall = time.perf_counter() - start
    print(f"clean overall {overall['accuracy']:.4f} of {overall['n']} (target {TARGET}); {wall:.1f} s")

    document = {
        "benchmark": "shape_metric",
        "target_clean_accuracy": TARGET,
        "target_met": overall["accuracy"] >= TARGET,
        "clean_overall": overall,
        "single_object_by_canvas": per_canvas,
        "multi_object_by_canvas": multi,
        "settings": {"seeds": args.seeds, "multi": args.multi, "canvases": args.canvases,
                     "noise_sigma": 15.0, "blur_sigma_at_32px": 0.6,
                     "strong_noise_sigma": 25.0, "strong_blur_sigma_at_32px": 1.0, "antialias_supersample": 4,
                     "segmentation": "object_masks defaults (chroma >= 100, min area 1% of the image)"},
        "environment": {"date": datetime.date.today().isoformat(), "platform": platform.platform(),
                        "python": platform.python_version(), "numpy": np.__version__,
                        "scipy": scipy.__version__, "wall_s": round(wall, 1)},
    }
    write_bytes_atomic(args.out, (json.dumps(document, indent=1) + "\n").encode("utf-8"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
