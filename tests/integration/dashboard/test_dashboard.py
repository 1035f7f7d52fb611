"""The dashboard in a real headless Chromium against a real cloud service on Tansu.

The cloud learns a late-labelled stream whose shopfloor drifts (the edge keeps predicting with
version 1, so the drift is detected on the edge's own error stream and a challenger is promoted);
the page must show the fleet, the accuracy chart with its drift and promotion markers, and roll
the champion back when, and only when, it has the operator token.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx

from cloud.config import (
    ApiConfig,
    CloudConfig,
    DatabaseConfig,
    DriftConfig,
    KafkaConfig,
    ModelConfig,
    PromotionConfig,
)
from cloud.service import CloudService
from shared.records import Heartbeat, now_ns
from shared.wire import Kind
from tests.integration.cloud.stream import EdgeProducer, Stream
from tests.integration.dashboard.browser import Page, screenshot_dir
from tests.waiting import wait_until

TOKEN = "plant-floor-token-0123456789abc"


def _config(bootstrap: str, tmp_path: Path) -> CloudConfig:
    uid = uuid.uuid4().hex[:8]
    return CloudConfig(
        environment="production",
        kafka=KafkaConfig(
            bootstrap_servers=bootstrap,
            topic_prefix=f"dash{uid}",
            group_id=f"g{uid}",
            session_timeout_s=2,
        ),
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'cloud.db'}"),
        models=[ModelConfig(name="quality", rolling_window=200)],
        # margin 1.0: after the first champion only a drift promotes, once the challenger
        # learned 400 samples of the drifted shopfloor
        promotion=PromotionConfig(
            min_samples=200, window=200, margin=1.0, min_samples_after_drift=400
        ),
        drift=DriftConfig(detector="ADWIN", params={"delta": 0.002}),
        api=ApiConfig(token=TOKEN, port=0),
        checkpoint_interval_s=0.5,
        metrics_snapshot_s=0.25,
    )


async def _heartbeat(
    edge: EdgeProducer,
    version: int,
    *,
    agent_id: str | None = None,
    age_s: float = 0.0,
    outbox: int = 0,
    status: str = "ok",
    reasons: tuple[str, ...] = (),
) -> None:
    hb = Heartbeat(
        agent_id or edge.agent_id,
        now_ns() - int(age_s * 1e9),
        {"quality": version},
        outbox_depth=outbox,
        outbox_bytes=outbox * 180,
        status=status,
        info={"reasons": list(reasons), "uptime_s": 3600.0 + age_s},
    )
    await edge.send_batch(Kind.HEARTBEAT, [hb])


async def _send(svc: CloudService, edge: EdgeProducer, stream: Stream, n: int, version: int):
    """Send ``n`` parts predicted by ``version``; wait until learned and in a metric snapshot."""
    await edge.send_parts(stream.parts(n, model_version=version))
    await wait_until(lambda: svc.learned >= stream.n, 30, f"{stream.n} samples learned")
    learned_at = now_ns()
    deadline = asyncio.get_running_loop().time() + 10
    while not await asyncio.to_thread(
        svc.registry.metric_points, "quality", since_ns=learned_at, limit=1
    ):
        assert asyncio.get_running_loop().time() < deadline, "no metric snapshot within 10 s"
        await asyncio.sleep(0.05)


async def _champion(base: str) -> int | None:
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        versions = (await http.get("/api/models/quality/versions")).json()
    return next((v["version"] for v in versions if v["status"] == "champion"), None)


async def test_page_shows_fleet_and_drift_chart_and_rolls_back_only_with_the_token(
    kafka_broker, tmp_path, page: Page
):
    cfg = _config(kafka_broker, tmp_path)
    async with EdgeProducer(kafka_broker, cfg.kafka.topics(), agent_id="bootstrap") as boot:
        await boot.send_batch(Kind.HEARTBEAT, [Heartbeat("bootstrap", now_ns() - 600 * 10**9)])
    stream = Stream(seed=3, assets=("press-1",))

    async with (
        CloudService(cfg) as svc,
        EdgeProducer(kafka_broker, cfg.kafka.topics(), agent_id="gw-press-1") as edge,
        EdgeProducer(kafka_broker, cfg.kafka.topics(), agent_id="gw-paint-2") as other,
    ):
        base = f"http://127.0.0.1:{svc.api_port}"
        await _heartbeat(edge, 1, outbox=42)
        await _heartbeat(
            other, 1, age_s=45, outbox=12_800, status="degraded", reasons=("uplink: timed out",)
        )

        # the edge runs version 1; the first 800 parts are before the drift, sent in steps so
        # the metric snapshots spread over time
        for _ in range(4):
            await _send(svc, edge, stream, 200, version=1)
        await page.get(base + "/")
        await page.wait(
            lambda d: d.execute_script("return document.body.dataset.loaded === 'true'"),
            20,
            "the first poll rendered",
        )
        # the fleet: both agents, their health, the active model and the outbox
        await page.wait(
            lambda d: (
                len(d.find_elements("css selector", "#fleet-table tbody tr[data-agent]")) == 3
            ),
            10,
            "three agents in the fleet table",
        )
        row = await page.text('#fleet-table tr[data-agent="gw-press-1"]')
        assert "OK" in row and "quality v1" in row and "42" in row
        assert (
            await page.js(
                "return document.querySelector('tr[data-agent=\"gw-paint-2\"]').dataset.health"
            )
            == "stale"
        )
        assert "uplink: timed out" in await page.text('tr[data-agent="gw-paint-2"]')
        assert (
            await page.js(
                "return document.querySelector('tr[data-agent=\"bootstrap\"]').dataset.health"
            )
            == "down"
        )

        # the shopfloor drifts; the edge's version-1 predictions go wrong, ADWIN fires on the
        # edge's errors, the challenger learns the new shopfloor and is promoted
        stream.drift()
        learner = svc.learners["quality"]
        while learner.champion is not None and learner.champion.version == 1:
            assert stream.n < 2400, "no drift promotion within 1600 drifted parts"
            await _send(svc, edge, stream, 50, version=1)
        assert learner.drift.detections >= 1
        promoted = learner.champion.version
        # the edge swaps to it, says so in its heartbeat (a swap marker) and predicts well again
        await _heartbeat(edge, promoted, outbox=3)
        await wait_until(lambda: len(svc.model_swaps) >= 1, 20, "the swap seen in a heartbeat")
        stream.edge_w = stream.w
        for _ in range(4):
            await _send(svc, edge, stream, 75, version=promoted)

        chart = "#accuracy-chart"
        await page.wait(
            lambda d: (
                int(
                    d.find_element(
                        "css selector", f"{chart} path[data-series='edge']"
                    ).get_attribute("data-points")
                )
                >= 8
            ),
            20,
            "the edge accuracy line drawn with at least 8 points",
        )
        await page.wait(
            lambda d: (
                d.find_elements("css selector", f"{chart} g.marker[data-kind='drift']")
                and d.find_elements("css selector", f"{chart} g.marker[data-kind='promotion']")
                and d.find_elements("css selector", f"{chart} g.marker[data-kind='swap']")
            ),
            20,
            "drift, promotion and swap markers on the chart",
        )
        drawn = int(await page.js(f"return document.querySelector('{chart}').dataset.points"))
        assert drawn >= 20
        # the edge's accuracy fell after the drift: the line is not flat
        edge_values = await page.js(
            "return document.querySelector(\"#accuracy-chart path[data-series='edge']\")"
            ".getAttribute('d')"
        )
        ys = [float(seg.split()[1]) for seg in edge_values.replace("M", "L").split("L")[1:]]
        assert max(ys) - min(ys) > 20, "the edge accuracy line should show the drop"
        # throughput: frames per second were measured while the stream came in
        await page.wait(
            lambda d: (
                int(
                    d.find_element("css selector", "#throughput-chart").get_attribute("data-points")
                )
                > 0
            ),
            10,
            "throughput points",
        )
        # the champion tile counts the agents not running it (gw-paint-2 still runs v1)
        learner_name = await _learner_of(base, promoted)
        assert await page.text("#kpi-champion") == (
            f"v{promoted} · {learner_name}\n1 agent not on it yet"
        )

        directory = screenshot_dir()
        if directory is not None:
            await page.screenshot(directory / "dashboard.png", full_page=True)

        # roll back without a token: 401, shown; the champion stays
        rollback = '#model-quality button[data-action="rollback"]'
        await page.wait(
            lambda d: d.find_element("css selector", rollback).is_enabled(), 10, "rollback enabled"
        )
        assert await page.text(rollback) == f"Roll back to v{promoted - 1}"
        await page.click(rollback)
        await page.wait(
            lambda d: d.find_element("css selector", "#confirm").is_displayed(), 5, "the dialog"
        )
        await page.click("#confirm-ok")
        await page.wait(
            lambda d: (
                d.find_element("css selector", "#error").get_attribute("data-status") == "401"
            ),
            10,
            "the 401 notice",
        )
        assert "401 Unauthorized" in await page.text("#error")
        assert "Operator token" in await page.text("#error")
        # a wrong token: 403, shown; the champion stays
        await page.type("#token", "not-the-token")
        await page.click('#token-form button[type="submit"]')
        await page.click(rollback)
        await page.click("#confirm-ok")
        await page.wait(
            lambda d: (
                d.find_element("css selector", "#error").get_attribute("data-status") == "403"
            ),
            10,
            "the 403 notice",
        )
        assert "403 Forbidden" in await page.text("#error")
        if directory is not None:
            await page.screenshot(directory / "dashboard-forbidden.png")
        assert await _champion(base) == promoted
        # cancelling the dialog sends nothing
        await page.type("#token", TOKEN)
        await page.click('#token-form button[type="submit"]')
        assert await page.js("return sessionStorage.getItem('edgeloop.dashboard.token')") == TOKEN
        await page.click(rollback)
        await page.click("#confirm-cancel")
        assert await _champion(base) == promoted
        # the right token: rolled back, the page says so, the registry agrees
        await page.click(rollback)
        await page.click("#confirm-ok")
        await page.wait(
            lambda d: "is champion now" in d.find_element("css selector", "#message").text,
            10,
            "the success notice",
        )
        assert await _champion(base) == promoted - 1
        assert svc.learners["quality"].champion.version == promoted - 1
        await page.wait(
            lambda d: d.find_elements("css selector", f"{chart} g.marker[data-kind='rollback']"),
            10,
            "the rollback marker",
        )
        await page.wait(
            lambda d: (
                d.find_element(
                    "css selector", f'#model-quality tr[data-version="{promoted - 1}"]'
                ).get_attribute("data-status")
                == "champion"
            ),
            10,
            "the registry table shows the rolled-back champion",
        )
        # the fleet flags the agent still running the newer version
        await page.wait(
            lambda d: (
                "not deployed yet"
                in d.find_element("css selector", 'tr[data-agent="gw-press-1"]').text
            ),
            10,
            "the agent marked behind the champion",
        )
        if directory is not None:
            await page.screenshot(directory / "dashboard-rollback.png", full_page=True)

        # nothing came from anywhere else; no script error, no CSP violation
        origins = await page.js(
            "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
        )
        assert origins and set(origins) == {base}
        # the browser logs the two refused writes as failed loads; anything else is a defect
        errors = [
            e
            for e in await page.console_errors()
            if not ("/api/models/quality/rollback" in e and ("401" in e or "403" in e))
        ]
        assert errors == []


async def _learner_of(base: str, version: int) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        entry = (await http.get(f"/api/models/quality/versions/{version}")).json()
    return str(entry["learner"])
