"""The uplink: outbox -> Kafka, at least once, with numbered batches the cloud deduplicates.

Each round takes up to ``max_in_flight`` of the oldest batches still to send from the outbox
(sealed, numbered and encoded when they were appended, so a resend is byte for byte the same),
sends them (key = asset, topic per kind) with ``acks="all"``, waits for every ack, and records
in the outbox where the broker put each one (partition and offset). The batches stay in the
outbox until the cloud says it has applied them (:mod:`edge.control`, the end-to-end
acknowledgement), unless ``delete_after: broker`` asks for the old contract (deleted at the
broker's ack: for consumers that are not the edgeloop cloud). A failed round closes the producer
and tries again after a capped exponential backoff (``initial`` doubling to ``max``, forever):
the cloud being away for hours costs outbox space, never data, until the overflow policy says so.

Every message carries the header ``el-low``: the lowest ``batch_seq`` the outbox still holds.
Nothing below it will ever be sent again by this incarnation, which lets the cloud keep its
dedupe state exact (docs/reliability.md).

The idempotent producer is off on purpose: the embedded Tansu broker rejects it, and the
``(agent_id, incarnation, batch_seq)`` identity already makes redelivery harmless downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaProducer

from edge.config import UplinkConfig
from edge.metrics import EdgeMetrics
from edge.outbox import ClaimedBatch, Outbox, SentBatch
from shared.supervision import cancel_requested, close_quietly
from shared.topics import Topics

__all__ = ["LOW_HEADER", "Uplink", "consumer_kwargs", "producer_kwargs"]

#: the Kafka header naming the lowest batch_seq the sending outbox still holds
LOW_HEADER = "el-low"

log = logging.getLogger(__name__)


def _client_kwargs(cfg: UplinkConfig) -> dict[str, Any]:
    """aiokafka bootstrap and security settings from the config (TLS/SASL passed through)."""
    kw: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "request_timeout_ms": cfg.request_timeout_ms,
        "security_protocol": cfg.security_protocol,
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=str(cfg.ssl_cafile) if cfg.ssl_cafile else None)
        if cfg.ssl_certfile:
            ctx.load_cert_chain(
                str(cfg.ssl_certfile), str(cfg.ssl_keyfile) if cfg.ssl_keyfile else None
            )
        kw["ssl_context"] = ctx
    if cfg.sasl_mechanism:
        kw["sasl_mechanism"] = cfg.sasl_mechanism
        kw["sasl_plain_username"] = cfg.sasl_username
        kw["sasl_plain_password"] = cfg.sasl_password
    return kw


def producer_kwargs(cfg: UplinkConfig) -> dict[str, Any]:
    """aiokafka producer settings from the config."""
    kw = _client_kwargs(cfg)
    kw.update(
        acks="all",
        enable_idempotence=False,
        linger_ms=cfg.linger_ms,
        max_request_size=8 * 1024 * 1024,
        max_batch_size=1024 * 1024,
        retry_backoff_ms=100,
    )
    if cfg.compression != "none":
        kw["compression_type"] = cfg.compression
    return kw


def consumer_kwargs(cfg: UplinkConfig) -> dict[str, Any]:
    """aiokafka settings for the agent's group-less consumers of the cloud's topics."""
    kw = _client_kwargs(cfg)
    kw.update(group_id=None, enable_auto_commit=False, metadata_max_age_ms=5000)
    return kw


class Uplink:
    """Drains the outbox into Kafka. Async context manager; ``stop`` flushes for a bounded time."""

    def __init__(
        self, cfg: UplinkConfig, agent_id: str, outbox: Outbox, metrics: EdgeMetrics
    ) -> None:
        self.cfg = cfg
        self.agent_id = agent_id
        self.outbox = outbox
        self.metrics = metrics
        self.topics = Topics(cfg.topic_prefix)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._producer: AIOKafkaProducer | None = None
        self.connected = False
        self.last_error: str | None = None
        self.acked_batches = 0
        self.acked_records = 0

    async def start(self) -> None:
        if self._task is not None:
            return
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"uplink:{self.agent_id}")

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Send what the outbox holds for up to ``flush_timeout`` s, then stop. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            if flush_timeout > 0 and self.connected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), flush_timeout)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._close_producer()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def stopping(self) -> bool:
        """Asked to stop (its task may end now)."""
        return self._stopping

    def notify(self) -> None:
        """New rows are in the outbox."""
        self._wake.set()

    # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancel that arrives
    # as the awaited call completes, and a swallowed cancel left stop() waiting for a loop
    # that went on retrying

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await close_quietly(producer.stop)

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(**producer_kwargs(self.cfg))
            try:
                async with asyncio.timeout(self.cfg.request_timeout_ms / 1000 + 5):
                    await producer.start()
            except BaseException:
                await close_quietly(producer.stop)
                raise
            self._producer = producer
        return self._producer

    async def _run(self) -> None:
        delay = self.cfg.backoff.initial
        while True:
            try:
                sent = await self._round()
            except asyncio.CancelledError as exc:
                if cancel_requested():
                    raise
                await self._failed_round(exc, delay)  # aiokafka cancelled one of its futures
                delay = min(delay * 2, self.cfg.backoff.max)
                continue
            except Exception as exc:  # noqa: BLE001 - retried forever, with backoff
                if not await self._failed_round(exc, delay):
                    return  # stop() gave up flushing: the outbox keeps the rest
                delay = min(delay * 2, self.cfg.backoff.max)
                continue
            delay = self.cfg.backoff.initial
            if sent == 0:
                if self._stopping:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._wake.wait()

    async def _failed_round(self, exc: BaseException, delay: float) -> bool:
        """Count and log a failed round, close the producer, back off; False when stopping."""
        self.connected = False
        self.metrics.uplink_connected.set(0)
        self.metrics.uplink_errors.inc()
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("uplink: %s; retrying in %.1fs", self.last_error, delay)
        await self._close_producer()
        if self._stopping:
            return False
        await asyncio.sleep(delay * random.uniform(0.9, 1.1))
        return True

    async def _round(self) -> int:
        batches = await self.outbox.claim(max_batches=self.cfg.max_in_flight)
        if not batches:
            return 0
        producer = await self._ensure_producer()
        low = self.outbox.low_seq
        headers = [(LOW_HEADER, str(low if low is not None else batches[0].seq).encode())]
        futures = []
        for b in batches:
            fut = await producer.send(
                self.topics.for_kind(b.kind), value=b.payload, key=b.asset.encode(), headers=headers
            )
            futures.append(fut)
        async with asyncio.timeout(self.cfg.request_timeout_ms / 1000 * 2 + 5):
            results = await asyncio.gather(*futures, return_exceptions=True)
        ok: list[tuple[ClaimedBatch, Any]] = [
            (b, r)
            for b, r in zip(batches, results, strict=True)
            if not isinstance(r, BaseException)
        ]
        if ok:
            if self.cfg.delete_after == "broker":
                await self.outbox.ack([b.seq for b, _ in ok])
            else:
                await self.outbox.mark_sent(
                    [SentBatch(b.seq, b.kind, md.partition, md.offset) for b, md in ok]
                )
            for b, _ in ok:
                self.metrics.uplink(b.kind.name.lower(), b.n)
                self.acked_records += b.n
            self.acked_batches += len(ok)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        self.connected = True
        self.last_error = None
        self.metrics.uplink_connected.set(1)
        return len(batches)
