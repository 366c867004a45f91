"""The console of `python -m mumu_assets.materialize`: one line per asset (and shard) with its
elapsed time and figures, and Dagster's event log at INFO and above (no DEBUG event lines)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

from mumu_assets.definitions import build_definitions
from mumu_assets.materialize import key_figures, materialize
from mumu_assets.profiles.toy import toy_resources

REPO = Path(__file__).resolve().parent.parent
ASSETS = ["raw_prompts", "content_style"]
DEBUG = " - DEBUG - "


def _asset_lines(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if re.search(rf"\bmaterialized {name}: ", line)]


def _assert_one_line_per_asset(lines: list[str]) -> None:
    for name in ASSETS:
        found = _asset_lines(lines, name)
        assert len(found) == 1, (name, lines)
        assert re.search(r": \d+\.\d s, rows \d+ -> \d+", found[0]), found[0]


def test_in_process_one_line_per_asset_and_no_debug_events(tmp_path, capfd):
    defs = build_definitions("toy", resources=toy_resources(root=str(tmp_path / "data")))
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        assert materialize(defs, ASSETS, instance=instance, run_config={"raw_prompts": {"limit": 40}},
                           log=lines.append)
    captured = capfd.readouterr()
    assert DEBUG not in captured.out + captured.err
    assert len(lines) == len(ASSETS)
    _assert_one_line_per_asset(lines)


def test_command_line_one_line_per_asset_and_no_debug_events(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["root"] = str(tmp_path / "data")
    params["data"]["prompts"]["limit"] = 40
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    result = subprocess.run(
        [sys.executable, "-m", "mumu_assets.materialize", *ASSETS], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "MUMU_PARAMS": str(params_file), "DAGSTER_HOME": str(home)}, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert DEBUG not in output
    _assert_one_line_per_asset(result.stdout.splitlines())
    assert (tmp_path / "data" / "prompts" / "pairs.parquet").is_file()


def test_key_figures_of_training_and_evaluation():
    assert key_figures({"rows_in": 10, "rows_out": 8, "failed_rows": 2, "skipped": 0}) == [
        "rows 10 -> 8", "failed rows 2"]
    assert key_figures({"final_loss": 0.12345, "steps": 800}) == ["final loss 0.1235", "steps 800"]
    assert key_figures({"headline": "test_one: colour 71.7% (63%-79%)", "aggregate/clip_i": 0.5, "errors": 0}) == [
        "test_one: colour 71.7% (63%-79%)"]
    assert key_figures({"aggregate/clip_i": 0.8, "aggregate/clip_t": 0.3}) == ["clip_i 0.8000", "clip_t 0.3000"]
