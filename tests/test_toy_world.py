"""The toy world (mumu_model.toy.world): grammar, renderer, defects, colour probe, suite."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mumu_model.data.report import Skipped
from mumu_model.toy.world import (
    BACKGROUNDS,
    PALETTE,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    ToyRenderer,
    colour_counts,
    content_of,
    dominant_colour,
    format_prompt,
    main,
    make_prompts,
    parse_prompt,
    render_scene,
)

REPO = Path(__file__).resolve().parents[1]
PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=float)


def _rows(prompts, start_seed=0):
    return [{"pair_id": f"p{i}", "text": text, "seed": start_seed + i} for i, text in enumerate(prompts)]


@pytest.fixture(scope="module")
def rendered():
    """1000 rendered rows of generated prompts (with the default 10% defects), shared."""
    rows = _rows(make_prompts(1000, seed=7, colour_word_probability=0.4))
    return list(ToyRenderer().generate(rows))


# -- grammar -------------------------------------------------------------------------------


def test_palette_and_backgrounds_are_what_the_world_promises():
    assert len(PALETTE) == 8 and len(SHAPES) == 6 and len(BACKGROUNDS) == 6
    distances = np.linalg.norm(PALETTE_ARRAY[:, None] - PALETTE_ARRAY[None], axis=-1)
    # Twice the probe tolerance: no pixel can be near two palette colours.
    assert distances[~np.eye(8, dtype=bool)].min() > 120


def test_generated_prompts_round_trip():
    prompts = make_prompts(2000, seed=1)
    assert prompts == make_prompts(2000, seed=1)
    assert prompts != make_prompts(2000, seed=2)
    objects = 0
    coloured = 0
    counts = Counter()
    for text in prompts:
        content, style = text.split(", ")  # exactly one comma, between content and style
        assert style.endswith(" style") and style.split()[0] in BACKGROUNDS
        scene = parse_prompt(text)
        assert format_prompt(scene) == text
        assert content_of(text) == content
        shapes = [spec.shape for spec in scene.objects]
        assert len(set(shapes)) == len(shapes)
        counts[len(shapes)] += 1
        objects += len(shapes)
        coloured += sum(spec.colour is not None for spec in scene.objects)
    assert abs(coloured / objects - 0.2) < 0.03
    assert set(counts) == {1, 2, 3}
    for n, share in {1: 0.5, 2: 0.35, 3: 0.15}.items():
        assert abs(counts[n] / len(prompts) - share) < 0.04


def test_colour_word_probability_and_max_objects_are_honoured():
    for text in make_prompts(200, seed=3, colour_word_probability=0.0, max_objects=1):
        (spec,) = parse_prompt(text).objects
        assert spec.colour is None
    always = [parse_prompt(t) for t in make_prompts(200, seed=3, colour_word_probability=1.0)]
    assert all(spec.colour for scene in always for spec in scene.objects)


def test_rule_based_splitter_cuts_toy_prompts_into_content_and_style():
    from mumu_model.data.content_style import RuleBasedSplitter

    prompts = make_prompts(200, seed=4)
    for text, result in zip(prompts, RuleBasedSplitter().split(prompts)):
        assert result.content == content_of(text)
        assert result.style == f"{parse_prompt(text).background} style"


def test_parse_is_lenient_about_case_whitespace_and_articles():
    scene = parse_prompt("  A  Small   ORANGE circle and an  square ,  Dotted   STYLE ")
    assert scene == Scene((ObjectSpec("circle", "orange", "small"), ObjectSpec("square")), "dotted")
    assert parse_prompt("an orange star") == Scene((ObjectSpec("star", "orange"),), None)
    assert format_prompt(parse_prompt("a orange star")) == "an orange star"
    assert content_of("a big cross and a blue diamond, noisy style") == "a big cross and a blue diamond"


@pytest.mark.parametrize(
    "text, word",
    [
        ("a hexagon", "hexagon"),
        ("the circle", "the"),
        ("a circle or a square", "or"),
        ("a circle and a circle", "circle"),
        ("a circle, wavy style", "wavy"),
        ("a circle, striped", "striped"),
        ("a circle, striped look", "look"),
        ("a circle, striped style please", "please"),
        ("a circle, dotted style, 4k", "4k"),
        ("a circle and", "and"),
        ("a big red", "red"),
        ("a circle.", "circle."),
        ("a red big circle", "big"),
    ],
)
def test_parse_errors_name_the_word_and_the_text(text, word):
    with pytest.raises(ValueError) as error:
        parse_prompt(text)
    assert repr(word) in str(error.value) and repr(text) in str(error.value)


@pytest.mark.parametrize("text", ["", "   ", ", plain style"])
def test_parse_rejects_prompts_without_objects(text):
    with pytest.raises(ValueError, match="no object"):
        parse_prompt(text)


def test_prompts_cli_writes_one_prompt_per_line(tmp_path):
    out = tmp_path / "sub" / "prompts.txt"
    assert main(["prompts", "--count", "25", "--seed", "5", "--out", str(out)]) == 0
    assert out.read_text().splitlines() == make_prompts(25, seed=5)
    assert [p.name for p in out.parent.iterdir()] == ["prompts.txt"]  # no temp file left


def test_toy_captions_drop_exactly_the_palettes_colour_words():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["profile"] == "toy"
    assert params["data"]["captions"]["crop_replaces_words"] == list(PALETTE)


def test_committed_prompt_file_is_the_documented_command():
    committed = (REPO / "examples" / "prompts" / "toy_prompts.txt").read_text().splitlines()
    assert committed == make_prompts(6000, seed=0, colour_word_probability=0.15)


# -- rendering -----------------------------------------------------------------------------


def test_same_text_and_seed_give_identical_images():
    text = "a small circle and a red square, striped style"
    renderer = ToyRenderer()
    first = renderer.render(parse_prompt(text), 11)
    again = renderer.render(parse_prompt(text), 11)
    other = renderer.render(parse_prompt(text), 12)
    assert first[0].tobytes() == again[0].tobytes() and first[1] == again[1]
    assert first[0].tobytes() != other[0].tobytes()
    # Through generate, alone or among other rows: the image depends on (text, seed) only.
    (alone,) = renderer.generate([{"pair_id": "x", "text": text, "seed": 11}])
    batch = list(renderer.generate(_rows(["a star, plain style", text], start_seed=10)))
    assert alone[1].tobytes() == batch[1][1].tobytes() == first[0].tobytes()


def test_unnamed_background_comes_from_the_seed():
    scene = parse_prompt("a circle")
    backgrounds = {ToyRenderer().render(scene, seed)[1]["background"] for seed in range(60)}
    assert backgrounds == set(BACKGROUNDS)


def test_boxes_are_tight_apart_and_inside(rendered):
    for row, image in rendered:
        assert image.mode == "RGB" and image.size == (32, 32)
        pixels = np.asarray(image)
        objects = row["annotations"]["objects"]
        covered = np.zeros((32, 32), dtype=bool)
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            assert all(isinstance(v, int) for v in obj["box"])
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            inside = (pixels[y0:y1, x0:x1] == PALETTE[obj["colour"]]).all(axis=-1)
            # Tight: the object's pixels reach every edge of its box.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y0:y1, x0:x1] |= inside
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
                assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, (row["text"], a, b)
        # Every palette-coloured pixel belongs to an object box.
        any_palette = (pixels[..., None, :] == PALETTE_ARRAY.astype(np.uint8)).all(-1).any(-1)
        assert (any_palette == covered).all()


def test_sizes_scale_with_the_canvas():
    def side(word, canvas, seed):
        scene = Scene((ObjectSpec("square", "red", word),), "plain")
        (obj,) = render_scene(scene, np.random.default_rng(seed), canvas)[1]
        return obj["box"][2] - obj["box"][0]

    assert {side("small", 32, s) for s in range(30)} <= set(range(10, 13))
    assert {side(None, 32, s) for s in range(30)} <= set(range(13, 17))
    assert {side("big", 32, s) for s in range(30)} <= set(range(17, 21))
    assert {side("big", 64, s) for s in range(30)} <= set(range(34, 41))
    assert render_scene(Scene((), "plain"), np.random.default_rng(0), 64)[0].size == (64, 64)


def test_crowded_scenes_still_fit():
    scene = parse_prompt(" and ".join(f"a big {shape}" for shape in SHAPES))
    image, objects = render_scene(scene, np.random.default_rng(0))
    assert [obj["shape"] for obj in objects] == list(SHAPES)


def test_defects_are_about_ten_percent_and_annotated_truthfully(rendered):
    defects = Counter(row["annotations"]["defect"] for row, _ in rendered)
    assert set(defects) == {None, "wrong_colour", "missing_object"}
    assert 0.07 <= (defects["wrong_colour"] + defects["missing_object"]) / len(rendered) <= 0.13
    for row, image in rendered:
        wanted = parse_prompt(row["text"]).objects
        drawn = row["annotations"]["objects"]
        defect = row["annotations"]["defect"]
        for obj in drawn:
            assert dominant_colour(image.crop(obj["box"])) == obj["colour"]
        if defect == "missing_object":
            assert len(drawn) == len(wanted) - 1
            assert all(spec.colour is None for spec in wanted)
            assert {o["shape"] for o in drawn} < {spec.shape for spec in wanted}
            continue
        assert [o["shape"] for o in drawn] == [spec.shape for spec in wanted]
        named = [(o, spec.colour) for o, spec in zip(drawn, wanted) if spec.colour]
        wrong = [o for o, colour in named if dominant_colour(image.crop(o["box"])) != colour]
        assert len(wrong) == (1 if defect == "wrong_colour" else 0), row


def test_single_object_missing_leaves_an_empty_image():
    renderer = ToyRenderer(defect_probability=1.0)
    image, annotations = renderer.render(parse_prompt("a star, plain style"), 3)
    assert annotations["objects"] == [] and annotations["defect"] == "missing_object"
    assert dominant_colour(image) is None


def test_defect_probability_zero_changes_only_the_defective_rows(rendered):
    clean = {row["pair_id"]: image for row, image in ToyRenderer(defect_probability=0.0).generate(
        {k: row[k] for k in ("pair_id", "text", "seed")} for row, _ in rendered[:200])}
    for row, image in rendered[:200]:
        same = clean[row["pair_id"]].tobytes() == image.tobytes()
        assert same == (row["annotations"]["defect"] is None)


def test_bad_rows_are_counted_not_raised():
    rows = [
        {"pair_id": "ok1", "text": "a circle, plain style", "seed": 1, "extra": [1]},
        "not a row",
        {"pair_id": "noseed", "text": "a circle"},
        {"pair_id": "strseed", "text": "a circle", "seed": "3"},
        {"pair_id": "boolseed", "text": "a circle", "seed": True},
        {"pair_id": "neg", "text": "a circle", "seed": -1},
        {"pair_id": "empty", "text": "  ", "seed": 1},
        {"pair_id": "prose", "text": "a cat on the beach, oil painting", "seed": 1},
        {"pair_id": "ok2", "text": "a red square", "seed": np.int64(2)},
    ]
    skipped = Skipped()
    out = list(ToyRenderer().generate(rows, skipped=skipped))
    assert [row["pair_id"] for row, _ in out] == ["ok1", "ok2"]
    assert skipped.counts == {"bad_row": 6, "unparsable_prompt": 1}
    assert "cat" in skipped.examples["unparsable_prompt"][0]
    # The yielded row is a copy: extra keys kept, input untouched.
    assert out[0][0]["extra"] == [1] and "annotations" not in rows[0]
    renderer = ToyRenderer()
    list(renderer.generate(rows[1:3]))
    assert renderer.skipped.counts == {"bad_row": 2}


# -- colour probe --------------------------------------------------------------------------


def test_probe_ignores_noise():
    rng = np.random.default_rng(0)
    hits = sum(
        dominant_colour(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) is not None
        for _ in range(200)
    )
    assert hits <= 10


@pytest.mark.parametrize("size_word", [None, *SIZES])
def test_probe_finds_every_single_object_colour(size_word):
    for k, (colour, shape) in enumerate((c, s) for c in PALETTE for s in SHAPES):
        scene = Scene((ObjectSpec(shape, colour, size_word),), BACKGROUNDS[k % len(BACKGROUNDS)])
        image, _ = render_scene(scene, np.random.default_rng(k))
        assert dominant_colour(image) == colour, (shape, colour)


def test_backgrounds_never_hit_the_palette():
    for seed in range(240):
        image, objects = render_scene(Scene((), BACKGROUNDS[seed % 6]), np.random.default_rng(seed))
        assert objects == []
        assert set(colour_counts(image).values()) == {0}
        pixels = np.asarray(image, dtype=float).reshape(-1, 3)
        assert np.linalg.norm(pixels[:, None] - PALETTE_ARRAY[None], axis=-1).min() > 60
        saturation = (pixels.max(1) - pixels.min(1)) / np.maximum(pixels.max(1), 1)
        assert saturation.max() < 0.25


def test_probe_accepts_other_modes_and_sizes():
    red = Image.new("RGBA", (5, 3), PALETTE["red"] + (0,))
    assert colour_counts(red)["red"] == 4 * 2
    assert dominant_colour(red) == "red"
    assert dominant_colour(Image.new("L", (40, 20), 128)) is None
    assert set(colour_counts(Image.new("RGB", (1, 1), PALETTE["blue"])).values()) == {0}
    assert dominant_colour(np.full((4, 4, 3), PALETTE["cyan"], dtype=np.uint8)) == "cyan"
    # One stray pixel is not an object; a 2x2 block is one patch, below min_patches=2.
    dots = np.full((10, 10, 3), 200, dtype=np.uint8)
    dots[1, 1] = dots[5, 5] = PALETTE["green"]
    assert dominant_colour(dots) is None
    dots[5:7, 5:7] = PALETTE["green"]
    assert dominant_colour(dots) is None and dominant_colour(dots, min_patches=1) == "green"
