import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from mumu_model.data.detection import (
    HEAD_PHRASE,
    AnnotationsDetector,
    Detection,
    Detector,
    GroundingDinoDetector,
    Phrase,
    _best_overlap,
    caption_phrases,
    choose_person_crops,
    crop,
    filter_detections,
    with_head_query,
)
from mumu_model.data.report import Skipped
from mumu_model.testing import tiny_grounding_dino

# Boxes drawn by hand on scikit-image's sample photos (CC0).
ASTRONAUT = "A smiling woman in an orange spacesuit holding a white helmet, with an American flag"
WOMAN_BOX = (20.0, 10.0, 370.0, 512.0)  # 67% of the 512x512 image
HEAD_BOX = (150.0, 15.0, 300.0, 190.0)
HELMET_BOX = (275.0, 340.0, 512.0, 512.0)
FLAG_BOX = (0.0, 0.0, 100.0, 420.0)


def astronaut() -> Image.Image:
    return Image.fromarray(photos.astronaut())


def phrase(caption: str, text: str) -> Phrase:
    start = caption.index(text)
    return Phrase(text, start, start + len(text))


# -- caption_phrases -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a man and his dog hiking in the wilderness", ["man", "dog", "wilderness"]),
        (
            "a red circle and a blue star on striped background",
            ["red circle", "blue star", "striped background"],
        ),
        (
            "The image shows a young woman with long brown hair sitting on a wooden bench in a "
            "park. She is wearing a blue dress and holding a cup of coffee.",
            "young woman|long brown hair|wooden bench|park|blue dress|cup|coffee".split("|"),
        ),
        (
            "In the image, there is a cat lying on a red blanket next to a window.",
            ["cat", "red blanket", "window"],
        ),
        ("a man's hat on the table", ["man", "hat", "table"]),
        ("two dogs playing with a ball in the snow", ["dogs", "ball", "snow"]),
        (
            "A close-up of an astronaut in a white spacesuit holding an American flag",
            ["astronaut", "white spacesuit", "American flag"],
        ),
        ("an orange tabby cat looking at the camera", ["orange tabby cat", "camera"]),
        ("a very large fluffy white dog", ["fluffy white dog"]),  # last 3 words
        ("the sky is blue and clear, and a kite flies above the beach", ["sky", "kite", "beach"]),
        ("an elderly woman sits quietly on a swing", ["elderly woman", "swing"]),
        (
            "a pair of shoes covered in mud next to a swimming pool",
            ["shoes", "mud", "swimming pool"],
        ),
        (
            "There are two children in the foreground, one of them is holding a red balloon.",
            ["children", "red balloon"],
        ),
        ("a dog chasing another dog", ["dog"]),  # first mention only
        ("it's a dog on the girl’s sofa, and the sofa isn't red", ["dog", "girl", "sofa"]),
        ("", []),
    ],
)
def test_caption_phrases(caption, expected):
    phrases = caption_phrases(caption)
    assert [p.text for p in phrases] == expected
    for p in phrases:  # offsets point at the phrase in the caption, first word first
        assert caption[p.start : p.end] == p.text
    assert [p.start for p in phrases] == sorted(p.start for p in phrases)


def test_caption_phrases_max_and_bad_input():
    caption = ", ".join(f"a {w}" for w in "cat dog cow pig hen fox owl bee ant elk".split())
    assert [p.text for p in caption_phrases(caption, max_phrases=3)] == ["cat", "dog", "cow"]
    assert len(caption_phrases(caption)) == 8
    assert caption_phrases(None) == []  # type: ignore[arg-type]


def test_with_head_query():
    man_dog = caption_phrases("a man and his dog")
    assert with_head_query(man_dog) == man_dog + [HEAD_PHRASE]
    assert with_head_query(caption_phrases("a dog")) == caption_phrases("a dog")
    face = caption_phrases("a man with a painted face")
    assert HEAD_PHRASE not in with_head_query(face)  # the caption already asks for the face


def test_best_overlap():
    phrases = [{"man"}, {"dog"}, {"wild", "##erness"}]
    assert _best_overlap({"wild"}, phrases) == [2]  # label names part of a phrase
    assert _best_overlap({"man", "dog"}, phrases) == [0, 1]  # merged label: a tie
    assert _best_overlap({"man", "wild", "##erness"}, phrases) == [0, 2]
    assert _best_overlap({"cat"}, phrases) == []


# -- GroundingDINO -------------------------------------------------------------------------

WORDS = ["man", "dog", "wild", "##erness", "red", "circle", "blue", "star", "woman", "helmet"]


@pytest.fixture(scope="module")
def tiny_gdino(tmp_path_factory):
    return tiny_grounding_dino(tmp_path_factory.mktemp("gdino"), WORDS)


def test_grounding_dino_one_forward_per_batch(tiny_gdino):
    # Thresholds 0: random weights then return every query's box.
    detector = GroundingDinoDetector(str(tiny_gdino), box_threshold=0.0, text_threshold=0.0)
    assert isinstance(detector, Detector)
    forwards = []
    detector.model.register_forward_hook(lambda *args: forwards.append(1))
    captions = ["a man and his dog hiking in the wilderness", "a red circle, a blue star and a man"]
    phrases = [caption_phrases(c) for c in captions]
    assert [len(p) for p in phrases] == [3, 3]
    images = [astronaut(), Image.fromarray(photos.coffee())]
    skipped = Skipped()

    results = detector.detect(images, phrases, keys=["a", "b"], skipped=skipped)

    assert len(forwards) == 1  # both images, all their phrases: one forward
    assert len(results) == 2
    num_queries = detector.model.config.num_queries
    for image, image_phrases, detections in zip(images, phrases, results):
        assert 0 < len(detections) <= num_queries
        assert len(detections) + skipped.total >= 1
        for d in detections:
            assert isinstance(d, Detection)
            assert d.phrase in image_phrases  # mapped back to this image's phrases
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            assert 0.0 <= d.score <= 1.0 and isinstance(d.label, str)
    # With text_threshold 0 labels merge every phrase; the tie-break spreads boxes over them.
    assert len({d.phrase for d in results[0]}) >= 2

    detector.batch_size = 1
    forwards.clear()
    again = detector.detect(images, phrases)
    assert len(forwards) == 2
    assert [len(r) for r in again] == [len(r) for r in results]


def test_grounding_dino_labels_and_bad_input(tiny_gdino):
    detector = GroundingDinoDetector(str(tiny_gdino), box_threshold=0.0, text_threshold=0.5)
    caption = "a woman holding a helmet"
    phrases = caption_phrases(caption)
    skipped = Skipped()
    results = detector.detect(
        [astronaut(), Image.new("RGB", (0, 0)), astronaut()],
        [phrases, phrases, []],
        keys=["ok", "empty", "nophrases"],
        skipped=skipped,
    )
    assert results[1] == [] and results[2] == []
    assert skipped.counts["bad_image"] == 1 and skipped.counts["no_phrases"] == 1
    # Labels from post-processing: each kept box's label shares a token with its phrase, or
    # the box was dropped as unmatched (labels with no token over text_threshold).
    for d in results[0]:
        assert set(d.label.replace(".", " ").split()) & set(d.phrase.text.split())
    num_queries = detector.model.config.num_queries
    assert len(results[0]) + skipped.counts["unmatched_label"] == num_queries


# -- AnnotationsDetector -------------------------------------------------------------------


def test_annotations_detector():
    caption = "a red circle and two blue stars on striped background"
    phrases = caption_phrases(caption)
    detector = AnnotationsDetector(
        {
            "k": [
                ("circle", (10, 10, 20, 20)),
                ("star", (30, 30, 50, 40)),
                ("triangle", (0, 0, 5, 5)),
                ("star", (60, 60, 80, 200)),  # clamped to the 64x64 image
                ("star", (70, 70, 80, 80)),  # entirely outside: no area left
            ]
        }
    )
    skipped = Skipped()
    image = Image.new("RGB", (64, 64))
    [found, missing] = detector.detect(
        [image, image], [phrases, phrases], keys=["k", "nokey"], skipped=skipped
    )
    assert [(d.phrase.text, d.label) for d in found] == [
        ("red circle", "circle"),
        ("blue stars", "star"),
        ("blue stars", "star"),
    ]
    assert found[2].box == (60.0, 60.0, 64.0, 64.0)
    assert all(d.score == 1.0 for d in found)
    assert missing == []
    assert skipped.counts == Counter(
        {"unmatched_annotation": 1, "empty_box": 1, "no_annotations": 1}
    )
    with pytest.raises(ValueError, match="keys"):
        detector.detect([image], [phrases])


# -- crop rules ----------------------------------------------------------------------------


def test_filter_detections_on_a_real_photo():
    image = astronaut()  # 512 px: s = 0.5, so the paper's 150x150 px becomes 75x75 px
    texts = ("smiling woman", "white helmet", "American flag")
    woman, helmet, flag = (phrase(ASTRONAUT, t) for t in texts)
    detections = [
        Detection(woman, WOMAN_BOX, 0.6, "woman"),
        Detection(woman, (0, 0, 512, 400), 0.9, "woman"),  # 78% of the image: dropped
        Detection(helmet, HELMET_BOX, 0.5, "helmet"),
        Detection(helmet, (300, 350, 380, 430), 0.7, "helmet"),  # 80x80 > 75x75: best helmet
        Detection(flag, (0, 0, 70, 70), 0.9, "flag"),  # 70x70 < 75x75: dropped
        Detection(flag, FLAG_BOX, 0.4, "flag"),
        Detection(flag, (600, 600, 700, 700), 0.9, "flag"),  # outside the image
    ]
    skipped = Skipped()
    kept = filter_detections(detections, image.size, skipped=skipped, key="astronaut")
    assert [(d.phrase.text, d.box) for d in kept] == [
        ("smiling woman", WOMAN_BOX),
        ("white helmet", (300.0, 350.0, 380.0, 430.0)),
        ("American flag", FLAG_BOX),
    ]
    assert skipped.counts == Counter(
        {"crop_too_large": 1, "crop_too_small": 1, "not_best_for_phrase": 1, "invalid_box": 1}
    )
    # At 1024 px the same 80x80 helmet is under 150x150: the larger helmet box is kept.
    at_1024 = {d.phrase.text: d.box for d in filter_detections(detections, (1024, 1024))}
    assert at_1024["white helmet"] == HELMET_BOX


def test_filter_scales_with_image_size():
    # chelsea (451x300): an eye of 70x65 px passes min side 150 * 451/1024 = 66 px.
    cat = Image.fromarray(photos.chelsea())
    eye = Detection(Phrase("eyes", 0, 4), (135, 85, 205, 150), 0.5, "eyes")
    assert filter_detections([eye], cat.size) == [eye]
    assert filter_detections([eye], cat.size, reference_side=451) == []  # absolute 150 px


def test_choose_person_crops_statistics_and_determinism():
    woman, helmet = phrase(ASTRONAUT, "smiling woman"), phrase(ASTRONAUT, "white helmet")
    detections = [
        Detection(woman, WOMAN_BOX, 0.6, "woman"),
        Detection(helmet, HELMET_BOX, 0.5, "helmet"),
        Detection(HEAD_PHRASE, HEAD_BOX, 0.8, "head"),
    ]
    heads = 0
    for seed in range(2000):
        chosen = choose_person_crops(detections, random.Random(seed))
        assert [d.phrase for d in chosen] == [woman, helmet]  # the head keeps "woman"
        assert chosen == choose_person_crops(detections, random.Random(seed))
        heads += chosen[0].box == HEAD_BOX
        if chosen[0].box == HEAD_BOX:
            assert chosen[0].label == "head" and chosen[0].score == 0.8
    assert abs(heads / 2000 - 0.7) < 0.035
    never = choose_person_crops(detections, random.Random(0), head_probability=0.0)
    always = choose_person_crops(detections, random.Random(0), head_probability=1.0)
    assert never[0].box == WOMAN_BOX and always[0].box == HEAD_BOX


def test_choose_person_crops_needs_a_head_inside_the_person():
    woman = phrase(ASTRONAUT, "smiling woman")
    outside = [
        Detection(woman, (0, 200, 200, 512), 0.6, "woman"),
        Detection(HEAD_PHRASE, HEAD_BOX, 0.8, "head"),
    ]
    assert choose_person_crops(outside, random.Random(0), 1.0) == outside[:1]
    # A face that is a caption phrase keeps its own crop and does not replace the person.
    caption = "a woman with a painted face"
    face = [
        Detection(phrase(caption, "woman"), WOMAN_BOX, 0.6, "woman"),
        Detection(phrase(caption, "painted face"), HEAD_BOX, 0.8, "face"),
    ]
    assert choose_person_crops(face, random.Random(0), 1.0) == face


def test_crop():
    image = astronaut()
    head = crop(image, HEAD_BOX)
    assert head.size == (150, 175) and head.mode == "RGB"
    assert np.array_equal(np.asarray(head), photos.astronaut()[15:190, 150:300])
    assert crop(image, (10.2, 10.7, 20.1, 20.0)).size == (11, 10)  # rounded outward
    assert crop(image, (500, 500, 600, 600)).size == (12, 12)  # clamped
    assert crop(image, (100, 100, 200, 200), pad_fraction=0.1).size == (120, 120)
    assert crop(Image.new("L", (8, 8)), (0, 0, 4, 4)).mode == "RGB"
    with pytest.raises(ValueError, match="no pixels"):
        crop(image, (600, 600, 700, 700))
