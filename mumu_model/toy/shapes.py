"""Analytic shape and object-count metrics for flat coloured shapes on low-saturation backgrounds.

No learned model: numpy and scipy only. Built for the toy world (`mumu_model.toy.world`), but it
takes the world's facts as arguments, never from an import, so another world of flat shapes can
reuse it: the shape names and a rasteriser (`ShapeTemplates.from_renderer(SHAPES, shape_mask)`)
or template masks (`ShapeTemplates.from_masks`), and, where colours are named, the palette.

Pipeline, per image:
1. Segmentation (`object_masks`). With no background given, a pixel is a seed of an object
   when its chroma (max - min of RGB) is at least `min_chroma`: the toy backgrounds are clamped
   to HSV saturation <= 0.2, so their chroma is <= 51, and every palette colour has chroma
   >= 150; 100 sits between the two. With a background colour or image given, a seed pixel is
   one more than `tolerance` away from it. Seeds are grouped into 8-connected components.
   Each component is then refined to the pixels at least half covered by the object: a pixel's
   coverage is its position on the line from the local background (the median of a ring
   around the component, or the given background) to the object's colour (the median of the
   component's interior). That is what makes an antialiased or blurred edge count the same as
   the hard-edged shape it came from, whatever the contrast of the colour. Holes are filled
   (flat shapes have none: a hole is noise), and components under `min_area` are dropped.
2. Shape (`classify_shape`). The mask, cropped to its tight box, is compared with each
   template shape fitted to that box: the template's area coverage of each pixel (a soft
   mask, supersampled), scored by soft IoU. When the templates come with their rasteriser,
   the shape is also rasterised at the sides whose tight box is exactly the mask's, scored by
   plain IoU; a shape scores the better of the two. Highest score wins; ties take template
   order. Orientation matters: the toy triangle points up, and a model that draws it upside
   down has drawn a different picture.
3. Matching (`match_objects`). Each expected (colour, shape) object is assigned to one
   detected object by the Hungarian algorithm on colour distance, with the shape score as a
   tie-breaker; per object it reports colour-right and shape-right, and the image is all-right
   when every expected object is.

Known limits: objects of different colours that touch are one component (the toy renderer
keeps objects >= 1 px apart; a generated image may not), and a pale object (chroma under
`min_chroma`) is background unless the background is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

RGB = tuple[int, int, int]
Background = RGB | np.ndarray | None

# Between the toy backgrounds' chroma (<= 51) and its palette's (>= 150).
DEFAULT_MIN_CHROMA = 100.0
# Euclidean RGB distance; the toy world's colour probe uses the same tolerance.
DEFAULT_TOLERANCE = 60.0
# Smallest object, as a share of the image: 10 px on a 32 px canvas, where the smallest toy
# object (a small triangle, 10 px side) covers about 50 px.
DEFAULT_MIN_AREA_FRACTION = 0.01
# How much a wrong shape costs in the assignment, in RGB units per unit of IoU: enough to pick
# between two detections of similar colour, far too little to override a colour difference.
SHAPE_COST = 30.0

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# -- inputs --------------------------------------------------------------------------------


def as_rgb_array(image: np.ndarray | Image.Image, name: str = "image") -> np.ndarray:
    """`image` as an H x W x 3 uint8 array. PIL images are converted to RGB; arrays must
    already be H x W x 3 uint8, anything else raises ValueError naming the problem."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or a PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be H x W x 3 (RGB), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    return image


def _as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(mask).__name__}")
    if mask.dtype != bool:
        raise ValueError(f"{name} must have dtype bool, got {mask.dtype}")
    if mask.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H x W), got shape {mask.shape}")
    if not mask.any():
        raise ValueError(f"{name} is empty (no True pixel)")
    return mask


def _as_colour(colour: Sequence[float], name: str) -> np.ndarray:
    value = np.asarray(colour, dtype=np.float64)
    if value.shape != (3,):
        raise ValueError(f"{name} must be an (R, G, B) triple, got {colour!r}")
    return value


def _tight(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`mask` cropped to its True pixels, and that box as (x0, y0, x1, y1), x1/y1 exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return mask[y0:y1, x0:x1], (int(x0), int(y0), int(x1), int(y1))


# -- segmentation --------------------------------------------------------------------------


def _reference(rgb: np.ndarray, background: Background) -> np.ndarray | None:
    """The given background as a float (3,) colour or H x W x 3 image; None when not given."""
    if background is None:
        return None
    if isinstance(background, np.ndarray) and background.ndim == 3:
        reference = as_rgb_array(background, "background").astype(np.float64)
        if reference.shape != rgb.shape:
            raise ValueError(f"background image has shape {reference.shape}, the image {rgb.shape}")
        return reference
    return _as_colour(background, "background")


def _local_background(rgb: np.ndarray, component: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Median colour of a 2 px ring around `component`, outside every seed (grey when none)."""
    near = ndimage.binary_dilation(component, _EIGHT_CONNECTED, iterations=1)
    ring = ndimage.binary_dilation(component, _EIGHT_CONNECTED, iterations=3) & ~near & ~seeds
    if not ring.any():
        ring = ~seeds
    return np.median(rgb[ring], axis=0) if ring.any() else np.full(3, 128.0)


def object_masks(
    image: np.ndarray | Image.Image,
    background: Background = None,
    *,
    min_chroma: float = DEFAULT_MIN_CHROMA,
    tolerance: float = DEFAULT_TOLERANCE,
    min_area: int | None = None,
) -> list[np.ndarray]:
    """The foreground objects of `image`, one H x W boolean mask each, in raster order of their
    first pixel.

    `background`: None for a low-saturation background of any pattern (seeds are pixels of
    chroma >= `min_chroma`); an (R, G, B) colour, or an H x W x 3 uint8 image of the background
    alone, for seeds more than `tolerance` away from it. Edges are refined to the pixels at
    least half covered by the object and holes filled (see the module docstring). Objects
    smaller than `min_area` pixels (default: 1% of the image, at least 4) are noise and dropped.
    """
    rgb = as_rgb_array(image).astype(np.float64)
    height, width = rgb.shape[:2]
    if min_area is None:
        min_area = max(4, round(DEFAULT_MIN_AREA_FRACTION * height * width))
    reference = _reference(rgb, background)
    if reference is None:
        seeds = rgb.max(axis=-1) - rgb.min(axis=-1) >= min_chroma
    else:
        seeds = np.sqrt(((rgb - reference) ** 2).sum(axis=-1)) > tolerance
    labels, count = ndimage.label(seeds, _EIGHT_CONNECTED)
    if count == 0:
        return []
    if reference is not None:
        reference = np.broadcast_to(reference, rgb.shape)

    claimed = np.zeros((height, width), dtype=bool)
    masks = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        # Work in the component's box grown by 4 px: the refinement looks at most 3 px out.
        ys = slice(max(0, window[0].start - 4), min(height, window[0].stop + 4))
        xs = slice(max(0, window[1].start - 4), min(width, window[1].stop + 4))
        component = labels[ys, xs] == index
        local = rgb[ys, xs]
        interior = ndimage.binary_erosion(component, _EIGHT_CONNECTED)
        colour = np.median(local[interior if interior.any() else component], axis=0)
        base = reference[ys, xs] if reference is not None else _local_background(local, component, seeds[ys, xs])
        direction = colour - base
        norm = float((direction**2).sum(axis=-1).mean())
        if norm < 1.0:
            continue  # the "object" has the background's colour
        coverage = ((local - base) * direction).sum(axis=-1) / (direction**2).sum(axis=-1).clip(min=1.0)
        other_seeds = seeds[ys, xs] & ~component
        grown = (ndimage.binary_dilation(component, _EIGHT_CONNECTED) & (coverage >= 0.5)
                 & ~other_seeds & ~claimed[ys, xs])
        # Keep the parts of the refined region that hold pixels of the seed component.
        parts, _ = ndimage.label(grown, _EIGHT_CONNECTED)
        keep = np.unique(parts[component & grown])
        refined = np.isin(parts, keep[keep > 0])
        refined = ndimage.binary_fill_holes(refined)
        if refined.sum() < min_area:
            continue
        mask = np.zeros((height, width), dtype=bool)
        mask[ys, xs] = refined
        claimed |= mask
        masks.append(mask)
    return masks


def count_objects(image: np.ndarray | Image.Image, background: Background = None, **options) -> int:
    """How many objects `object_masks(image, background, **options)` finds."""
    return len(object_masks(image, background, **options))


# -- shapes --------------------------------------------------------------------------------


@dataclass
class ShapeTemplates:
    """The shapes a mask is matched against: one high-resolution boolean template per name
    (tight to its True pixels), and optionally the rasteriser that drew them.

    `render(name, side)` must return the boolean mask of shape `name` drawn in a `side` x
    `side` square and trimmed to its tight box, as `mumu_model.toy.world.shape_mask` does;
    with it, small masks are also compared with the exact rasterisation at their size.
    """

    masks: dict[str, np.ndarray]
    render: Callable[[str, int], np.ndarray] | None = None
    _renders: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.masks:
            raise ValueError("ShapeTemplates needs at least one template")
        self.masks = {name: _tight(_as_mask(mask, f"template {name!r}"))[0] for name, mask in self.masks.items()}

    @classmethod
    def from_renderer(cls, names: Sequence[str], render: Callable[[str, int], np.ndarray],
                      resolution: int = 96) -> ShapeTemplates:
        """Templates drawn by `render(name, resolution)`, which is kept for exact matches."""
        return cls({name: np.asarray(render(name, resolution), dtype=bool) for name in names}, render)

    @classmethod
    def from_masks(cls, masks: Mapping[str, np.ndarray]) -> ShapeTemplates:
        """Templates from boolean masks of any size (the higher the resolution, the better)."""
        return cls(dict(masks))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.masks)

    def rendered(self, name: str, side: int) -> np.ndarray:
        """`render(name, side)` as a boolean array, cached."""
        key = (name, side)
        if key not in self._renders:
            self._renders[key] = np.asarray(self.render(name, side), dtype=bool)
        return self._renders[key]


def _soft_fit(template: np.ndarray, height: int, width: int, supersample: int = 8) -> np.ndarray:
    """Share of each pixel of a `height` x `width` box covered by `template` stretched over it."""
    offsets = (np.arange(supersample) + 0.5) / supersample
    rows = ((np.arange(height)[:, None] + offsets).ravel() / height * template.shape[0]).astype(int)
    cols = ((np.arange(width)[:, None] + offsets).ravel() / width * template.shape[1]).astype(int)
    samples = template[np.ix_(rows, cols)].reshape(height, supersample, width, supersample)
    return samples.mean(axis=(1, 3))


def _soft_iou(mask: np.ndarray, soft: np.ndarray) -> float:
    overlap = float((mask * soft).sum())
    return overlap / float((mask + soft - mask * soft).sum())


def shape_scores(mask: np.ndarray, templates: ShapeTemplates) -> dict[str, float]:
    """IoU in [0, 1] of `mask` with each template fitted to its tight box (see the module
    docstring), in template order."""
    crop, _ = _tight(_as_mask(mask))
    height, width = crop.shape
    scores = {}
    long_edge = max(height, width)
    for name, template in templates.masks.items():
        candidates = [template]
        if templates.render is not None:
            # The rasteriser's own drawings near the mask's size: at small sizes the pixel
            # grid changes a shape (a cross's arms are rounded to whole, centred pixels), and
            # a pointed shape's box can be up to 2 px smaller than the side it was drawn at.
            candidates += [templates.rendered(name, side) for side in range(max(1, long_edge - 1), long_edge + 4)]
        score = max(_soft_iou(crop, _soft_fit(candidate, height, width)) for candidate in candidates)
        scores[name] = score
    return scores


def classify_shape(mask: np.ndarray, templates: ShapeTemplates) -> tuple[str, dict[str, float]]:
    """The best-matching shape of a boolean object mask, and every shape's score (IoU).

    `mask` is 2-D bool with at least one True pixel (ValueError otherwise); the object may sit
    anywhere in it. Ties go to the earlier template.
    """
    scores = shape_scores(mask, templates)
    return max(scores, key=lambda name: scores[name]), scores


# -- objects and matching ------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    mask: np.ndarray  # H x W bool, the whole image
    box: tuple[int, int, int, int]  # tight (x0, y0, x1, y1), x1/y1 exclusive
    colour: RGB  # median of the interior pixels (the edge mixes with the background)
    shape: str
    shape_scores: dict[str, float]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def object_colour(rgb: np.ndarray, mask: np.ndarray) -> RGB:
    """Median colour of `mask`'s interior in `rgb` (of the whole mask when it has no interior)."""
    interior = ndimage.binary_erosion(mask, _EIGHT_CONNECTED)
    median = np.median(rgb[interior if interior.any() else mask], axis=0)
    return tuple(int(round(c)) for c in median)


def detect_objects(image: np.ndarray | Image.Image, templates: ShapeTemplates,
                   background: Background = None, **options) -> list[DetectedObject]:
    """Every object of `image` (`object_masks` with `background` and `**options`), with its
    box, colour and shape."""
    rgb = as_rgb_array(image)
    objects = []
    for mask in object_masks(rgb, background, **options):
        shape, scores = classify_shape(mask, templates)
        objects.append(DetectedObject(mask, _tight(mask)[1], object_colour(rgb, mask), shape, scores))
    return objects


def nearest_colour(colour: Sequence[float], palette: Mapping[str, Sequence[float]]) -> str:
    """Name of the palette colour nearest `colour` (Euclidean RGB; ties: palette order)."""
    value = _as_colour(colour, "colour")
    names = list(palette)
    distances = [float(np.linalg.norm(value - _as_colour(palette[n], f"palette colour {n!r}"))) for n in names]
    return names[int(np.argmin(distances))]


@dataclass(frozen=True)
class ObjectMatch:
    expected_colour: RGB
    expected_shape: str
    detected: int | None  # index into MatchResult.detected; None when nothing was left to match
    found_colour: RGB | None
    found_shape: str | None
    colour_distance: float  # Euclidean RGB; inf when not found
    colour_right: bool
    shape_right: bool

    @property
    def right(self) -> bool:
        return self.colour_right and self.shape_right


@dataclass(frozen=True)
class MatchResult:
    objects: tuple[ObjectMatch, ...]  # one per expected object, in the order given
    detected: tuple[DetectedObject, ...]

    @property
    def all_right(self) -> bool:
        """Every expected object found with its colour and its shape (extra objects allowed:
        see `count_right`). False when nothing was expected."""
        return bool(self.objects) and all(match.right for match in self.objects)

    @property
    def all_colours(self) -> bool:
        """Every expected object found in its colour, whatever its shape."""
        return bool(self.objects) and all(match.colour_right for match in self.objects)

    @property
    def count_right(self) -> bool:
        return len(self.detected) == len(self.objects)

    @property
    def colour_accuracy(self) -> float:
        return sum(m.colour_right for m in self.objects) / len(self.objects) if self.objects else float("nan")

    @property
    def shape_accuracy(self) -> float:
        return sum(m.shape_right for m in self.objects) / len(self.objects) if self.objects else float("nan")


def match_objects(
    image: np.ndarray | Image.Image,
    expected: Sequence[tuple[Sequence[int], str]],
    templates: ShapeTemplates,
    *,
    background: Background = None,
    palette: Mapping[str, Sequence[int]] | None = None,
    colour_tolerance: float = DEFAULT_TOLERANCE,
    **options,
) -> MatchResult:
    """Match each expected `(colour_rgb, shape)` object to one object detected in `image`.

    The assignment is one-to-one and minimises the total colour distance (Hungarian), plus
    `SHAPE_COST` x (1 - the detection's score for the expected shape) to break near-ties;
    with fewer detections than expected objects, the costliest go unmatched. A match is
    colour-right when the found colour is within `colour_tolerance` of the expected one, or,
    with `palette` given, when both have the same nearest palette colour (a generated orange
    that drifted towards yellow but is still nearer orange counts). Shape-right: the
    detection's best shape is the expected one. `**options` go to `object_masks`.
    """
    if not expected:
        raise ValueError("match_objects needs at least one expected (colour, shape) object")
    wanted = [(_as_colour(colour, f"expected colour {i}"), shape) for i, (colour, shape) in enumerate(expected)]
    for i, (_, shape) in enumerate(wanted):
        if shape not in templates.masks:
            raise ValueError(f"expected shape {i} is {shape!r}, not one of {', '.join(templates.names)}")
    detected = detect_objects(image, templates, background, **options)

    cost = np.zeros((len(wanted), len(detected)))
    for i, (colour, shape) in enumerate(wanted):
        for j, found in enumerate(detected):
            distance = float(np.linalg.norm(colour - np.array(found.colour, dtype=np.float64)))
            cost[i, j] = distance + SHAPE_COST * (1.0 - found.shape_scores[shape])
    rows, cols = linear_sum_assignment(cost) if detected else ([], [])
    assigned = dict(zip((int(r) for r in rows), (int(c) for c in cols)))

    matches = []
    for i, (colour, shape) in enumerate(wanted):
        expected_rgb = tuple(int(round(c)) for c in colour)
        j = assigned.get(i)
        if j is None:
            matches.append(ObjectMatch(expected_rgb, shape, None, None, None, float("inf"), False, False))
            continue
        found = detected[j]
        distance = float(np.linalg.norm(colour - np.array(found.colour, dtype=np.float64)))
        if palette is not None:
            colour_right = nearest_colour(found.colour, palette) == nearest_colour(colour, palette)
        else:
            colour_right = distance <= colour_tolerance
        matches.append(ObjectMatch(expected_rgb, shape, j, found.colour, found.shape, distance,
                                   colour_right, found.shape == shape))
    return MatchResult(tuple(matches), tuple(detected))


__all__ = [
    "DetectedObject",
    "MatchResult",
    "ObjectMatch",
    "ShapeTemplates",
    "as_rgb_array",
    "classify_shape",
    "count_objects",
    "detect_objects",
    "match_objects",
    "nearest_colour",
    "object_colour",
    "object_masks",
    "shape_scores",
]
