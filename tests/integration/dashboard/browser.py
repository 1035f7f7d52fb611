"""A real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven from async tests.

Selenium is synchronous and the cloud service under test runs on the test's event loop, so
every browser call goes through ``asyncio.to_thread``: the loop keeps serving the page while
the browser waits. The driver and the browser are given by path, so Selenium Manager never runs
(nothing is downloaded).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI

CHROMIUM = Path(os.environ.get("EDGELOOP_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("EDGELOOP_CHROMEDRIVER", "/usr/bin/chromedriver"))

CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-extensions",
    "--disable-default-apps",
    "--force-prefers-reduced-motion",
    "--lang=en-GB",
)


def need_chromium() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        why = (
            f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver "
            "(`make test` does as root)"
        )
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    try:
        import selenium  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("selenium is not installed (pip install -e '.[dev]')")
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")


def start_chromium(profile: Path, width: int = 1440, height: int = 1100) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER))
    return webdriver.Chrome(service=service, options=options)


class Page:
    """The browser, awaitable: each call runs in a worker thread."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, script, *args)

    async def wait(self, cond: Callable[[Any], Any], within: float, what: str) -> Any:
        """Poll ``cond(driver)`` in the browser thread until it is truthy; fail naming ``what``."""
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
            TimeoutException,
        )
        from selenium.webdriver.support.ui import WebDriverWait

        # the page re-renders every poll: an element found a moment ago may be gone
        ignored = (StaleElementReferenceException, NoSuchElementException)

        def run() -> Any:
            wait = WebDriverWait(
                self.driver, within, poll_frequency=0.1, ignored_exceptions=ignored
            )
            return wait.until(cond)

        try:
            return await self.call(run)
        except TimeoutException:
            raise AssertionError(f"timed out after {within}s waiting for {what}") from None

    async def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return await self.call(self.driver.find_element, By.CSS_SELECTOR, css)

    async def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        def run() -> None:
            self.driver.find_element(By.CSS_SELECTOR, css).click()

        await self.call(run)

    async def type(self, css: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        def run() -> None:
            box = self.driver.find_element(By.CSS_SELECTOR, css)
            box.clear()
            box.send_keys(text)

        await self.call(run)

    async def text(self, css: str) -> str:
        """The rendered text of the first match, read in one step (rows are re-rendered)."""
        text = await self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;", css
        )
        if text is None:
            raise AssertionError(f"nothing on the page matches {css!r}")
        return str(text)

    async def console_errors(self) -> list[str]:
        logs = await self.call(self.driver.get_log, "browser")
        return [e["message"] for e in logs if e.get("level") == "SEVERE"]

    async def screenshot(self, path: Path, *, full_page: bool = False) -> None:
        """A PNG of the viewport, or of the whole page (the window is resized, then restored)."""

        def run() -> None:
            size = self.driver.get_window_size()
            if full_page:
                self.driver.execute_script("window.scrollTo(0, 0)")
                chrome = size["height"] - self.driver.execute_script("return window.innerHeight")
                height = self.driver.execute_script("return document.documentElement.scrollHeight")
                self.driver.set_window_size(size["width"], int(height) + int(chrome))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(path))
            if full_page:
                self.driver.set_window_size(size["width"], size["height"])

        await self.call(run)


def screenshot_dir() -> Path | None:
    """Where to write screenshots (``EDGELOOP_SCREENSHOTS=docs/screenshots``); None: don't."""
    target = os.environ.get("EDGELOOP_SCREENSHOTS")
    return Path(target) if target else None
