"""The toy world's model-free metrics: is each crop's colour and shape in the output?

Registered as the `toy` world (pyproject.toml, `mumu.worlds` entry points), which the
evaluation (`eval.worlds`) loads for suites that say `world: toy`. Two probes, no model:

Colour probe. Per palette colour, the solid 2x2 patches of the output near it are counted
(`world.colour_counts`; single pixels would let noise score), and a colour "covers" the image
with at least `min_patches` of them.
- One coloured object: `colour_match` is 1.0 when the dominant colour (the one with the most
  patches, if it covers) is the object's colour, else 0.0.
- Several: the fraction of the objects' colours that cover the image, so 0.5 for one of two.
Chance is 1 / len(PALETTE) for one object; a text-only ablation of a model that learned its
colours from the images should sit there.

Object probe, where every object names a colour and a shape. The output is segmented and each
expected (colour, shape) object matched one-to-one to a detected object (`shapes.match_objects`,
colour first): `obj_colour` and `obj_shape` are the shares of objects right in colour and in
shape, `all_colours` and `all_objects` whether every object is, `count_match` whether as many
objects were detected as asked for. Shape chance is 1 / len(SHAPES).

Slot binding, where two or more objects each name a colour and a shape: the names the
evaluation's binding judge (`eval.binding`) reports on real outputs, read from the object probe
(`slot_binding`), so one vocabulary serves the laptop and the GPU. The shape plays the phrase:
each slot (one per object) takes a detected object of its shape, and is `bound` when that
object has its crop's colour, `leaked` when it has another slot's colour instead, `missing`
when no object of its shape was left for it; `duplicated` when two or more detected objects
have its colour and shape. A slot found in a colour of no slot is neither bound nor leaked
(the judge on real outputs has no such case). Copy-paste does not apply to flat renders.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from ..images import to_rgb
from .shapes import MatchResult, ShapeTemplates, match_objects, nearest_colour
from .world import PALETTE, SHAPES, colour_counts, dominant_colour, shape_mask


@dataclass(frozen=True)
class ColourProbe:
    match: float  # 1.0 / 0.0 for one object; for several, the fraction of their colours found
    found: str  # what the probe saw: the dominant colour (one object), or every colour covering
    # the image, most patches first, comma-joined (several); "" when none covers it


def colour_probe(image: Image.Image, colours: Sequence[str], *, min_patches: int = 2) -> ColourProbe:
    """Does the image carry the expected palette `colours` (one per object)?"""
    if not colours:
        raise ValueError("colour_probe needs at least one expected colour")
    image = to_rgb(image)
    if len(colours) == 1:
        dominant = dominant_colour(image, min_patches=min_patches) or ""
        return ColourProbe(float(dominant == colours[0]), dominant)
    counts = colour_counts(image)
    # Most patches first; ties keep palette order (sorted is stable).
    covering = sorted((c for c, n in counts.items() if n >= min_patches), key=lambda c: -counts[c])
    return ColourProbe(sum(c in covering for c in colours) / len(colours), ",".join(covering))


def colour_chance() -> float:
    """The colour probe's chance level for one object: one palette colour in len(PALETTE)."""
    return 1.0 / len(PALETTE)


@functools.lru_cache(maxsize=1)
def _templates() -> ShapeTemplates:
    return ShapeTemplates.from_renderer(SHAPES, shape_mask)


def object_probe(image: Image.Image, objects: Sequence[tuple[str, str]]) -> MatchResult:
    """Match each expected (palette colour, shape) object to one flat object of the output. An
    object is colour-right when its nearest palette colour is the expected one, shape-right
    when its mask best fits the expected shape; a missing object is neither."""
    if not objects:
        raise ValueError("object_probe needs at least one expected (colour, shape) object")
    expected = [(PALETTE[colour], shape) for colour, shape in objects]
    return match_objects(to_rgb(image), expected, _templates(), palette=PALETTE)


def objects_found(result: MatchResult) -> str:
    """What the object probe saw: each detected object's "colour shape", comma-joined."""
    return ",".join(f"{nearest_colour(d.colour, PALETTE)} {d.shape}" for d in result.detected)


def slot_binding(result: MatchResult, objects: Sequence[tuple[str, str]]) -> dict[str, float | int | str]:
    """The binding columns of one output (names as `eval.binding`) for the expected (palette
    colour, shape) `objects`, two or more, from the objects the object probe detected.

    As the judge's detector finds a slot's phrase, a slot takes a detected object of its shape
    (one each, nearest colours first); its colour then says bound, leaked or neither.
    """
    if len(objects) < 2:
        raise ValueError(f"slot binding needs two or more objects, got {len(objects)}")
    found = [(nearest_colour(d.colour, PALETTE), d.shape) for d in result.detected]
    distance = np.array([[np.linalg.norm(np.subtract(PALETTE[colour], d.colour, dtype=float)) if d.shape == shape
                          else np.inf for d in result.detected] for colour, shape in objects]).reshape(len(objects), -1)
    rows, cols = linear_sum_assignment(np.where(np.isfinite(distance), distance, 1e9)) if found else ([], [])
    assigned = {int(r): int(c) for r, c in zip(rows, cols) if np.isfinite(distance[r, c])}
    outcomes, duplicated = [], []
    for index, (colour, shape) in enumerate(objects):
        others = {c for i, (c, _) in enumerate(objects) if i != index and c != colour}
        j = assigned.get(index)
        if j is None:
            outcomes.append("missing")
        elif found[j][0] == colour:
            outcomes.append("bound")
        elif found[j][0] in others:
            outcomes.append("leaked")
        else:
            outcomes.append("wrong")
        duplicated.append(found.count((colour, shape)) >= 2)
    n = len(objects)
    return {"n_slots": n, "slot_bound": outcomes.count("bound") / n, "all_bound": float(outcomes.count("bound") == n),
            "slot_leaked": outcomes.count("leaked") / n, "slot_missing": outcomes.count("missing") / n,
            "slot_duplicated": sum(duplicated) / n,
            "slot_outcomes": ", ".join(f"{shape}:{outcome}" + ("+duplicated" if twice else "")
                                       for (_, shape), outcome, twice in zip(objects, outcomes, duplicated))}


def shape_chance() -> float:
    """The object probe's chance level for one object's shape: one shape in len(SHAPES)."""
    return 1.0 / len(SHAPES)


class ToyWorld:
    """The toy world as the evaluation sees it (the interface is `eval.worlds.World`)."""

    colours = tuple(PALETTE)
    shapes = tuple(SHAPES)
    means = ("colour_match", "obj_colour", "obj_shape", "all_colours", "all_objects", "count_match", "n_objects")
    main_metric = "colour_match"
    rates = {"colour_match": "object", "obj_colour": "object", "obj_shape": "object",
             "all_colours": "image", "all_objects": "image", "count_match": "image"}

    def score(self, image: Image.Image,
              objects: Sequence[tuple[str | None, str | None]]) -> dict[str, float | int | str]:
        """The colour probe where objects name colours; the object probe too where every object
        names a colour and a shape."""
        colours = [colour for colour, _ in objects if colour is not None]
        if not colours:
            return {}
        probe = colour_probe(image, colours)
        row: dict[str, float | int | str] = {"colour_match": probe.match, "colour_found": probe.found,
                                       "n_objects": len(colours)}
        if all(colour is not None and shape is not None for colour, shape in objects):
            found = object_probe(image, objects)
            row.update(obj_colour=found.colour_accuracy, obj_shape=found.shape_accuracy,
                       all_colours=float(found.all_colours), all_objects=float(found.all_right),
                       count_match=float(found.count_right), objects_found=objects_found(found))
            if len(objects) >= 2:
                row.update(slot_binding(found, objects))
        return row

    def chance(self, metrics: Mapping[str, float]) -> dict[str, float]:
        levels = {}
        if "colour_match" in metrics or "colour_match_text_only" in metrics:
            levels["colour_chance"] = colour_chance()
        if "obj_shape" in metrics:
            levels["shape_chance"] = shape_chance()
        return levels

    def headline(self, metrics: Mapping[str, float]) -> str:
        """A suite's figures in a line, each rate with its 95% interval: colour and shape for
        one-object suites, all colours right and per-object colour for several; then the
        text-only ablation's. "" for a suite without the probes."""

        def rate(name: str) -> str:
            value = metrics.get(name)
            if value is None or math.isnan(value):
                return ""
            low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
            return f"{value:.1%}" + (f" ({low:.0%}-{high:.0%})" if low is not None and high is not None else "")

        if "colour_match" not in metrics:
            return ""
        several = metrics.get("n_objects", 1.0) > 1.0
        shown = [("all colours", "all_colours"), ("per object", "obj_colour")] if several else \
            [("colour", "colour_match"), ("shape", "obj_shape")]
        shown.append(("text-only " + shown[0][0], f"{shown[0][1]}_text_only"))
        return ", ".join(f"{label} {rate(name)}" for label, name in shown if rate(name))


TOY_WORLD = ToyWorld()
