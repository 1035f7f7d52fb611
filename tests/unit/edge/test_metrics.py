"""The agent's HTTP endpoint and its JSON log lines."""

from __future__ import annotations

import json
import logging

import httpx

from edge.cli import JsonFormatter
from edge.metrics import EdgeMetrics, HealthServer


async def test_health_metrics_and_unknown_routes():
    state = {"status": "degraded", "reasons": ["model: corrupt"]}
    EdgeMetrics("gw-http").outbox_dropped("reading", 3)
    async with HealthServer("127.0.0.1", 0, lambda: state) as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        r = await http.get(f"{base}/healthz", timeout=5)
        assert r.status_code == 200 and r.json() == state
        m = await http.get(f"{base}/metrics", timeout=5)
        assert 'edgeloop_edge_outbox_dropped_total{agent="gw-http",kind="reading"} 3.0' in m.text
        assert (await http.get(f"{base}/nope", timeout=5)).status_code == 404
        assert (await http.post(f"{base}/healthz", timeout=5)).status_code == 405
        state["status"] = "stopping"
        assert (await http.get(f"{base}/healthz", timeout=5)).status_code == 503


def test_json_log_lines_carry_level_logger_and_message():
    rec = logging.LogRecord(
        "edge.agent", logging.ERROR, __file__, 1, "model %s refused", ("v2",), None
    )
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["level"] == "error" and doc["logger"] == "edge.agent"
    assert doc["msg"] == "model v2 refused" and doc["ts"].endswith("Z")
