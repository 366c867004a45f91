"""Analytic shape and count metrics (mumu_model.toy.shapes) on the toy world's clean renders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mumu_model.toy.shapes import (
    ShapeTemplates,
    classify_shape,
    count_objects,
    match_objects,
    object_masks,
)
from mumu_model.toy.world import BACKGROUNDS, PALETTE, SHAPES, SIZES, ObjectSpec, Scene, render_scene, shape_mask

SIZE_WORDS = (None, *SIZES)


@pytest.fixture(scope="module")
def templates() -> ShapeTemplates:
    return ShapeTemplates.from_renderer(SHAPES, shape_mask)


def _render(scene: Scene, seed, size: int = 32) -> tuple[np.ndarray, list[dict]]:
    image, objects = render_scene(scene, np.random.default_rng(seed), size)
    return np.asarray(image), objects


def _box_mask(box, size: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_clean_single_objects_are_classified(templates):
    right = total = 0
    for i in range(120):  # every shape x size word x background, at least once
        shape, size, background = SHAPES[i % 6], SIZE_WORDS[i // 6 % 3], BACKGROUNDS[i // 18 % 6]
        rgb, drawn = _render(Scene((ObjectSpec(shape, None, size),), background), (3, i))
        masks = object_masks(rgb)
        assert len(masks) == 1, (i, shape, background, len(masks))
        # The mask is the drawn object: inside the renderer's tight box, and filling it.
        x0, y0, x1, y1 = drawn[0]["box"]
        rows, cols = np.flatnonzero(masks[0].any(axis=1)), np.flatnonzero(masks[0].any(axis=0))
        assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == (x0, y0, x1, y1)
        name, scores = classify_shape(masks[0], templates)
        assert set(scores) == set(SHAPES) and all(0.0 <= s <= 1.0 for s in scores.values())
        right += name == shape
        total += 1
    assert right / total >= 0.95, f"{right}/{total}"


@pytest.mark.parametrize("canvas", [48, 64])
def test_larger_canvases_and_antialiased_renders(templates, canvas):
    for i, shape in enumerate(SHAPES):
        scene = Scene((ObjectSpec(shape),), BACKGROUNDS[i])
        rgb, _ = _render(scene, (5, i), canvas)
        # Drawn at 4x and box-downsampled: soft edges, as an antialiasing renderer makes them.
        big, _ = render_scene(scene, np.random.default_rng((5, i)), canvas * 4)
        smooth = np.asarray(big.resize((canvas, canvas), Image.BOX))
        for image in (rgb, smooth):
            masks = object_masks(image)
            assert len(masks) == 1
            assert classify_shape(masks[0], templates)[0] == shape


def test_templates_without_a_rasteriser(templates):
    masks_only = ShapeTemplates.from_masks(templates.masks)
    assert masks_only.render is None and masks_only.names == SHAPES
    for i, shape in enumerate(SHAPES):
        rgb, _ = _render(Scene((ObjectSpec(shape, None, "big"),), "plain"), (6, i))
        assert classify_shape(object_masks(rgb)[0], masks_only)[0] == shape


@pytest.mark.parametrize("objects", [2, 3])
def test_count_on_multi_object_renders(objects):
    rng = np.random.default_rng(objects)
    for k in range(20):
        shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))[:objects]]
        scene = Scene(tuple(ObjectSpec(s, None, SIZE_WORDS[k % 3]) for s in shapes), BACKGROUNDS[k % 6])
        rgb, drawn = _render(scene, (8, objects, k))
        assert len(drawn) == objects
        assert count_objects(rgb) == objects, (k, shapes, scene.background)


def test_count_ignores_noise():
    rgb, _ = _render(Scene((ObjectSpec("star"), ObjectSpec("circle")), "noisy"), 4)
    noisy = np.clip(rgb + np.random.default_rng(0).normal(0, 15, rgb.shape), 0, 255).astype(np.uint8)
    assert count_objects(noisy) == 2


def test_match_objects_assigns_each_expected_object(templates):
    objects = (ObjectSpec("circle", "red"), ObjectSpec("cross", "blue"), ObjectSpec("triangle", "yellow"))
    scene = Scene(objects, "checkered")
    rgb, drawn = _render(scene, 21)
    by_shape = {o["shape"]: o for o in drawn}
    # Expected objects in another order than drawn: each must land on its own object.
    expected = [(PALETTE["yellow"], "triangle"), (PALETTE["red"], "circle"), (PALETTE["blue"], "cross")]
    result = match_objects(rgb, expected, templates)
    assert result.all_right and result.count_right
    assert result.colour_accuracy == result.shape_accuracy == 1.0
    assert sorted(m.detected for m in result.objects) == [0, 1, 2]
    for match in result.objects:
        found = result.detected[match.detected]
        assert found.box == tuple(by_shape[match.expected_shape]["box"])
        assert found.colour == match.found_colour == match.expected_colour
        assert match.colour_distance == 0.0

    # A wrong colour and a wrong shape are each reported on their own object only.
    wrong = [(PALETTE["yellow"], "triangle"), (PALETTE["green"], "circle"), (PALETTE["blue"], "star")]
    result = match_objects(rgb, wrong, templates, palette=PALETTE)
    assert [m.colour_right for m in result.objects] == [True, False, True]
    assert [m.shape_right for m in result.objects] == [True, True, False]
    assert result.objects[1].found_shape == "circle" and result.objects[2].found_shape == "cross"
    assert not result.all_right


def test_match_objects_with_an_object_missing(templates):
    rgb, _ = _render(Scene((ObjectSpec("square", "green"),), "striped"), 2)
    result = match_objects(rgb, [(PALETTE["pink"], "star"), (PALETTE["green"], "square")], templates)
    missing, present = result.objects
    assert present.right and present.detected == 0
    assert missing.detected is None and not missing.colour_right and not missing.shape_right
    assert missing.colour_distance == float("inf")
    assert not result.all_right and not result.count_right


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_blank_images_have_no_objects(background):
    rgb, drawn = _render(Scene((), background), 9)
    assert drawn == []
    assert object_masks(rgb) == [] and count_objects(rgb) == 0


def test_given_background_colour_and_image(templates):
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert count_objects(grey, (128, 128, 128)) == 0
    image = grey.copy()
    image[5:15, 5:15] = (190, 100, 100)  # a dull red square: chroma 90, under the default 100
    image[20:30, 18:28][shape_mask("diamond", 10)] = (80, 80, 170)
    assert count_objects(image) == 0  # both below the default chroma
    masks = object_masks(image, (128, 128, 128))
    assert [classify_shape(m, templates)[0] for m in masks] == ["square", "diamond"]
    assert count_objects(image, grey) == 2


def test_bad_inputs_raise(templates):
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="dtype uint8"):
        object_masks(rgb.astype(np.float32))
    with pytest.raises(ValueError, match=r"H x W x 3"):
        count_objects(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"H x W x 3"):
        object_masks(np.zeros((32, 32, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="numpy array or a PIL image"):
        object_masks([[0, 0, 0]])
    with pytest.raises(ValueError, match="background image has shape"):
        object_masks(rgb, np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="background must be an"):
        object_masks(rgb, (1, 2))
    with pytest.raises(ValueError, match="mask must have dtype bool"):
        classify_shape(np.ones((5, 5), dtype=np.uint8), templates)
    with pytest.raises(ValueError, match="mask must be 2-D"):
        classify_shape(np.ones((5, 5, 1), dtype=bool), templates)
    with pytest.raises(ValueError, match="mask is empty"):
        classify_shape(np.zeros((5, 5), dtype=bool), templates)
    with pytest.raises(ValueError, match="'hexagon'"):
        match_objects(rgb, [(PALETTE["red"], "hexagon")], templates)
    with pytest.raises(ValueError, match="at least one expected"):
        match_objects(rgb, [], templates)
    with pytest.raises(ValueError, match="at least one template"):
        ShapeTemplates.from_masks({})


def test_pil_images_are_accepted():
    rgb, _ = _render(Scene((ObjectSpec("diamond"), ObjectSpec("star")), "gradient"), 1)
    assert count_objects(Image.fromarray(rgb)) == count_objects(rgb) == 2
