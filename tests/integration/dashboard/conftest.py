"""Fixtures for the dashboard tests: a fresh headless Chromium per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.dashboard.browser import Page, need_chromium, start_chromium


@pytest.fixture
def page(tmp_path_factory) -> Iterator[Page]:
    """A headless Chromium with a fresh profile (empty sessionStorage), quit after the test."""
    need_chromium()
    profile = tmp_path_factory.mktemp("chromium-profile")
    driver = start_chromium(profile)
    try:
        yield Page(driver)
    finally:
        driver.quit()
