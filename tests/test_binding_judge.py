"""The slot-binding judge on composites made by pasting references into canvases.

The detector is an `AnnotationsDetector` that knows where each reference was pasted (as the toy
world's renderer boxes stand in for GroundingDINO); the embeddings come from tiny random-weight
CLIP and DINO built from config. An exact paste is identical under any embedding (cosine 1.0),
which is all the bound / leaked / duplicated outcomes below rely on.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from eval.binding import BINDING_MEANS, BINDING_RATES, SLOT_TRIALS, BindingJudge, binding_headline, slot_problem
from eval.generation import Generated
from eval.metrics import ClipEmbedder, DinoEmbedder, wilson_interval
from eval.scoring import Scorers, score_entry, summarize
from eval.suites import EntryError, load_entry, load_suite
from mumu_model.data.detection import AnnotationsDetector
from mumu_model.images import load_image
from mumu_model.testing import tiny_clip, tiny_dino

IMAGES = Path(__file__).resolve().parents[1] / "eval" / "suites" / "images"
GREY = (128, 128, 128)
LEFT, RIGHT = (8, 8), (70, 50)


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedders")
    return [DinoEmbedder(tiny_dino(root / "dino")), ClipEmbedder(tiny_clip(root / "clip"))]


@pytest.fixture(scope="module")
def references():
    return load_image(IMAGES / "cat.jpg").resize((40, 32)), load_image(IMAGES / "cup.jpg").resize((36, 32))


def composite(*pastes: tuple[Image.Image, tuple[int, int]]) -> Image.Image:
    canvas = Image.new("RGB", (128, 96), GREY)
    for image, at in pastes:
        canvas.paste(image, at)
    return canvas


def box(image: Image.Image, at: tuple[int, int]) -> tuple[int, int, int, int]:
    return (at[0], at[1], at[0] + image.width, at[1] + image.height)


def composites(cat: Image.Image, cup: Image.Image) -> dict[str, tuple[Image.Image, list]]:
    """Per case, the output and where the detector finds each phrase: the cat's slot is always
    on the left, the cup's on the right; what is pasted there varies."""
    redrawn = ImageOps.mirror(cat).resize((48, 38)).rotate(8, fillcolor=GREY)  # same cat, not a paste
    return {
        "correct": (composite((cat, LEFT), (cup, RIGHT)), [("cat", box(cat, LEFT)), ("cup", box(cup, RIGHT))]),
        "swapped": (composite((cup, LEFT), (cat, RIGHT)), [("cat", box(cup, LEFT)), ("cup", box(cat, RIGHT))]),
        "twice": (composite((cat, LEFT), (cat, RIGHT)), [("cat", box(cat, LEFT)), ("cup", box(cat, RIGHT))]),
        "missing": (composite((cat, LEFT)), [("cat", box(cat, LEFT))]),
        "redrawn": (composite((redrawn, LEFT), (cup, RIGHT)), [("cat", box(redrawn, LEFT)), ("cup", box(cup, RIGHT))]),
    }


def test_pasted_composites_are_judged_as_pasted(embedders, references):
    cat, cup = references
    cases = composites(cat, cup)
    detector = AnnotationsDetector({key: boxes for key, (_, boxes) in cases.items()})
    outputs = [image for image, _ in cases.values()]
    for models in ([embedders[0]], [embedders[1]], embedders):  # DINO, CLIP, both averaged
        judged = BindingJudge(detector, models).judge(outputs, [(cat, "cat"), (cup, "cup")], keys=list(cases))
        outcomes = {key: [s.outcome for s in j.slots] for key, j in zip(cases, judged)}
        assert outcomes == {
            "correct": ["bound+copy", "bound+copy"],
            "swapped": ["leaked", "leaked"],  # each slot holds the other reference
            "twice": ["bound+duplicated+copy", "leaked"],  # the cat in both slots: counted once as a duplicate
            "missing": ["bound+copy", "missing"],  # the cup never found: counted, not a silent 0
            "redrawn": [judged[4].slots[0].outcome, "bound+copy"],
        }
        # A redrawn cat (mirrored, rescaled, turned) is found but is no copy-paste, whatever
        # the embedding says: its aligned pixels differ.
        redrawn = judged[4].slots[0]
        assert redrawn.found and not redrawn.copy_paste and redrawn.own < 1.0 - 1e-4

    rows = {key: j.row() for key, j in zip(cases, judged)}
    assert rows["correct"] | {"leakage": 0, "slot_outcomes": ""} == {
        SLOT_TRIALS: 2, "slot_bound": 1.0, "all_bound": 1.0, "slot_leaked": 0.0, "slot_missing": 0.0,
        "slot_duplicated": 0.0, "slot_copy_paste": 1.0, "leakage": 0, "slot_outcomes": ""}
    assert rows["correct"]["leakage"] < 0 < rows["swapped"]["leakage"]
    assert rows["correct"]["slot_outcomes"] == "cat:bound+copy, cup:bound+copy"
    def get(case: str, *names: str) -> tuple:
        return tuple(rows[case][name] for name in names)

    assert get("swapped", "slot_bound", "all_bound", "slot_leaked") == (0.0, 0.0, 1.0)
    assert get("twice", "slot_duplicated", "all_bound") == (0.5, 0.0)
    assert get("missing", "slot_missing", "slot_bound", "all_bound") == (0.5, 0.5, 0.0)
    # Leakage is a mean over the found slots only: the missing cup does not pull it anywhere.
    assert rows["missing"]["leakage"] == pytest.approx(judged[3].slots[0].nearest_other - 1.0, abs=1e-5)
    # Every slot is exactly one of bound, leaked, missing.
    for row in rows.values():
        assert row["slot_bound"] + row["slot_leaked"] + row["slot_missing"] == pytest.approx(1.0)


def test_one_object_boxed_twice_is_not_a_duplicate(embedders, references):
    cat, cup = references
    image = composite((cat, LEFT), (cup, RIGHT))
    shifted = (LEFT[0] + 1, LEFT[1], LEFT[0] + cat.width + 1, LEFT[1] + cat.height)  # the same cat again
    detector = AnnotationsDetector({"x": [("cat", box(cat, LEFT)), ("cat", shifted), ("cup", box(cup, RIGHT))]})
    (judged,) = BindingJudge(detector, embedders).judge([image], [(cat, "cat"), (cup, "cup")], keys=["x"])
    assert [s.outcome for s in judged.slots] == ["bound+copy", "bound+copy"]


def test_people_are_compared_by_face(embedders):
    import skimage.data
    from matplotlib import cbook

    from eval.faces import cosine, load_face_embedder

    face = load_face_embedder("dlib")  # the real dlib models, shipped in a package
    astronaut = Image.fromarray(skimage.data.astronaut()).resize((256, 256))
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        hopper = image.convert("RGB").resize((200, 256))
    # Redrawn (mirrored) people, in their own slots and swapped.
    right, swapped = (Image.new("RGB", (480, 256), GREY) for _ in range(2))
    right.paste(ImageOps.mirror(astronaut), (0, 0))
    right.paste(ImageOps.mirror(hopper), (270, 0))
    swapped.paste(ImageOps.mirror(hopper), (0, 0))
    swapped.paste(ImageOps.mirror(astronaut), (210, 0))
    detector = AnnotationsDetector({"right": [("astronaut", (0, 0, 256, 256)), ("woman", (270, 0, 470, 256))],
                                    "swapped": [("astronaut", (0, 0, 200, 256)), ("woman", (210, 0, 466, 256))]})
    judged = BindingJudge(detector, embedders, face=face).judge(
        [right, swapped], [(astronaut, "astronaut"), (hopper, "woman")], keys=["right", "swapped"])
    assert [s.outcome for s in judged[0].slots] == ["bound", "bound"]
    assert [s.outcome for s in judged[1].slots] == ["leaked", "leaked"]
    # The similarity is the faces' cosine, not the embedders'.
    expected = cosine(face.faces(right.crop((0, 0, 256, 256)))[0].embedding, face.faces(astronaut)[0].embedding)
    assert judged[0].slots[0].own == pytest.approx(expected, abs=1e-5)


def test_bad_slots_are_refused_by_name(tmp_path, embedders, references):
    cat, cup = references
    assert "two or more slots" in slot_problem([(cat, "cat")])
    assert slot_problem([(cat, "cat"), (cat.copy(), "kitten")]) == (
        "slots 0 and 1 have the same reference image: binding cannot tell them apart")
    with pytest.raises(ValueError, match="same reference image"):
        BindingJudge(AnnotationsDetector({}), embedders).judge([cat], [(cat, "cat"), (cat, "cat")], keys=["k"])
    with pytest.raises(ValueError, match="at least one image embedder"):
        BindingJudge(AnnotationsDetector({}), [])

    images = tmp_path / "images"
    images.mkdir()
    cat.save(images / "cat.png")
    cup.save(images / "cup.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    suite = tmp_path / "pairs.yaml"
    suite.write_text(
        "name: pairs\nversion: 1\nentries:\n"
        # Slot count and objects disagree: an object whose image is no slot of the prompt.
        "  - id: stray\n    prompt: 'a <img:cat.png> cat and a cup'\n"
        "    objects: [{image: cat.png, phrase: cat}, {image: cup.png, phrase: cup}]\n"
        "  - id: unreadable\n    prompt: 'a <img:cat.png> cat and a <img:broken.png> cup'\n"
        "    objects: [{image: cat.png, phrase: cat}, {image: broken.png, phrase: cup}]\n"
    )
    loaded = load_suite(suite)
    [error] = loaded.errors
    assert error.entry == "stray"
    assert "objects[1] image 'cup.png' is not one of the prompt's 1 image slots (cat.png)" in str(error)
    with pytest.raises(EntryError, match="broken.png"):
        load_entry(loaded, loaded.entries[0], max_images=4)


def _pairs_suite(root: Path, cat: Image.Image, cup: Image.Image) -> Path:
    (root / "images").mkdir(parents=True)
    cat.save(root / "images" / "cat.png")
    cup.save(root / "images" / "cup.png")
    path = root / "pairs.yaml"
    path.write_text(
        "name: pairs\nversion: 1\nentries:\n"
        "  - id: pair\n    prompt: 'a <img:cat.png> cat next to a <img:cup.png> cup'\n"
        "    objects: [{image: cat.png, phrase: cat}, {image: cup.png, phrase: cup}]\n"
        "    references: [cat.png, cup.png]\n"
        "  - id: alone\n    prompt: 'a <img:cat.png> cat'\n    objects: [{image: cat.png, phrase: cat}]\n"
    )
    return path


def test_binding_columns_and_suite_rates_with_intervals(tmp_path, embedders, references):
    suite = load_suite(_pairs_suite(tmp_path, *references))
    pair, alone = (load_entry(suite, e, max_images=4) for e in suite.entries)
    cases = composites(pair.objects[0][0], pair.objects[1][0])  # the references as loaded
    seeds = list(range(len(cases)))  # one "seed" per case
    detector = AnnotationsDetector({f"pairs/{entry}/seed{seed}": boxes
                                    for entry in ("pair", "alone") for seed, (_, boxes) in enumerate(cases.values())})
    scorers = Scorers(clip=embedders[1], dino=embedders[0], detector=detector, face=None)
    images = [image for image, _ in cases.values()]
    errors: list[EntryError] = []
    rows = pd.DataFrame(
        score_entry(Generated(pair, seeds, images, [f"{k}.png" for k in cases]), scorers, None, errors)
        + score_entry(Generated(alone, seeds, images, [f"{k}.png" for k in cases]), scorers, None, errors))
    assert not errors
    pair_rows = rows[rows.entry == "pair"]
    assert list(pair_rows.slot_bound) == [1.0, 0.0, 0.5, 0.5, pair_rows.slot_bound.iloc[4]]
    assert list(pair_rows.slot_missing) == [0.0, 0.0, 0.0, 0.5, 0.0]
    assert rows[rows.entry == "alone"].slot_bound.isna().all()  # one slot: nothing to bind

    metrics = summarize(rows, None)
    bound_slots = float((pair_rows.slot_bound * 2).sum())
    assert metrics[SLOT_TRIALS] == 10 and metrics["slot_bound"] == pytest.approx(bound_slots / 10)
    interval = (metrics["slot_bound_ci_low"], metrics["slot_bound_ci_high"])
    assert interval == pytest.approx(wilson_interval(bound_slots, 10))
    assert metrics["slot_missing"] == pytest.approx(0.1) and metrics["slot_duplicated"] == pytest.approx(0.1)
    assert metrics["slot_copy_paste"] == pytest.approx(5 / 10)  # correct x2, twice, missing, redrawn's cup
    assert (metrics["all_bound_ci_low"], metrics["all_bound_ci_high"]) == pytest.approx(
        wilson_interval(float(pair_rows.all_bound.sum()), 5))  # over images
    for name in (*BINDING_RATES, *BINDING_MEANS):
        assert not math.isnan(metrics[name]), name
    line = binding_headline(metrics)
    assert line.startswith("10 slots: bound ") and "missing 10.0% (" in line and "copy-paste 50.0%" in line
    assert binding_headline({"clip_i": 0.5}) == ""


# -- the toy world: the same names from its analytic probe ---------------------------------


def test_toy_world_reports_the_judges_names():
    from mumu_model.toy.metrics import TOY_WORLD
    from mumu_model.toy.world import ObjectSpec, Scene, render_scene

    def scene(*objects: tuple[str, str]) -> Image.Image:
        image, _ = render_scene(Scene(tuple(ObjectSpec(s, c) for c, s in objects), "plain"), np.random.default_rng(5),
                                size=48)
        return image

    expected = [("red", "star"), ("blue", "square")]
    rows = {
        "correct": TOY_WORLD.score(scene(("red", "star"), ("blue", "square")), expected),
        "leaked": TOY_WORLD.score(scene(("red", "star"), ("red", "square")), expected),  # the star's colour leaked
        "twice": TOY_WORLD.score(scene(("red", "star"), ("red", "star")), expected),
        "missing": TOY_WORLD.score(scene(("red", "star"),), expected),
    }
    judge_names = {SLOT_TRIALS, "slot_outcomes", *BINDING_RATES, *BINDING_MEANS}
    for row in rows.values():
        assert {name for name in row if name in judge_names} == judge_names - {"slot_copy_paste", "leakage"}
    assert rows["correct"]["slot_outcomes"] == "star:bound, square:bound" and rows["correct"]["all_bound"] == 1.0
    assert rows["leaked"]["slot_outcomes"] == "star:bound, square:leaked" and rows["leaked"]["slot_leaked"] == 0.5
    assert rows["twice"]["slot_outcomes"] == "star:bound+duplicated, square:missing"
    assert rows["missing"]["slot_outcomes"] == "star:bound, square:missing" and rows["missing"]["slot_missing"] == 0.5
    assert "slot_bound" not in TOY_WORLD.score(scene(("red", "star"),), [("red", "star")])  # one slot

    metrics = summarize(pd.DataFrame([{"variant": "multimodal", **row} for row in rows.values()]), TOY_WORLD)
    assert metrics[SLOT_TRIALS] == 8 and metrics["slot_bound"] == pytest.approx(5 / 8)
    assert metrics["all_bound"] == pytest.approx(1 / 4) and "slot_bound_ci_low" in metrics


def test_binding_rates_reach_mlflow_dagster_and_compare(tiny_pipeline_dir, tmp_path):
    import dagster as dg
    from mlflow import MlflowClient

    from eval.compare import comparison_table, fetch_run
    from mumu_assets.eval_assets import EvalModelsResource, evaluation
    from mumu_assets.resources import DatasetStorage
    from mumu_model.toy.world import PALETTE

    (tmp_path / "images").mkdir()
    for colour in ("red", "blue"):
        Image.new("RGB", (16, 16), PALETTE[colour]).save(tmp_path / "images" / f"{colour}.png")
    suite = tmp_path / "toys.yaml"
    suite.write_text(
        "name: toys\nversion: 1\nworld: toy\nentries:\n"
        "  - id: two\n    prompt: 'a <img:red.png> star and a <img:blue.png> square'\n"
        "    objects: [{image: red.png, phrase: star, colour: red, shape: star},"
        " {image: blue.png, phrase: square, colour: blue, shape: square}]\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {"pipeline": str(tiny_pipeline_dir), "suites": [str(suite)], "steps": 1, "seeds": [0, 1],
              "tracking_uri": uri}
    result = dg.materialize(
        [evaluation], resources={"storage": DatasetStorage(root=str(tmp_path / "data")),
                                 "eval_models": EvalModelsResource(face=None)},
        run_config={"ops": {"evaluation": {"config": config}}}, selection=[evaluation],
    )
    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    for name in ("slot_bound", "slot_bound_ci_low", "slot_bound_ci_high", "all_bound", "slot_leaked",
                 "slot_missing", "slot_duplicated"):
        assert 0.0 <= metadata[f"toys/{name}"] <= 1.0, name
    assert "4 slots: bound " in metadata["headline"] and "slot_bound" in metadata["summary"]

    client = MlflowClient(tracking_uri=uri)
    run = fetch_run(client, metadata["mlflow_run_id"])
    assert run.metrics["toys/slot_bound"] == pytest.approx(metadata["toys/slot_bound"])
    assert run.metrics["aggregate/n_slots"] == 4 and "aggregate/slot_missing" in run.metrics
    table = comparison_table(run, run)
    assert "toys/slot_bound_ci_low" in table and "aggregate/all_bound" in table


# -- public benchmark formats --------------------------------------------------------------

DREAMBENCH_PROMPTS = """Classes
subject_name,class
backpack,backpack
dog,dog
vase,vase

Prompts
Object Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on top of pink fabric'.format(unique_token, class_token),
]

Live Subject Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} sleeping'.format(unique_token, class_token),
]
"""


def test_import_a_dreambench_folder(tmp_path, capsys):
    from eval.cli import main

    folder = tmp_path / "dataset"
    for subject, count in (("backpack", 1), ("dog", 2)):
        (folder / subject).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (24, 24), (40 * index, 90, 200)).save(folder / subject / f"{index:02d}.jpg")
    (folder / "prompts_and_classes.txt").write_text(DREAMBENCH_PROMPTS)

    with pytest.raises(SystemExit) as exited:  # written, but a subject was left out: status 1
        main(["eval", "import", "dreambench", str(folder), "--out", str(tmp_path / "suites")])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert "wrote" in out and "not imported: vase: no images" in err  # a subject without images is announced
    suite = load_suite(tmp_path / "suites" / "dreambench.yaml")
    assert not suite.errors and [e.id for e in suite.entries] == [
        "backpack_00", "backpack_01", "dog_00", "dog_01", "dog_02"]  # the dog takes the live prompts
    dog = load_entry(suite, suite.entries[3], max_images=4)
    assert dog.entry.prompt == "a <img:dog/00.jpg> dog wearing a red hat" and dog.text == "a dog wearing a red hat"
    assert dog.objects[0][1] == "dog" and len(dog.references) == 2  # every image of the subject

    (folder / "prompts_and_classes.txt").write_text("Classes\nsubject_name,class\ndog,dog\n")
    assert main(["eval", "import", "dreambench", str(folder), "--out", str(tmp_path / "again")]) == 2
    assert "needs both an 'Object Prompts' and a 'Live Subject Prompts' list" in capsys.readouterr().err


def test_import_an_omnicontext_json(tmp_path, capsys):
    import json

    from eval.benchmarks import import_omnicontext, omnicontext_prompt
    from eval.cli import main

    (tmp_path / "images").mkdir()
    for name in ("1a", "1b", "2a", "3a", "3b"):
        Image.new("RGB", (16, 16), (len(name) * 60, 20, 20)).save(tmp_path / "images" / f"{name}.png")
    records = [
        {"key": "1", "task_type": "multi_object",
         "instruction": "The cat from image 1 sits beside the cup from image 2.",
         "input_images": ["images/1a.png", "images/1b.png"]},
        {"key": "2", "task_type": "single_object", "instruction": "Put the vase in image 1 on a shelf, 1 < 2.",
         "input_images": ["images/2a.png"]},
        {"key": "3", "task_type": "multi_object", "instruction": "The dog from image 1 runs.",  # image 2 never named
         "input_images": ["images/3a.png", "images/3b.png"]},
        {"key": "4", "task_type": "multi_object", "instruction": "The man from image 1 and the dog from image 2.",
         "input_images": ["images/1a.png", "images/nowhere.png"]},
    ]
    source = tmp_path / "omnicontext.json"
    source.write_text(json.dumps(records))

    written, problems = import_omnicontext(source, tmp_path / "suites")
    assert sorted(p.name for p in written) == ["omnicontext_multi_object.yaml", "omnicontext_single_object.yaml"]
    assert [str(p) for p in problems] == [
        "record 3: the instruction names images [1] but input_images has 2",
        "record 4: image 2 'images/nowhere.png': no such file under " + str(tmp_path)]
    multi = load_suite(tmp_path / "suites" / "omnicontext_multi_object.yaml")
    [entry] = multi.entries
    assert entry.prompt == "The <img:images/1a.png> cat sits beside the <img:images/1b.png> cup."
    assert [(o.image, o.phrase) for o in entry.objects] == [("images/1a.png", "cat"), ("images/1b.png", "cup")]
    loaded = load_entry(multi, entry, max_images=4)
    assert loaded.prompt.num_images == 2 and loaded.text == records[0]["instruction"]
    single = load_suite(tmp_path / "suites" / "omnicontext_single_object.yaml")
    assert single.entries[0].prompt == "Put the <img:images/2a.png> vase on a shelf, 1 << 2."  # '<' kept literal

    with pytest.raises(ValueError, match=r"image 1: expected each image named once"):
        omnicontext_prompt("Image 1 shows a cat.", ["a.png"])
    source.write_text("{not json")
    assert main(["eval", "import", "omnicontext", str(source), "--out", str(tmp_path / "x")]) == 2
    assert "cannot read as JSON" in capsys.readouterr().err
