"""stage1_model / stage2_model: the trainer launched by Dagster (torchrun through Pipes)."""

import shutil
import sys
import time
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
    two_nodes = TrainingCluster(nnodes=2, nproc_per_node=8, rdzv_endpoint="head-node:29500").command("c.yaml", [])
    assert "--nnodes=2" in two_nodes and "--rdzv_endpoint=head-node:29500" in two_nodes
    assert "--standalone" not in two_nodes
    assert "--rdzv_conf=join_timeout=900,read_timeout=900" in two_nodes


def test_stage_assets_train_and_report_through_pipes(tmp_path):
    data = tmp_path / "data"
    for stage in (1, 2):
        write_shard(data / "captions" / f"stage{stage}" / "00000.tar", records(4))
    common = [
        "max_steps=2", "checkpoint_every=2", "validate_every=0", "batch_size=2", "log_every=1",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"validation_image_root={REPO / 'examples' / 'images'}",
    ]
    # Each stage its own captions (the profile's params may mix them), then stage 2 with both.
    run_config = {"ops": {
        name: {"config": {"config_file": str(REPO / "configs" / "train_tiny.yaml"), "overrides": common,
                          "output_root": str(tmp_path / "runs"), "captions": [stage]}}
        for stage, name in ((1, "stage1_model"), (2, "stage2_model"))
    }}
    # Stage 2 mixes stage 1's records into its own.
    run_config["ops"]["stage2_model"]["config"].update(captions=[2, 1], overrides=[*common, "shard_weights=[3.0,1.0]"])
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
    assert first["run_message"].startswith(f"new run {first['run_id']}") and first["data_version_s"] >= 0
    second = {k: v.value for k, v in events["stage2_model"].items()}
    assert second["data_version"] == f"{dvc_hash(data / 'captions' / 'stage2')}+{first['data_version']}"

    # The same data again, one step longer: the same run goes on, and the metadata says so.
    longer = {"config": {**run_config["ops"]["stage1_model"]["config"], "overrides": [*common, "max_steps=3"]}}
    again = dg.materialize([stage1_model], resources=resources, run_config={"ops": {"stage1_model": longer}})
    [event] = again.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["new_run"] is False and metadata["run_id"] == first["run_id"] and metadata["steps"] == 3
    assert metadata["run_message"].startswith(f"resumed run {first['run_id']}")
    assert "changed without starting a new run: max_steps 2 -> 3" in metadata["run_message"]

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


def _stage1(tmp_path, cluster: TrainingCluster, steps: int = 2, env: dict | None = None):
    """stage1_model alone on 4 records with the tiny config: (result, run config's output root)."""
    data = tmp_path / "data"
    write_shard(data / "captions" / "stage1" / "00000.tar", records(4))
    overrides = [
        f"max_steps={steps}", f"checkpoint_every={steps}", "validate_every=0", "batch_size=2", "log_every=1",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    run_config = {"ops": {"stage1_model": {"config": {
        "config_file": str(REPO / "configs" / "train_tiny.yaml"), "overrides": overrides,
        "output_root": str(tmp_path / "runs"), "captions": [1]}}}}
    resources = {"storage": DatasetStorage(root=str(data)), "training_cluster": cluster,
                 "pipes_subprocess_client": dg.PipesSubprocessClient(env=env)}
    return dg.materialize([stage1_model], resources=resources, run_config=run_config, raise_on_error=False)


# The trainer, preempted (SIGTERM to itself) before step 3 of its first launch only.
PREEMPT_FIRST_LAUNCH = """
import os, signal, sys
from pathlib import Path
from mumu_model.cli import main
from mumu_model.training.trainer import Trainer

original, flag = Trainer.train_step, Path(os.environ["PREEMPTED_ONCE"])


def train_step(self, batches):
    if self.step + 1 == 3 and not flag.exists():
        flag.touch()
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, batches)


Trainer.train_step = train_step
if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
"""


class DriverCluster(TrainingCluster):
    """The local cluster, running a driver script in place of `-m mumu_model.training`."""

    driver: str

    def program(self, config_file: str, overrides: list[str]) -> list[str]:
        return [self.driver, *super().program(config_file, overrides)[2:]]


def test_a_preempted_launch_is_made_again_and_resumes(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(PREEMPT_FIRST_LAUNCH)
    env = {"PREEMPTED_ONCE": str(tmp_path / "preempted-once"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = _stage1(tmp_path, DriverCluster(nproc_per_node=1, driver=str(driver), max_requeues=1), steps=4, env=env)
    assert result.success, _failure(result)
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    # Stopped after step 3 with its checkpoint, launched again, resumed there: one run, 4 steps.
    [preemption] = metadata["preemptions"]
    assert preemption["step"] == 3 and preemption["checkpoint"].endswith("step-00000003")
    assert metadata["steps"] == 4 and metadata["new_run"] is False and metadata["run_id"] == preemption["run_id"]
    assert not (tmp_path / "runs" / "stage1" / "preempted.json").exists()
    pipes = tmp_path / "runs" / "pipes" / result.run_id
    assert "mumu: preempted: SIGTERM: stopped after step 3" in (pipes / "stage1" / "logs" / "node0.log").read_text()
    assert (pipes / "stage1.relaunch1" / "logs" / "node0.log").is_file()

    # Preempted again with no relaunch left: the asset fails, saying so and where it can resume.
    (tmp_path / "preempted-once").unlink()
    shutil.rmtree(tmp_path / "runs")
    result = _stage1(tmp_path, DriverCluster(nproc_per_node=1, driver=str(driver), max_requeues=0), steps=4, env=env)
    assert not result.success
    assert "preempted again after 0 relaunch(es), TrainingCluster.max_requeues=0; materialize again to resume" in _failure(result)


def _failure(result) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return str(failure.event_specific_data.error.message)


def test_two_local_nodes_report_through_the_shared_pipes_folder(tmp_path):
    # Two torchrun agents (one rank each) meet at a c10d rendezvous on 127.0.0.1, a free port;
    # rank 0's messages come back through a file in the configured shared folder.
    shared = tmp_path / "shared_pipes"
    result = _stage1(tmp_path, TrainingCluster(nnodes=2, nproc_per_node=1, pipes_dir=str(shared)))
    assert result.success, _failure(result)
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["steps"] == 2 and metadata["world_size"] == 2 and metadata["run_id"]
    assert isinstance(metadata["final_loss"], float)
    folder = shared / result.run_id / "stage1"
    assert '"method": "report_asset_materialization"' in (folder / "messages.jsonl").read_text()
    assert not (folder / "context.json").exists()  # the injected context is removed at the end
    assert sorted(p.name for p in (folder / "logs").iterdir()) == ["node0.log", "node1.log"]


def test_a_run_that_reports_nothing_fails(tmp_path):
    # `true` stands in for an interpreter that exits 0 without a word to Dagster.
    result = _stage1(tmp_path, TrainingCluster(nproc_per_node=1, python="true"))
    assert not result.success and not result.get_asset_materialization_events()
    message = _failure(result)
    assert "without reporting a materialization" in message
    assert "true -m torch.distributed.run --nproc_per_node=1 --standalone" in message
    assert f"logs: {tmp_path / 'runs' / 'pipes' / result.run_id / 'stage1' / 'logs' / 'node0.log'}" in message


def test_a_rendezvous_nobody_answers_fails_in_bounded_time_naming_the_endpoint(tmp_path):
    # A free port on this machine, and agents told not to host the store themselves: nobody
    # answers at the endpoint, as when the head node is down.
    from mumu_assets.launchers import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    cluster = TrainingCluster(nnodes=2, nproc_per_node=1, rdzv_endpoint=endpoint, rdzv_timeout_s=3, rdzv_host=False)
    started = time.monotonic()
    result = _stage1(tmp_path, cluster)
    elapsed = time.monotonic() - started
    assert not result.success
    message = _failure(result)
    assert f"rdzv_endpoint={endpoint}" in message and "rdzv_timeout_s=3" in message, message
    assert "TrainingCluster.rdzv_endpoint" in message
    assert elapsed < 120, elapsed  # bounded by the timeout (plus start-up), not torchrun's 15 minutes


def test_a_refusal_fails_the_asset_with_the_trainers_one_line_message(tmp_path):
    from .test_training_runs import damage

    damage(tmp_path / "data" / "captions" / "stage1")
    result = _stage1(tmp_path, TrainingCluster(nproc_per_node=1))
    assert not result.success
    message = _failure(result)
    assert "stage 1: training refused: " in message, message
    assert "unreadable, more than max_bad_fraction=0.01" in message and "00001.tar (damaged" in message
    assert "Traceback" not in message


def test_the_data_version_reads_only_shards_changed_since_they_were_hashed(tmp_path):
    import os

    from mumu_assets.training_assets import data_version_of

    shards = tmp_path / "captions" / "stage1"
    first = write_shard(shards / "00000.tar", records(4)).path
    write_shard(shards / "00001.tar", records(2))
    version, seconds = data_version_of([shards], tmp_path / "runs")
    assert version == dvc_hash(shards) and seconds >= 0
    # A rewritten shard (a new file, as every writer of the data makes) is hashed again.
    write_shard(shards / "00001.tar", records(3))
    version = data_version_of([shards], tmp_path / "runs")[0]
    assert version == dvc_hash(shards)
    # New bytes behind an unchanged inode, size and mtime: only a re-read would see them, and the
    # state (DVC's own database; under the output root outside a DVC repository) spares it.
    stat = first.stat()
    data = bytearray(first.read_bytes())
    data[600] ^= 0xFF
    with open(first, "r+b") as handle:
        handle.write(bytes(data))
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data_version_of([shards], tmp_path / "runs")[0] == version != dvc_hash(shards)
    # A stage that mixes in another caption dataset is versioned by both, in order.
    other = tmp_path / "captions" / "stage2"
    write_shard(other / "00000.tar", records(2))
    assert data_version_of([other, shards], tmp_path / "runs")[0] == f"{dvc_hash(other)}+{version}"
