"""dvc repro / push / pull reproduce a dataset, and Dagster records the same hash DVC does."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mumu_model.data.versioning import dvc_hash

REPO = Path(__file__).resolve().parent.parent


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def project(tmp_path):
    """A copy of the project's DVC files (and the files its stages depend on) in a new git repo."""
    root = tmp_path / "project"
    # The paper profile's parameters (the prompt stages need no model there: rule-based split).
    copies = {"dvc.yaml": "dvc.yaml", "params.paper.yaml": "params.yaml",
              "examples/prompts/diffusiondb_sample.csv": "examples/prompts/diffusiondb_sample.csv"}
    for source, target in copies.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / source, root / target)
    # The stages depend on the code too; link it (a copy would shadow the installed package).
    for package in ("mumu_model", "mumu_assets"):
        (root / package).symlink_to(REPO / package)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "MUMU_PROFILE": "paper",  # the prompt stages use the rule-based splitter: no model needed
    }
    (tmp_path / "dagster_home").mkdir()
    _run(["git", "init", "-q"], root, env)
    dvc = str(Path(sys.executable).parent / "dvc")
    _run([dvc, "init", "-q"], root, env)
    _run([dvc, "remote", "add", "-d", "test", str(tmp_path / "remote")], root, env)
    return root, env, dvc


def test_repro_push_pull_round_trip(project):
    root, env, dvc = project
    _run([dvc, "repro", "content_style"], root, env)  # pulls in raw_prompts, its dependency
    outputs = [root / "data" / "prompts" / "raw_prompts.parquet", root / "data" / "prompts" / "pairs.parquet"]
    original = [path.read_bytes() for path in outputs]

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    locked = {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage["outs"]}
    assert locked["data/prompts/raw_prompts.parquet"] == dvc_hash(outputs[0])

    # Dagster recorded the same hash in the asset's metadata.
    import dagster as dg

    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("raw_prompts"))
    assert event.asset_materialization.metadata["dvc_hash"].value == locked["data/prompts/raw_prompts.parquet"]

    # Nothing changed: repro re-runs nothing.
    assert "didn't change" in _run([dvc, "repro", "content_style"], root, env)

    _run([dvc, "push"], root, env)
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    _run([dvc, "pull", "--with-deps", "content_style"], root, env)
    assert [path.read_bytes() for path in outputs] == original

    # A parameter change re-runs exactly the stage that reads it.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["content_style"]["styles_per_content"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    status = _run([dvc, "status"], root, env)
    assert "content_style" in status and "raw_prompts" not in status
