"""`mlflow ui` on 127.0.0.1 in headless Chromium: a user finds the evaluation run that
`eval.run.evaluate` logged, its metrics and its grid artifact. Screenshots go to
outputs/test-artifacts/mlflow_ui/."""

import os
import sys
import time
from pathlib import Path

from eval.run import EvalModels, evaluate
from mumu_model.testing import tiny_clip

from .browser import ARTIFACTS, REPO, Server, free_port, headless_chromium


def _body(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _wait_text(driver, text: str, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in _body(driver):
            return True
        time.sleep(1)
    return False


def _click_text(driver, text: str) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for element in driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']"):
            try:
                if element.is_displayed():
                    element.click()
                    return
            except StaleElementReferenceException:
                continue
        time.sleep(0.5)
    raise AssertionError(f"nothing to click named {text!r}")


def test_a_user_finds_the_run_its_metrics_and_grid_in_mlflow_ui(tmp_path, tiny_pipeline_dir):
    from PIL import Image

    shots = ARTIFACTS / "mlflow_ui"
    shots.mkdir(parents=True, exist_ok=True)
    driver = headless_chromium()
    images = tmp_path / "suite" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32), (220, 30, 30)).save(images / "red.png")
    suite = tmp_path / "suite" / "browser.yaml"
    suite.write_text("name: browser\nversion: 1\nentries:\n  - id: red\n    prompt: 'a <img:red.png> circle'\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clip = tiny_clip(tmp_path / "clip")
    result = evaluate(tiny_pipeline_dir, [suite], models=EvalModels(clip=clip, pickscore=clip, face=None), steps=2,
                      seeds=(0,), out_dir=tmp_path / "out", tracking_uri=uri)

    port = free_port()
    server = Server([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
                     "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/",
                    env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, cwd=tmp_path,
                    log=tmp_path / "mlflow_ui.log")
    try:
        from mlflow import MlflowClient

        experiment = MlflowClient(tracking_uri=uri).get_run(result.run_id).info.experiment_id
        base = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{result.run_id}"
        driver.get(base)
        assert _wait_text(driver, result.run_id[:8]) or _wait_text(driver, "Metrics"), _body(driver)
        assert _wait_text(driver, "browser/clip_t"), _body(driver)  # a metric of the suite
        driver.save_screenshot(str(shots / "1_run.png"))

        driver.get(f"{base}/artifacts")
        for name in ("eval", "grids", "browser.png"):  # open the artifact tree as a user does
            assert _wait_text(driver, name), _body(driver)
            _click_text(driver, name)
        # The preview: the artifact's path as its title and the grid drawn (a decoded image wider than
        # two 128 px cells; the UI's icons are smaller).
        shown = "return Array.from(document.images).filter(i => i.complete && i.naturalWidth >= 256).length"
        deadline = time.monotonic() + 60
        while not driver.execute_script(shown) and time.monotonic() < deadline:
            time.sleep(1)
        driver.save_screenshot(str(shots / "2_grid.png"))
        assert "eval/grids/browser.png" in _body(driver) and driver.execute_script(shown), _body(driver)
    finally:
        driver.quit()
        server.stop()
