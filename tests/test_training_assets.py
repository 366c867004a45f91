"""stage1_model / stage2_model: the trainer launched by Dagster (torchrun through Pipes)."""

import sys
from pathlib import Path

import dagster as dg

from mumu_assets.resources import DatasetStorage
from mumu_assets.training_assets import TrainingCluster, stage1_model, stage2_model
from mumu_model.data.shards import write_shard
from mumu_model.data.versioning import dvc_hash

from .test_training import records

REPO = Path(__file__).resolve().parents[1]


def test_cluster_command_is_torchrun():
    one_node = TrainingCluster(nproc_per_node=8).command("c.yaml", ["max_steps=3"])
    assert one_node == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone",
        "-m", "mumu_model.training", "c.yaml", "--set", "max_steps=3",
    ]
    two_nodes = TrainingCluster(nnodes=2, nproc_per_node=8, rdzv_endpoint="10.0.0.1:29500").command("c.yaml", [])
    assert "--nnodes=2" in two_nodes and "--rdzv_endpoint=10.0.0.1:29500" in two_nodes
    assert "--standalone" not in two_nodes


def test_stage_assets_train_and_report_through_pipes(tmp_path):
    data = tmp_path / "data"
    for stage in (1, 2):
        write_shard(data / "captions" / f"stage{stage}" / "00000.tar", records(4))
    common = [
        "max_steps=2", "checkpoint_every=2", "validate_every=0", "batch_size=2", "log_every=1",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"validation_image_root={REPO / 'examples' / 'images'}",
    ]
    run_config = {"ops": {
        name: {"config": {"config_file": str(REPO / "configs" / "train_tiny.yaml"), "overrides": common,
                          "output_root": str(tmp_path / "runs")}}
        for name in ("stage1_model", "stage2_model")
    }}
    resources = {
        "storage": DatasetStorage(root=str(data)),
        "training_cluster": TrainingCluster(nproc_per_node=1),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    result = dg.materialize([stage1_model, stage2_model], resources=resources, run_config=run_config)
    assert result.success
    events = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    for stage in (1, 2):
        metadata = {k: v.value for k, v in events[f"stage{stage}_model"].items()}
        assert (tmp_path / "runs" / f"stage{stage}" / "pipeline" / "model_index.json").is_file()
        assert any("loss" in key for key in metadata), metadata
    # Stage 2 started from stage 1's pipeline; the data version is tagged on the MLflow run.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2
    tags = [run.data.tags for run in runs]
    assert {t.get("data_dvc_hash") for t in tags} >= {dvc_hash(data / "captions" / "stage1")}
    assert all(t.get("dagster_run_id") == result.run_id for t in tags)
    first = {k: v.value for k, v in events["stage1_model"].items()}
    assert first["new_run"] is True and first["data_version"] == dvc_hash(data / "captions" / "stage1")

    # The same data again: the same run, nothing new to train, and the metadata says so.
    again = dg.materialize([stage1_model], resources=resources, run_config={"ops": {"stage1_model": run_config["ops"]["stage1_model"]}})
    [event] = again.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["new_run"] is False and metadata["run_id"] == first["run_id"]

    # New captions (another DVC hash): a new run from step 0 with its own MLflow run; the old run stays.
    write_shard(data / "captions" / "stage1" / "00000.tar", list(records(5))[1:])
    renewed = dg.materialize([stage1_model], resources=resources, run_config={"ops": {"stage1_model": run_config["ops"]["stage1_model"]}})
    [event] = renewed.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["new_run"] is True and metadata["run_id"] != first["run_id"] and metadata["steps"] == 2
    assert metadata["previous_run"].endswith(first["run_id"])
    assert metadata["mlflow_run_id"] != first["mlflow_run_id"]
    assert (tmp_path / "runs" / "stage1" / "runs" / first["run_id"] / "pipeline" / "model_index.json").is_file()


def test_missing_shards_fail_clearly(tmp_path):
    resources = {
        "storage": DatasetStorage(root=str(tmp_path / "data")),
        "training_cluster": TrainingCluster(nproc_per_node=1),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
    result = dg.materialize([stage1_model], resources=resources, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "materialize multimodal_captions_stage1 first" in str(failure.event_specific_data.error.message)
