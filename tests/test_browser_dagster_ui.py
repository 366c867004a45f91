"""`dagster dev` on 127.0.0.1 driven by headless Chromium as a user drives it: open the prompts
group's graph and click "Materialize all", then open `synthetic_images`, pick every shard and
launch the backfill; the daemon runs it. Screenshots go to outputs/test-artifacts/dagster_ui/."""

import os
import sys
import time
from pathlib import Path

import dagster as dg
import yaml

from .browser import ARTIFACTS, REPO, Server, click_button, free_port, headless_chromium

LOCATION = "mumu_assets.definitions"


def _wait_for(instance, asset: str, partitions: int | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    key = dg.AssetKey(asset)
    while time.monotonic() < deadline:
        if partitions is None:
            if instance.get_latest_materialization_event(key) is not None:
                return True
        elif len(instance.get_materialized_partitions(key)) >= partitions:
            return True
        time.sleep(2)
    return False


def test_a_user_materializes_the_toy_graph_from_the_ui(tmp_path):
    shots = ARTIFACTS / "dagster_ui"
    shots.mkdir(parents=True, exist_ok=True)
    driver = headless_chromium()
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["root"] = str(tmp_path / "data")
    params["data"]["prompts"]["limit"] = 24
    params["data"]["content_style"]["styles_per_content"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "MUMU_PARAMS": str(tmp_path / "params.yaml")}
    server = Server([str(Path(sys.executable).parent / "dagster"), "dev", "-m", LOCATION, "-h", "127.0.0.1",
                     "-p", str(port)], f"http://127.0.0.1:{port}/server_info", env=env, cwd=REPO,
                    log=tmp_path / "dagster_dev.log")
    base = f"http://127.0.0.1:{port}"
    try:
        instance = dg.DagsterInstance.from_config(str(home))
        driver.get(f"{base}/locations/{LOCATION}/asset-groups/prompts")
        try:  # the community prompt shown on a new instance
            click_button(driver, "Skip", timeout=10)
        except Exception:  # noqa: BLE001 - not shown: nothing to dismiss
            pass
        driver.save_screenshot(str(shots / "1_prompts_group.png"))
        click_button(driver, "Materialize all")
        assert _wait_for(instance, "content_style", None, 180), (tmp_path / "dagster_dev.log").read_text()[-3000:]

        driver.get(f"{base}/assets/synthetic_images")
        click_button(driver, "Materialize", contains=True)
        click_button(driver, "All")
        driver.save_screenshot(str(shots / "2_backfill_dialog.png"))
        click_button(driver, "Launch backfill")
        assert _wait_for(instance, "synthetic_images", 2, 240), (tmp_path / "dagster_dev.log").read_text()[-3000:]

        driver.get(f"{base}/runs")
        from selenium.webdriver.common.by import By

        def listed() -> str:
            driver.refresh()
            time.sleep(2)
            return driver.find_element(By.TAG_NAME, "body").text

        deadline = time.monotonic() + 30  # the prompts run, and the backfill's runs behind its row
        while time.monotonic() < deadline and "Success" not in (text := listed()):
            pass
        driver.save_screenshot(str(shots / "3_runs.png"))
        assert "Success" in text and "Failure" not in text, text
        shards = sorted(p.name for p in (tmp_path / "data" / "synthetic" / "images").glob("*.tar"))
        assert shards == ["00000.tar", "00001.tar"]
    finally:
        driver.quit()
        server.stop()
