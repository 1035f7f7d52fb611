"""Model delivery: promotion recorded -> active on the edge, and the compiled model's speed.

Push latency: a river pipeline is promoted through the cloud's own path (registry -> hook ->
compile -> parity -> sign -> publish) and the time from the registry's promotion timestamp to
the agent's slot holding that version is measured, ``PROMOTIONS`` times, on loopback Tansu.
Shadow is off here (``shadow_frames: 0``): it adds ``shadow_frames`` live frames by design.
Ceiling: a raw aiokafka produce -> consume round trip on the same broker, same run.

Inference: the last compiled artifact in onnxruntime (batch 1 and 256) against river's own
``predict_proba_one`` on the same pipeline, same rows, same run; parity max |diff| reported.
"""

from __future__ import annotations

import asyncio
import pickle
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Result, rate

PROMOTIONS = 20
FEATURES = ["x_last", "y_last", "z_last", "w_last"]


def _pipeline(seed: int) -> tuple[Any, list[dict[str, float]]]:
    from river import linear_model, preprocessing

    rng = random.Random(seed)
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    rows = []
    for _ in range(500):
        x = {f: rng.uniform(-1, 1) for f in FEATURES}
        model.learn_one(x, x["x_last"] + 0.5 * x["y_last"] - x["z_last"] > 0)
        rows.append(x)
    return model, rows


async def _raw_round_trip(bootstrap: str, n: int = 20) -> float:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = f"bench-rt-{uuid.uuid4().hex[:6]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", metadata_max_age_ms=500
    )
    await producer.start()
    await consumer.start()
    lat: list[float] = []
    try:
        await producer.send_and_wait(topic, b"warm")
        await asyncio.wait_for(consumer.getone(), 20)
        for _ in range(n):
            t0 = time.perf_counter()
            await producer.send_and_wait(topic, b"x")
            await asyncio.wait_for(consumer.getone(), 10)
            lat.append(time.perf_counter() - t0)
    finally:
        await consumer.stop()
        await producer.stop()
    return statistics.median(lat)


async def _push(tmp: Path) -> tuple[list[float], float, Any, list[dict[str, float]]]:
    from cloud.config import CloudConfig
    from cloud.learning import PromotionDecision
    from cloud.service import CloudService
    from edge.agent import Agent
    from edge.config import edge_config_model
    from edgeloop.services import TansuBroker
    from shared.manifest import generate_keypair

    private, public = generate_keypair()
    (tmp / "k.key").write_bytes(private)
    (tmp / "k.pub").write_bytes(public)
    with TansuBroker() as kafka:
        ceiling = await _raw_round_trip(kafka.bootstrap)
        cloud = CloudService(
            CloudConfig.model_validate(
                {
                    "environment": "development",
                    "kafka": {
                        "bootstrap_servers": kafka.bootstrap,
                        "partitions": 1,
                        "session_timeout_s": 2,
                    },
                    "database": {"url": f"sqlite:///{tmp / 'c.db'}"},
                    "models": [{"name": "quality"}],
                    "promotion": {"enabled": False},
                    "api": {"port": 0},
                    "delivery": {
                        "enabled": True,
                        "private_key": str(tmp / "k.key"),
                        "artifact_dir": str(tmp / "art"),
                    },
                }
            )
        )
        agent_cfg = edge_config_model([]).model_validate(
            {
                "agent_id": "bench",
                "state_dir": str(tmp / "edge"),
                "uplink": {"bootstrap_servers": kafka.bootstrap},
                "http": {"port": None},
                "models": {
                    "public_key": str(tmp / "k.pub"),
                    "name": "quality",
                    "shadow_frames": 0,
                    "watch_frames": 0,
                },
            }
        )
        latencies: list[float] = []
        model: Any = None
        rows: list[dict[str, float]] = []
        async with cloud, Agent(agent_cfg) as agent:
            for i in range(PROMOTIONS + 1):
                model, rows = _pipeline(i)
                cloud.recent_frames["quality"].extend(rows[-256:])
                decision = PromotionDecision(
                    model="quality",
                    learner="logistic",
                    reason="manual",
                    evidence={},
                    pipeline_blob=pickle.dumps(model),
                    metrics={},
                    features=list(FEATURES),
                    steps=[],
                )
                entry = await cloud.apply_decision(decision, actor="bench")
                deadline = time.monotonic() + 30
                while True:
                    cur = agent.slot.current
                    if cur is not None and cur.version == entry.version:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"v{entry.version} not active on the edge in 30 s")
                    await asyncio.sleep(0.001)
                if i:  # the first includes the consumer's start-up
                    latencies.append((time.time_ns() - entry.updated_ns) / 1e9)
            compiled_path = agent.slot.current.path  # type: ignore[union-attr]
            blob = await asyncio.to_thread(Path(compiled_path).read_bytes)
    return latencies, ceiling, (model, blob), rows


def _inference(model: Any, blob: bytes, rows: list[dict[str, float]]) -> list[Result]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    x = np.array([[r[f] for f in FEATURES] for r in rows], dtype=np.float64)
    one = x[:1]
    batch = x[:256]
    onnx_1 = rate(lambda: (sess.run(["probability"], {"features": one}), 1)[1])
    onnx_b = rate(lambda: (sess.run(["probability"], {"features": batch}), 256)[1])
    river_1 = rate(lambda: (model.predict_proba_one(rows[0]), 1)[1])
    got = sess.run(["probability"], {"features": x})[0]
    want = np.array([model.predict_proba_one(r)[True] for r in rows])
    diff = float(np.max(np.abs(np.asarray(got).ravel() - want)))
    return [
        Result("delivery", "compiled onnx batch=1", onnx_1, "rows/s", "river predict_proba_one", river_1),
        Result("delivery", "compiled onnx batch=256", onnx_b, "rows/s", "river predict_proba_one", river_1),
        Result("delivery", "parity max |onnx - river|", diff, "abs", target="<= 1e-5", higher_is_better=False),
    ]  # fmt: skip


def run() -> list[Result]:
    with tempfile.TemporaryDirectory() as d:
        latencies, ceiling, (model, blob), rows = asyncio.run(_push(Path(d)))
    lat = sorted(latencies)
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    out = [
        Result(
            "delivery",
            f"push latency p50 ({len(lat)} promotions)",
            p50 * 1000,
            "ms",
            "raw Kafka produce->consume round trip p50",
            ceiling * 1000,
            target="< 1000 ms",
            higher_is_better=False,
        ),
        Result(
            "delivery",
            "push latency p99",
            p99 * 1000,
            "ms",
            "raw Kafka produce->consume round trip p50",
            ceiling * 1000,
            higher_is_better=False,
        ),
    ]
    return out + _inference(model, blob, rows)


if __name__ == "__main__":
    from bench.common import format_table

    print(format_table(run()))
