"""`mumu demo` in headless Chromium: a user writes a prompt, drops an image in its slot and gets
an image; a corrupt file then shows its error in the page, and the app keeps serving.
Screenshots go to outputs/test-artifacts/demo/."""

import os
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from mumu_model.demo import compose_prompt

from .browser import ARTIFACTS, REPO, Server, click_button, free_port, headless_chromium


def test_compose_prompt_places_each_image_and_names_mistakes(tmp_path):
    red = tmp_path / "red.png"
    Image.new("RGB", (24, 24), (220, 20, 20)).save(red)
    parts = compose_prompt("a <image1> circle", [str(red), None], max_images=2)
    assert parts[0] == "a " and isinstance(parts[1], Image.Image) and parts[2] == " circle"
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for text, files, message in [
        ("", [None], "write a prompt"),
        ("a <image2> dog", [str(red), None], "<image2> has no image: upload one in slot 2"),
        ("a <image3> dog", [str(red), None], "<image3>: there are only 2 image slots"),
        ("a dog", [str(red)], "image 1 is uploaded but the prompt has no <image1>"),
        ("<image1> <image1> <image1>", [str(red)], "places 3 images; this model takes at most 2"),
        ("a <image1> dog", [str(tmp_path / "bad.png")], "image 1 (bad.png): "),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            compose_prompt(text, files, max_images=2)


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _output_source(driver) -> str | None:
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, "#output img")
    return images[0].get_attribute("src") if images else None


def _uploaded(driver, slot: str) -> bool:
    from selenium.webdriver.common.by import By

    return "Drop File Here" not in driver.find_element(By.CSS_SELECTOR, f"#{slot}").text


def _wait(condition, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    return None


def _generate(driver, page: str, text: str, image: Path) -> str | None:
    """Open `page`, write `text`, put `image` in slot 1, click Generate; the output's source."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(page)
    prompt = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 60)
    assert prompt, _text(driver)
    prompt[0].send_keys(Keys.CONTROL, "a")
    prompt[0].send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "#image1 input[type=file]").send_keys(str(image))
    assert _wait(lambda: _uploaded(driver, "image1"), 30), _text(driver)
    click_button(driver, "Generate")
    return _wait(lambda: _output_source(driver), 120)


def test_a_user_generates_in_the_browser_and_sees_errors(tmp_path, tiny_pipeline_dir):
    pytest.importorskip("gradio")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = ARTIFACTS / "demo"
    shots.mkdir(parents=True, exist_ok=True)
    driver = headless_chromium()
    port = free_port()
    server = Server([str(Path(sys.executable).parent / "mumu"), "demo", "--model", str(tiny_pipeline_dir),
                     "--port", str(port), "--device", "cpu"], f"http://127.0.0.1:{port}/",
                    env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, cwd=REPO, log=tmp_path / "demo.log")
    red, bad = tmp_path / "red.png", tmp_path / "bad.png"
    Image.new("RGB", (24, 24), (220, 20, 20)).save(red)
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not the rest of a PNG")
    try:
        first = _generate(driver, f"http://127.0.0.1:{port}/", "a <image1> circle", red)
        driver.save_screenshot(str(shots / "1_generated.png"))
        assert first, (tmp_path / "demo.log").read_text()[-3000:]
        gallery = driver.find_elements(By.CSS_SELECTOR, "#crops img")
        assert gallery, "the conditioning image is not shown beside the output"

        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        prompt.send_keys(Keys.CONTROL, "a")
        prompt.send_keys("a <image1> circle and a <image2> square")
        driver.find_element(By.CSS_SELECTOR, "#image2 input[type=file]").send_keys(str(bad))
        assert _wait(lambda: _uploaded(driver, "image2"), 30), _text(driver)
        click_button(driver, "Generate")
        error = _wait(lambda: "image 2 (bad.png)" in _text(driver), 60)
        driver.save_screenshot(str(shots / "2_error.png"))
        assert error, _text(driver)

        # The app goes on serving: a new page generates again.
        again = _generate(driver, f"http://127.0.0.1:{port}/", "a <image1> square", red)
        driver.save_screenshot(str(shots / "3_served_again.png"))
        assert again, _text(driver)
        assert server.process.poll() is None  # still serving
    finally:
        driver.quit()
        server.stop()
