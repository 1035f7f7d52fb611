"""The wire ledger: an independent reader of every uplink topic.

Its own Kafka consumer (no group, from the beginning of every partition, every uplink topic)
records each batch identity ``(agent_id, incarnation, batch_seq)`` it sees and how often, a
digest of each occurrence's bytes (a resend must be byte for byte the same batch), and the
contents the checker needs: the readings of tracked assets (the numbered MQTT stream, the
poison assets) and every event (dead letters). It never asks the system under test anything.

Tansu keeps its log in memory: a broker restarted empty hands out the same offsets again for
other messages. The rig tells the ledger when it restarted the broker (:meth:`reconnect` with
``new_log``: a fresh consumer reads the new log from its start); independently, the ledger
notices a log that now ends before its position and reads that partition again from the start.
An occurrence is keyed by (log generation, topic, partition, offset, digest), so reading a log
twice never counts as a duplicate on the wire, and a replaced log is never mistaken for one
already read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.records import Event, Reading
from shared.topics import Topics
from shared.wire import Kind, WireDecodeError, decode_batch

__all__ = ["Ident", "WireLedger"]

log = logging.getLogger("chaos.ledger")

#: a batch's identity: (agent_id, incarnation, batch_seq)
Ident = tuple[str, str, int]


class WireLedger:
    """Every batch seen on the uplink topics. Start it, let it run, ``stop`` it (idempotent)."""

    def __init__(self, bootstrap: str, prefix: str, track_assets: set[str]) -> None:
        self.bootstrap = bootstrap
        self.topics = Topics(prefix)
        self.track_assets = set(track_assets)
        self.generation = 0
        self._occurrences: set[tuple[int, str, int, int, bytes]] = set()
        #: wire occurrences per identity (distinct messages in the logs)
        self.seen: Counter[Ident] = Counter()
        self.digests: dict[Ident, bytes] = {}
        #: identities sent twice with different bytes (must never happen)
        self.diverged: set[Ident] = set()
        self.kinds: dict[Ident, Kind] = {}
        self.records: dict[Ident, int] = {}
        #: readings of the tracked assets, per identity
        self.readings: dict[Ident, list[Reading]] = {}
        self.events: dict[Ident, list[Event]] = {}
        self.undecodable: list[str] = []
        self.log_resets = 0  # partitions found to end before what was read (a lost log)
        self._short: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._consumer = AIOKafkaConsumer(
            *self.topics.uplink(),
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=500,
            request_timeout_ms=5000,
            client_id="chaos-ledger",
        )
        try:
            async with asyncio.timeout(30):
                await self._consumer.start()
        except BaseException:
            consumer, self._consumer = self._consumer, None
            await _stop_quietly(consumer)
            raise
        self._task = asyncio.create_task(self._run(), name="chaos-ledger")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await _stop_quietly(consumer)

    async def reconnect(self, *, new_log: bool) -> None:
        """A fresh consumer from the start of every partition; ``new_log``: the broker lost its
        log (offsets are handed out again), so what follows is another generation."""
        await self.stop()
        if new_log:
            self.generation += 1
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.start()
                return
            except Exception as exc:  # the broker is still coming back
                if time.monotonic() > deadline:
                    raise
                log.info("ledger: reconnect failed (%s); retrying", exc)
                await asyncio.sleep(0.5)

    # --- reading ------------------------------------------------------------------------------

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        next_check = time.monotonic() + 1.0
        while True:
            got = await consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, msgs in got.items():
                for msg in msgs:
                    self._add(tp.topic, tp.partition, msg.offset, msg.value)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                with contextlib.suppress(Exception):  # a broker that is down: next time
                    await self._check_log_ends(consumer)

    async def _check_log_ends(self, consumer: AIOKafkaConsumer) -> None:
        """A partition whose high watermark stays below what was read, three checks in a row,
        is a new log. The high watermark of the fetch responses, not ListOffsets: Tansu answers
        ListOffsets(latest) with the base offset of the last record batch plus one, which is
        below the true end whenever that batch held more than one record."""
        for tp in list(consumer.assignment()):
            hw = consumer.highwater(tp)
            pos = await consumer.position(tp)
            if hw is None or hw >= pos:
                self._short.pop(tp, None)
                continue
            seen = self._short[tp] = self._short.get(tp, 0) + 1
            if seen < 3:
                continue
            del self._short[tp]
            log.warning(
                "ledger: %s[%d] ends at %d, before %d already read: a new log",
                tp.topic,
                tp.partition,
                hw,
                pos,
            )
            self.log_resets += 1
            self.generation += 1
            await consumer.seek_to_beginning(tp)

    def _add(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        raw = value or b""
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        key = (self.generation, topic, partition, offset, digest)
        if key in self._occurrences:
            return  # the same message read again (a reconnect), not another one
        self._occurrences.add(key)
        try:
            batch = decode_batch(raw)
        except WireDecodeError as exc:
            self.undecodable.append(f"{topic}[{partition}]@{offset}: {exc}")
            return
        ident: Ident = (batch.agent_id, batch.incarnation, batch.batch_seq)
        self.seen[ident] += 1
        first = self.digests.setdefault(ident, digest)
        if first != digest:
            self.diverged.add(ident)
            return
        if self.seen[ident] > 1:
            return
        self.kinds[ident] = batch.kind
        self.records[ident] = len(batch.records)
        if batch.kind is Kind.READING:
            mine = [r for r in batch.records if isinstance(r, Reading)]
            tracked = [r for r in mine if r.asset in self.track_assets]
            if tracked:
                self.readings[ident] = tracked
        elif batch.kind is Kind.EVENT:
            self.events[ident] = [r for r in batch.records if isinstance(r, Event)]

    # --- questions ----------------------------------------------------------------------------

    async def caught_up(self) -> bool:
        """True when the consumer's position is at the high watermark of every partition it
        reads (as the last fetch responses reported it; see :meth:`_check_log_ends`)."""
        consumer = self._consumer
        if consumer is None:
            return False
        parts = list(consumer.assignment())
        if not parts:
            return False
        for tp in parts:
            hw = consumer.highwater(tp)
            if hw is None or await consumer.position(tp) < hw:
                return False
        return True

    def of_agent(self, agent_id: str) -> set[Ident]:
        return {i for i in self.seen if i[0] == agent_id}

    def tracked_values(self, idents: set[Ident], asset: str, tag: str) -> list[Any]:
        """The values of every tracked reading (asset, tag) in the given batches."""
        return [
            r.value
            for i in idents
            for r in self.readings.get(i, ())
            if r.asset == asset and r.tag == tag
        ]

    def partitions(self) -> list[TopicPartition]:
        return [] if self._consumer is None else sorted(self._consumer.assignment())


async def _stop_quietly(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer whatever state its broker is in. aiokafka's fetcher can raise the
    CancelledError of its own fetch task out of ``stop()`` when that task was backing off from
    a broker that went away; only a cancellation of the caller is passed on."""
    try:
        async with asyncio.timeout(15):
            await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception as exc:
        log.info("ledger: consumer stop: %s", exc)
