"""Concurrent runs on one MLflow sqlite store: MLflow creates a new database's tables in whichever
process opens it first, and two doing so at once collide ("table ... already exists", "duplicate
column name: step"). `tracking.ensure_store` creates it once, under a file lock; here two
trainings start at once on a fresh store and both finish with their runs in it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mumu_model.data.shards import write_shard
from mumu_model.tracking import ensure_store

from .test_training import records

REPO = Path(__file__).resolve().parents[1]


def _experiments(uri: str) -> list[str]:
    from mlflow import MlflowClient

    return [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()]


def test_ensure_store_creates_a_sqlite_store_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert ensure_store(uri) == uri
    assert (tmp_path / "store" / "mlflow.db").is_file() and "Default" in _experiments(uri)
    assert ensure_store(uri) == uri  # made: opened, not made again
    assert ensure_store("http://127.0.0.1:1") == "http://127.0.0.1:1"  # a server makes its own; not reached


def test_two_trainings_started_at_once_share_a_new_store(tmp_path):
    from mlflow import MlflowClient

    shard = write_shard(tmp_path / "data" / "00000.tar", records(4)).path
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # nothing there yet: both runs find it new
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    processes = []
    for name in ("a", "b"):
        command = [sys.executable, "-m", "mumu_model.training", str(REPO / "configs" / "train_tiny.yaml")]
        for setting in (f"shards={shard}", f"output_dir={tmp_path / name}", f"tracking_uri={uri}", f"run_name={name}",
                        "max_steps=2", "batch_size=2", "resolution=32", "warmup_steps=0", "log_every=1",
                        "checkpoint_every=2", "validate_every=0"):
            command += ["--set", setting]
        log = open(tmp_path / f"{name}.log", "w")
        processes.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + 420
    for process, log in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
    for name, (process, _) in zip("ab", processes):
        assert process.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = {run.info.run_name: run for run in client.search_runs(experiments)}
    assert set(runs) == {"a", "b"}
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert all(run.data.metrics.get("loss") is not None for run in runs.values())
