"""The dashboard's HTTP surface (no browser): page, assets, headers, and the read endpoints."""

from __future__ import annotations

import httpx
import pytest

from cloud.dashboard import ThroughputSampler, dashboard_router, fleet_health
from cloud.service import CloudService
from shared.records import Heartbeat, now_ns
from shared.wire import Kind
from tests.integration.cloud.stream import EdgeProducer, Stream
from tests.integration.dashboard.test_dashboard import _config
from tests.waiting import wait_until


def test_fleet_health_by_heartbeat_age_then_status():
    kw = {"stale_after_s": 30, "down_after_s": 120}
    assert fleet_health(1, "ok", **kw) == "ok"
    assert fleet_health(1, "degraded", **kw) == "degraded"
    assert fleet_health(31, "ok", **kw) == "stale"
    assert fleet_health(121, "degraded", **kw) == "down"


def test_health_thresholds_must_be_ordered():
    with pytest.raises(ValueError, match="stale_after_s < down_after_s"):
        dashboard_router(stale_after_s=60, down_after_s=30)


async def test_page_assets_headers_and_read_endpoints(kafka_broker, tmp_path):
    cfg = _config(kafka_broker, tmp_path)
    stream = Stream(seed=5, assets=("press-1",))
    async with (
        CloudService(cfg) as svc,
        EdgeProducer(kafka_broker, cfg.kafka.topics(), agent_id="gw-1") as edge,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.api_port}", timeout=5) as http,
    ):
        r = await http.get("/")
        assert r.status_code == 307 and r.headers["location"] == "/dashboard/"
        r = await http.get("/dashboard/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        # every asset the page names is served, from this origin only
        for name, media in (
            ("dashboard.js", "text/javascript"),
            ("dashboard.css", "text/css"),
            ("favicon.svg", "image/svg+xml"),
        ):
            assert f"/dashboard/static/{name}" in r.text
            a = await http.get(f"/dashboard/static/{name}")
            assert a.status_code == 200 and a.headers["content-type"].startswith(media)
            assert "http://" not in a.text.replace("http://www.w3.org/2000/svg", "")
            assert "https://" not in a.text
        assert (await http.get("/dashboard/static/index.html.bak")).status_code == 404
        assert (await http.get("/dashboard/static/..%2F__init__.py")).status_code == 404

        # before any data: models listed, no fleet, no rates
        ov = (await http.get("/api/dashboard/overview")).json()
        assert ov["fleet"] == [] and ov["throughput"]["current"] is None
        assert [m["name"] for m in ov["models"]] == ["quality"] and ov["write_protected"]
        r = await http.get("/api/dashboard/timeline", params={"model": "nope"})
        assert r.status_code == 404 and "configured: ['quality']" in r.json()["detail"]
        r = await http.get("/api/dashboard/timeline", params={"model": "quality", "window_s": 0})
        assert r.status_code == 422

        await edge.send_batch(Kind.HEARTBEAT, [Heartbeat("gw-1", now_ns(), {"quality": 1}, 5)])
        await edge.send_parts(stream.parts(400, model_version=1))
        await wait_until(lambda: svc.learned >= 400, 30, "400 samples learned")
        ov = (await http.get("/api/dashboard/overview")).json()
        [agent] = ov["fleet"]
        assert agent["agent_id"] == "gw-1" and agent["health"] == "ok"
        assert agent["outbox_depth"] == 5 and agent["behind"] == {}
        assert ov["throughput"]["totals"]["frames"] == 400
        assert ov["throughput"]["join"]["joined"] == 400
        model = ov["models"][0]
        assert model["champion"]["version"] == 1 and model["champion"]["edge"]["n"] > 0

        await wait_until(lambda: svc.checkpoints >= 1, 10, "a checkpoint")
        tl = (await http.get("/api/dashboard/timeline", params={"model": "quality"})).json()
        assert tl["champion"] == 1 and tl["primary"] == "accuracy"
        assert {"edge", "logistic", "hoeffding_tree"} <= set(tl["series"])
        # the newest figures are always the last point, marked live
        last = tl["series"]["edge"][-1]
        assert last["live"] and last["version"] == 1 and 0.9 < last["rolling"]["accuracy"] <= 1
        assert [p["to_version"] for p in tl["promotions"]] == [1]
        # max_points bounds every series and keeps the newest point
        small = (
            await http.get("/api/dashboard/timeline", params={"model": "quality", "max_points": 10})
        ).json()
        for subject, points in small["series"].items():
            assert len(points) <= 11, subject
            assert points[-1]["live"], subject


def test_throughput_rates_from_counter_differences():
    class Topics:
        telemetry, frames, labels, events, agents = "t", "f", "l", "e", "a"

    class Svc:
        topics = Topics()
        learned = 0

        class stats:
            records: dict[str, int] = {}

    svc = Svc()
    sampler = ThroughputSampler(keep=10, min_interval_s=0.0)
    sampler.sample(svc)  # type: ignore[arg-type]
    svc.stats.records = {"t": 500, "f": 50}
    svc.learned = 40
    first = sampler.samples[0]
    sampler.sample(svc)  # type: ignore[arg-type]
    dt = sampler.samples[1].mono - first.mono
    [point] = sampler.series()
    assert point["telemetry"] == pytest.approx(500 / dt)
    assert point["frames"] == pytest.approx(50 / dt)
    assert point["learned"] == pytest.approx(40 / dt)
    assert point["labels"] == 0
    # a counter that went back (restored checkpoint) gives 0, never a negative rate
    svc.stats.records = {"t": 100}
    sampler.sample(svc)  # type: ignore[arg-type]
    assert sampler.series()[-1]["telemetry"] == 0
