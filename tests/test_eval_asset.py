"""The evaluation asset materialized in-process on a tiny pipeline with tiny metric models."""

import importlib
from pathlib import Path

import dagster as dg
import pytest
import yaml
from PIL import Image

from mumu_assets import eval_assets
from mumu_assets.eval_assets import EvalModelsResource, evaluation
from mumu_assets.resources import DatasetStorage
from mumu_model.testing import tiny_clip, tiny_dino, tiny_grounding_dino
from mumu_model.testing import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    # One database for the module: MLflow spends seconds creating (migrating) a new one.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_evaluation_asset_reports_summary_and_grid(tmp_path, tracking_uri):
    pipeline = tiny_pipeline(tmp_path / "pipeline")
    models = EvalModelsResource(
        clip=str(tiny_clip(tmp_path / "clip")), dino=str(tiny_dino(tmp_path / "dino")),
        detector=str(tiny_grounding_dino(tmp_path / "gdino", ["dog", "cat", "man", "woman"])), face=None,
    )
    config = {"pipeline": str(pipeline), "suites": [str(REPO / "eval" / "suites" / "single_subject.yaml")],
              "steps": 2, "seeds": [0], "tracking_uri": tracking_uri}
    result = dg.materialize(
        [evaluation],
        resources={"storage": DatasetStorage(root=str(tmp_path / "data")), "eval_models": models},
        run_config={"ops": {"evaluation": {"config": config}}},
        selection=[evaluation],
    )
    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert "aggregate" in metadata["summary"] and "clip_i" in metadata["summary"]
    assert metadata["errors"] == 0
    assert Path(metadata["grid"]).is_file()
    assert metadata["mlflow_run_id"]
    assert 0.0 <= metadata["aggregate/clip_t"] + 1.0 <= 2.0  # a cosine


def _reload_with_params(monkeypatch, path: Path, values: dict):
    # EvaluationConfig reads params.yaml when the module is imported, as Dagster needs defaults.
    path.write_text(yaml.safe_dump(values))
    monkeypatch.setenv("MUMU_PARAMS", str(path))
    return importlib.reload(eval_assets)


def test_evaluation_defaults_come_from_params_and_probe_figures_surface(tiny_pipeline_dir, tmp_path, tracking_uri,
                                                                         monkeypatch):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16), (220, 30, 30)).save(tmp_path / "images" / "red.png")
    suite = tmp_path / "colours.yaml"
    suite.write_text("name: colours\nversion: 1\nworld: toy\nentries:\n  - id: one\n    prompt: 'a <img:red.png> circle'\n"
                     "    objects: [{image: red.png, phrase: circle, colour: red}]\n")
    try:
        # No `evaluation` group: the paper's protocol.
        module = _reload_with_params(monkeypatch, tmp_path / "none.yaml", {"data": {}})
        config = module.EvaluationConfig()
        assert (config.steps, config.guidance, config.seeds, config.text_only_ablation) == (50, 6.0, [0, 1], False)
        assert config.suites == module.BUILTIN_SUITES and config.pipeline == "runs/stage2/pipeline"

        # A profile's group (the toy world's shape, fewer steps): the defaults, ablation on.
        evaluation_params = {"pipeline": str(tiny_pipeline_dir), "suites": [str(suite)], "steps": 1, "guidance": 4.0,
                             "seeds": [0], "resolution": None, "text_only_ablation": True,
                             # one met, one not, one the evaluation has no figure for
                             "targets": {"colours/colour_match": ">= 0", "colours/colour_match_text_only": "<= -1",
                                         "colours/no_such_metric": ">= 0.5"}}
        module = _reload_with_params(monkeypatch, tmp_path / "toy.yaml", {"evaluation": evaluation_params})
        config = module.EvaluationConfig()
        assert (config.steps, config.guidance, config.suites, config.text_only_ablation) == (1, 4.0, [str(suite)], True)
        result = dg.materialize(
            [module.evaluation],
            resources={"storage": DatasetStorage(root=str(tmp_path / "data")),
                       "eval_models": module.EvalModelsResource(face=None)},
            run_config={"ops": {"evaluation": {"config": {"tracking_uri": tracking_uri}}}},
        )
    finally:
        monkeypatch.undo()
        importlib.reload(eval_assets)
    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    for name in ("colour_match", "colour_match_text_only", "colour_match_ci_low", "colour_match_ci_high"):
        assert isinstance(metadata[f"colours/{name}"], float) and 0.0 <= metadata[f"colours/{name}"] <= 1.0, name
    assert metadata["aggregate/colour_chance"] == pytest.approx(1 / 8)
    assert metadata["headline"].startswith("colours: colour ") and "text-only colour" in metadata["headline"]
    assert "colour_match_text_only" in metadata["summary"]
    assert Path(metadata["samples"]).is_file()  # the first entries of every suite, small
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "meets_targets" and not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    checked = {k: v.value for k, v in check.metadata.items()}
    assert (checked["met"], checked["targets"]) == (1, 3)
    assert "colours/colour_match_text_only" in checked["figures"] and "(target <= -1): not met" in checked["figures"]
    assert "colours/no_such_metric missing (target >= 0.5): not met" in checked["figures"]
    import mlflow

    run = mlflow.MlflowClient(tracking_uri).get_run(metadata["mlflow_run_id"])
    assert run.data.metrics["target/colours/colour_match"] == 1.0
    assert run.data.metrics["target/colours/colour_match_text_only"] == 0.0
    assert run.data.tags["targets_met"] == "1/3"


def test_a_malformed_target_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("eval.run.evaluate", lambda *a, **k: pytest.fail("evaluate ran with a malformed target"))
    result = _materialize_with({"pipeline": str(tmp_path / "p"), "device": "cpu", "targets": {"one/colour": "> 0.9"}},
                               tmp_path)
    assert not result.success
    assert "evaluation config: target 'one/colour': '> 0.9': write it as" in _failure_message(result)


class _Stop(Exception):
    """Raised by a stand-in for `evaluate` once it has seen its arguments."""


def _materialize_with(config: dict, tmp_path):
    return dg.materialize(
        [evaluation],
        resources={"storage": DatasetStorage(root=str(tmp_path / "data")),
                   "eval_models": EvalModelsResource(face=None)},
        run_config={"ops": {"evaluation": {"config": config}}},
        raise_on_error=False,
    )


def _failure_message(result) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = failure.step_failure_data
    messages = [data.user_failure_data.description] if data.user_failure_data else []
    error = data.error
    while error is not None:  # the op's exception is the cause of Dagster's wrapper
        messages.append(error.message)
        error = error.cause
    return " | ".join(m for m in messages if m)


def test_evaluation_device_and_dtype_reach_evaluate(tmp_path, monkeypatch):
    import torch

    seen = {}

    def stand_in(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr("eval.run.evaluate", stand_in)
    assert eval_assets.EvaluationConfig().device is None and eval_assets.EvaluationConfig().dtype is None
    result = _materialize_with({"pipeline": str(tmp_path / "p"), "device": "cpu", "dtype": "bf16"}, tmp_path)
    assert not result.success and "_Stop" in _failure_message(result)
    assert (seen["device"], seen["dtype"]) == ("cpu", torch.bfloat16)


@pytest.mark.parametrize(
    "device, dtype, message",
    [("cpu", "float16", "dtype float16 on device 'cpu'"), ("gpu", None, "device 'gpu': not a device"),
     ("cpu", "int4", "dtype 'int4': unknown")],
)
def test_evaluation_refuses_bad_device_or_dtype_before_loading(tmp_path, monkeypatch, device, dtype, message):
    monkeypatch.setattr("eval.run.evaluate", lambda *a, **k: pytest.fail("evaluate ran with a bad device or dtype"))
    result = _materialize_with({"pipeline": str(tmp_path / "p"), "device": device, "dtype": dtype}, tmp_path)
    assert not result.success
    assert f"evaluation config: {message}" in _failure_message(result)
