"""The bootstrap on Dagster's run queue, with its real processes: a PostgreSQL instance, the
daemon, run workers launched through the code server, one process per step.

The toy bootstrap runs over 8 shards on 2 workers while a step process is SIGKILLed halfway
through writing its shard; the killed step is retried, and every dataset is byte for byte what
the serial run (`python -m mumu_assets.materialize`, one process) writes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mumu_model.atomic import is_temp_name
from mumu_model.data.versioning import dvc_hash

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP_ASSETS = [
    "raw_prompts", "content_style", "real_images", "synthetic_images", "scorer_model", "pickscore_scores",
    "filtered_synthetic", "detections", "multimodal_captions_stage1", "multimodal_captions_stage2",
]


def _params(tmp_path: Path, root: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=str(root), num_shards=8)
    params["data"]["prompts"]["limit"] = 40
    params["data"]["content_style"]["styles_per_content"] = 1
    params["pretrained"]["scorer"]["steps"] = 3
    path = tmp_path / f"params_{root.name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _holder_of(path: Path) -> int | None:
    """The pid of a process that has `path` open (/proc), if any."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == str(path):
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


def _kill_a_writer(folder: Path, process: subprocess.Popen, deadline_s: float) -> tuple[str, int] | None:
    """SIGKILL the first process seen writing a shard temp in `folder`: (temp name, pid)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and process.poll() is None:
        temps = [p for p in folder.glob(".*.tmp")] if folder.is_dir() else []
        for temp in temps:
            pid = _holder_of(temp.resolve())
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                return temp.name, pid
        time.sleep(0.02)
    return None


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not is_temp_name(p.name)}


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory, postgres_url):
    if not (Path("/proc/self/fd").is_dir()):
        pytest.skip("needs /proc to find the writer to kill")
    tmp_path = tmp_path_factory.mktemp("engine")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "cluster" / "dagster.yaml").read_text())
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"python_file": {
        "relative_path": str(REPO / "tests" / "engine_definitions.py"), "working_directory": str(REPO),
        "location_name": "mumu"}}]}))
    data = tmp_path / "engine"
    env = {**os.environ, "MUMU_PARAMS": str(_params(tmp_path, data)), "MUMU_DEVICE_LEASES": str(tmp_path / "leases")}
    log = tmp_path / "bootstrap.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mumu_assets.bootstrap", "--workers", "2", "--home", str(home),
             "--workspace", str(workspace), "--database", postgres_url, "--timeout", "500"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        killed = _kill_a_writer(data / "synthetic" / "images", process, deadline_s=300)
        try:
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
    output = log.read_text(errors="replace")
    lines = [line for line in output.splitlines() if line.startswith("[")]
    assert process.returncode == 0, "\n".join(lines[-40:]) + "\n" + output[-3000:]

    serial = tmp_path / "serial"
    serial_home = tmp_path / "serial_home"
    serial_home.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "mumu_assets.materialize", *BOOTSTRAP_ASSETS], cwd=REPO, capture_output=True,
        text=True, env={**os.environ, "MUMU_PARAMS": str(_params(tmp_path, serial)), "DAGSTER_HOME": str(serial_home)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"data": data, "serial": serial, "killed": killed, "lines": lines, "home": home, "url": postgres_url}


def test_two_workers_write_what_the_serial_run_writes(engine_run):
    engine, serial = _files(engine_run["data"]), _files(engine_run["serial"])
    assert len(engine) > 8 * 7, sorted(engine)  # every shard of every sharded dataset, and more
    assert sorted(engine) == sorted(serial)
    differing = [name for name in engine if engine[name] != serial[name]]
    assert differing == []
    for dataset in ("synthetic/images", "synthetic/filtered", "captions/stage1", "captions/stage2"):
        assert dvc_hash(engine_run["data"] / dataset) == dvc_hash(engine_run["serial"] / dataset), dataset
    shard_lines = [line for line in engine_run["lines"] if "shard 0000" in line]
    assert len(shard_lines) == 16 and all("success" in line for line in shard_lines), shard_lines


def _runs(engine_run):
    os.environ["MUMU_DAGSTER_PG_URL"] = engine_run["url"]
    instance = dg.DagsterInstance.from_config(str(engine_run["home"]))
    return instance, instance.get_runs(filters=dg.RunsFilter(tags={}))


def test_the_queue_ran_two_shards_at_once_on_postgres(engine_run):
    instance, runs = _runs(engine_run)
    shard_runs = [run for run in runs if run.job_name.startswith("bootstrap_shards_")]
    assert len(shard_runs) == 16
    spans = sorted((instance.get_run_stats(run.run_id).start_time, instance.get_run_stats(run.run_id).end_time)
                   for run in shard_runs)
    overlapping = sum(1 for (_, end), (start, _) in zip(spans, spans[1:]) if start < end)
    assert overlapping >= 4, spans  # two workers: runs overlap, and never more than two at once
    for start, _ in spans:
        assert sum(1 for s, e in spans if s <= start < e) <= 2


def test_a_step_killed_mid_shard_is_retried(engine_run):
    assert engine_run["killed"] is not None, "no shard writer was seen to kill"
    temp, pid = engine_run["killed"]
    shard = temp.split(".")[1]
    instance, runs = _runs(engine_run)
    run = next(run for run in runs if run.job_name == "bootstrap_shards_0" and run.tags["dagster/partition"] == shard)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    events = [record.dagster_event for record in instance.all_logs(run.run_id) if record.dagster_event]
    kinds = [event.event_type_value for event in events if event.step_key == "synthetic_images"]
    assert kinds.index("STEP_START") < kinds.index("STEP_UP_FOR_RETRY") < kinds.index("STEP_RESTARTED"), kinds
    assert kinds[-1] == "STEP_SUCCESS", kinds
    crash = [event.message for event in events if event.step_key == "synthetic_images" and "SIGKILL" in (event.message or "")]
    assert crash, "the executor did not see the step process die"
    # The retried writer's shard is in place; the killed writer's temp, if still there, is no part
    # of the dataset's version (the hashes are compared with the serial run's above).
    assert (engine_run["data"] / "synthetic" / "images" / f"{shard}.tar").is_file()
