"""Headless Chromium (Debian's `chromium` and `chromium-driver`) for tests that drive the web
UIs as a user does, and the servers they drive, bound to 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from mumu_assets.launchers import stop_process_groups

from .conftest import skip_without

REPO = Path(__file__).resolve().parent.parent
# Screenshots of every browser test, kept after the run (outputs/ is ignored by git).
ARTIFACTS = REPO / "outputs" / "test-artifacts"


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        skip_without("Chromium", "apt-get install chromium chromium-driver")
    return browser, driver


def headless_chromium(width: int = 1400, height: int = 900):
    """A Selenium driver for the system's Chromium; nothing is downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    # Every host name but the loopback resolves to nothing: pages under test reach only 127.0.0.1.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(argument)
    options.binary_location = browser
    return webdriver.Chrome(service=Service(driver), options=options)


def click_button(driver, text: str, timeout: float = 30, contains: bool = False) -> None:
    """Click the first visible, enabled button whose text is (or contains) `text`."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    xpath = (f"//button[contains(normalize-space(), '{text}')]" if contains
             else f"//button[normalize-space()='{text}']")

    def clicked(drv) -> bool:  # React re-renders: an element found may be gone a moment later
        for button in drv.find_elements(By.XPATH, xpath):
            try:
                if button.is_displayed() and button.is_enabled():
                    button.click()
                    return True
            except StaleElementReferenceException:
                continue
        return False

    WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(clicked)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process in its own process group, waited for on `url`, stopped whole."""

    def __init__(self, command: list[str], url: str, *, env: dict, cwd: Path, log: Path, timeout_s: float = 180):
        self.url, self.log = url, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "wb")
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {self.process.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s: {log.read_text()[-3000:]}")
                time.sleep(1)

    def stop(self) -> None:
        stop_process_groups([self.process], grace_s=30)
        self._out.close()
