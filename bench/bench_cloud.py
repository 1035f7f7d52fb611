"""Cloud learner: samples/s through the whole ingest path next to a raw river loop, same run.

Set-up: a Tansu broker started here; an edge-like producer writes ``PARTS`` labelled parts of 4
assets as numbered wire batches (100 frames per batch, each label batch one frame batch later,
frames carrying the edge's prediction for model version 1), all before the service starts. The
cloud service then consumes from offset 0 with its defaults (consumer group, decode, dedupe,
join, the default candidates ``StandardScaler | LogisticRegression`` and
``HoeffdingTreeClassifier`` predicting then learning, the champion scored, ADWIN, the promotion
policy, checkpoints into SQLite); the figure is joined samples learned per second between the
first learned sample and the last.

Raw ceiling, same run, same data, same pipelines (built from the same default config): a plain
Python loop calling river's ``predict_proba_one`` then ``learn_one`` on each candidate (the
minimum a prequential learner must do); for the run whose frames carry no edge prediction,
plus ``predict_proba_one`` of a frozen copy of the candidate the service made champion (the
service scores that replica there). A last row shows ``learn_one`` alone, for scale.
This machine's speed drifts by +-25 % from one second to the next, so raw loop and service
alternate ``ROUNDS`` times; the table compares medians and also gives each round's ratio and
their median (single windows gave 0.60x to 1.22x for the same code).
"""

from __future__ import annotations

import asyncio
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.common import Result
from cloud.config import (
    ApiConfig,
    CloudConfig,
    DatabaseConfig,
    KafkaConfig,
    ModelConfig,
    PromotionConfig,
)
from cloud.learning import build_pipeline
from cloud.service import CloudService
from edgeloop.services import TansuBroker
from shared.records import Frame, Label
from shared.topics import Topics
from shared.wire import Batch, Kind, encode_batch

PARTS = 20_000
ROUNDS = 3
ASSETS = ("press-1", "press-2", "press-3", "press-4")
BATCH = 100
T0 = 1_700_000_000_000_000_000
STEP_NS = 100_000_000
FEATURES = ("spindle_temp", "vibration_rms", "power", "cycle_time", "torque", "coolant_temp")
WEIGHTS = (1.2, -1.6, 0.8, -0.5, 0.9, -0.3)


def make_parts(n: int, *, edge: bool = True, seed: int = 1) -> list[tuple[Frame, Label]]:
    """A learnable stream: quality is a linear rule of six features with 5 % label noise.

    With ``edge``, frames carry the prediction of the deployed version 1 (which knows the rule:
    a closed loop in steady state, where the edge runs the champion); without, they carry none.
    """
    rng = random.Random(seed)
    out: list[tuple[Frame, Label]] = []
    for i in range(n):
        asset = ASSETS[i % len(ASSETS)]
        x = {f: rng.gauss(0, 1) for f in FEATURES}
        s = sum(w * x[f] for w, f in zip(WEIGHTS, FEATURES, strict=True))
        y = int(s > 0)
        pred = float(y)
        if rng.random() < 0.05:
            y = 1 - y
        ts = T0 + i * STEP_NS
        frame = Frame(
            asset,
            f"{asset}-{i}",
            ts,
            x,
            prediction=pred if edge else None,
            model_version=1 if edge else None,
        )
        out.append((frame, Label(asset, f"{asset}-{i}", ts + 20 * STEP_NS, y)))
    return out


def _encoded(parts: list[tuple[Frame, Label]], topics: Topics) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value) in send order: per asset, frame batches with labels one batch late."""
    seq = 0
    msgs: list[tuple[str, bytes, bytes]] = []
    pending: dict[str, list[Label]] = {}
    by_asset: dict[str, list[tuple[Frame, Label]]] = {a: [] for a in ASSETS}
    for p in parts:
        by_asset[p[0].asset].append(p)
    chunks = {
        a: [ps[i : i + BATCH] for i in range(0, len(ps), BATCH)] for a, ps in by_asset.items()
    }
    for round_ in range(max(len(c) for c in chunks.values())):
        for asset in ASSETS:
            if round_ >= len(chunks[asset]):
                continue
            chunk = chunks[asset][round_]
            frames = Batch("bench-edge", seq, Kind.FRAME, [f for f, _ in chunk])
            seq += 1
            msgs.append((topics.frames, asset.encode(), encode_batch(frames)))
            if pending.get(asset):
                labels = Batch("bench-edge", seq, Kind.LABEL, pending[asset])
                seq += 1
                msgs.append((topics.labels, asset.encode(), encode_batch(labels)))
            pending[asset] = [lb for _, lb in chunk]
    for asset, labels_left in pending.items():
        if labels_left:
            msgs.append(
                (
                    topics.labels,
                    asset.encode(),
                    encode_batch(Batch("bench-edge", seq, Kind.LABEL, labels_left)),
                )
            )
            seq += 1
    return msgs


def _raw_rate(
    parts: list[tuple[Frame, Label]], *, predict: bool, replica: str | None = None
) -> float:
    """river alone: the default candidates' pipelines, predict_proba_one (opt.) then learn_one.

    With ``replica`` (a candidate's name), also what the service does when frames carry no
    edge prediction: once that candidate learned ``min_samples`` it is frozen (a copy, as the
    registry's pickle is) and that copy's ``predict_proba_one`` scores every later sample."""
    specs = ModelConfig().effective_learners()
    pipelines = {spec.name: build_pipeline(spec.pipeline) for spec in specs}
    data = [(f.features, int(lb.target)) for f, lb in parts]
    freeze_at = PromotionConfig().min_samples if replica else -1
    frozen: Any = None
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(data):
        for p in pipelines.values():
            if predict:
                p.predict_proba_one(x)
            p.learn_one(x, y)
        if frozen is not None:
            frozen.predict_proba_one(x)
        elif i + 1 == freeze_at:
            frozen = copy.deepcopy(pipelines[replica])  # type: ignore[index]
    return len(data) / (time.perf_counter() - t0)


async def _service_rate(
    bootstrap: str, parts: list[tuple[Frame, Label]], db: Path, prefix: str = "bench"
) -> dict[str, Any]:
    cfg = CloudConfig(
        environment="development",
        kafka=KafkaConfig(
            bootstrap_servers=bootstrap,
            topic_prefix=f"bench-{prefix}",
            group_id=f"bench-{prefix}",
            session_timeout_s=2,
        ),
        database=DatabaseConfig(url=f"sqlite:///{db}"),
        api=ApiConfig(enabled=False),
    )
    topics = cfg.kafka.topics()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5
    )
    await producer.start()
    try:
        futs = [await producer.send(t, v, key=k) for t, k, v in _encoded(parts, topics)]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    n = len(parts)
    async with CloudService(cfg, serve_api=False) as svc:
        deadline = time.monotonic() + 300
        while svc.learned == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the service learned nothing within 300 s")
            await asyncio.sleep(0.002)
        t0, n0 = time.perf_counter(), svc.learned
        while svc.learned < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service learned {svc.learned} of {n} within 300 s")
            await asyncio.sleep(0.005)
        dt = time.perf_counter() - t0
        return {
            "rate": (svc.learned - n0) / dt,
            "joined": svc.join.stats.joined,
            "checkpoints": svc.checkpoints,
            "promotions": len(svc.registry.promotions(cfg.models[0].name)),
            "champion": getattr(svc.learners[cfg.models[0].name].champion, "learner", None),
        }


def run() -> list[Result]:
    edge_parts = make_parts(PARTS, edge=True)
    cloud_parts = make_parts(PARTS, edge=False)
    edge_rounds: list[tuple[float, float]] = []  # (raw, service) per round
    cloud_rounds: list[tuple[float, float]] = []
    learn_only: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-cloud-") as tmp, TansuBroker() as broker:
        for i in range(ROUNDS):
            raw = _raw_rate(edge_parts, predict=True)
            got = asyncio.run(
                _service_rate(broker.bootstrap, edge_parts, Path(tmp) / f"edge{i}.db", f"edge{i}")
            )
            edge_rounds.append((raw, got["rate"]))
            got = asyncio.run(
                _service_rate(
                    broker.bootstrap, cloud_parts, Path(tmp) / f"cloud{i}.db", f"cloud{i}"
                )
            )
            # the cloud run also scores the champion's frozen replica: so does its ceiling
            raw = _raw_rate(cloud_parts, predict=True, replica=got["champion"])
            cloud_rounds.append((raw, got["rate"]))
            learn_only.append(_raw_rate(edge_parts, predict=False))
    med = statistics.median
    for name, rounds in (("edge", edge_rounds), ("cloud", cloud_rounds)):
        print(
            f"   cloud ({name} predictions): rounds (raw, service, ratio): "
            + ", ".join(f"({r:,.0f}, {v:,.0f}, {v / r:.2f}x)" for r, v in rounds)
            + f"; median of the round ratios {med(v / r for r, v in rounds):.2f}x",
            file=sys.stderr,
        )

    def measured(metric: str, ceiling: str, rounds: list[tuple[float, float]]) -> list[Result]:
        """The service's median next to the raw median, then the per-round ratios' median."""
        return [
            Result(
                "cloud",
                metric,
                med(v for _, v in rounds),
                "samples/s",
                ceiling,
                med(r for r, _ in rounds),
                target=">= 0.8x",
            ),
            Result(
                "cloud",
                f"  same, median of {ROUNDS} interleaved rounds: "
                + " ".join(f"{v / r:.2f}" for r, v in rounds),
                med(v / r for r, v in rounds),
                "x",
                target=">= 0.8x",
            ),
        ]

    return [
        *measured(
            f"samples/s Kafka->learn, champion scored at the edge ({PARTS:,} parts)",
            "raw river predict_proba_one+learn_one",
            edge_rounds,
        ),
        *measured(
            "samples/s Kafka->learn, champion replica scored in the cloud",
            "raw river, same + replica predict_proba_one",
            cloud_rounds,
        ),
        Result(
            "cloud",
            "samples/s Kafka->learn, champion scored at the edge",
            med(v for _, v in edge_rounds),
            "samples/s",
            "raw river learn_one only (no predict)",
            med(learn_only),
        ),
    ]


if __name__ == "__main__":
    from bench.common import format_table

    print(format_table(run()))
