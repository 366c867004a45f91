"""The bootstrap command's settings fail fast, naming what to fix."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mumu_assets.bootstrap import BootstrapError, bootstrap_phases, device_pool
from mumu_assets.definitions import build_definitions

REPO = Path(__file__).resolve().parent.parent


def test_the_toy_bootstrap_runs_in_two_phases_around_its_scorer():
    phases = bootstrap_phases(build_definitions("toy").resolve_asset_graph())
    assert phases[0] == (["raw_prompts", "content_style"], ["real_images", "synthetic_images"])
    assert phases[1][0] == ["scorer_model"]
    assert phases[1][1][0] == "pickscore_scores" and phases[1][1][-1] == "multimodal_captions_stage2"


def test_the_paper_bootstrap_is_one_phase_and_leaves_training_out():
    (serial, sharded), = bootstrap_phases(build_definitions("paper").resolve_asset_graph())
    assert serial == ["raw_prompts", "content_style"]
    assert "synthetic_images" in sharded and "multimodal_captions_stage2" in sharded
    assert not {"stage1_model", "stage2_model", "evaluation"} & set(serial + sharded)


def test_more_workers_than_gpus_is_refused_naming_the_flag():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has GPUs")
    with pytest.raises(BootstrapError, match=r"--workers=2 needs 2 GPU\(s\), but this host has 0"):
        device_pool(2, devices_per_worker=1)
    assert device_pool(2) == ["cpu", "cpu"]  # no GPU: CPU workers


def _bootstrap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mumu_assets.bootstrap", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_an_unreachable_database_fails_fast_naming_the_setting():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    result = _bootstrap("--workers", "1", "--database", f"postgresql+psycopg2://mumu@127.0.0.1:{port}/dagster")
    assert result.returncode == 2
    assert f"--database=postgresql+psycopg2://mumu@127.0.0.1:{port}/dagster: cannot connect" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and time.monotonic() - started < 60


def test_a_missing_database_setting_is_named():
    result = subprocess.run([sys.executable, "-m", "mumu_assets.bootstrap", "--workers", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in __import__("os").environ.items() if k != "MUMU_DAGSTER_PG_URL"})
    assert result.returncode == 2 and "MUMU_DAGSTER_PG_URL" in result.stderr
