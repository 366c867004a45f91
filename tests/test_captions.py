import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from mumu_model.data.captions import (
    CONTROL_NAME,
    CONTROL_PREFIX,
    CannyBackend,
    CaptionRecord,
    PidiNetSketchBackend,
    TransformersDepthBackend,
    insert_crops,
    record_rng,
    stage1_record,
    stage2_record,
)
from mumu_model.data.detection import (
    AnnotationsDetector,
    Detection,
    Phrase,
    caption_phrases,
    with_head_query,
)
from mumu_model.data.report import Skipped
from mumu_model.testing import tiny_depth_anything
from mumu_model.prompt import MultimodalPrompt

# scikit-image's astronaut (512x512, CC0) with boxes drawn by hand.
CAPTION = (
    "A smiling woman in an orange spacesuit holding a white helmet, with an American flag and a "
    "rocket"
)
BOXES = {
    "astronaut": [
        ("woman", (20, 10, 370, 512)),
        ("head", (150, 15, 300, 190)),
        ("spacesuit", (20, 150, 370, 512)),
        ("helmet", (275, 340, 512, 512)),
        ("flag", (0, 0, 100, 420)),
        ("rocket", (350, 0, 470, 280)),
    ]
}
HEAD_BOX = (150.0, 15.0, 300.0, 190.0)


def astronaut() -> Image.Image:
    return Image.fromarray(photos.astronaut())


def astronaut_detections(scores: dict[str, float] | None = None) -> list[Detection]:
    """The fixed boxes served as detections; scores per label (default: all 1.0)."""
    phrases = with_head_query(caption_phrases(CAPTION))
    [found] = AnnotationsDetector(BOXES).detect([astronaut()], [phrases], keys=["astronaut"])
    scores = scores or {}
    return [Detection(d.phrase, d.box, scores.get(d.label, 1.0), d.label) for d in found]


def no_control(image):
    raise AssertionError("control backend called")


def write_members(record: CaptionRecord, root) -> None:
    for name, image in record.crops.items():
        image.save(root / name)


def caption_of(prompt: MultimodalPrompt) -> str:
    """The prompt's text with the images and the space after each tag removed."""
    return prompt.text_with_placeholders("\0").replace("\0 ", "")


# -- insert_crops --------------------------------------------------------------------------


def test_insert_crops_positions_and_escaping(tmp_path):
    caption = "a man <3 his dog and x<y"
    man, dog = (Phrase(w, caption.index(w), caption.index(w) + len(w)) for w in ("man", "dog"))
    text = insert_crops(caption, [(dog, "crop1.png"), (man, "crop0.png")])  # any order given
    assert text == "a <img:crop0.png> man <<3 his <img:crop1.png> dog and x<<y"
    for name, colour in (("crop0.png", "red"), ("crop1.png", "blue")):
        Image.new("RGB", (4, 4), colour).save(tmp_path / name)
    prompt = MultimodalPrompt.from_text(text, tmp_path)
    assert prompt.image_paths == ("crop0.png", "crop1.png")
    assert [p.getpixel((0, 0)) for p in prompt.images] == [(255, 0, 0), (0, 0, 255)]
    assert caption_of(prompt) == caption
    assert prompt.to_text() == text

    assert insert_crops("a <b> c", []) == "a <<b> c"
    assert MultimodalPrompt.from_text(insert_crops("a <b> c", [])).parts == ("a <b> c",)
    start = Phrase("Dogs", 0, 4)
    assert insert_crops("Dogs run", [(start, "c.png")]) == "<img:c.png> Dogs run"


def test_insert_crops_rejects_bad_input():
    caption = "a man and a dog"
    man = Phrase("man", 2, 5)
    with pytest.raises(ValueError, match="not in the caption"):
        insert_crops(caption, [(Phrase("dog", 2, 5), "c.png")])
    with pytest.raises(ValueError, match="not in the caption"):
        insert_crops(caption, [(Phrase("head", -1, -1), "c.png")])
    with pytest.raises(ValueError, match="two crops"):
        insert_crops(caption, [(man, "a.png"), (man, "b.png")])
    for name in ("", " a.png", "a>b.png", "a\nb"):
        with pytest.raises(ValueError, match="member name"):
            insert_crops(caption, [(man, name)])


def test_insert_crops_drops_the_words_a_crop_shows(tmp_path):
    caption = "a big Red star and a red circle, red style"
    star, circle = Phrase("big Red star", 2, 14), Phrase("red circle", 21, 31)
    colours = ["red", "blue"]
    # Only the cropped phrase loses its colour (any case); the others and the style keep theirs.
    text = insert_crops(caption, [(star, "c0.png")], crop_replaces_words=colours)
    assert text == "a <img:c0.png> big star and a red circle, red style"
    both = insert_crops(caption, [(star, "c0.png"), (circle, "c1.png")], crop_replaces_words=colours)
    assert both == "a <img:c0.png> big star and a <img:c1.png> circle, red style"
    for name in ("c0.png", "c1.png"):
        Image.new("RGB", (4, 4), "red").save(tmp_path / name)
    assert caption_of(MultimodalPrompt.from_text(both, tmp_path)) == "a big star and a circle, red style"
    # A phrase that is only such a word keeps it (the noun stays); no listed word, no change.
    assert insert_crops("the red", [(Phrase("red", 4, 7), "c.png")], colours) == "the <img:c.png> red"
    assert insert_crops("a  green  star", [(Phrase("green  star", 3, 14), "c.png")], colours) == (
        "a  <img:c.png> green  star"
    )
    with pytest.raises(ValueError, match="overlaps"):
        insert_crops(caption, [(star, "c0.png"), (Phrase("star", 10, 14), "c1.png")], colours)


# -- stage 1 -------------------------------------------------------------------------------


def test_stage1_record_on_a_real_photo(tmp_path):
    scores = {"woman": 0.9, "head": 0.95, "spacesuit": 0.3, "helmet": 0.8, "flag": 0.7}
    scores["rocket"] = 0.6
    skipped = Skipped()
    record = stage1_record(
        "astronaut",
        astronaut(),
        CAPTION,
        astronaut_detections(scores),
        rng=random.Random(0),
        control_probability=0.0,
        control_backends={"canny": no_control},
        skipped=skipped,
    )
    assert record is not None and record.key == "astronaut" and record.caption == CAPTION
    # 5 caption crops survive the filter; the 3 best-scoring are inserted, in caption order.
    phrases = [c["phrase"] for c in record.meta["crops"]]
    assert phrases == ["smiling woman", "white helmet", "American flag"]
    assert record.prompt.startswith("A <img:crop0.png> smiling woman in an orange spacesuit")
    assert record.prompt.endswith(
        "holding a <img:crop1.png> white helmet, with an <img:crop2.png> American flag and a rocket"
    )
    assert sorted(record.crops) == ["crop0.png", "crop1.png", "crop2.png"]
    assert record.meta["num_crops"] == 3 and record.meta["control"] is None
    assert not record.meta["text_only"] and not record.meta["no_crops"]
    assert record.crops["crop1.png"].size == (237, 172)  # the helmet box, tight
    assert record.target.size == (512, 512)
    # Round trip through the prompt parser with the members on disk.
    write_members(record, tmp_path)
    prompt = MultimodalPrompt.from_text(record.prompt, tmp_path)
    assert prompt.num_images == 3 and caption_of(prompt) == CAPTION
    assert np.array_equal(np.asarray(prompt.images[2]), photos.astronaut()[0:420, 0:100])


def test_stage1_head_crop_rate_is_deterministic_per_key():
    detections = astronaut_detections()
    image = astronaut()
    heads = 0
    for index in range(300):
        key = f"record-{index}"
        records = [
            stage1_record(
                key, image, CAPTION, detections, rng=record_rng(key), control_probability=0.0
            )
            for _ in range(2)
        ]
        assert records[0].prompt == records[1].prompt and records[0].meta == records[1].meta
        woman = next(c for c in records[0].meta["crops"] if c["phrase"] == "smiling woman")
        heads += woman["head"]
        if woman["head"]:
            assert woman["box"] == list(HEAD_BOX) and woman["label"] == "head"
    assert 0.6 < heads / 300 < 0.8


def test_stage1_control_rate_kinds_and_image_budget():
    image = Image.new("RGB", (64, 48), "white")
    caption = "a red circle, a blue star and a green square on a grey floor"
    phrases = caption_phrases(caption)
    boxes = [(0, 0, 20, 20), (20, 0, 40, 20), (40, 0, 60, 20), (0, 20, 30, 40)]
    detections = [Detection(p, b, 0.5, p.text) for p, b in zip(phrases, boxes)]
    backends = {
        "canny": lambda im: Image.new("RGB", im.size, "black"),
        "depth": lambda im: Image.new("L", (7, 5), 128),  # any size: resized to the target
        "sketch": lambda im: Image.new("RGB", im.size, "white"),
    }
    kinds = Counter()
    for index in range(1000):
        key = f"k{index}"
        record, again = (
            stage1_record(
                key, image, caption, detections, rng=record_rng(key), control_backends=backends
            )
            for _ in range(2)
        )
        assert record.prompt == again.prompt
        kinds[record.meta["control"]] += 1
        if record.meta["control"]:
            assert record.prompt.startswith(f"<img:{CONTROL_NAME}>{CONTROL_PREFIX}a ")
            assert record.crops[CONTROL_NAME].size == image.size
            assert record.crops[CONTROL_NAME].mode == "RGB"
        assert record.meta["num_crops"] == 3  # max_crops; with control 3 + 1 = 4 images
        assert len(record.crops) <= 4
    assert 0.26 < (1000 - kinds[None]) / 1000 < 0.34
    assert all(70 < kinds[kind] < 130 for kind in backends)

    # A smaller image budget: the control image takes one of the slots.
    record = stage1_record(
        "k", image, caption, detections, rng=random.Random(0), control_probability=1.0,
        max_images=3, control_backends=backends,
    )
    assert record.meta["control"] and record.meta["num_crops"] == 2 and len(record.crops) == 3


def test_stage1_text_only_and_bad_input():
    skipped = Skipped()
    image = Image.fromarray(photos.coffee())
    caption = "a cup of coffee on a wooden table"
    table = Phrase("wooden table", caption.index("wooden"), len(caption))
    # The table covers the whole image: dropped, so the record has no crop.
    whole = Detection(table, (0, 0, 600, 400), 0.9, "table")
    record = stage1_record(
        "coffee", image, caption, [whole], rng=random.Random(0), control_probability=0.0,
        skipped=skipped,
    )
    assert record.prompt == caption and record.crops == {}
    assert record.meta["no_crops"] and record.meta["text_only"]
    assert skipped.counts["crop_too_large"] == 1

    def broken(image):
        raise RuntimeError("model failed")

    record = stage1_record(
        "coffee", image, caption, [], rng=random.Random(0), control_probability=1.0,
        control_backends={"canny": broken}, skipped=skipped,
    )
    assert record.prompt == caption and record.meta["control"] is None
    assert skipped.counts["control_failed"] == 1

    wrong = Detection(Phrase("dog", 0, 3), (0, 0, 300, 300), 0.9, "dog")
    record = stage1_record(
        "coffee", image, caption, [wrong], rng=random.Random(0), control_probability=0.0,
        skipped=skipped,
    )
    assert record.meta["no_crops"] and skipped.counts["phrase_not_in_caption"] == 1

    bad = [(Image.new("RGB", (0, 0)), caption), ("x.png", caption), (image, "  ")]
    for bad_image, bad_caption in bad:
        rng = random.Random(0)
        assert stage1_record("bad", bad_image, bad_caption, [], rng=rng, skipped=skipped) is None
    assert skipped.counts["bad_image"] == 2 and skipped.counts["empty_caption"] == 1


def test_crop_replaces_words_leaves_the_caption_and_uncropped_phrases():
    scores = {"woman": 0.1, "head": 0.1, "spacesuit": 1.0, "helmet": 0.9, "flag": 0.1, "rocket": 0.1}
    kwargs = {"rng": random.Random(0), "max_crops": 2, "control_probability": 0.0}
    record = stage1_record("astronaut", astronaut(), CAPTION, astronaut_detections(scores),
                           crop_replaces_words=["orange", "white", "american"], **kwargs)
    assert record.prompt == (
        "A smiling woman in an <img:crop0.png> spacesuit holding a <img:crop1.png> helmet, with an "
        "American flag and a rocket"
    )
    assert record.caption == CAPTION
    assert [c["phrase"] for c in record.meta["crops"]] == ["orange spacesuit", "white helmet"]
    record = stage2_record("astronaut", astronaut(), CAPTION, astronaut_detections(scores), rng=random.Random(0),
                           subject="any", crop_replaces_words=["smiling", "orange"], min_side=0)
    assert record.prompt == CAPTION.replace("A smiling woman", "A <img:crop0.png> woman")  # the largest box


def test_stage1_crop_size_pads_to_square():
    detections = astronaut_detections({"woman": 0.5, "spacesuit": 0.5, "helmet": 0.5})
    record = stage1_record(
        "astronaut", astronaut(), CAPTION, detections, rng=random.Random(1),
        control_probability=1.0, crop_size=252,
    )
    assert record.meta["control"] == "canny"
    assert {image.size for image in record.crops.values()} == {(252, 252)}
    # The 100x420 flag is centred on black: its left and right margins are black padding.
    flag = next(c["name"] for c in record.meta["crops"] if c["phrase"] == "American flag")
    pixels = np.asarray(record.crops[flag])
    assert pixels[:, :40].max() == 0 and pixels[:, -40:].max() == 0


# -- control backends ----------------------------------------------------------------------


def test_canny_on_a_real_photo():
    image = Image.fromarray(photos.coffee())
    edges = CannyBackend()(image)
    assert edges.mode == "RGB" and edges.size == image.size
    pixels = np.asarray(edges)
    assert set(np.unique(pixels)) <= {0, 255}
    assert 0.01 < (pixels[..., 0] == 255).mean() < 0.2  # outlines, not texture or nothing
    assert np.array_equal(np.asarray(CannyBackend()(image)), pixels)
    # A larger sigma smooths more: fewer edge pixels.
    smooth = np.asarray(CannyBackend(sigma=4.0)(image))
    assert (smooth[..., 0] == 255).sum() < (pixels[..., 0] == 255).sum()
    assert CannyBackend()(Image.new("RGBA", (30, 20))).size == (30, 20)


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory):
    return tiny_depth_anything(tmp_path_factory.mktemp("tiny_depth_anything"))


def test_depth_backend_with_a_tiny_depth_anything(depth_dir):
    depth = TransformersDepthBackend(str(depth_dir))
    image = Image.fromarray(photos.chelsea())
    out = depth(image)
    assert out.mode == "RGB" and out.size == image.size
    record = stage1_record(
        "cat", image, "a cat", [], rng=random.Random(0), control_probability=1.0,
        control_backends={"depth": depth, "canny": depth},
    )
    assert record.meta["control"] in ("depth", "canny")
    assert record.crops[CONTROL_NAME].size == image.size


def test_sketch_backend_needs_its_model():
    with pytest.raises(ValueError, match="PiDiNet weights"):
        PidiNetSketchBackend()


# -- stage 2 -------------------------------------------------------------------------------


def test_stage2_prefers_the_face(tmp_path):
    skipped = Skipped()
    record = stage2_record(
        "astronaut", astronaut(), CAPTION, astronaut_detections(), rng=random.Random(0),
        skipped=skipped,
    )
    assert record.meta["crop_kind"] == "head"
    assert record.prompt == CAPTION.replace("A smiling", "A <img:crop0.png> smiling")
    assert list(record.crops) == ["crop0.png"] and record.crops["crop0.png"].size == (150, 175)
    write_members(record, tmp_path)
    assert caption_of(MultimodalPrompt.from_text(record.prompt, tmp_path)) == CAPTION

    # Without a head (or with one too small for stage 2), the person.
    no_head = [d for d in astronaut_detections() if d.label != "head"]
    record = stage2_record("astronaut", astronaut(), CAPTION, no_head, rng=random.Random(0))
    assert record.meta["crop_kind"] == "person" and record.crops["crop0.png"].size == (350, 502)
    small_head = no_head + [Detection(Phrase("head", -1, -1), (200, 50, 250, 100), 1.0, "head")]
    record = stage2_record("astronaut", astronaut(), CAPTION, small_head, rng=random.Random(0))
    assert record.meta["crop_kind"] == "person"

    crop_size = stage2_record(
        "astronaut", astronaut(), CAPTION, astronaut_detections(), rng=random.Random(0),
        crop_size=504,
    )
    assert crop_size.crops["crop0.png"].size == (504, 504)


def test_stage2_without_a_person():
    skipped = Skipped()
    cat = Image.fromarray(photos.chelsea())
    caption = "a tabby cat with green eyes"
    phrases = caption_phrases(caption)
    boxes = {"cat": [("cat", (0, 0, 300, 300)), ("eyes", (135, 85, 340, 160))]}
    [found] = AnnotationsDetector(boxes).detect([cat], [phrases], keys=["cat"])
    assert stage2_record("cat", cat, caption, found, rng=random.Random(0), skipped=skipped) is None
    assert skipped.counts["no_person"] == 1
    record = stage1_record(
        "cat", cat, caption, found, rng=random.Random(0), control_probability=0.0
    )
    assert record.prompt == "a <img:crop0.png> tabby cat with <img:crop1.png> green eyes"


def test_stage2_max_subjects_counts_every_detected_phrase_and_text_only_keeps_the_caption():
    found = astronaut_detections()
    kwargs = {"rng": random.Random(0), "max_subjects": 1}
    # One person (the head is not a phrase of its own): kept. Five objects: skipped, counted.
    assert stage2_record("astronaut", astronaut(), CAPTION, found, **kwargs).meta["crop_kind"] == "head"
    skipped = Skipped()
    assert stage2_record("astronaut", astronaut(), CAPTION, found, subject="any", skipped=skipped, **kwargs) is None
    assert skipped.counts["too_many_subjects"] == 1
    # A detection too small to crop still counts: the object is in the picture.
    flag_only = [d for d in found if d.label in ("flag", "rocket")]
    tiny_rocket = [d if d.label == "flag" else Detection(d.phrase, (350, 0, 352, 2), 1.0, d.label) for d in flag_only]
    assert stage2_record("a", astronaut(), CAPTION, tiny_rocket, subject="any", **kwargs) is None
    assert stage2_record("a", astronaut(), CAPTION, tiny_rocket[:1], subject="any", **kwargs).meta["crops"][0][
        "phrase"] == "American flag"

    text_only = stage2_record("astronaut", astronaut(), CAPTION, found, rng=random.Random(0), text_only_probability=1.0)
    assert text_only.prompt == CAPTION and text_only.crops == {} and text_only.meta["text_only"]
    assert text_only.meta["num_crops"] == 0 and text_only.caption == CAPTION
    draws = [stage2_record(f"k{i}", astronaut(), CAPTION, found, rng=record_rng(f"k{i}"), text_only_probability=0.3)
             for i in range(200)]
    assert 40 <= sum(r.meta["text_only"] for r in draws) <= 80
