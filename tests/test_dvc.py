"""dvc repro / push / pull reproduce a dataset, and Dagster records the same hash DVC does; the
whole toy main job (data, pretrained models, both training stages, evaluation) reproduces at smoke
size with a console that holds no warning it does not expect and each progress line once, and a
fresh clone pulls byte-identical outputs."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mumu_model.data.versioning import dvc_hash
from mumu_model.toy.suites import KINDS, write_suites

REPO = Path(__file__).resolve().parent.parent


def _run(args, cwd, env, console: bool = False, timeout: float = 300):
    """stdout of `args` (with `console`, stdout and stderr together, as a terminal shows them)."""
    result = subprocess.run(args, cwd=cwd, env=env, text=True, timeout=timeout, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if console else subprocess.PIPE)
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


# -- the whole toy main job --------------------------------------------------------------------

# A console line that reads like a warning: a logged WARNING, a Python warning (UserWarning,
# FutureWarning, ...), a deprecation, or diffusers' dtype notice, which carries no level.
WARNING_LIKE = re.compile(r"warn|deprecat|should be kept in float32", re.IGNORECASE)
# The warning-like lines the main job's console may show, each with why no user can act on it.
# Empty: every warning the main job printed had a cause of ours, and it was fixed (issue 27).
EXPECTED_WARNINGS: list[tuple[str, str]] = []


def unexpected_warnings(console: str) -> list[str]:
    """The warning-like lines of `console` that no `EXPECTED_WARNINGS` pattern allows."""
    return [line for line in console.splitlines()
            if WARNING_LIKE.search(line) and not any(re.search(pattern, line) for pattern, _ in EXPECTED_WARNINGS)]


def test_the_console_check_finds_warnings_of_every_kind():
    console = "\n".join([
        "[     1 s] materialized raw_prompts: 0.4 s, rows 40 -> 40",
        "2026/12/07 21:42:24 WARNING mlflow.models.model: Failed to log model config as params",
        "/x/y.py:3: FutureWarning: `torch_dtype` is deprecated",
        "There are modules in UNet2DConditionModel that should be kept in float32: [].",
    ])
    assert len(unexpected_warnings(console)) == 3

GIT = ["git", "-c", "user.name=mumu-test", "-c", "user.email=mumu-test@localhost"]

# Smoke size: the toy profile's params.yaml with every step shrunk (as tests/test_toy_graph.py's
# run config); params.yaml is every asset's defaults, so the values must live there.
SMOKE_TRAINING = {"max_steps": 2, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1,
                  "validation_steps": 2, "validation_seeds": [0], "log_pipeline_artifact": False}


def _smoke_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["prompts"]["limit"] = 40
    params["data"]["content_style"]["styles_per_content"] = 1
    params["pretrained"] = {"vae": {"steps": 3, "batch_size": 8, "lr": 2.0e-3},
                            "scorer": {"steps": 3, "batch_size": 8, "lr": 2.0e-3}}
    params["training"].update(stage1_config="configs/train_stage1_smoke.yaml",
                              stage2_config="configs/train_stage2_smoke.yaml")
    # Two-step models are held to no targets (the check then passes, saying none are set).
    params["evaluation"].update(suites=params["evaluation"]["suites"][:2], steps=2, seeds=[0], batch_size=8, targets={})
    return params


@pytest.fixture
def toy_project(tmp_path):
    """A git repo with the project's DVC files at smoke size, committed, and a local remote."""
    root = tmp_path / "A"
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "examples/prompts/toy_prompts.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(_smoke_params(), sort_keys=False))
    for stage in (1, 2):
        config = yaml.safe_load((REPO / "configs" / f"train_stage{stage}_toy.yaml").read_text())
        (root / "configs").mkdir(exist_ok=True)
        (root / "configs" / f"train_stage{stage}_smoke.yaml").write_text(yaml.safe_dump({**config, **SMOKE_TRAINING}))
    # The code is copied and committed: the stages run from the project folder, so the copies
    # shadow the installed package, and what DVC hashes is what runs (and what the clone gets).
    for package in ("mumu_model", "mumu_assets", "eval"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    # 4-prompt suites in place of the real ones (the validation split holds the trainer's images).
    shutil.rmtree(root / "eval" / "suites" / "toy")
    for split in ("validation", "test"):
        write_suites(root / "eval" / "suites" / "toy", split, counts=dict.fromkeys(KINDS, 4))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "MUMU_PROFILE": "toy",
        "OMP_NUM_THREADS": "1",  # every stage is a process of its own on a shared 2-core machine
    }
    env.pop("MUMU_PARAMS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    (tmp_path / "dagster_home").mkdir()
    # The project's instance settings (telemetry off), as `make demo` runs with them.
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path / "dagster_home" / "dagster.yaml")
    dvc = str(Path(sys.executable).parent / "dvc")
    _run(["git", "init", "-q"], root, env)
    _run([dvc, "init", "-q"], root, env)
    _run([dvc, "remote", "add", "-d", "test", str(tmp_path / "remote")], root, env)
    _run([*GIT, "add", "-A"], root, env)
    _run([*GIT, "commit", "-q", "-m", "smoke project"], root, env)
    return root, env, dvc


def _files(root: Path, outs: list[str]) -> dict[str, bytes]:
    """The bytes of every regular file of `outs` (links to folders are not followed: DVC does
    not version them)."""
    found = {}
    for out in outs:
        path = root / out
        if path.is_file():
            found[out] = path.read_bytes()
            continue
        assert path.is_dir(), f"{out}: missing"
        for folder, _, names in os.walk(path):
            for name in names:
                file = Path(folder) / name
                if not file.is_symlink():
                    found[str(file.relative_to(root))] = file.read_bytes()
    return found


def test_whole_toy_job_reproduces_and_a_fresh_clone_pulls_it(toy_project, tmp_path):
    root, env, dvc = toy_project
    # From empty data/ and runs/, upstream first: 3-4 minutes alone on 2 cores, more beside other tests.
    console = _run([dvc, "repro"], root, env, console=True, timeout=900)
    # What a user reads (each stage is `python -m mumu_assets.materialize`, the main job's command):
    # no warning that is not expected, and each training progress line once (smoke: log_every 1).
    assert not unexpected_warnings(console), "\n".join(unexpected_warnings(console))
    for step in (1, 2):
        shown = re.findall(rf"\bstep {step}: loss ", console)
        assert len(shown) == 2, (step, console)  # once per training stage
    # The pipeline carries the settings chosen for the toy world (params.yaml's evaluation).
    index = json.loads((root / "runs" / "stage2" / "pipeline" / "model_index.json").read_text())
    chosen = yaml.safe_load((root / "params.yaml").read_text())["evaluation"]
    assert (index["sampling_steps"], index["sampling_guidance"], index["sampling_resolution"]) == (
        chosen["steps"], chosen["guidance"], 32)

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert set(lock["stages"]) == set(stages)
    outs = [out["path"] for stage in lock["stages"].values() for out in stage["outs"]]
    assert {"runs/stage1", "runs/stage2", "data/models/vae", "data/models/scorer", "data/evaluation"} <= set(outs)
    # The trainer linked its run's exported pipeline where evaluation.pipeline points.
    assert (root / "runs" / "stage2" / "pipeline" / "model_index.json").is_file()
    (summary,) = (root / "data" / "evaluation").glob("*/summary.json")  # one evaluation run
    metrics = json.loads(summary.read_text())
    assert 0.0 <= metrics["aggregate"]["colour_match"] <= 1.0 and not metrics["errors"]
    # Shared state, not an output: the MLflow database holds the training and evaluation runs.
    assert (root / "runs" / "mlflow.db").is_file()
    assert "up to date" in _run([dvc, "status"], root, env)

    _run([dvc, "push"], root, env)
    _run([*GIT, "add", "dvc.lock"], root, env)
    _run([*GIT, "commit", "-q", "-m", "reproduced"], root, env)

    clone = tmp_path / "B"
    _run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "data").exists() and not (clone / "runs").exists()
    _run([dvc, "pull"], clone, env)
    original, pulled = _files(root, outs), _files(clone, outs)
    assert pulled.keys() == original.keys() and pulled == original
    assert "up to date" in _run([dvc, "status"], clone, env)
