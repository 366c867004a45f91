"""The toy world's evaluation suites: reproducible, split by seed, balanced, and each crop what its
entry says it is (colour, shape, source)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mumu_model.toy.metrics import object_probe
from eval.suites import load_entry, load_suite
from mumu_model.toy.suites import (
    COUNTS,
    KINDS,
    OBJECTS_PER_KIND,
    OUTSIDE_COLOUR_JITTER,
    SPLITS,
    draw_outside_crop,
    suite_paths,
    write_suite,
    write_suites,
)
from mumu_model.toy.world import BACKGROUNDS, PALETTE, SHAPES, dominant_colour, parse_prompt

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "eval" / "suites" / "toy"


@pytest.mark.parametrize("split", list(SPLITS))
def test_committed_suites_are_what_the_generator_writes(tmp_path, split):
    written = write_suites(tmp_path, split)
    assert written == suite_paths(tmp_path, split)
    for path in written:
        committed = COMMITTED / split / path.name
        assert path.read_bytes() == committed.read_bytes(), f"{committed} differs: regenerate the suites"
        name = path.stem
        fresh = sorted(p.name for p in (tmp_path / split / "images" / name).iterdir())
        assert fresh == sorted(p.name for p in (COMMITTED / split / "images" / name).iterdir())
        for image in fresh:
            assert (tmp_path / split / "images" / name / image).read_bytes() == \
                (COMMITTED / split / "images" / name / image).read_bytes()


def test_validation_and_test_are_drawn_from_different_seeds():
    # A renderer crop is fixed by (shape, colour, side), so small ones recur in any split, as in
    # training; the outside crops (jitter, margin, background) are drawn afresh and never do.
    assert len(set(SPLITS.values())) == len(SPLITS)

    def crops(split: str) -> set[bytes]:
        return {p.read_bytes() for p in (COMMITTED / split / "images").glob("*_outside/*.png")}

    assert crops("validation") and not crops("validation") & crops("test")


@pytest.mark.parametrize("kind", KINDS)
def test_entries_are_balanced_and_every_crop_is_its_object(kind):
    path = COMMITTED / "test" / f"test_{kind}.yaml"
    document = yaml.safe_load(path.read_text())
    entries = document["entries"]
    count = COUNTS["test"][kind]
    assert len(entries) == count and len({e["id"] for e in entries}) == count
    firsts = [e["objects"][0] for e in entries]
    assert Counter(o["colour"] for o in firsts) == {c: count // len(PALETTE) for c in PALETTE}
    assert Counter(o["shape"] for o in firsts) == {s: count // len(SHAPES) for s in SHAPES}

    suite = load_suite(path)
    assert not suite.errors
    for entry, raw in zip(suite.entries, entries):
        objects = raw["objects"]
        assert len(objects) == OBJECTS_PER_KIND[kind]
        assert len({o["colour"] for o in objects}) == len({o["shape"] for o in objects}) == len(objects)
        # The words are a toy prompt without colours, in the crops' order.
        scene = parse_prompt(raw["text"])
        assert [o.shape for o in scene.objects] == [o["shape"] for o in objects]
        assert all(o.colour is None for o in scene.objects) and scene.background in BACKGROUNDS
        loaded = load_entry(suite, entry, max_images=4)
        assert loaded.prompt.num_images == len(objects)
        assert loaded.world_objects == [(o["colour"], o["shape"]) for o in objects]
        for obj in objects:
            crop = Image.open(suite.image_root / obj["image"]).convert("RGB")
            if kind == "outside":
                # Antialiased and outlined: the fill's nearest palette colour is the entry's.
                assert object_probe(_on_canvas(crop), [(obj["colour"], obj["shape"])]).all_colours
            else:
                assert dominant_colour(crop) == obj["colour"]
                assert max(crop.size) <= 20
    # Every crop is a file of its own: no two entries (or objects) share one.
    images = [o["image"] for e in entries for o in e["objects"]]
    assert len(set(images)) == len(images)


def _on_canvas(crop: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (40, 40), (128, 128, 128))
    canvas.paste(crop, (2, 2))
    return canvas


def test_outside_crops_differ_from_the_renderer_within_bounds():
    rng = np.random.default_rng(0)
    sizes, off_palette, margins = [], 0, 0
    for i in range(80):
        colour, shape = list(PALETTE)[i % 8], SHAPES[i % 6]
        crop = np.asarray(draw_outside_crop(shape, colour, rng), dtype=np.int16)
        sizes.append(crop.shape[0])
        # The most common object colour is the jittered fill: within 15 units per channel.
        pixels, counts = np.unique(crop.reshape(-1, 3), axis=0, return_counts=True)
        near = [(c, p) for p, c in zip(pixels, counts) if np.abs(p - PALETTE[colour]).max() <= OUTSIDE_COLOUR_JITTER]
        fill = max(near, key=lambda pair: pair[0])[1]
        off_palette += bool(np.any(fill != PALETTE[colour]))
        margins += bool(np.abs(crop[0, 0] - fill).max() > 60)  # a corner of background
    assert min(sizes) >= 9 and max(sizes) <= 26 + 8
    assert off_palette >= 70 and margins >= 60  # nearly every crop off-palette; corners are background
    with pytest.raises(ValueError, match="unknown colour"):
        draw_outside_crop("star", "mauve", rng)
    with pytest.raises(ValueError, match="unknown shape"):
        draw_outside_crop("blob", "red", rng)


def test_write_suite_checks_its_arguments_and_small_counts_stay_balanced(tmp_path):
    path = write_suite(tmp_path, "two", name="tiny_two", count=16, seed=5)
    entries = yaml.safe_load(path.read_text())["entries"]
    assert Counter(e["objects"][0]["colour"] for e in entries) == {c: 2 for c in PALETTE}
    assert max(Counter(e["objects"][0]["shape"] for e in entries).values()) == 3
    assert path.read_bytes() == write_suite(tmp_path / "again", "two", name="tiny_two", count=16, seed=5).read_bytes()
    with pytest.raises(ValueError, match="unknown suite kind"):
        write_suite(tmp_path, "four", name="x", count=4, seed=0)
    with pytest.raises(ValueError, match="count must be >= 1"):
        write_suite(tmp_path, "one", name="x", count=0, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        write_suites(tmp_path, "train")
