"""`mumu demo` in headless Chromium: the page starts from the model's sampling defaults and
offers examples from the suites' crops; a user clicks one and gets an image, writes a prompt,
drops an image in its slot and gets an image; a corrupt file then shows its error in the page,
and the app keeps serving. Screenshots go to outputs/test-artifacts/demo/."""

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from mumu_model.demo import DEFAULT_EXAMPLE_SUITES, compose_prompt, suite_examples
from mumu_model.loading import write_sampling_defaults

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


def test_examples_come_one_per_number_of_images_from_the_suites(tmp_path):
    examples = suite_examples([DEFAULT_EXAMPLE_SUITES], max_images=4)
    assert [len(e.files) for e in examples] == [1, 2, 3]
    one, two = examples[0], examples[1]
    assert one.text.count("<image1>") == 1 and "<img:" not in one.text and Path(one.files[0]).is_file()
    assert "<image1>" in two.text and "<image2>" in two.text
    parts = compose_prompt(two.text, list(two.files), max_images=4)  # what a click hands the model
    assert sum(isinstance(part, Image.Image) for part in parts) == 2
    assert [len(e.files) for e in suite_examples([DEFAULT_EXAMPLE_SUITES], max_images=1)] == [1]
    with pytest.raises(ValueError, match="no such suite file or folder"):
        suite_examples([tmp_path / "missing.yaml"], max_images=4)


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


def _value(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector).get_attribute("value")


def _click_example(driver, label: str) -> None:
    """Click the example whose label starts with `label` (React may re-render it meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked() -> bool:
        for element in driver.find_elements(By.XPATH, f"//*[@id='examples']//*[starts-with(normalize-space(), '{label}')]"):
            try:
                if element.is_displayed():
                    element.click()
                    return True
            except StaleElementReferenceException:
                continue
        return False

    assert _wait(clicked, 30), _text(driver)


def test_a_user_generates_in_the_browser_and_sees_errors(tmp_path, tiny_pipeline_dir):
    pytest.importorskip("gradio")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = ARTIFACTS / "demo"
    shots.mkdir(parents=True, exist_ok=True)
    # A model saved with its sampling defaults (3 steps, guidance 2): the page starts from them.
    model = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, model)
    write_sampling_defaults(model, 3, 2.0)
    driver = headless_chromium()
    port = free_port()
    server = Server([str(Path(sys.executable).parent / "mumu"), "demo", "--model", str(model),
                     "--port", str(port), "--device", "cpu"], f"http://127.0.0.1:{port}/",
                    env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, cwd=REPO, log=tmp_path / "demo.log")
    red, bad = tmp_path / "red.png", tmp_path / "bad.png"
    Image.new("RGB", (24, 24), (220, 20, 20)).save(red)
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not the rest of a PNG")
    page = f"http://127.0.0.1:{port}/"
    try:
        # A first visitor: the controls show the model's own settings, and an example works in two clicks.
        driver.get(page)
        assert _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 60), _text(driver)
        assert _value(driver, "#steps input[type=number]") == "3"
        assert _value(driver, "#guidance input[type=number]") == "2"
        _click_example(driver, "2 objects")
        assert _wait(lambda: "<image2>" in _value(driver, "#prompt textarea"), 30), _text(driver)
        assert _wait(lambda: _uploaded(driver, "image1") and _uploaded(driver, "image2"), 30), _text(driver)
        click_button(driver, "Generate")
        example = _wait(lambda: _output_source(driver), 120)
        driver.save_screenshot(str(shots / "0_example.png"))
        assert example, (tmp_path / "demo.log").read_text()[-3000:]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#crops img")) == 2  # both crops beside the output

        first = _generate(driver, page, "a <image1> circle", red)
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
        again = _generate(driver, page, "a <image1> square", red)
        driver.save_screenshot(str(shots / "3_served_again.png"))
        assert again, _text(driver)
        assert server.process.poll() is None  # still serving
    finally:
        driver.quit()
        server.stop()
