"""Evaluation: metrics with tiny random models, dlib faces with real weights, suites, reporting.

Every model is built from a config, saved, and loaded back by path, as real checkpoints are;
the dlib face models are the real ones shipped in `face-recognition-models`.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from eval.faces import ArcFaceEmbedder, face_similarity, load_face_embedder
from eval.metrics import ClipEmbedder, DinoEmbedder, clip_i, clip_t, dino_score, multimodal_clip_score, wilson_interval
from eval.run import EvalModels, evaluate
from eval.suites import SuiteError, builtin_suites, load_entry, load_suite
from mumu_model.data.detection import AnnotationsDetector
from mumu_model.loading import PipelineFolderError, check_pipeline_folder
from mumu_model.testing import tiny_clip, tiny_dino, tiny_grounding_dino, tiny_sdxl_pipeline
from mumu_model.toy.metrics import TOY_WORLD, colour_chance, colour_probe, object_probe, objects_found, shape_chance
from mumu_model.toy.world import PALETTE



@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return tiny_dino(tmp_path_factory.mktemp("tiny_dino"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ClipEmbedder(clip_dir)


def noise(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# -- DreamBench metrics --------------------------------------------------------------------


def test_clip_i_and_dino_of_an_image_with_itself_is_one(clip, dino_dir):
    dino = DinoEmbedder(dino_dir)
    images = [noise(0), noise(1, (64, 64)), Image.new("RGB", (30, 50), (200, 30, 30))]
    for image in images:
        assert clip_i(clip, [image], [image]) == pytest.approx([1.0], abs=1e-5)
        assert dino_score(dino, [image], [image]) == pytest.approx([1.0], abs=1e-5)
    # Mean over references, per generated image; no references: NaN (the metric does not apply).
    both = clip_i(clip, [images[0]], images[:2])
    assert both[0] == pytest.approx((1.0 + clip_i(clip, [images[0]], [images[1]])[0]) / 2, abs=1e-5)
    assert np.isnan(clip_i(clip, [images[0]], [])[0])


def test_clip_t_is_the_cosine_of_clip_image_and_text_embeddings(clip_dir, clip):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    image, text = noise(3), "a cat on the beach"
    with torch.no_grad():
        t = model.get_text_features(**processor(text=[text], return_tensors="pt")).pooler_output
        i = model.get_image_features(**processor(images=[image], return_tensors="pt")).pooler_output
    expected = float(torch.nn.functional.cosine_similarity(t, i))
    assert clip_t(clip, [image], [text])[0] == pytest.approx(expected, abs=1e-4)


# -- multimodal CLIP score -----------------------------------------------------------------


def test_multimodal_clip_score_with_fixed_boxes(clip):
    dog, cat, ball = noise(10, (20, 16)), noise(11, (16, 24)), noise(12, (12, 12))
    output = Image.new("RGB", (64, 64), (90, 90, 90))
    output.paste(dog, (4, 4))
    output.paste(cat, (40, 30))
    detector = AnnotationsDetector({
        "found": [("dog", (4, 4, 24, 20))],
        # Two dogs found; the one pasted at (40, 30) is the cat's pixels, so it matches object 2.
        "two": [("dog", (40, 30, 56, 54)), ("dog", (4, 4, 24, 20))],
    })
    found, two = multimodal_clip_score(
        clip, detector, [output, output], [(dog, "dog"), (ball, "ball")], keys=["found", "two"]
    )
    # The region is exactly the dog's pixels: similarity 1. The ball is not found: 0, counted.
    assert found.objects[0].found and found.objects[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert found.objects[1].found is False and found.objects[1].similarity == 0.0
    assert found.score == pytest.approx(0.5, abs=1e-5) and (found.found, found.missing) == (1, 1)
    assert two.objects[0].box == (4.0, 4.0, 24.0, 20.0)  # the better match of the two dogs

    # Two objects with the same phrase need two detections; each takes its best match.
    (both,) = multimodal_clip_score(clip, detector, [output], [(cat, "dog"), (dog, "dog")], keys=["two"])
    assert [o.box for o in both.objects] == [(40.0, 30.0, 56.0, 54.0), (4.0, 4.0, 24.0, 20.0)]
    assert both.score == pytest.approx(1.0, abs=1e-5)
    (one,) = multimodal_clip_score(clip, detector, [output], [(dog, "dog"), (cat, "dog")], keys=["found"])
    assert (one.found, one.missing) == (1, 1) and one.score == pytest.approx(0.5, abs=1e-5)
    # Nothing annotated for this output: every object missing, score 0.
    (none,) = multimodal_clip_score(clip, detector, [output], [(dog, "dog")], keys=["unknown"])
    assert none.score == 0.0 and none.missing == 1


# -- faces ---------------------------------------------------------------------------------


def test_dlib_face_embedding_matches_the_same_person_only():
    import skimage.data
    from matplotlib import cbook

    embedder = load_face_embedder("dlib")
    astronaut = Image.fromarray(skimage.data.astronaut())
    mirrored = astronaut.transpose(Image.FLIP_LEFT_RIGHT)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        hopper = image.convert("RGB")

    a, m, h = (embedder.faces(image)[0].embedding for image in (astronaut, mirrored, hopper))
    assert a.shape == (128,)
    # dlib's scale: same person ~0.2, different people ~0.7, threshold 0.6.
    assert np.linalg.norm(a - m) < 0.4
    assert np.linalg.norm(a - h) > 0.6

    same, other, blank = face_similarity(embedder, [mirrored, hopper, Image.new("RGB", (64, 64))], [a])
    assert same.similarity > other.similarity and same.distance < 0.4 < 0.6 < other.distance
    assert (blank.similarity, blank.found, blank.total) == (0.0, 0, 1) and np.isnan(blank.distance)


def test_arcface_without_insightface_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ImportError, match="pip install insightface onnxruntime"):
        ArcFaceEmbedder()
    with pytest.raises(ValueError, match="face backend"):
        load_face_embedder("facenet")


# -- suites --------------------------------------------------------------------------------


def test_builtin_suites_load_with_their_images():
    names = {p.stem for p in builtin_suites()}
    assert {"single_subject", "multi_subject", "style_transfer", "portraits", "text_only"} <= names
    for path in builtin_suites():
        suite = load_suite(path)
        assert suite.version and not suite.errors and suite.sha256
        for entry in suite.entries:
            loaded = load_entry(suite, entry, max_images=4)
            assert "<img:" not in loaded.text and (loaded.references or loaded.text_only)
    multi = load_suite(next(p for p in builtin_suites() if p.stem == "multi_subject"))
    assert all(len(e.objects) >= 2 for e in multi.entries)


def test_bad_suite_files_and_entries(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    no_version = tmp_path / "no_version.yaml"
    no_version.write_text("name: x\nentries: [{id: a, prompt: hi}]\n")
    with pytest.raises(SuiteError, match="no version"):
        load_suite(no_version)
    with pytest.raises(SuiteError, match="not valid YAML"):
        (tmp_path / "bad.yaml").write_text("version: [1\n")
        load_suite(tmp_path / "bad.yaml")

    path = tmp_path / "s.yaml"
    path.write_text(
        "version: 2\nentries:\n"
        "  - {id: ok, prompt: 'a <img:a.png> cat'}\n"
        "  - {id: ok, prompt: 'again'}\n"
        "  - {id: no_prompt}\n"
        "  - {id: bad_object, prompt: 'x', objects: [{image: a.png}]}\n"
    )
    suite = load_suite(path)
    assert [e.id for e in suite.entries] == ["ok"]
    assert [(e.entry, e.message.split(" ")[0]) for e in suite.errors] == [
        ("ok", "duplicate"), ("no_prompt", "'prompt'"), ("bad_object", "objects[0]")]


def test_incomplete_pipeline_folder_fails_fast(tiny_pipeline_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    shutil.rmtree(broken / "unet")
    for path in (broken / "vae").glob("*.safetensors"):
        path.unlink()
    with pytest.raises(PipelineFolderError, match=r"incomplete: unet/ \(missing or empty\), vae/ \(no .safetensors"):
        check_pipeline_folder(broken)
    with pytest.raises(PipelineFolderError, match="no model_index.json"):
        evaluate(tmp_path, [], out_dir=tmp_path / "out", mlflow_run=False)
    assert not (tmp_path / "out").exists()  # nothing ran


# -- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    # One database for the module: MLflow spends seconds creating (migrating) a new one.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory, clip_dir, dino_dir):
    root = tmp_path_factory.mktemp("eval_models")
    words = ["face", "circle", "square", "woman"]
    return EvalModels(
        clip=clip_dir, dino=dino_dir, pickscore=clip_dir, detector=tiny_grounding_dino(root / "gdino", words),
        detector_box_threshold=0.0, face="dlib", sdxl=tiny_sdxl_pipeline(root / "sdxl"),
    )


def _custom_suite(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32), (220, 30, 30)).save(images / "red.png")
    Image.new("RGB", (32, 32), (30, 30, 220)).save(images / "blue.png")
    path = tmp_path / "custom.yaml"
    path.write_text(
        "name: custom\nversion: 3\nentries:\n"
        "  - id: good\n    prompt: 'a <img:red.png> circle and a <img:blue.png> square'\n"
        "    objects: [{image: red.png, phrase: circle}, {image: blue.png, phrase: square}]\n"
        "    references: [red.png]\n"
        "  - id: missing_image\n    prompt: 'a <img:nowhere.png> circle'\n"
        "  - id: too_many_images\n    prompt: '" + " ".join(["<img:red.png>"] * 5) + " circles'\n"
        "  - id: plain_text\n    prompt: 'a red circle'\n"
        "  - id: faceless\n    prompt: 'a <img:red.png> woman'\n    faces: [red.png]\n"
    )
    return path


def test_evaluate_end_to_end_on_a_tiny_pipeline(tiny_pipeline_dir, eval_models, tracking_uri, tmp_path):
    from mlflow import MlflowClient

    portraits = next(p for p in builtin_suites() if p.stem == "portraits")
    uri = tracking_uri
    result = evaluate(
        tiny_pipeline_dir, [_custom_suite(tmp_path), portraits], models=eval_models, steps=2, guidance=6.0,
        seeds=(0, 1), out_dir=tmp_path / "out", tracking_uri=uri,
    )

    # Bad entries are reported by name; the rest of the suite is scored.
    errors = {e.entry: e.message for e in result.errors}
    face_error = {"faceless"} if eval_models.face is not None else set()
    assert set(errors) == {"missing_image", "too_many_images"} | face_error
    assert "nowhere.png" in errors["missing_image"] and "5 images, at most 4" in errors["too_many_images"]
    if face_error:  # a reference without a face costs the face metric, not the entry
        assert "faces[0] 'red.png'" in errors["faceless"]
    rows = result.rows
    assert len(rows) == 2 * (3 + 4)  # (good, plain_text, faceless) + 4 portraits, 2 seeds each
    assert set(rows[rows.suite == "custom"].entry) == {"good", "plain_text", "faceless"}

    good = rows[rows.entry == "good"]
    for name in ("clip_t", "clip_i", "dino", "pickscore", "mm_clip"):
        assert good[name].notna().all(), name
    assert (good.mm_objects == 2).all() and (good.mm_found <= 2).all()
    # The binding judge on GroundingDINO's boxes: each slot bound, leaked or missing.
    assert (good.n_slots == 2).all() and np.allclose(good.slot_bound + good.slot_leaked + good.slot_missing, 1.0)
    plain = rows[rows.entry == "plain_text"]
    assert plain.text_only.all() and plain.sdxl_clip_t.notna().all() and plain.clip_i.isna().all()
    assert plain.mm_clip.isna().all()  # no objects: the metric does not apply
    custom = result.suites["custom"]
    assert custom["errors"] == 2 + len(face_error) and custom["images"] == 6
    assert custom["mm_objects"] == 4  # good: 2 objects x 2 seeds; the other entries have none
    assert custom["clip_t_vs_sdxl"] == pytest.approx(custom["clip_t_text_only"] - custom["sdxl_clip_t"])
    if eval_models.face is not None:  # the tiny model draws no face: found 0, similarity 0
        assert result.suites["portraits"]["face_total"] == 8 and result.suites["portraits"]["face_sim"] == 0.0
    assert result.aggregate["errors"] == 2 + len(face_error) and result.aggregate["images"] == 14
    assert result.aggregate["clip_t"] == pytest.approx(np.mean([result.suites[s]["clip_t"] for s in result.suites]))

    # Files: every image, one grid per suite, rows and summary.
    out = tmp_path / "out"
    assert all((out / p).is_file() for p in rows.image)
    assert (out / "images_sdxl/custom/plain_text/seed1.png").is_file()
    with Image.open(out / "grids" / "custom.png") as grid:
        assert grid.width >= 5 * 128  # 2 inputs, gap, 2 outputs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == result.run_id and len(summary["errors"]) == len(result.errors)

    # MLflow: metrics per suite and aggregate, params, artifacts.
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.data.metrics["custom/clip_i"] == pytest.approx(custom["clip_i"])
    assert "aggregate/mm_clip" in run.data.metrics and run.data.metrics["aggregate/errors"] == len(result.errors)
    params = run.data.params
    assert params["steps"] == "2" and params["guidance"] == "6.0" and params["seeds"] == "0,1"
    assert params["suite.custom.version"] == "3" and params["suite.portraits.version"] == "1"
    assert params["pipeline"] == str(Path(tiny_pipeline_dir).resolve())
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "eval/grids")}
    assert artifacts == {"eval/grids/custom.png", "eval/grids/portraits.png"}
    assert run.info.status == "FINISHED"


def test_cli_run_and_compare(tiny_pipeline_dir, clip_dir, tracking_uri, tmp_path, capsys):
    from eval.cli import main

    suite = tmp_path / "suite.yaml"
    suite.write_text("name: small\nversion: 1\nentries: [{id: circle, prompt: 'a red circle'}]\n")
    uri = tracking_uri
    common = ["eval", "run", "--model", str(tiny_pipeline_dir), "--suite", str(suite), "--clip", str(clip_dir),
              "--face", "none", "--tracking-uri", uri, "--quiet"]
    assert main(common + ["--steps", "2", "--out", str(tmp_path / "a"), "--run-name", "a"]) == 0
    assert main(common + ["--steps", "3", "--out", str(tmp_path / "b"), "--run-name", "b"]) == 0
    capsys.readouterr()
    assert main(["eval", "compare", "a", "b", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert "aggregate/clip_t" in table and "small/clip_t" in table and "B - A" in table
    assert "warning: steps differs: A 2 / B 3" in table

    assert main(["eval", "run", "--model", str(tmp_path), "--suite", str(suite), "--no-mlflow",
                 "--out", str(tmp_path / "c")]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert main(["eval", "compare", "a", "nope", "--tracking-uri", uri]) == 2


def test_evaluate_a_loaded_pipeline_into_an_existing_mlflow_run(pipe, clip_dir, tracking_uri, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("training", artifact_location=(tmp_path / "artifacts").as_uri())
    training_run = client.create_run(experiment).info.run_id  # e.g. the run that trained the model
    client.log_param(training_run, "steps", "1000")
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: small\nversion: 1\nentries: [{id: circle, prompt: 'a red circle'}]\n")
    result = evaluate(pipe, [suite], models=EvalModels(clip=clip_dir, face=None), steps=1, out_dir=tmp_path / "out",
                      mlflow_run=training_run, tracking_uri=tracking_uri)
    run = client.get_run(training_run)
    assert result.run_id == training_run and run.info.status == "RUNNING"  # left to its owner to end
    assert run.data.params["steps"] == "1000" and run.data.params["eval.steps"] == "1"  # no collision
    assert run.data.metrics["small/clip_t"] == pytest.approx(result.suites["small"]["clip_t"])


# -- the toy world's colour probe -------------------------------------------------------

GREY = (128, 128, 128)


def disc(colour: str, size: int = 32, background=GREY) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse((8, 8, 24, 24), fill=PALETTE[colour])
    return image


def grey_noise(seed: int = 0, size: int = 32) -> Image.Image:
    # Low-saturation noise: pixels wander around grey, never into a palette colour in a 2x2 patch.
    rng = np.random.default_rng(seed)
    level = rng.integers(90, 170, (size, size, 1))
    return Image.fromarray(np.repeat(level, 3, axis=2).astype(np.uint8))


def colour_suite(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    disc("red").save(images / "red.png")
    disc("blue").save(images / "blue.png")
    path = root / "colours.yaml"
    path.write_text(
        "name: colours\nversion: 1\nworld: toy\nentries:\n"
        "  - id: one\n    prompt: 'a <img:red.png> circle, dotted style'\n"
        "    objects: [{image: red.png, phrase: circle, colour: red}]\n    references: [red.png]\n"
        "  - id: two\n    prompt: 'a <img:red.png> circle and a <img:blue.png> circle'\n"
        "    objects: [{image: red.png, phrase: circle, colour: red, shape: circle},"
        " {image: blue.png, phrase: circle, colour: blue, shape: circle}]\n"
        "  - id: words\n    prompt: 'a circle'\n"
    )
    return path


def test_colour_entries_parse_and_unknown_colours_are_entry_errors(tmp_path):
    path = colour_suite(tmp_path)
    with path.open("a") as handle:
        handle.write(
            "  - id: mauve\n    prompt: 'a <img:red.png> circle'\n"
            "    objects: [{image: red.png, phrase: circle, colour: mauve}]\n"
            "  - id: listed\n    prompt: 'a <img:red.png> circle'\n"
            "    objects: [{image: red.png, phrase: circle, colour: [red]}]\n"
            "  - id: blob\n    prompt: 'a <img:red.png> blob'\n"
            "    objects: [{image: red.png, phrase: blob, colour: red, shape: blob}]\n"
        )
    suite = load_suite(path)
    assert [e.id for e in suite.entries] == ["one", "two", "words"]
    assert [o.colour for o in suite.entries[1].objects] == ["red", "blue"]
    assert [e.entry for e in suite.errors] == ["mauve", "listed", "blob"]
    assert "unknown shape 'blob'" in str(suite.errors[2])
    assert "unknown colour 'mauve'" in str(suite.errors[0]) and str(suite.errors[0]).startswith("colours/mauve:")
    loaded = [load_entry(suite, e, max_images=4) for e in suite.entries]
    assert [e.world_objects for e in loaded] == [[("red", None)], [("red", "circle"), ("blue", "circle")], []]


def test_colours_need_a_registered_world(tmp_path):
    path = colour_suite(tmp_path)
    text = path.read_text()
    path.write_text(text.replace("world: toy\n", ""))
    suite = load_suite(path)
    assert [e.id for e in suite.entries] == ["words"]
    assert "names a colour, but the suite names no world" in str(suite.errors[0])
    path.write_text(text.replace("world: toy", "world: moon"))
    with pytest.raises(SuiteError, match="unknown world 'moon'; registered worlds: toy"):
        load_suite(path)


def test_colour_probe_on_drawn_images():
    assert colour_probe(disc("red"), ["red"]).match == 1.0
    assert colour_probe(disc("red"), ["red"]).found == "red"
    assert colour_probe(disc("red"), ["blue"]).match == 0.0
    noise = colour_probe(grey_noise(), ["red"])
    assert (noise.match, noise.found) == (0.0, "")

    # Several objects: the fraction of their colours that cover the image.
    both = disc("red", size=64)
    ImageDraw.Draw(both).rectangle((44, 44, 52, 52), fill=PALETTE["blue"])  # smaller than the disc
    assert colour_probe(both, ["red", "blue"]).match == 1.0
    assert colour_probe(both, ["red", "green"]).match == 0.5
    assert colour_probe(both, ["red", "blue"]).found == "red,blue"  # most patches first
    assert colour_probe(grey_noise(1), ["red", "blue"]).match == 0.0
    assert colour_chance() == pytest.approx(1 / 8)


def test_object_probe_matches_each_object_to_its_crop():
    from mumu_model.toy.world import ObjectSpec, Scene, render_scene

    scene = Scene((ObjectSpec("star", "red"), ObjectSpec("square", "blue"), ObjectSpec("cross", "yellow")), "plain")
    image, _ = render_scene(scene, np.random.default_rng(3))
    probe = object_probe(image, [("blue", "square"), ("red", "star"), ("yellow", "cross")])
    assert probe.all_right and probe.count_right and len(probe.detected) == 3
    assert set(objects_found(probe).split(",")) == {"red star", "blue square", "yellow cross"}
    # A colour that is not there: that object is wrong, the others still match their own.
    wrong = object_probe(image, [("green", "square"), ("red", "star")])
    assert [m.colour_right for m in wrong.objects] == [False, True] and wrong.objects[1].shape_right
    assert not wrong.all_colours and wrong.colour_accuracy == 0.5 and not wrong.count_right
    # Right colour, wrong shape.
    assert object_probe(image, [("red", "circle")]).all_colours
    assert not object_probe(image, [("red", "circle")]).objects[0].shape_right
    empty = object_probe(Image.new("RGB", (32, 32), (200, 200, 200)), [("red", "star")])
    assert (len(empty.detected), empty.all_colours, empty.shape_accuracy) == (0, False, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        object_probe(image, [])
    assert shape_chance() == pytest.approx(1 / 6)


def test_wilson_interval_and_headline():
    from scipy.stats import binomtest

    for hits, trials in ((86, 120), (3, 24), (60, 60)):
        reference = binomtest(hits, trials).proportion_ci(method="wilson")
        assert wilson_interval(hits, trials) == pytest.approx((reference.low, reference.high), abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0 and 0.0 < wilson_interval(0, 10)[1] < 0.31
    assert wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    one = {"colour_match": 0.85, "colour_match_ci_low": 0.78, "colour_match_ci_high": 0.9, "obj_shape": 0.6,
           "colour_match_text_only": 0.1, "n_objects": 1.0}
    assert TOY_WORLD.headline(one) == "colour 85.0% (78%-90%), shape 60.0%, text-only colour 10.0%"
    two = {"colour_match": 0.7, "all_colours": 0.5, "obj_colour": 0.65, "all_colours_text_only": 0.02, "n_objects": 2.0}
    assert TOY_WORLD.headline(two) == "all colours 50.0%, per object 65.0%, text-only all colours 2.0%"
    assert TOY_WORLD.headline({"clip_t": 0.3}) == ""


# -- the text-only ablation, end to end ----------------------------------------------------


def test_evaluate_with_text_only_ablation(tiny_pipeline_dir, clip_dir, tracking_uri, tmp_path):
    from mlflow import MlflowClient

    uri = tracking_uri
    result = evaluate(
        tiny_pipeline_dir, [colour_suite(tmp_path / "suite")], models=EvalModels(clip=clip_dir, face=None),
        steps=1, seeds=(0, 1), out_dir=tmp_path / "out", tracking_uri=uri, text_only_ablation=True,
    )
    assert not result.errors
    rows = result.rows
    # one and two have images: 2 seeds x (multimodal + ablation); words is text-only: no ablation.
    counts = rows.groupby(["entry", "variant"]).size().to_dict()
    assert counts == {("one", "multimodal"): 2, ("one", "text_only"): 2, ("two", "multimodal"): 2,
                      ("two", "text_only"): 2, ("words", "multimodal"): 2}
    ablation = rows[rows.variant == "text_only"]
    assert set(ablation.prompt) == {"a circle, dotted style", "a circle and a circle"}  # what MUMU was given
    coloured = rows[rows.entry != "words"]
    assert coloured.colour_match.between(0, 1).all() and rows[rows.entry == "words"].colour_match.isna().all()
    assert coloured.clip_i[coloured.entry == "one"].notna().all()  # the ablation is scored like the rest
    assert all((tmp_path / "out" / p).is_file() for p in rows.image)
    assert (tmp_path / "out" / "images_text_only/colours/one/seed1.png").is_file()
    # The object probe scores the entry whose objects name colour and shape, and only it.
    probed = rows[rows.entry == "two"]
    assert probed.obj_colour.between(0, 1).all() and probed.count_match.isin([0.0, 1.0]).all()
    assert rows[rows.entry != "two"].obj_shape.isna().all() and (probed.n_objects == 2).all()

    metrics = result.suites["colours"]
    assert 0.0 <= metrics["colour_match"] <= 1.0 and 0.0 <= metrics["colour_match_text_only"] <= 1.0
    assert -1.0 <= metrics["clip_i_text_only"] <= 1.0  # a cosine
    assert metrics["colour_chance"] == pytest.approx(1 / 8)
    assert (metrics["images"], metrics["images_text_only"]) == (6, 4)
    # Binomial intervals around the rates; colour_match counts objects (1 + 2 per seed).
    multimodal = coloured[coloured.variant == "multimodal"]
    hits = float((multimodal.colour_match * multimodal.n_objects).sum())
    assert (metrics["colour_match_ci_low"], metrics["colour_match_ci_high"]) == pytest.approx(wilson_interval(hits, 6))
    assert metrics["all_colours_ci_low"] <= metrics["all_colours"] <= metrics["all_colours_ci_high"]
    assert metrics["shape_chance"] == pytest.approx(1 / 6)
    assert not any("_ci_" in name for name in result.aggregate)  # intervals are per suite
    assert "clip_t_text_only" not in metrics  # that name is text adherence's (with SDXL), not the ablation's
    expected = coloured[coloured.variant == "text_only"].colour_match.mean()
    assert metrics["colour_match_text_only"] == pytest.approx(expected)
    assert result.aggregate["colour_match_text_only"] == metrics["colour_match_text_only"]
    assert result.aggregate["images_text_only"] == 4 and result.aggregate["images"] == 6

    # Files: the string column survives rows.csv; the grid has the ablation beside the outputs.
    table = pd.read_csv(tmp_path / "out" / "rows.csv", keep_default_na=False)
    assert all(set(found.split(",")) <= set(PALETTE) for found in table.colour_found if found)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["suites"]["colours"]["colour_chance"] == pytest.approx(1 / 8)
    with Image.open(tmp_path / "out" / "grids" / "colours.png") as grid:
        assert grid.width == (2 + 1 + 2 + 1 + 2) * 128  # inputs, gap, outputs, gap, ablation
    with Image.open(tmp_path / "out" / "samples.png") as samples:  # the first 2 entries, small
        assert samples.size == ((2 + 1 + 2 + 1 + 2) * 64, 2 * (64 + 14))

    run = MlflowClient(tracking_uri=uri).get_run(result.run_id)
    for name in ("colours/colour_match", "colours/colour_match_text_only", "colours/colour_chance",
                 "aggregate/colour_match_text_only"):
        assert run.data.metrics[name] == pytest.approx(result.metrics()[name]), name
    assert run.data.params["text_only_ablation"] == "True"


def test_batched_generation_gives_the_same_images_and_pins_a_failure_on_its_entry(pipe, tmp_path, monkeypatch):
    from mumu_model import MUMUPipeline

    suite = colour_suite(tmp_path / "suite")
    common = dict(models=EvalModels(face=None), steps=2, seeds=(0, 1), mlflow_run=False, text_only_ablation=True)
    alone = evaluate(pipe, [suite], out_dir=tmp_path / "alone", **common)
    batched = evaluate(pipe, [suite], out_dir=tmp_path / "batched", batch_size=3, **common)
    assert list(batched.rows.image) == list(alone.rows.image) and len(alone.rows) == 10
    for relative in alone.rows.image:  # each image has its own generator: batching changes nothing
        with Image.open(tmp_path / "alone" / relative) as a, Image.open(tmp_path / "batched" / relative) as b:
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1, relative

    # A prompt that cannot be generated fails its batch; the batch is redone prompt by prompt,
    # so only that entry is lost (its ablation is in another batch, and dropped with it).
    generate = MUMUPipeline.__call__

    def fails_on_dotted(self, prompt, *args, **kwargs):
        if any("dotted" in p if isinstance(p, str) else "dotted" in p.to_text() for p in prompt):
            raise RuntimeError("out of memory, say")
        return generate(self, prompt, *args, **kwargs)

    monkeypatch.setattr(MUMUPipeline, "__call__", fails_on_dotted)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        evaluate(pipe, [suite], out_dir=tmp_path / "zero", batch_size=0, **common)
    result = evaluate(pipe, [suite], out_dir=tmp_path / "failing", batch_size=3, **common)
    assert [(e.entry, e.message) for e in result.errors] == [
        ("one", "generation failed: RuntimeError: out of memory, say")
    ]
    assert sorted(set(result.rows.entry)) == ["two", "words"] and len(result.rows) == 6
