"""The edge agent: connectors -> state and frames -> inference -> rules -> outbox -> uplink.

One processing tick (every ``tick_interval`` seconds) takes every reading the connectors
delivered since the last tick, updates asset state, cuts the frames that are due, scores them all
in one model call, evaluates rules for the assets that changed (and those with a pending or
active rule), writes readings, frames and events to the outbox in ONE transaction, and only then
runs rule actions and wakes the uplink. Nothing leaves the agent (no write-back, no Kafka send)
for data the outbox does not hold, and nothing is acknowledged upstream before it is durable:
connectors that acknowledge their source (MQTT QoS 1/2) are given an acking sink
(:mod:`protocols.base`) and their callbacks run right after the commit that holds their readings;
a reading refused by the bounded queue is reported back as not durable (the MQTT connector then
reconnects so the broker redelivers it).

Connectors deliver into an in-memory list bounded by ``queue_size`` readings; beyond it readings
are dropped and counted (``edgeloop_edge_queue_dropped_total``): that only happens when the disk
cannot keep up, and the drop happens where it costs least (before any processing).

The agent keeps running without a model, and when the model cannot be loaded (corrupt file, wrong
inputs): it logs why, reports ``degraded`` on ``/healthz`` and in ``edgeloop_edge_degraded``, and
goes on building frames (unscored), firing rules and buffering. A model that loads but raises
when scoring (some inputs or batch sizes) does not stop the tick either: that tick's frames go out
unscored (tagged with the model's version and no prediction, which the model-sync watch counts
like NaN and rolls back), ``edgeloop_edge_inference_failed_frames_total`` counts them, and the
agent reports ``degraded`` with the error until ``SCORE_ERROR_HOLD`` seconds pass without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from edge.config import EdgeConfigBase
from edge.control import ControlLink
from edge.frames import FrameBuilder
from edge.inference import LoadedModel, ModelLoadError, ModelSlot, load_model, unscored
from edge.isolation import PackedSink, ProcessConnector
from edge.metrics import EdgeMetrics, HealthServer
from edge.model_sync import LabelExtractor, ModelSync
from edge.outbox import Outbox, OutboxError, Storable
from edge.packed import PackedReadings
from edge.rules import ActionRunner, Firing, RuleEngine
from edge.synthetic import SyntheticConfig, SyntheticConnector
from edge.uplink import Uplink
from protocols.base import (
    NO_ACK,
    Connector,
    ConnectorState,
    DeadLetter,
    DurableCallback,
    load_connector_class,
)
from shared.records import (
    Event,
    Frame,
    Heartbeat,
    Label,
    Reading,
    Record,
    dead_letter_event,
    now_ns,
)
from shared.supervision import Supervisor

__all__ = ["Agent", "build_connector"]

log = logging.getLogger(__name__)


#: how long a model call that raised keeps the agent "degraded" (seconds since the last failure)
SCORE_ERROR_HOLD = 60.0
#: how long an unexpected error inside a tick keeps the agent "degraded"
TICK_ERROR_HOLD = 60.0
#: sent batches the cloud has not confirmed for this long make the agent "degraded"
UNACKED_DEGRADED_AFTER = 600.0


def _noop(ok: bool) -> None:
    return None


def build_connector(config: Any) -> Connector[Any]:
    """The connector for one ``connectors[]`` entry (no I/O)."""
    if getattr(config, "isolation", "inline") == "process":
        return ProcessConnector(config)
    if isinstance(config, SyntheticConfig):
        return SyntheticConnector(config)
    cls = load_connector_class(config.kind)
    return cls(config)


def _count_readings(records: Sequence[Storable]) -> int:
    n = 0
    for r in records:
        if type(r) is Reading:
            n += 1
        elif type(r) is PackedReadings:
            n += r.n
    return n


class Agent:
    """The gateway agent. Async context manager; ``start``/``stop`` are idempotent."""

    def __init__(
        self, config: EdgeConfigBase, *, connectors: Mapping[str, Connector[Any]] | None = None
    ) -> None:
        self.config = config
        self.agent_id = config.agent_id
        self.metrics = EdgeMetrics(config.agent_id)
        self.connectors: dict[str, Connector[Any]] = (
            dict(connectors)
            if connectors is not None
            else {c.name: build_connector(c) for c in config.connectors}
        )
        self.outbox = Outbox(
            config.outbox_path(),
            agent_id=config.agent_id,
            batch_size=config.uplink.batch_size,
            max_bytes=config.outbox.max_bytes,
            overflow=config.outbox.overflow,
            synchronous=config.outbox.synchronous,
            on_drop=lambda kind, n: self.metrics.outbox_dropped(kind.name.lower(), n),
            on_release=lambda kind, n: self.metrics.outbox_released(kind.name.lower(), n),
            on_quarantine=lambda kind: self.metrics.dead_letter("outbox"),
        )
        self.frames = FrameBuilder(config.frames)
        self.slot = ModelSlot(
            observe_latency=self.metrics.inference.observe,
            on_score_error=self.metrics.score_failed.inc,
        )
        self.rules = RuleEngine(config.rules, on_error=self.metrics.rule_error)
        self.actions = ActionRunner(self.connectors, on_result=self.metrics.action)
        self.uplink = Uplink(config.uplink, config.agent_id, self.outbox, self.metrics)
        self.control = (
            ControlLink(config.uplink, config.agent_id, self.outbox, self.uplink, self.metrics)
            if config.uplink.delete_after == "applied"
            else None
        )
        self.label_extractor = LabelExtractor(config.labels)
        self.model_sync = ModelSync(self, config.models) if config.models is not None else None
        self._emitted: list[Record] = []  # records from model sync, committed with the next tick
        self._dead: list[Event] = []  # connectors' dead letters, committed with the next tick
        self.dead_letters = 0
        #: a core task that dies makes the agent failing (its process exits non-zero)
        self.supervisor = Supervisor(
            "agent",
            log,
            stopping=lambda: self._stopping,
            on_fail=lambda: self.metrics.failed.set(1),
        )
        self.tick_errors = 0
        self._unacked_age = 0.0
        self._last_tick_error: tuple[float, str] | None = None
        self._logged_tick_errors: set[str] = set()
        self.labels_emitted = 0
        self.http: HealthServer | None = None
        if config.http.port is not None:
            self.http = HealthServer(config.http.host, config.http.port, self.health)
        # (connector, readings, packed): inline connectors deliver readings (packed is None);
        # isolated ones deliver encoded rows for the outbox plus the readings state needs
        self._queue: list[tuple[str, Sequence[Reading], Sequence[PackedReadings] | None]] = []
        self._queued = 0
        self._carry: list[Storable] = []
        # durability callbacks of the queued readings (connectors that ack upstream, e.g. MQTT
        # QoS 1), called after the outbox transaction holding those readings committed
        self._waiters: list[DurableCallback] = []
        self._carry_waiters: list[DurableCallback] = []
        self._last_frame: dict[str, Frame] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopping = False
        self._started_at = 0.0
        self.accepted_readings = 0  # readings committed to the outbox
        self.frames_built = 0
        self.events_emitted = 0
        self.ticks = 0
        self._skipped_seen = 0
        self._tick_wake = asyncio.Event()  # set by stop(): end the tick loop after its tick

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._stopping = False
        self._tick_wake.clear()
        self._started_at = time.monotonic()
        try:
            await self.outbox.start()
            if self.config.model is not None:
                m = self.config.model
                await self.load_model(m.path, m.manifest_path(), raise_errors=False)
            if self.model_sync is not None:
                await self.model_sync.start()  # a persisted delivered model replaces the above
            await self.actions.start()
            for name, conn in self.connectors.items():
                conn.set_sink(self._make_sink(name), acking=True)
                conn.set_dead_letter_sink(functools.partial(self._dead_letters, name))
                if isinstance(conn, ProcessConnector):
                    conn.set_packed_sink(
                        self._make_packed_sink(name),
                        max_rows=self.config.uplink.batch_size,
                        on_dropped=functools.partial(self.metrics.queue_dropped, name),
                    )
                    conn.set_want(self._wanted_tags(name))
                await conn.start()
            await self.uplink.start()
            if self.control is not None:
                await self.control.start()
            if self.http is not None:
                await self.http.start()
            self._tasks = [
                asyncio.create_task(self._tick_loop(), name=f"agent:{self.agent_id}:tick"),
                asyncio.create_task(self._house_loop(), name=f"agent:{self.agent_id}:house"),
            ]
            self.supervisor.watch(self._tasks)
            self.supervisor.watch([self.uplink.task], stopping=lambda: self.uplink.stopping)
            if self.control is not None:
                control = self.control
                self.supervisor.watch([control.task], stopping=lambda: control.stopping)
            if self.model_sync is not None:
                self.supervisor.watch(self.model_sync.tasks())
        except BaseException:
            await self.stop()
            raise
        log.info(
            "agent %s started: %d connectors, %d frame specs, %d rules, model %s, outbox %s "
            "(%d records waiting)",
            self.agent_id,
            len(self.connectors),
            len(self.config.frames),
            len(self.config.rules),
            self.slot.versions or self.slot.error or "none",
            self.outbox.path,
            self.outbox.records,
        )

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Stop sources, commit what they delivered, flush the uplink for a bounded time."""
        if not self._started:
            return
        self._started = False
        self._stopping = True
        for conn in self.connectors.values():
            with contextlib.suppress(Exception):
                await conn.stop()
        # the tick loop finishes its tick (an outbox write is never cut short); the rest cancel
        self._tick_wake.set()
        for task in self._tasks[1:]:
            task.cancel()
        # a task that died was reported by _task_done (the agent is failing); stop goes on
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.model_sync is not None:
            await self.model_sync.stop()
        with contextlib.suppress(OutboxError):
            if self.outbox.is_open:
                await self._tick()  # commit what the connectors delivered before they stopped
        await self.actions.stop()
        await self.uplink.stop(flush_timeout=flush_timeout)
        if self.control is not None:
            await self.control.stop()
        await self.outbox.stop()
        if self.http is not None:
            await self.http.stop()
        log.info(
            "agent %s stopped (%d records left in the outbox)", self.agent_id, self.outbox.records
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- supervision ----------------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the agent is failing (a core task died), or None."""
        return self.supervisor.failure

    @property
    def failed(self) -> asyncio.Event:
        return self.supervisor.failed

    def _dead_letters(self, connector: str, letters: Sequence[DeadLetter]) -> None:
        """A connector's dead letters: stored as events with the next tick (before any ack)."""
        for d in letters:
            self._dead.append(
                dead_letter_event(
                    origin=connector,
                    source=d.source,
                    reason=d.reason,
                    payload=d.payload,
                    ts_ns=d.ts_ns,
                )
            )
        self.dead_letters += len(letters)
        self.metrics.dead_letter(connector, len(letters))

    # --- model --------------------------------------------------------------------------

    async def load_model(
        self, path: Path, manifest: Path, *, raise_errors: bool = True
    ) -> LoadedModel | None:
        """Load a model and swap it in; the replaced one stays available for rollback."""
        threads = self.config.model.intra_op_threads if self.config.model else 1
        try:
            model = await asyncio.to_thread(load_model, path, manifest, intra_op_threads=threads)
        except ModelLoadError as exc:
            self.metrics.model_errors.inc()
            self.slot.fail(str(exc))
            self.metrics.degraded.set(1)
            log.error("model not loaded, running without it (degraded): %s", exc)
            if raise_errors:
                raise
            return None
        self.slot.swap(model)
        self.frames.use_model_features(model.features)
        self._update_wants()
        self.metrics.model_version.set(model.version)
        log.info(
            "model %s v%d active (%d features)",
            model.manifest.name,
            model.version,
            len(model.features),
        )
        return model

    def rollback_model(self) -> LoadedModel:
        """Reactivate the previous model at once (the current one becomes previous)."""
        model = self.slot.rollback()
        self.frames.use_model_features(model.features)
        self._update_wants()
        self.metrics.model_version.set(model.version)
        log.warning("model rolled back to %s v%d", model.manifest.name, model.version)
        return model

    def emit(self, records: Sequence[Record]) -> None:
        """Queue records (model-sync events) for the next tick's outbox transaction."""
        self._emitted.extend(records)

    # --- ingest -------------------------------------------------------------------------

    def _make_sink(self, name: str) -> Any:
        def sink(readings: Sequence[Reading], on_durable: DurableCallback = _noop) -> None:
            self._admit(name, readings, None, len(readings), on_durable)

        return sink

    def _admit(
        self,
        name: str,
        readings: Sequence[Reading],
        packed: Sequence[PackedReadings] | None,
        n: int,
        on_durable: DurableCallback,
    ) -> None:
        """Queue a delivery for the next tick, or refuse it (counted) when the queue is full."""
        if self._queued + n > self.config.queue_size:
            self.metrics.queue_dropped(name, n)
            on_durable(False)
            return
        self._queue.append((name, readings, packed))
        self._queued += n
        if on_durable is not _noop and on_durable is not NO_ACK:
            self._waiters.append(on_durable)

    def _make_packed_sink(self, name: str) -> PackedSink:
        def sink(
            state: Sequence[Reading],
            packed: Sequence[PackedReadings],
            n: int,
            on_durable: DurableCallback,
        ) -> None:
            self._admit(name, state, packed, n, on_durable)

        return sink

    def _wanted_tags(self, connector: str) -> frozenset[str] | None:
        """Tags whose readings an isolated connector must deliver as objects (None: all).

        Frames need their trigger and window tags, rules the tags they name; a rule that reads
        tags it does not name, or label extraction on the connector, needs every reading.
        """
        if connector in self.label_extractor.by_connector:
            return None
        tags = self.frames.state_tags()
        if self.rules.rules:
            for ns in ("r", "age"):
                keys = self.rules.needs.get(ns, frozenset())
                if keys is None:
                    return None
                tags |= keys
        return tags

    def _update_wants(self) -> None:
        for name, conn in self.connectors.items():
            if isinstance(conn, ProcessConnector):
                conn.set_want(self._wanted_tags(name))

    def ingest(self, connector: str, readings: Sequence[Reading]) -> None:
        """Offer readings as if ``connector`` had delivered them (bounded like a connector)."""
        self._make_sink(connector)(readings)

    @staticmethod
    def _notify(waiters: list[DurableCallback], ok: bool) -> None:
        for done in waiters:
            try:
                done(ok)
            except Exception:
                log.exception("a connector's durability callback raised")

    # --- the tick -----------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        interval = self.config.tick_interval
        next_at = time.monotonic()
        while not self._stopping:
            try:
                await self._tick()
            except OutboxError as exc:
                log.error("outbox write failed; the tick's records are kept for a retry: %s", exc)
            next_at = max(next_at + interval, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick_wake.wait(), next_at - time.monotonic())

    def _tick_error(self, stage: str, exc: BaseException) -> None:
        """An unexpected error in one stage of a tick: counted, logged once, and the tick goes
        on without that stage's output (the readings are stored all the same)."""
        self.tick_errors += 1
        self.metrics.tick_error(stage)
        what = f"{stage}: {type(exc).__name__}: {exc}"[:300]
        self._last_tick_error = (time.monotonic(), what)
        if what not in self._logged_tick_errors and len(self._logged_tick_errors) < 100:
            self._logged_tick_errors.add(what)
            log.error(
                "tick stage %s raised; its output for this tick is skipped, the data is kept "
                "(edgeloop_edge_tick_errors_total; report this with the traceback)",
                stage,
                exc_info=exc,
            )

    async def _tick(self) -> None:
        queue, self._queue, self._queued = self._queue, [], 0
        waiters, self._waiters = self._carry_waiters + self._waiters, []
        self._carry_waiters = []
        dead, self._dead = self._dead, []
        now = time.monotonic()
        readings: list[Reading] = []  # what updates asset state
        stored: list[Reading] = []  # readings the outbox encodes (from inline connectors)
        packed: list[PackedReadings] = []  # readings isolated connectors encoded already
        labels: list[Label] = []
        per_conn: dict[str, int] = {}
        extract = self.label_extractor.by_connector
        for name, batch, rows in queue:
            readings.extend(batch)
            if rows is None:
                stored.extend(batch)
                n = len(batch)
            else:
                packed.extend(rows)
                n = sum(p.n for p in rows)
            per_conn[name] = per_conn.get(name, 0) + n
            if name in extract:
                try:
                    labels += self.label_extractor.extract(name, batch)
                except Exception as exc:  # noqa: BLE001 - a stage error never stops the tick
                    self._tick_error("labels", exc)
        try:
            pending = self.frames.observe(readings, now) if readings else []
            pending += self.frames.due(now)
        except Exception as exc:  # noqa: BLE001 - a stage error never stops the tick
            self._tick_error("frames", exc)
            pending = []
        if self.frames.skipped != self._skipped_seen:
            self.metrics.frames_skipped.inc(self.frames.skipped - self._skipped_seen)
            self._skipped_seen = self.frames.skipped
        try:
            frames = self.slot.score(pending)
        except Exception as exc:  # noqa: BLE001 - frames go out unscored
            self._tick_error("inference", exc)
            frames = unscored(pending)
        if self.model_sync is not None:
            try:
                self.model_sync.observe(pending, frames, labels)
            except Exception as exc:  # noqa: BLE001 - a stage error never stops the tick
                self._tick_error("model_sync", exc)
        for f in frames:
            self._last_frame[f.asset] = f
        firings: list[Firing] = []
        if self.rules.rules:
            touched = {r.asset for r in readings} | {f.asset for f in frames}
            touched |= {p.asset for p in packed}
            touched |= self.rules.watched_assets()
            ts = now_ns()
            for asset in touched:
                try:
                    firings += self.rules.evaluate(asset, self._rule_context(asset, now), now, ts)
                except Exception as exc:  # noqa: BLE001 - one asset's rules, not the tick
                    self._tick_error("rules", exc)
        events = [f.event for f in firings if f.event is not None]
        emitted, self._emitted = self._emitted, []
        records: list[Storable] = [
            *self._carry,
            *dead,
            *stored,
            *packed,
            *frames,
            *labels,
            *events,
            *emitted,
        ]
        if not records:
            self._notify(waiters, True)
            return
        try:
            await self.outbox.append(records)
        except OutboxError:
            self._carry = records[-self.config.queue_size :]
            if len(records) > self.config.queue_size:
                self._notify(waiters, False)  # some were cut from the carry: get them resent
            else:
                self._carry_waiters = waiters  # acked once the carry is committed
            raise
        except Exception as exc:  # noqa: BLE001 - the records are stored one by one instead
            self._tick_error("outbox", exc)
            await self._store_each(records)
        self._notify(waiters, True)  # durable now: connectors may acknowledge upstream
        if self._carry:  # readings of an earlier tick whose write failed are in now
            self.accepted_readings += _count_readings(self._carry)
        self._carry = []
        self.uplink.notify()
        self.ticks += 1
        self.labels_emitted += len(labels)
        self.accepted_readings += len(stored) + sum(p.n for p in packed)
        for name, n in per_conn.items():
            self.metrics.readings(name, n)
        if frames:
            self.frames_built += len(frames)
            scored = sum(1 for f in frames if f.model_version is not None)
            if scored:
                self.metrics.scored.inc(scored)
            for f in frames:
                self.metrics.frames(f.asset)
        self.events_emitted += len(events)
        for firing in firings:
            self.metrics.rule(firing.rule.name, "clear" if firing.cleared else "fire")
            try:
                self.actions.dispatch(firing)
            except Exception as exc:  # noqa: BLE001 - a stage error never stops the tick
                self._tick_error("actions", exc)

    async def _store_each(self, records: Sequence[Storable]) -> None:
        """The last resort when a tick's records could not be stored together: one by one, and
        each one that still fails as a dead letter with the reason (OutboxError propagates)."""
        for rec in records:
            try:
                await self.outbox.append([rec])
            except OutboxError:
                raise
            except Exception as exc:  # noqa: BLE001 - the reason travels with the dead letter
                letter = dead_letter_event(
                    origin="agent",
                    source=type(rec).__name__,
                    reason=f"could not be stored: {type(exc).__name__}: {exc}",
                    payload=repr(rec),
                )
                await self.outbox.append([letter])
                self.metrics.dead_letter("agent")
                self.dead_letters += 1

    def _rule_context(self, asset: str, now: float) -> dict[str, Any]:
        st = self.frames.state(asset)
        frame = self._last_frame.get(asset)
        needs = self.rules.needs  # only the keys the rules read (CEL conversion is per key)
        tags = st.tags
        want = needs["r"]
        if want is None:
            r = st.values()
        else:
            r = {}
            for t in want:
                ts = tags.get(t)
                if ts is not None and ts.reading is not None:
                    r[t] = ts.reading.value
        want = needs["age"]
        if want is None:
            age = st.ages(now)
        else:
            age = {}
            for t in want:
                ts = tags.get(t)
                if ts is not None and ts.reading is not None:
                    age[t] = now - ts.seen_at
        feats: dict[str, float] = frame.features if frame is not None else {}
        want = needs["f"]
        if want is not None and feats:
            feats = {k: feats[k] for k in want if k in feats}
        return {
            "asset": asset,
            "r": r,
            "age": age,
            "f": feats,
            "has_frame": frame is not None,
            "prediction": frame.prediction
            if frame is not None and frame.prediction is not None
            else -1.0,
            "score": frame.score if frame is not None and frame.score is not None else -1.0,
        }

    # --- housekeeping: gauges and heartbeats --------------------------------------------

    async def _house_loop(self) -> None:
        hb_every = self.config.heartbeat_interval
        next_hb = time.monotonic()
        while True:
            try:
                stats = await self.outbox.stats()
                self.metrics.outbox_rows.set(stats.records)
                self.metrics.outbox_bytes.set(stats.nbytes)
                age = (
                    0.0 if stats.oldest_ns is None else max(0.0, (now_ns() - stats.oldest_ns) / 1e9)
                )
                self.metrics.outbox_age.set(age)
                self.metrics.outbox_unacked.set(stats.unacked)
                unacked_age = (
                    0.0
                    if stats.oldest_unacked_ns is None
                    else max(0.0, (now_ns() - stats.oldest_unacked_ns) / 1e9)
                )
                self.metrics.outbox_unacked_age.set(unacked_age)
                self._unacked_age = unacked_age
                self.metrics.degraded.set(1 if self.degraded_reasons() else 0)
                if time.monotonic() >= next_hb:
                    next_hb = time.monotonic() + hb_every
                    reasons = self.degraded_reasons()
                    hb = Heartbeat(
                        self.agent_id,
                        now_ns(),
                        self.slot.versions,
                        stats.records,
                        stats.nbytes,
                        "degraded" if reasons else "ok",
                        {
                            "reasons": reasons,
                            "uptime_s": round(time.monotonic() - self._started_at, 1),
                            "dropped": {k.name.lower(): v for k, v in self.outbox.dropped.items()},
                            "outbox": {
                                "incarnation": stats.incarnation,
                                "low_seq": stats.low_seq,
                                "next_seq": stats.next_seq,
                                "unacked": stats.unacked,
                                "unacked_age_s": round(unacked_age, 1),
                            },
                            **(
                                {"model_sync": self.model_sync.status()}
                                if self.model_sync is not None
                                else {}
                            ),
                        },
                    )
                    await self.outbox.append([hb])
                    self.uplink.notify()
            except OutboxError as exc:
                log.error("housekeeping: %s", exc)
            await asyncio.sleep(1.0)

    # --- health -------------------------------------------------------------------------

    def degraded_reasons(self) -> list[str]:
        reasons: list[str] = []
        if self.failure is not None:
            reasons.append(f"failing: {self.failure}")
        if self._last_tick_error is not None:
            at, what = self._last_tick_error
            if time.monotonic() - at < TICK_ERROR_HOLD:
                reasons.append(f"tick error ({what}); the data is kept")
        if self._unacked_age > UNACKED_DEGRADED_AFTER:
            reasons.append(
                f"the cloud has not confirmed {self.outbox.unacked} sent batches for "
                f"{self._unacked_age:.0f} s (they stay in the outbox until it does)"
            )
        if self.config.model is not None and self.slot.current is None:
            reasons.append(f"model: {self.slot.error or 'not loaded'}")
        failed_at = self.slot.last_score_error_at
        if failed_at is not None and time.monotonic() - failed_at < SCORE_ERROR_HOLD:
            reasons.append(f"model: {self.slot.last_score_error}; frames go out unscored")
        for name, conn in self.connectors.items():
            if conn.status.state is not ConnectorState.CONNECTED:
                err = conn.status.last_error
                reasons.append(f"connector {name}: {conn.status.state}{f' ({err})' if err else ''}")
        if self.uplink.last_error is not None:
            reasons.append(f"uplink: {self.uplink.last_error}")
        return reasons

    def health(self) -> dict[str, Any]:
        reasons = self.degraded_reasons()
        m = self.slot.current
        if self.failure is not None:
            status = "failing"
        elif self._stopping:
            status = "stopping"
        else:
            status = "degraded" if reasons else "ok"
        return {
            "status": status,
            "agent_id": self.agent_id,
            "reasons": reasons,
            "model": None
            if m is None
            else {"name": m.manifest.name, "version": m.version, "features": list(m.features)},
            "model_error": self.slot.error,
            "score_errors": {
                "calls": self.slot.score_errors,
                "frames": self.slot.score_failed_frames,
                "last": self.slot.last_score_error,
            },
            "model_sync": None if self.model_sync is None else self.model_sync.status(),
            "failure": self.failure,
            "outbox": {
                "rows": self.outbox.records,
                "bytes": self.outbox.nbytes,
                "incarnation": self.outbox.incarnation,
                "next_seq": self.outbox.next_seq,
                "low_seq": self.outbox.low_seq,
                "unacked_batches": self.outbox.unacked,
                "unacked_age_s": round(self._unacked_age, 1),
                "dropped": {k.name.lower(): v for k, v in self.outbox.dropped.items()},
                "released": {k.name.lower(): v for k, v in self.outbox.released.items()},
                "requeued": self.outbox.requeued,
                "quarantined": self.outbox.quarantined,
            },
            "control": None if self.control is None else self.control.status(),
            "dead_letters": self.dead_letters,
            "tick_errors": self.tick_errors,
            "uplink": {
                "connected": self.uplink.connected,
                "last_error": self.uplink.last_error,
                "acked_batches": self.uplink.acked_batches,
            },
            "connectors": {n: str(c.status.state) for n, c in self.connectors.items()},
            "accepted_readings": self.accepted_readings,
            "frames": self.frames_built,
            "events": self.events_emitted,
            "labels": self.labels_emitted,
        }
