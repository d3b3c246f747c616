"""A headless Chromium for the tests that must see a page as a user does (Debian's `chromium` and
`chromium-driver`, driven by selenium with the system driver named explicitly, so nothing is downloaded).
Under CI (the CI environment variable, set by .ci/run) a missing browser fails the test; elsewhere it
skips it with the reason."""

from __future__ import annotations

import os
import shutil
from typing import Iterator, List

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
WINDOW = (1280, 900)
LOAD_SECONDS = 20


def _which(names) -> str | None:
    return next((found for found in map(shutil.which, names) if found), None)


def chromium() -> Iterator["object"]:
    """Yields a selenium Chrome driver (browser console logged), quits it afterwards."""
    binary, driver_path = _which(BROWSERS), _which(DRIVERS)
    try:
        from selenium import webdriver  # pylint: disable=import-outside-toplevel
        from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
    except ImportError:
        binary = None
    if binary is None or driver_path is None:
        reason = "no headless browser: apt-get install chromium chromium-driver, pip install -r requirements.txt"
        if os.environ.get("CI"):
            pytest.fail(f"under CI the browser tests must run: {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(LOAD_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> List[str]:
    """The console's errors since the last call (failed loads, script errors)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def broken_images(driver) -> List[str]:
    """Every <img> of the page that did not load (natural width 0), once all have finished loading."""
    from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel

    WebDriverWait(driver, LOAD_SECONDS).until(
        lambda d: d.execute_script("return Array.from(document.images).every(image => image.complete)")
    )
    return driver.execute_script("return Array.from(document.images).filter(image => !(image.naturalWidth > 0)).map(image => image.src)")
