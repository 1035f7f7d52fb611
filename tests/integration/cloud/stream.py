"""A learnable, drifting factory stream and a producer that sends it as the edge would."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from shared.records import Frame, Heartbeat, Label
from shared.topics import Topics
from shared.wire import Batch, Kind, encode_batch

T0 = 1_700_000_000_000_000_000
STEP_NS = 100_000_000  # a part every 0.1 s of event time


@dataclass
class Stream:
    """Parts with two features; quality is ``w . x > 0`` with some label noise; ``drift()``
    flips the rule. The edge "model" predicts with the pre-drift rule (so it is right before the
    drift and wrong after)."""

    seed: int = 7
    noise: float = 0.03
    assets: tuple[str, ...] = ("press-1", "press-2")
    w: tuple[float, float] = (1.5, -2.0)
    edge_w: tuple[float, float] = (1.5, -2.0)
    n: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def drift(self) -> None:
        self.w = (-self.w[0], -self.w[1])

    def parts(self, count: int, model_version: int | None = None) -> list[tuple[Frame, Label]]:
        out = []
        for _ in range(count):
            i = self.n
            self.n += 1
            asset = self.assets[i % len(self.assets)]
            x = {"temp": self.rng.gauss(0, 1), "pressure": self.rng.gauss(0, 1)}
            y = int(self.w[0] * x["temp"] + self.w[1] * x["pressure"] > 0)
            if self.rng.random() < self.noise:
                y = 1 - y
            edge = int(self.edge_w[0] * x["temp"] + self.edge_w[1] * x["pressure"] > 0)
            ts = T0 + i * STEP_NS
            frame = Frame(
                asset,
                f"part-{i}",
                ts,
                x,
                prediction=float(edge) if model_version is not None else None,
                model_version=model_version,
            )
            out.append((frame, Label(asset, f"part-{i}", ts + 30 * STEP_NS, y)))
        return out


class EdgeProducer:
    """Sends frame batches, then (late) label batches, numbered like an edge agent does."""

    def __init__(self, bootstrap: str, topics: Topics, agent_id: str = "edge-1") -> None:
        self.topics = topics
        self.agent_id = agent_id
        self.seq = 0
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=False
        )

    async def __aenter__(self) -> EdgeProducer:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send_raw(self, topic: str, key: bytes, value: bytes) -> None:
        await self.producer.send_and_wait(topic, value, key=key)
        self.sent.append((topic, key, value))

    async def send_batch(self, kind: Kind, records: list) -> None:
        by_asset: dict[str, list] = {}
        for r in records:
            by_asset.setdefault(getattr(r, "asset", self.agent_id), []).append(r)
        for asset, recs in by_asset.items():
            batch = Batch(self.agent_id, self.seq, kind, recs)
            self.seq += 1
            await self.send_raw(self.topics.for_kind(kind), asset.encode(), encode_batch(batch))

    async def send_parts(self, parts: list[tuple[Frame, Label]], batch: int = 50) -> None:
        """Frames first; each label batch goes out one frame batch later (late labels)."""
        chunks = [parts[i : i + batch] for i in range(0, len(parts), batch)]
        pending: list[Label] = []
        for chunk in chunks:
            await self.send_batch(Kind.FRAME, [f for f, _ in chunk])
            if pending:
                await self.send_batch(Kind.LABEL, pending)
            pending = [lb for _, lb in chunk]
        if pending:
            await self.send_batch(Kind.LABEL, pending)

    async def heartbeat(self, models: dict[str, int], outbox_depth: int = 0) -> None:
        hb = Heartbeat(self.agent_id, T0, models, outbox_depth=outbox_depth)
        await self.send_batch(Kind.HEARTBEAT, [hb])

    async def replay(self) -> int:
        """Send every message sent so far again, byte for byte (an outbox replay)."""
        sent = list(self.sent)
        for topic, key, value in sent:
            await self.producer.send_and_wait(topic, value, key=key)
        return len(sent)
