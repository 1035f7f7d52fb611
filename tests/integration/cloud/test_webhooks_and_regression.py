"""Drift webhooks against a real local HTTP server; a numeric target learned with MAE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import httpx
import uvicorn

from cloud.config import (
    ApiConfig,
    DriftConfig,
    ModelConfig,
    PromotionConfig,
    WebhookConfig,
)
from cloud.service import CloudService
from shared.records import Frame, Label
from tests.integration.cloud.stream import STEP_NS, T0, EdgeProducer, Stream
from tests.integration.cloud.test_service import _ensure_topics, make_config
from tests.waiting import wait_until


class Receiver:
    """An ASGI app that records JSON POSTs; the first ``fail_first`` answers are 503."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.attempts = 0
        self.received: list[dict] = []
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http"
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        self.attempts += 1
        status = 503 if self.attempts <= self.fail_first else 204
        if status == 204:
            self.received.append(json.loads(body))
            self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the test process keeps its own signal handling
        yield


@contextlib.asynccontextmanager
async def http_server(app):
    server = _Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done(), 10, "the webhook server")
        assert server.started, task.exception()
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/hooks/edgeloop"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_a_drift_is_posted_to_the_webhook_with_retries(kafka_broker, tmp_path):
    receiver = Receiver(fail_first=1)  # the first POST is refused with a 503: retried
    async with http_server(receiver) as url:
        cfg = make_config(
            kafka_broker,
            tmp_path,
            environment="development",
            api=ApiConfig(enabled=False),
            promotion=PromotionConfig(min_samples=200, window=200, margin=1.0),
            drift=DriftConfig(detector="ADWIN", params={"delta": 0.002}),
            webhooks=[
                WebhookConfig(
                    url=url,
                    events=["drift"],
                    retries=2,
                    timeout_s=5,
                    headers={"X-Edgeloop-Key": "k1"},
                )
            ],
        )
        await _ensure_topics(kafka_broker, cfg)
        stream = Stream(seed=3, assets=("press-1",))
        async with (
            CloudService(cfg) as svc,
            EdgeProducer(kafka_broker, cfg.kafka.topics()) as edge,
        ):
            parts = stream.parts(600, model_version=1)
            stream.drift()
            parts += stream.parts(300, model_version=1)
            await edge.send_parts(parts)
            await wait_until(lambda: svc.learned >= 900, 60, "900 samples learned")
            await wait_until(lambda: receiver.received, 15, "the drift webhook")
            drifts = svc.registry.drifts("quality")
            assert drifts
            body = receiver.received[0]
            assert body["event"] == "drift" and body["model"] == "quality"
            assert body["id"] == drifts[0]["id"] and body["version"] == 1
            assert body["source"] == "edge" and body["detector"] == "ADWIN"
            assert body["evidence"]["rolling"]["accuracy"] < 0.9
            assert receiver.headers[0]["x-edgeloop-key"] == "k1"
            assert receiver.attempts == 2 and svc.notifier.sent == 1
            assert svc.notifier.failed == 0
            # only the subscribed event: the initial promotion was not posted
            assert {b["event"] for b in receiver.received} == {"drift"}


def regression_parts(n: int, seed: int = 5) -> list[tuple[Frame, Label]]:
    """Spindle power from temperature and feed, plus noise (sd 0.1): a numeric target."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        x = {"temp": rng.uniform(-2, 2), "feed": rng.uniform(-2, 2)}
        y = 3.0 * x["temp"] - 2.0 * x["feed"] + 5.0 + rng.gauss(0, 0.1)
        ts = T0 + i * STEP_NS
        out.append(
            (Frame("press-1", f"r{i}", ts, x), Label("press-1", f"r{i}", ts + 5 * STEP_NS, y))
        )
    return out


async def test_a_numeric_target_is_learned_and_scored_with_mae(kafka_broker, tmp_path):
    cfg = make_config(
        kafka_broker,
        tmp_path,
        models=[ModelConfig(name="power", task="regression", rolling_window=200)],
        promotion=PromotionConfig(min_samples=200, window=200, margin=0.05),
    )
    await _ensure_topics(kafka_broker, cfg)
    async with (
        CloudService(cfg) as svc,
        EdgeProducer(kafka_broker, cfg.kafka.topics()) as edge,
    ):
        await edge.send_parts(regression_parts(1500))
        await wait_until(lambda: svc.learned >= 1500, 60, "1500 samples learned")
        ml = svc.learners["power"]
        assert set(ml.candidates) == {"linear", "hoeffding_tree"}
        linear = ml.candidates["linear"]
        assert linear.metrics.n == 1500
        overall, rolling = linear.metrics.overall(), linear.metrics.rolling()
        assert set(overall) == {"mae", "rmse"}
        # predict-then-learn: the early errors were large, the recent ones are near the noise
        assert rolling["mae"] < 0.2 < overall["mae"]
        # the challenger is the candidate with the lowest MAE over the promotion window
        best = min(ml.candidates.values(), key=lambda c: c.promo.get())
        assert ml.challenger() is best
        await svc.drain_hooks()
        first = svc.registry.promotions("power")[-1]
        assert first["reason"] == "initial"
        assert first["evidence"]["metric"] == "mae"
        assert first["evidence"]["higher_is_better"] is False
        champ = svc.registry.champion("power")
        assert champ is not None and champ.features == ["temp", "feed"]
        # the frozen champion is scored in the cloud (the frames carry no edge prediction)
        assert ml.champion is not None and ml.champion.metrics.n > 0
        assert "mae" in ml.champion.metrics.overall()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.api_port}") as http:
            text = (await http.get("/metrics")).text
        assert 'learner="linear",metric="mae"' in text
