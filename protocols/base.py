"""The contract every connector implements, and the machinery they share.

A connector is built from its pydantic config with no network I/O, is an async context manager
with idempotent ``start()``/``stop()``, delivers normalised :class:`~shared.records.Reading`
batches to a sink (or to ``async for batch in connector.stream()``), performs ``write(tag, value)``
for actions, and reports a :class:`ConnectorStatus`.

Acknowledging upstream only once readings are durable: a connector whose source needs an
acknowledgement (MQTT QoS 1/2 PUBACK) passes ``on_durable`` to ``_emit``. A sink registered with
``set_sink(sink, acking=True)`` takes that callback as a second argument and calls it once, on the
event loop, with ``True`` when the readings are durable (the agent: after the outbox transaction
holding them committed) or ``False`` when they were refused (queue overflow) or lost before
commit, so the connector must not acknowledge and should make the source redeliver. A plain sink
(``acking=False``, the default; every sink written before this existed) is treated as durable
when it returns, as is ``stream()`` delivery. Connectors with nothing to acknowledge (Modbus,
OPC UA) never pass ``on_durable`` and see no change.

Columns, for sinks that never look at reading objects: a connector whose readings come in blocks
(a Modbus poll's registers, all good and taken at one instant) may also deliver them as
:class:`ReadingColumns` — a fixed :class:`PointSet` (the points' assets and tags, built once) with a
timestamp and one value per point — to a sink registered with ``set_column_sink``. The connector
isolation worker (``edge/connector_host.py``) does, to encode wire rows straight from the values.
Without a column sink nothing changes: the same readings arrive as :class:`Reading` objects.
``ReadingColumns.readings()`` gives them back as such, equal to what ``_emit`` would have carried.

Policy is not the connector's business: the agent chooses the sink (and so buffering and
overflow), and whether to start when a device is down. The connector only reconnects, with the
backoff its config states (:class:`BackoffConfig`: 0.1 s doubling to 30 s with 10 % jitter by
default), and reports what it is doing.

Third-party connectors register under the ``edgeloop.connectors`` entry-point group::

    [project.entry-points."edgeloop.connectors"]
    mybus = "mypkg.mybus:MyBusConnector"
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Generic, Literal, Self, TypeVar

from prometheus_client import Counter, Gauge
from pydantic import Field

from shared.config import ConfigModel
from shared.records import TS_MAX, Reading, Value, trusted_reading

log = logging.getLogger(__name__)

__all__ = [
    "NO_ACK",
    "AckingSink",
    "Backoff",
    "BackoffConfig",
    "ColumnSink",
    "Connector",
    "ConnectorConfig",
    "ConnectorError",
    "ConnectorState",
    "ConnectorStatus",
    "DeadLetter",
    "DeadLetterConfig",
    "DeadLetterSink",
    "DurableCallback",
    "PointSet",
    "ReadingColumns",
    "ReadingSink",
    "TimestampBounds",
    "WriteError",
    "available_connectors",
    "load_connector_class",
]

ReadingSink = Callable[[Sequence[Reading]], None]
#: called once with True (durable: acknowledge upstream) or False (refused/lost: do not)
DurableCallback = Callable[[bool], None]
AckingSink = Callable[[Sequence[Reading], DurableCallback], None]


class PointSet:
    """The points of a block read together: ``assets[i]`` and ``tags[i]`` name point ``i``.

    Built once by the connector and reused for every read, so consumers may cache what they derive
    from it in a dict keyed by the set itself (it hashes and compares by identity).
    ``asset`` is the assets' common value, or None when they differ.
    """

    __slots__ = ("asset", "assets", "tags")

    def __init__(self, assets: Sequence[str], tags: Sequence[str]) -> None:
        if len(assets) != len(tags):
            raise ValueError(f"{len(assets)} assets for {len(tags)} tags")
        self.assets = tuple(assets)
        self.tags = tuple(tags)
        self.asset = self.assets[0] if self.assets and len(set(self.assets)) == 1 else None

    def __len__(self) -> int:
        return len(self.tags)

    def __repr__(self) -> str:
        return f"PointSet({len(self.tags)} points, asset={self.asset!r})"


@dataclass(frozen=True, slots=True)
class ReadingColumns:
    """Good-quality readings of ``points`` taken at ``ts_ns``: ``values[i]`` is point ``i``'s.

    The connector guarantees every field valid, as for :func:`shared.records.trusted_reading`.
    """

    points: PointSet
    ts_ns: int
    values: Sequence[Value]

    def __len__(self) -> int:
        return len(self.values)

    def readings(self) -> list[Reading]:
        ts = self.ts_ns
        return [
            trusted_reading(a, t, ts, v)
            for a, t, v in zip(self.points.assets, self.points.tags, self.values, strict=True)
        ]


ColumnSink = Callable[[Sequence[ReadingColumns]], None]

READINGS = Counter(
    "edgeloop_connector_readings_total", "Readings delivered by a connector", ["connector", "kind"]
)
MALFORMED = Counter(
    "edgeloop_connector_malformed_total",
    "Inputs a connector could not turn into readings (counted, never fatal)",
    ["connector", "kind"],
)
RECONNECTS = Counter(
    "edgeloop_connector_reconnects_total", "Connection attempts after a loss", ["connector", "kind"]
)
ERRORS = Counter(
    "edgeloop_connector_errors_total", "Protocol errors seen by a connector", ["connector", "kind"]
)
CONNECTED = Gauge(
    "edgeloop_connector_connected", "1 while the connector is connected", ["connector", "kind"]
)
WRITES = Counter(
    "edgeloop_connector_writes_total",
    "Writes performed, by outcome",
    ["connector", "kind", "outcome"],
)


class ConnectorError(Exception):
    """A connector failed in a way the caller should hear about (bad tag, no connection, ...)."""


class WriteError(ConnectorError):
    """A write was refused: unknown or read-only tag, wrong value type, device exception."""


class ConnectorState(StrEnum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"


@dataclass(frozen=True, slots=True)
class ConnectorStatus:
    state: ConnectorState
    last_error: str | None = None
    next_attempt_at: float | None = None  # epoch seconds of the next reconnect attempt
    connected_since: float | None = None
    attempts: int = 0


class BackoffConfig(ConfigModel):
    """Reconnect backoff: ``initial`` seconds, multiplied by ``factor`` up to ``max``, +/- jitter."""

    initial: float = Field(0.1, gt=0)
    factor: float = Field(2.0, ge=1.0)
    max: float = Field(30.0, gt=0)
    jitter: float = Field(0.1, ge=0, le=1)


class Backoff:
    """Stateful delay sequence for one reconnect loop; ``reset()`` after a success."""

    def __init__(self, config: BackoffConfig) -> None:
        self._config = config
        self._next = config.initial
        self.attempts = 0

    def reset(self) -> None:
        self._next = self._config.initial
        self.attempts = 0

    def next_delay(self) -> float:
        c = self._config
        delay = min(self._next, c.max)
        self._next = min(self._next * c.factor, c.max)
        self.attempts += 1
        if c.jitter:
            delay *= 1 + random.uniform(-c.jitter, c.jitter)
        return max(delay, 0.0)


class DeadLetterConfig(ConfigModel):
    """Where inputs that produced no reading are kept with their reason (besides the agent's
    outbox, which stores each as a dead-letter event before an acknowledging source is acked)."""

    size: int = Field(1000, ge=1, description="Kept in memory (oldest dropped first)")
    path: Path | None = Field(None, description="Also append each one as a JSON line here")
    max_payload_bytes: int = Field(4096, ge=0, description="Payload bytes kept per input")
    max_file_bytes: int = Field(
        10_000_000, ge=1024, description="Rotate the file to <path>.1 beyond this size"
    )


class TimestampBounds(ConfigModel):
    """How far a timestamp taken from the source may lie from the gateway's clock. A reading
    outside is a dead letter (a device clock set to 9999-12-31 must not poison the stream)."""

    max_future: float = Field(
        86_400.0, gt=0, description="seconds a source timestamp may be ahead of the gateway"
    )
    max_past: float = Field(
        3650 * 86_400.0,
        gt=0,
        description="seconds a source timestamp may be behind it (10 years: a clock reset to "
        "1970 or 2000 is caught, a backfill of old history is not)",
    )

    def problem(self, ts_ns: int, now_ns: int) -> str | None:
        """Why ``ts_ns`` is refused, or None when it is acceptable."""
        if not 0 <= ts_ns <= TS_MAX:
            return f"timestamp {ts_ns} ns is outside 1970..2262 (64-bit nanoseconds)"
        ahead = (ts_ns - now_ns) / 1e9
        if ahead > self.max_future:
            return (
                f"timestamp is {ahead:,.0f} s ahead of the gateway clock "
                f"(timestamps.max_future: {self.max_future:g} s); fix the device clock or raise "
                "the bound"
            )
        if -ahead > self.max_past:
            return (
                f"timestamp is {-ahead:,.0f} s behind the gateway clock "
                f"(timestamps.max_past: {self.max_past:g} s); fix the device clock or raise "
                "the bound"
            )
        return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input that produced no reading, and why."""

    ts_ns: int
    source: str  # where it came from: an MQTT topic, an OPC UA node, a Modbus block
    reason: str
    payload: bytes  # truncated to dead_letter.max_payload_bytes
    size: int  # original payload length

    def to_json(self) -> dict[str, Any]:
        try:
            text: str | None = self.payload.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        out: dict[str, Any] = {"ts_ns": self.ts_ns, "source": self.source, "reason": self.reason}
        if text is not None:
            out["payload"] = text
        else:
            out["payload_b64"] = base64.b64encode(self.payload).decode()
        out["size"] = self.size
        return out


#: receives each dead letter as it happens (the agent stores it durably with the next tick)
DeadLetterSink = Callable[[Sequence[DeadLetter]], None]


class _DeadLetterStore:
    def __init__(self, config: DeadLetterConfig) -> None:
        self.config = config
        self.ring: deque[DeadLetter] = deque(maxlen=config.size)
        self._file: IO[str] | None = None
        self._file_bytes = 0

    def add(self, source: str, payload: bytes, reason: str) -> DeadLetter:
        cap = self.config.max_payload_bytes
        item = DeadLetter(time.time_ns(), source, reason, payload[:cap], len(payload))
        self.ring.append(item)
        path = self.config.path
        if path is None:
            return item
        try:
            if self._file is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
                self._file_bytes = path.stat().st_size
            line = json.dumps(item.to_json(), separators=(",", ":")) + "\n"
            self._file.write(line)
            self._file.flush()
            self._file_bytes += len(line)
            if self._file_bytes > self.config.max_file_bytes:
                self._file.close()
                self._file = None
                path.replace(path.with_name(path.name + ".1"))
        except OSError as exc:
            log.warning("dead-letter file %s: %s (kept in memory only)", path, exc)
        return item

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ConnectorConfig(ConfigModel):
    """Fields every connector config has.

    Subclasses narrow ``kind`` to ``Literal["<entry-point name>"]`` so the agent's config can hold
    a discriminated list of connectors (``connectors[2].registers[5].type`` in error paths).
    """

    kind: str = Field(
        ..., description="Entry-point name of the connector (opcua, modbus, mqtt, ...)"
    )
    name: str = Field(..., min_length=1, description="Unique connector name (metrics label)")
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    isolation: Literal["inline", "process"] = Field(
        "inline",
        description="inline: run on the agent's event loop; process: run in a worker process "
        "of its own that hands the agent readings already encoded (uses a second core)",
    )
    dead_letter: DeadLetterConfig = Field(default_factory=DeadLetterConfig)
    timestamps: TimestampBounds = Field(default_factory=TimestampBounds)


C = TypeVar("C", bound=ConnectorConfig)


class Connector(ABC, Generic[C]):
    """Base class: lifecycle, status, sink, metrics. Subclasses implement ``_run`` and ``write``.

    ``_run`` is the connector's supervised main loop; it owns connecting, reconnecting with
    ``self.backoff`` and delivering readings via ``self._emit``. It is cancelled by ``stop()``.
    """

    kind: ClassVar[str] = "abstract"
    config_model: ClassVar[type[ConnectorConfig]] = ConnectorConfig

    def __init__(self, config: C) -> None:
        if not isinstance(config, self.config_model):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_model.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config: C = config
        self.name = config.name
        self.backoff = Backoff(config.backoff)
        self._sink: ReadingSink | None = None
        self._acking_sink: AckingSink | None = None
        self._column_sink: ColumnSink | None = None
        self._dead_sink: DeadLetterSink | None = None
        self._dead = _DeadLetterStore(config.dead_letter)
        self._queue: asyncio.Queue[list[Reading]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._status = ConnectorStatus(ConnectorState.STOPPED)
        self._closed = True
        self._m_readings = READINGS.labels(self.name, self.kind)
        self._m_malformed = MALFORMED.labels(self.name, self.kind)
        self._m_reconnects = RECONNECTS.labels(self.name, self.kind)
        self._m_errors = ERRORS.labels(self.name, self.kind)
        self._m_connected = CONNECTED.labels(self.name, self.kind)
        self.malformed_total = 0
        self.readings_total = 0

    # --- lifecycle ---------------------------------------------------------------------

    def set_sink(self, sink: ReadingSink | AckingSink | None, *, acking: bool = False) -> None:
        """Deliver readings to ``sink`` (called on the event loop; must not block).

        With ``acking=True`` the sink is an :data:`AckingSink`: it is called as
        ``sink(readings, on_durable)`` and reports durability through ``on_durable`` (see the
        module doc); a connector that has nothing to acknowledge passes a no-op.
        """
        if acking:
            self._acking_sink = sink  # type: ignore[assignment]
            self._sink = self._plain_to_acking
        else:
            self._acking_sink = None
            self._sink = sink  # type: ignore[assignment]

    def set_column_sink(self, sink: ColumnSink | None) -> None:
        """Deliver blocks of good readings as :class:`ReadingColumns` to ``sink`` as well.

        Only connectors that read in blocks use it (Modbus); the others, and every reading that
        is not good, keep going to the sink set with :meth:`set_sink`, which must be set too.
        Without a column sink, :meth:`_emit_columns` hands the same readings to that sink.
        """
        self._column_sink = sink

    def set_dead_letter_sink(self, sink: DeadLetterSink | None) -> None:
        """Hand every dead letter to ``sink`` as it happens (the agent stores it durably).

        With such a sink, an acknowledging connector's ack of a message that produced only dead
        letters also waits for the acking sink's ``on_durable`` (the dead letter is stored first).
        """
        self._dead_sink = sink

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """The most recent inputs that produced no reading, with their reasons (oldest first)."""
        return list(self._dead.ring)

    def _dead_letter(self, source: str, payload: bytes, reason: str) -> None:
        """Count an input that produced no reading, keep it with its reason, pass it on."""
        self._malformed(reason)
        item = self._dead.add(source, payload, reason)
        if self._dead_sink is not None:
            try:
                self._dead_sink([item])
            except Exception:
                log.exception("connector %r: the dead-letter sink raised", self.name)

    def _plain_to_acking(self, readings: Sequence[Reading]) -> None:
        assert self._acking_sink is not None
        self._acking_sink(readings, _durable_noop)

    async def start(self) -> None:
        """Start the connector's loop. Returns at once; connecting happens in the background.

        Calling ``start`` on a running connector does nothing.
        """
        if self._task is not None:
            return
        self._closed = False
        self._set_status(ConnectorState.CONNECTING)
        self._task = asyncio.create_task(self._supervise(), name=f"connector:{self.name}")

    async def stop(self) -> None:
        """Stop and release every resource. Safe to call twice and before ``start``."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self._closed:
            self._closed = True
            await self._close()
            self._dead.close()
        self._m_connected.set(0)
        self._set_status(ConnectorState.STOPPED)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def __del__(self) -> None:
        if getattr(self, "_task", None) is not None:
            warnings.warn(f"unclosed connector {self.name!r}", ResourceWarning, stacklevel=1)

    async def _supervise(self) -> None:
        while True:
            try:
                await self._run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a connector loop must never die silently
                self._m_errors.inc()
                delay = self.backoff.next_delay()
                self._set_status(
                    ConnectorState.RECONNECTING,
                    error=f"{type(exc).__name__}: {exc}",
                    next_attempt_at=time.time() + delay,
                )
                self._m_connected.set(0)
                await asyncio.sleep(delay)
                self._m_reconnects.inc()

    @abstractmethod
    async def _run(self) -> None:
        """Connect, deliver readings until cancelled; raise to be restarted with backoff."""

    async def _close(self) -> None:
        """Release protocol resources after the loop is cancelled (override when needed)."""

    # --- status and delivery -----------------------------------------------------------

    @property
    def status(self) -> ConnectorStatus:
        return self._status

    def _set_status(
        self,
        state: ConnectorState,
        *,
        error: str | None = None,
        next_attempt_at: float | None = None,
    ) -> None:
        prev = self._status
        since = prev.connected_since
        if state is ConnectorState.CONNECTED:
            if prev.state is not ConnectorState.CONNECTED:
                since = time.time()
            self.backoff.reset()
            self._m_connected.set(1)
        else:
            since = None
        self._status = ConnectorStatus(
            state,
            last_error=error if error is not None else prev.last_error,
            next_attempt_at=next_attempt_at,
            connected_since=since,
            attempts=self.backoff.attempts,
        )

    def _emit(self, readings: Sequence[Reading], on_durable: DurableCallback | None = None) -> None:
        """Hand ``readings`` to the sink (or the ``stream()`` queue).

        ``on_durable`` (optional) is called once with True when the readings may be acknowledged
        upstream, False when they must not be; with a plain sink or ``stream()`` that is right
        after delivery. If the sink raises, it is not called (the caller sees the exception).
        """
        if not readings:
            if on_durable is not None:
                if self._acking_sink is not None and self._dead_sink is not None:
                    # only dead letters came of it: acknowledge once they are stored
                    self._acking_sink(readings, on_durable)
                else:
                    on_durable(True)
            return
        n = len(readings)
        self.readings_total += n
        self._m_readings.inc(n)
        if on_durable is not None and self._acking_sink is not None:
            self._acking_sink(readings, on_durable)
            return
        if self._sink is not None:
            self._sink(readings)
        elif self._queue is not None:
            self._queue.put_nowait(list(readings))
        if on_durable is not None:
            on_durable(True)

    def _emit_columns(self, batch: Sequence[ReadingColumns]) -> None:
        """Hand blocks of good readings to the column sink, or as readings to :meth:`_emit`."""
        if not batch:
            return
        sink = self._column_sink
        if sink is None:
            out: list[Reading] = []
            for cols in batch:
                out += cols.readings()
            self._emit(out)
            return
        n = sum(len(c.values) for c in batch)
        self.readings_total += n
        self._m_readings.inc(n)
        sink(batch)

    def _malformed(self, reason: str) -> None:
        """Count an input that could not be turned into a reading (never fatal)."""
        self.malformed_total += 1
        self._m_malformed.inc()

    async def stream(self) -> AsyncIterator[list[Reading]]:
        """Iterate over reading batches (when no sink is set). Ends when the connector stops."""
        if self._sink is not None:
            raise ConnectorError(f"connector {self.name!r} delivers to a sink; stream() is unused")
        if self._queue is None:
            self._queue = asyncio.Queue()
        queue = self._queue
        while self._task is not None or not queue.empty():
            try:
                yield await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                continue

    # --- actions -----------------------------------------------------------------------

    @abstractmethod
    async def write(self, tag: str, value: Value) -> None:
        """Write ``value`` to ``tag`` on the device; raise :class:`WriteError` on refusal."""


def _durable_noop(ok: bool) -> None:
    return None


#: the ``on_durable`` an acking sink receives when the connector has nothing to acknowledge
NO_ACK: DurableCallback = _durable_noop


def available_connectors() -> dict[str, Any]:
    """Entry points in the ``edgeloop.connectors`` group, by name (not yet imported)."""
    return {ep.name: ep for ep in entry_points(group="edgeloop.connectors")}


def load_connector_class(kind: str) -> type[Connector[Any]]:
    eps = available_connectors()
    if kind not in eps:
        raise ConnectorError(
            f"no connector named {kind!r}; installed: {', '.join(sorted(eps)) or 'none'}"
        )
    cls = eps[kind].load()
    if not (isinstance(cls, type) and issubclass(cls, Connector)):
        raise ConnectorError(f"entry point {kind!r} does not name a Connector subclass")
    return cls
