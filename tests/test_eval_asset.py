"""The evaluation asset materialized in-process on a tiny pipeline with tiny metric models."""

from pathlib import Path

import dagster as dg

from mumu_assets.eval_assets import EvalModelsResource, evaluation
from mumu_assets.resources import DatasetStorage
from mumu_model.data.tiny_models import tiny_clip, tiny_dino, tiny_grounding_dino
from mumu_model.testing import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


def test_evaluation_asset_reports_summary_and_grid(tmp_path):
    pipeline = tiny_pipeline(tmp_path / "pipeline")
    models = EvalModelsResource(
        clip=str(tiny_clip(tmp_path / "clip")), dino=str(tiny_dino(tmp_path / "dino")),
        detector=str(tiny_grounding_dino(tmp_path / "gdino", ["dog", "cat", "man", "woman"])), face=None,
    )
    config = {"pipeline": str(pipeline), "suites": [str(REPO / "eval" / "suites" / "single_subject.yaml")],
              "steps": 2, "seeds": [0], "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
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
