"""One MLflow store for training and evaluation, the pyfunc MUMU model in the registry, aliases.

Everything runs against a sqlite store in a temporary folder with artifacts beside it; nothing
reaches a network (telemetry off, no model hub, pip requirements given rather than inferred).
"""

import json
import math
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from PIL import Image

from eval.compare import fetch_run, main_metric
from eval.run import EvalModels, evaluate
from mumu_assets.eval_assets import EvaluationConfig, EvalModelsResource, champion_decision, evaluation
from mumu_assets.resources import DatasetStorage
from mumu_model import registry
from mumu_model.toy.metrics import TOY_WORLD
from mumu_model.training.checkpoint import FORMAT, STATE_FILE
from mumu_model.training.config import TrainConfig
from mumu_model.tracking import (
    TRAINED_BY_TAG,
    default_tracking_uri,
    project_tracking_uri,
    training_mlflow_run,
)


@pytest.fixture(autouse=True)
def offline_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # One database for the module: MLflow spends seconds creating (migrating) a new one.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _training_run_folder(root: Path, pipeline: Path, mlflow_run: str, in_run_file: bool = False) -> Path:
    """What a trainer leaves: output_dir/runs/<id>/{pipeline, run.json, checkpoints/step-N/state.json}
    and output_dir/pipeline linking to the run's export. Returns output_dir/pipeline."""
    run_dir = root / "runs" / "abc123"
    shutil.copytree(pipeline, run_dir / "pipeline")
    record = {"run_id": "abc123", "identity": {}, **({"mlflow_run_id": mlflow_run} if in_run_file else {})}
    (run_dir / "run.json").write_text(json.dumps(record))
    for step, run in ((2, "older-run"), (4, mlflow_run)):
        checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / STATE_FILE).write_text(json.dumps({"format": FORMAT, "mlflow_run_id": run}))
    (root / "pipeline").symlink_to("runs/abc123/pipeline")
    return root / "pipeline"


def _colour_suite(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), (220, 30, 30)).save(tmp_path / "images" / "red.png")
    suite = tmp_path / "colours.yaml"
    suite.write_text("name: colours\nversion: 1\nworld: toy\nimage_root: images\nentries:\n  - id: one\n"
                     "    prompt: 'a <img:red.png> circle'\n    objects: [{image: red.png, phrase: circle, colour: red}]\n")
    return suite


# -- one store -------------------------------------------------------------------------------------


def test_training_and_evaluation_default_to_one_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project_store = f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    assert project_tracking_uri() == project_store  # evaluation's default: runs/mlflow.db, made absolute
    for stage in (1, 2):  # training's default: beside its output folder, runs/stageN
        assert default_tracking_uri(TrainConfig(output_dir=f"runs/stage{stage}")) == project_store
    assert project_tracking_uri("sqlite:///elsewhere.db").endswith(str(tmp_path.resolve() / "elsewhere.db"))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")  # one variable moves both
    assert project_tracking_uri(default="sqlite:///runs/mlflow.db") == "http://tracking:5000"
    assert default_tracking_uri(TrainConfig(output_dir="runs/stage1")) == "http://tracking:5000"
    assert project_tracking_uri("sqlite:////abs/explicit.db") == "sqlite:////abs/explicit.db"  # explicit wins


def test_the_paper_profile_evaluates_into_the_training_store():
    import yaml

    repo = Path(__file__).resolve().parents[1]
    for name in ("params.yaml", "params.paper.yaml"):
        evaluation_params = yaml.safe_load((repo / name).read_text())["evaluation"]
        assert evaluation_params["tracking_uri"] == "sqlite:///runs/mlflow.db", name


def test_training_mlflow_run_is_read_from_the_run_folder(tiny_pipeline_dir, tmp_path):
    linked = _training_run_folder(tmp_path / "a", tiny_pipeline_dir, "mlflow-run-1")
    assert training_mlflow_run(linked) == "mlflow-run-1"  # the newest checkpoint's, through the link
    recorded = _training_run_folder(tmp_path / "b", tiny_pipeline_dir, "mlflow-run-2", in_run_file=True)
    assert training_mlflow_run(recorded) == "mlflow-run-2"
    assert training_mlflow_run(tiny_pipeline_dir) is None  # not exported by a training run


# -- registry ---------------------------------------------------------------------------------------


def test_register_alias_load_and_generate(tiny_pipeline_dir, store, monkeypatch):
    import mlflow

    name = "mumu-test"
    before = mlflow.is_tracking_uri_set()
    first = registry.register_pipeline(tiny_pipeline_dir, name, store)
    second = registry.register_pipeline(tiny_pipeline_dir, name, store, model_config={"steps": 2})
    assert (first, second) == ("1", "2")
    assert mlflow.is_tracking_uri_set() == before  # log_model's process-wide setting was restored

    registry.set_alias(name, registry.CHAMPION, first, store)
    assert registry.alias_version(name, registry.CHAMPION, store).version in (1, "1")
    registry.set_alias(name, registry.CHAMPION, second, store)  # moved
    champion = registry.alias_version(name, registry.CHAMPION, store)
    assert str(champion.version) == "2" and champion.run_id
    assert champion.tags["mumu.pipeline"] == str(Path(tiny_pipeline_dir).resolve())
    assert registry.alias_version(name, "nobody", store) is None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{registry.CHAMPION}")
    crop = registry.encode_png(Image.new("RGB", (20, 12), (200, 20, 20)))
    rows = pd.DataFrame([{"prompt": "a <img:crop.png> circle", "images": {"crop.png": crop},
                          "seed": 3, "height": 32, "width": 48}])
    out = model.predict(rows)
    assert list(out.columns) == ["image"] and len(out) == 1
    assert registry.decode_image(out["image"][0]).size == (48, 32)
    again = model.predict(rows)  # a row's seed makes it reproducible
    assert again["image"][0] == out["image"][0]


def test_predict_rejects_bad_rows_by_row_and_field(tiny_pipeline_dir):
    from types import SimpleNamespace

    model = registry.MUMUPyfuncModel()
    model.load_context(SimpleNamespace(artifacts={registry.PIPELINE_ARTIFACT: str(tiny_pipeline_dir)},
                                       model_config={"device": "cpu", "steps": 1}))
    crop = registry.encode_png(Image.new("RGB", (8, 8), (0, 0, 200)))
    text_only = model.predict(None, pd.DataFrame({"prompt": ["a circle"]}))  # no images column at all
    assert registry.decode_image(text_only["image"][0]).size == (model.pipe.default_sample_size,) * 2
    cases = [
        ({"prompt": "a <img:crop.png> circle", "images": {"other.png": crop}}, "row 1: prompt:"),
        ({"prompt": "a <img:crop.png> circle", "images": {"crop.png": "not base64!"}}, "row 1: images['crop.png']: not base64"),
        ({"prompt": "a <img:crop.png> circle", "images": {"crop.png": "aGVsbG8="}}, "not a PNG or JPEG"),
        ({"prompt": "a <bad> circle"}, "row 1: prompt: position 2: unknown tag"),
        ({"prompt": "a circle", "seed": 1.5}, "row 1: seed: expected an integer"),
    ]
    for row, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
            model.predict(None, pd.DataFrame([{"prompt": "fine"}, row]))
    with pytest.raises(ValueError, match="'prompt' column"):
        model.predict(None, pd.DataFrame({"text": ["a circle"]}))


def test_beats_decides_on_strict_improvement():
    assert registry.beats(0.7, 0.6) and registry.beats(0.1, None) and registry.beats(0.1, math.nan)
    assert not registry.beats(0.6, 0.6) and not registry.beats(0.5, 0.6)
    assert not registry.beats(None, 0.1) and not registry.beats(math.nan, None)


def test_promote_if_better_moves_the_alias_only_on_improvement(tiny_pipeline_dir, store, tmp_path):
    client = _client(store)
    name, metric = "mumu-promote", "aggregate/colour_match"
    experiment = client.create_experiment("promote-evals", artifact_location=(tmp_path / "artifacts").as_uri())
    versions = {}
    for score in (0.5, 0.4, 0.6):  # one evaluation run per candidate, the model logged into it
        run = client.create_run(experiment).info.run_id
        client.log_metric(run, metric, score)
        versions[score] = registry.register_pipeline(tiny_pipeline_dir, name, store, run_id=run)
        assert client.get_model_version(name, versions[score]).run_id == run

    def holder():
        return str(registry.alias_version(name, registry.CHAMPION, store).version)

    assert registry.promote_if_better(name, versions[0.5], metric, 0.5, store)  # no champion yet
    assert not registry.promote_if_better(name, versions[0.4], metric, 0.4, store) and holder() == versions[0.5]
    assert not registry.promote_if_better(name, versions[0.4], metric, None, store) and holder() == versions[0.5]
    assert registry.promote_if_better(name, versions[0.6], metric, 0.6, store) and holder() == versions[0.6]


def test_champion_decision_uses_the_suites_main_metric():
    aggregate = {"colour_match": 0.7, "colour_match_text_only": 0.1, "clip_t": 0.2, "images": 120.0}
    toy = (TOY_WORLD.main_metric,)  # the suites' world ranks by its own metric first
    assert main_metric(aggregate, toy) == "colour_match" and main_metric(aggregate) == "clip_t"
    assert main_metric({"clip_t": 0.2, "mm_clip": 0.3}) == "mm_clip" and main_metric({"images": 1.0}) is None
    config = EvaluationConfig()
    assert champion_decision(config, aggregate, errors=0, preferred=toy) == ("aggregate/colour_match", 0.7)
    assert champion_decision(config, aggregate, errors=2, preferred=toy) == ("aggregate/colour_match", None)
    assert champion_decision(EvaluationConfig(champion_metric="clip_t"), aggregate, 0) == ("aggregate/clip_t", 0.2)
    assert champion_decision(config, {"images": 1.0}, 0) == (None, None)


# -- evaluation runs, compare ----------------------------------------------------------------------


def test_evaluation_names_its_training_run_and_compare_resolves_aliases(tiny_pipeline_dir, store, tmp_path,
                                                                         capsys):
    from eval.cli import main

    pipeline = _training_run_folder(tmp_path / "stage2", tiny_pipeline_dir, "training-run-id")
    result = evaluate(pipeline, [_colour_suite(tmp_path)], models=EvalModels(face=None), steps=1,
                      out_dir=tmp_path / "out", tracking_uri=store)
    client = _client(store)
    assert client.get_run(result.run_id).data.tags[TRAINED_BY_TAG] == "training-run-id"

    name = "mumu-compare"
    version = registry.register_pipeline(pipeline, name, store, run_id=result.run_id)
    assert client.get_model_version(name, version).tags[TRAINED_BY_TAG] == "training-run-id"
    registry.set_alias(name, registry.CHAMPION, version, store)
    for reference in (f"models:/{name}@champion", f"{name}@champion"):
        found = fetch_run(client, reference)
        assert found.run_id == result.run_id and "aggregate/colour_match" in found.metrics
    with pytest.raises(ValueError, match="no registered model 'mumu-compare' with alias 'nobody'"):
        fetch_run(client, f"{name}@nobody")

    capsys.readouterr()
    assert main(["eval", "compare", f"models:/{name}@champion", result.run_id, "--tracking-uri", store]) == 0
    assert "aggregate/colour_match" in capsys.readouterr().out
    assert main(["eval", "compare", f"{name}@nobody", result.run_id, "--tracking-uri", store]) == 2


def test_evaluation_asset_registers_and_crowns_the_first_model(tiny_pipeline_dir, store, tmp_path):
    config = {"pipeline": str(tiny_pipeline_dir), "suites": [str(_colour_suite(tmp_path))], "steps": 1,
              "seeds": [0], "tracking_uri": store, "text_only_ablation": False,
              "register_model": True, "model_name": "mumu-asset"}
    result = dg.materialize(
        [evaluation],
        resources={"storage": DatasetStorage(root=str(tmp_path / "data")), "eval_models": EvalModelsResource(face=None)},
        run_config={"ops": {"evaluation": {"config": config}}},
    )
    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["model_name"] == "mumu-asset" and metadata["champion_metric"] == "aggregate/colour_match"
    assert metadata["champion"] is True  # nothing to beat yet
    champion = registry.alias_version("mumu-asset", registry.CHAMPION, store)
    assert str(champion.version) == metadata["model_version"] and champion.run_id == metadata["mlflow_run_id"]
