"""The agent's Prometheus metrics (default registry, labelled by agent) and its health endpoint.

``/metrics`` serves the default registry (so the connectors' own ``edgeloop_connector_*``
metrics appear beside these); ``/healthz`` answers JSON with ``status`` ok | degraded | failing
and the reasons: HTTP 200 for ok and degraded (the process is alive and working; degraded means
e.g. running rules without a model), 503 for failing (a core task died; the process is about to
exit so its supervisor restarts it) and while stopping. A dependency-free asyncio HTTP/1.1 server: two GET
routes do not justify a web framework on a gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

__all__ = ["EdgeMetrics", "HealthServer"]

log = logging.getLogger(__name__)

_READINGS = Counter(
    "edgeloop_edge_readings_total", "Readings accepted into the outbox", ["agent", "connector"]
)
_QUEUE_DROPPED = Counter(
    "edgeloop_edge_queue_dropped_total",
    "Readings dropped because the ingest queue was full",
    ["agent", "connector"],
)
_FRAMES = Counter("edgeloop_edge_frames_total", "Frames built", ["agent", "asset"])
_FRAMES_SKIPPED = Counter(
    "edgeloop_edge_frames_skipped_total", "Frames skipped by on_stale: skip", ["agent"]
)
_INFER = Histogram(
    "edgeloop_edge_inference_seconds",
    "Latency of one batched model call",
    ["agent"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
_INFER_FRAMES = Counter("edgeloop_edge_scored_frames_total", "Frames scored", ["agent"])
_INFER_FAILED = Counter(
    "edgeloop_edge_inference_failed_frames_total",
    "Frames left unscored because the model call raised at run time",
    ["agent"],
)
_RULE_FIRINGS = Counter(
    "edgeloop_edge_rule_firings_total", "Rule activations", ["agent", "rule", "transition"]
)
_RULE_ERRORS = Counter(
    "edgeloop_edge_rule_errors_total", "Rule conditions that failed to evaluate", ["agent", "rule"]
)
_ACTIONS = Counter(
    "edgeloop_edge_actions_total", "Rule actions run", ["agent", "rule", "type", "outcome"]
)
_OUTBOX_ROWS = Gauge("edgeloop_edge_outbox_depth", "Records waiting in the outbox", ["agent"])
_OUTBOX_BYTES = Gauge("edgeloop_edge_outbox_bytes", "Bytes held by the outbox", ["agent"])
_OUTBOX_AGE = Gauge(
    "edgeloop_edge_outbox_oldest_age_seconds", "Age of the oldest unsent record", ["agent"]
)
_OUTBOX_DROPPED = Counter(
    "edgeloop_edge_outbox_dropped_total",
    "Records dropped by the overflow policy",
    ["agent", "kind"],
)
_UPLINK_BATCHES = Counter(
    "edgeloop_edge_uplink_batches_total", "Batches the broker acknowledged", ["agent", "kind"]
)
_UPLINK_RECORDS = Counter(
    "edgeloop_edge_uplink_records_total", "Records the broker acknowledged", ["agent", "kind"]
)
_UPLINK_ERRORS = Counter("edgeloop_edge_uplink_errors_total", "Failed send rounds", ["agent"])
_UPLINK_CONNECTED = Gauge(
    "edgeloop_edge_uplink_connected", "1 while the last send round succeeded", ["agent"]
)
_OUTBOX_UNACKED = Gauge(
    "edgeloop_edge_outbox_unacked_batches",
    "Batches the broker acked that the cloud has not yet confirmed applied",
    ["agent"],
)
_OUTBOX_UNACKED_AGE = Gauge(
    "edgeloop_edge_outbox_unacked_age_seconds",
    "Seconds since the broker acked the oldest batch the cloud has not confirmed",
    ["agent"],
)
_OUTBOX_RELEASED = Counter(
    "edgeloop_edge_outbox_released_total",
    "Records of sent batches released to make room before the cloud confirmed them",
    ["agent", "kind"],
)
_E2E_ACKED = Counter(
    "edgeloop_edge_applied_batches_total",
    "Batches the cloud confirmed applied (end-to-end acknowledgement)",
    ["agent"],
)
_REPLAYS = Counter(
    "edgeloop_edge_replays_total",
    "Sent batches queued again because their log was lost, by cause",
    ["agent", "cause"],
)
_DEAD_LETTERS = Counter(
    "edgeloop_edge_dead_letters_total",
    "Inputs kept as dead-letter events instead of records, by who refused them",
    ["agent", "origin"],
)
_TICK_ERRORS = Counter(
    "edgeloop_edge_tick_errors_total",
    "Unexpected errors inside a processing tick, by stage (the tick goes on)",
    ["agent", "stage"],
)
_DEGRADED = Gauge("edgeloop_edge_degraded", "1 while the agent reports itself degraded", ["agent"])
_FAILED = Gauge(
    "edgeloop_edge_failed", "1 once a core task died: the agent exits to be restarted", ["agent"]
)
_MODEL_VERSION = Gauge("edgeloop_edge_model_version", "Active model version (0: none)", ["agent"])
_MODEL_ERRORS = Counter("edgeloop_edge_model_load_errors_total", "Models refused", ["agent"])


class EdgeMetrics:
    """Metric children bound to one agent id."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        a = agent
        self.frames_skipped = _FRAMES_SKIPPED.labels(a)
        self.inference = _INFER.labels(a)
        self.scored = _INFER_FRAMES.labels(a)
        self.score_failed = _INFER_FAILED.labels(a)
        self.outbox_rows = _OUTBOX_ROWS.labels(a)
        self.outbox_bytes = _OUTBOX_BYTES.labels(a)
        self.outbox_age = _OUTBOX_AGE.labels(a)
        self.uplink_errors = _UPLINK_ERRORS.labels(a)
        self.uplink_connected = _UPLINK_CONNECTED.labels(a)
        self.degraded = _DEGRADED.labels(a)
        self.failed = _FAILED.labels(a)
        self.outbox_unacked = _OUTBOX_UNACKED.labels(a)
        self.outbox_unacked_age = _OUTBOX_UNACKED_AGE.labels(a)
        self.applied_batches = _E2E_ACKED.labels(a)
        self.model_version = _MODEL_VERSION.labels(a)
        self.model_errors = _MODEL_ERRORS.labels(a)
        self._cache: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(self.agent, *labels)
        return child

    def readings(self, connector: str, n: int) -> None:
        self._child(_READINGS, connector).inc(n)

    def queue_dropped(self, connector: str, n: int) -> None:
        self._child(_QUEUE_DROPPED, connector).inc(n)

    def frames(self, asset: str, n: int = 1) -> None:
        self._child(_FRAMES, asset).inc(n)

    def rule(self, rule: str, transition: str) -> None:
        self._child(_RULE_FIRINGS, rule, transition).inc()

    def rule_error(self, rule: str) -> None:
        self._child(_RULE_ERRORS, rule).inc()

    def action(self, rule: str, kind: str, ok: bool) -> None:
        self._child(_ACTIONS, rule, kind, "ok" if ok else "error").inc()

    def outbox_dropped(self, kind: str, n: int) -> None:
        self._child(_OUTBOX_DROPPED, kind).inc(n)

    def outbox_released(self, kind: str, n: int) -> None:
        self._child(_OUTBOX_RELEASED, kind).inc(n)

    def replayed(self, cause: str, n: int) -> None:
        self._child(_REPLAYS, cause).inc(n)

    def dead_letter(self, origin: str, n: int = 1) -> None:
        self._child(_DEAD_LETTERS, origin).inc(n)

    def tick_error(self, stage: str) -> None:
        self._child(_TICK_ERRORS, stage).inc()

    def uplink(self, kind: str, records: int) -> None:
        self._child(_UPLINK_BATCHES, kind).inc()
        self._child(_UPLINK_RECORDS, kind).inc(records)


class HealthServer:
    """``GET /metrics`` and ``GET /healthz`` on one small port. Async context manager."""

    def __init__(self, host: str, port: int, health: Callable[[], dict[str, Any]]) -> None:
        self.host = host
        self.port = port
        self._health = health
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1].split(b"?")[0]) if len(parts) >= 2 else (b"", b"")
            if method != b"GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == b"/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest()
            elif path in (b"/healthz", b"/health"):
                doc = self._health()
                bad = doc.get("status") in ("stopping", "failing")
                code = "503 Service Unavailable" if bad else "200 OK"
                status, ctype, body = code, "application/json", json.dumps(doc).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(writer.drain(), 5.0)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)
