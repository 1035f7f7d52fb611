"""The agent's end of the control topic: the cloud's end-to-end acks and replay requests.

A group-less consumer of ``<prefix>.control`` (:mod:`shared.control`), assigned every partition.
It keeps only messages keyed by this agent's id or ``*``:

* ``applied`` -> :meth:`edge.outbox.Outbox.apply_acks` deletes the batches the cloud confirmed,
  and stores how far this consumer read in the same transaction, so a restarted agent resumes
  where it stopped and misses no acknowledgement;
* ``replay`` -> :meth:`edge.outbox.Outbox.requeue`: every sent batch the cloud has not confirmed
  is sent again (the cloud lost them from its broker; it drops what it had already applied).

The consumer watches its own log too: a stored position beyond the end of the partition (or
before its start), or a high watermark that falls below the position while reading, means the
broker lost the control log — and so, almost certainly, the uplink topics' logs as well. The
agent then replays on its own, without waiting to be asked, and reads the new log from its start.

A fresh outbox (no stored position) starts at the end of the topic: acknowledgements published
before this incarnation existed are not its own. Reconnects back off like the uplink's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from edge.config import UplinkConfig
from edge.metrics import EdgeMetrics
from edge.outbox import AppliedAck, Outbox, OutboxError
from edge.uplink import Uplink, consumer_kwargs
from shared.control import BROADCAST, ControlError, decode_control
from shared.logcheck import LogEndWatch, log_ends
from shared.supervision import cancel_requested, close_quietly
from shared.topics import Topics
from shared.wire import Kind

__all__ = ["ControlLink"]

log = logging.getLogger(__name__)

#: how often the consumer compares its positions with the broker's log ends (seconds)
LOG_CHECK_INTERVAL = 2.0


class ControlLink:
    """Reads the control topic for one agent. Async context manager; ``stop`` is idempotent."""

    def __init__(
        self, cfg: UplinkConfig, agent_id: str, outbox: Outbox, uplink: Uplink, metrics: EdgeMetrics
    ) -> None:
        self.cfg = cfg
        self.agent_id = agent_id
        self.outbox = outbox
        self.uplink = uplink
        self.metrics = metrics
        self.topics = Topics(cfg.topic_prefix)
        self._keys = {agent_id.encode(), BROADCAST.encode()}
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.connected = False
        self.last_error: str | None = None
        self.acks = 0  # applied messages for this agent
        self.confirmed = 0  # batches deleted on the cloud's word
        self.replays = 0  # replay requests honoured
        self.log_losses = 0  # control logs found lost or replaced
        self.unreadable = 0
        self.last_ack_at: float | None = None
        self._replay_ids: set[str] = set()
        self._ends_watch = LogEndWatch()
        self._reached = False  # the current session got as far as reading
        self.stopping = False

    async def start(self) -> None:
        if self._task is None:
            self.stopping = False
            self._task = asyncio.create_task(self._run(), name=f"control:{self.agent_id}")

    async def stop(self) -> None:
        self.stopping = True  # its task may end now
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> ControlLink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def _within(self) -> float:
        """The bound on one request to the broker (seconds)."""
        return self.cfg.request_timeout_ms / 1000 + 5

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "last_error": self.last_error,
            "acks": self.acks,
            "confirmed_batches": self.confirmed,
            "replays": self.replays,
            "log_losses": self.log_losses,
            "unreadable": self.unreadable,
            "last_ack_age_s": None
            if self.last_ack_at is None
            else round(time.monotonic() - self.last_ack_at, 1),
        }

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.cfg.backoff.initial
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                if cancel_requested():
                    raise
                self._lost("CancelledError: a broker call was cancelled under the consumer", delay)
            except (KafkaError, OSError, TimeoutError, OutboxError) as exc:
                self._lost(f"{type(exc).__name__}: {exc}", delay)
            finally:
                consumer, self._consumer = self._consumer, None
                if consumer is not None:
                    await close_quietly(consumer.stop)
            if self._reached:
                delay = self.cfg.backoff.initial  # the last session worked: start over
                self._reached = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.backoff.max)

    def _lost(self, error: str, delay: float) -> None:
        self.connected = False
        self.last_error = error
        log.warning("control topic: %s; retrying in %.1fs", error, delay)

    async def _session(self) -> None:
        topic = self.topics.control
        consumer = AIOKafkaConsumer(
            topic,  # group-less: every partition is assigned to this consumer
            **consumer_kwargs(self.cfg),
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
            client_id=f"edgeloop-control-{self.agent_id}",
        )
        self._consumer = consumer
        # a start cut short leaves aiokafka's bootstrap connection open: on a cancel or a
        # timeout it is let finish (bounded), so that stop() closes everything it opened
        starting = asyncio.ensure_future(consumer.start())
        try:
            async with asyncio.timeout(self._within):
                await asyncio.shield(starting)
        except BaseException:
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(5.0):
                    await starting
            raise
        tps = await self._assignment(consumer, topic)
        await self._position(consumer, tps)
        self.connected = True
        self._reached = True
        self.last_error = None
        log.info(
            "control topic %s: reading %d partitions from %s",
            topic,
            len(tps),
            {tp.partition: await consumer.position(tp) for tp in tps},
        )
        next_check = time.monotonic() + LOG_CHECK_INTERVAL
        while True:
            got = await consumer.getmany(timeout_ms=500, max_records=1000)
            acks: list[AppliedAck] = []
            positions: dict[int, int] = {}
            replay: list[tuple[str, list[tuple[Kind, int]] | None]] = []
            for tp, msgs in got.items():
                for msg in msgs:
                    positions[tp.partition] = msg.offset + 1
                    if msg.key not in self._keys:
                        continue
                    self._take(msg.value, acks, replay)
            if acks or positions:
                gone = await self.outbox.apply_acks(acks, positions)
                if acks:
                    self.acks += 1
                    self.last_ack_at = time.monotonic()
                if gone:
                    self.confirmed += gone
                    self.metrics.applied_batches.inc(gone)
            for reason, parts in replay:
                await self._replay("cloud", reason, parts)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + LOG_CHECK_INTERVAL
                if not await self._log_intact(consumer, tps):
                    await self._replay("control_log_lost", "the control topic's log was lost")

    async def _assignment(self, consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
        deadline = time.monotonic() + self._within
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no partitions of {topic} (the cloud creates the topic)")
            await asyncio.sleep(0.1)
        return sorted(consumer.assignment())

    async def _position(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        stored = await self.outbox.control_positions()
        async with asyncio.timeout(self._within):
            starts = await consumer.beginning_offsets(tps)
            ends = await log_ends(consumer, tps)
        lost = False
        for tp in tps:
            pos = stored.get(tp.partition)
            if pos is None:
                consumer.seek(tp, ends[tp])  # a fresh outbox: nothing before now is ours
            elif pos >= starts[tp]:
                # beyond the end the broker reports: most likely a lost log, but the answer
                # may be stale; parked there, the log-end watch decides on two sightings
                consumer.seek(tp, pos)
            else:
                lost = True
                log.error(
                    "control topic %s[%d]: stored position %d is before the log start (%d, end "
                    "%d): records were removed unread; reading from the start and re-sending "
                    "every batch the cloud has not confirmed",
                    tp.topic,
                    tp.partition,
                    pos,
                    starts[tp],
                    ends[tp],
                )
                consumer.seek(tp, starts[tp])
        if lost:
            await self._replay("control_log_lost", "the control topic's log was lost")

    async def _log_intact(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
        """False when a partition's log ends before what this consumer already read (found
        twice at the same position: :mod:`shared.logcheck`)."""
        async with asyncio.timeout(self._within):
            ends = await log_ends(consumer, tps, tries=1)
        positions = {tp: await consumer.position(tp) for tp in tps}
        short = self._ends_watch.check(positions, ends)
        for tp in short:
            log.error(
                "control topic %s[%d] ends at %d, before offset %d already read: the broker "
                "lost its log; re-sending every batch the cloud has not confirmed",
                tp.topic,
                tp.partition,
                ends[tp],
                positions[tp],
            )
            consumer.seek(tp, 0)
            await self.outbox.apply_acks([], {tp.partition: 0})
        return not short

    def _take(
        self,
        value: bytes | None,
        acks: list[AppliedAck],
        replay: list[tuple[str, list[tuple[Kind, int]] | None]],
    ) -> None:
        try:
            msg = decode_control(value)
        except ControlError as exc:
            self.unreadable += 1
            log.warning("control topic: unreadable message skipped: %s", exc)
            return
        if msg.agent_id not in (self.agent_id, BROADCAST):
            return
        if msg.type == "replay":
            if msg.id and msg.id in self._replay_ids:
                return
            if msg.id:
                self._replay_ids.add(msg.id)
            parts: list[tuple[Kind, int]] | None = None
            if msg.replay_parts is not None:
                parts = []
                for topic, partition in msg.replay_parts:
                    kind = self.topics.kind_of(topic)
                    if kind is not None:
                        parts.append((kind, partition))
            replay.append((msg.reason or "asked by the cloud", parts))
            return
        for part in msg.parts:
            kind = self.topics.kind_of(part.topic)
            if kind is None:
                continue
            acks.append(AppliedAck(msg.incarnation, kind, part.partition, part.floor, part.ranges))

    async def _replay(
        self, cause: str, reason: str, parts: list[tuple[Kind, int]] | None = None
    ) -> None:
        n = await self.outbox.requeue(parts)
        self.replays += 1
        if cause != "cloud":
            self.log_losses += 1
        self.metrics.replayed(cause, n)
        log.warning("replay (%s): %d sent batches queued to be sent again", reason, n)
        self.uplink.notify()
