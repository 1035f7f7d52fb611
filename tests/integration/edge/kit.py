"""What the edge integration tests share: a Kafka collector that checks exactly-once delivery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from aiokafka import AIOKafkaConsumer

from shared.records import Event, Frame, Heartbeat, Reading
from shared.topics import Topics
from shared.wire import Batch, decode_batch


class Collector:
    """Consumes every uplink topic from the beginning; keeps each (agent_id, batch_seq) once."""

    def __init__(self, bootstrap: str, agent_id: str, prefix: str = "edgeloop") -> None:
        self.bootstrap = bootstrap
        self.agent_id = agent_id  # batches of other agents (a shared broker) are ignored
        self.topics = Topics(prefix)
        self.batches: dict[tuple[str, int], Batch] = {}
        self.deliveries = 0
        self.duplicates = 0
        self.mismatched: list[int] = []  # a resent seq whose records differ (must never happen)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            *self.topics.uplink(),
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=500,
            request_timeout_ms=5000,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def __aenter__(self) -> Collector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            got = await self._consumer.getmany(timeout_ms=200)
            for msgs in got.values():
                for msg in msgs:
                    self.add(decode_batch(msg.value), msg.key)

    def add(self, batch: Batch, key: bytes | None = None) -> None:
        if batch.agent_id != self.agent_id:
            return
        self.deliveries += 1
        ident = (batch.agent_id, batch.batch_seq)
        seen = self.batches.get(ident)
        if seen is not None:
            self.duplicates += 1
            if list(seen.records) != list(batch.records):
                self.mismatched.append(batch.batch_seq)
            return
        if key is not None:
            first = batch.records[0]
            owner = first.agent_id if isinstance(first, Heartbeat) else first.asset
            assert key.decode() == owner, f"batch {batch.batch_seq}: key {key!r} != {owner!r}"
        self.batches[ident] = batch

    async def caught_up(self) -> bool:
        """True when the consumer's position is at the end of every partition."""
        c = self._consumer
        assert c is not None
        parts = c.assignment()
        if not parts:
            return False
        ends = await c.end_offsets(list(parts))
        for tp in parts:
            with contextlib.suppress(Exception):
                if await c.position(tp) < ends[tp]:
                    return False
        return True

    def records(self, kind: type) -> list[Any]:
        return [r for b in self.batches.values() for r in b.records if isinstance(r, kind)]

    @property
    def readings(self) -> list[Reading]:
        return self.records(Reading)

    @property
    def frames(self) -> list[Frame]:
        return self.records(Frame)

    @property
    def events(self) -> list[Event]:
        return self.records(Event)

    def seqs(self, agent_id: str) -> list[int]:
        return sorted(s for a, s in self.batches if a == agent_id)

    def assert_exactly_once(self, agent_id: str) -> None:
        """After dedupe on (agent_id, batch_seq): no gaps, resends identical, no duplicate row."""
        seqs = self.seqs(agent_id)
        assert seqs, "no batches arrived"
        missing = sorted(set(range(1, seqs[-1] + 1)) - set(seqs))
        assert not missing, f"{len(missing)} batch_seq gaps, first {missing[:10]}"
        assert not self.mismatched, f"resent batches differ: {self.mismatched[:10]}"
        keys = Counter((r.asset, r.tag, r.ts_ns) for r in self.readings)
        dup = [k for k, n in keys.items() if n > 1]
        assert not dup, f"{len(dup)} readings arrived in two batches, e.g. {dup[:3]}"


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Subscriber:
    """A paho client collecting what arrives on one topic filter."""

    def __init__(self, url: str, topic: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
