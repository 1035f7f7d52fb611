"""From the page to the gateway: buttons on the dashboard change the model the edge agent runs.

The whole loop runs in-process (``edgeloop.stack.LocalStack``: Tansu, Mosquitto, the factory
simulator, the cloud service with model delivery, one edge agent); the browser only talks to the
cloud's API, and the test reads the edge agent's model slot.
"""

from __future__ import annotations

from edgeloop.stack import LocalStack, StackConfig
from tests.conftest import _need_mosquitto
from tests.integration.dashboard.browser import Page
from tests.waiting import wait_until

TOKEN = "stack-operator-token-0123456789"


async def _confirm(page: Page, button: str) -> None:
    await page.wait(
        lambda d: d.find_element("css selector", button).is_enabled(), 60, f"{button} enabled"
    )
    await page.click(button)
    await page.wait(
        lambda d: d.find_element("css selector", "#confirm").is_displayed(), 5, "the dialog"
    )
    await page.click("#confirm-ok")
    await page.wait(
        lambda d: "is champion now" in d.find_element("css selector", "#message").text,
        15,
        "the success notice",
    )


async def test_promote_then_rollback_from_the_page_reach_the_edge_agent(page: Page, tmp_path):
    _need_mosquitto()
    cfg = StackConfig(
        seed=2,
        workdir=tmp_path / "stack",
        extra_cloud={"environment": "production", "api": {"port": 0, "token": TOKEN}},
    )
    async with LocalStack(cfg) as stack:
        base = stack.endpoints["api"]
        await wait_until(lambda: stack.edge_version() == 1, 90, "the edge runs version 1")
        await page.get(base + "/")
        await page.type("#token", TOKEN)
        await page.click('#token-form button[type="submit"]')
        await page.wait(
            lambda d: (
                "quality v1" in d.find_element("css selector", 'tr[data-agent="stack-edge"]').text
            ),
            20,
            "the fleet shows the agent on v1",
        )

        # a snapshot of the challenger becomes v2; delivery compiles, signs and pushes it
        await _confirm(page, '#model-quality button[data-action="promote-challenger"]')
        await wait_until(lambda: stack.edge_version() == 2, 60, "the edge runs version 2")
        await page.wait(
            lambda d: (
                "quality v2" in d.find_element("css selector", 'tr[data-agent="stack-edge"]').text
            ),
            20,
            "the fleet shows the agent on v2",
        )

        # roll back from the page: the edge accepts the lower version (signed as a rollback)
        await _confirm(page, '#model-quality button[data-action="rollback"]')
        await wait_until(lambda: stack.edge_version() == 1, 60, "the edge back on version 1")
        await page.wait(
            lambda d: (
                "quality v1" in d.find_element("css selector", 'tr[data-agent="stack-edge"]').text
            ),
            20,
            "the fleet shows the agent back on v1",
        )
        await page.wait(
            lambda d: (
                len(d.find_elements("css selector", "#accuracy-chart g.marker[data-kind='swap']"))
                >= 2
            ),
            20,
            "two edge swap markers (v1 -> v2 -> v1)",
        )
        assert (
            await page.js(
                "return document.querySelectorAll(\"#accuracy-chart g.marker[data-kind='rollback']\")"
                ".length"
            )
            == 1
        )
