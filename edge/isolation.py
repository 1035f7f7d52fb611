"""``isolation: process``: a connector in a worker process of its own, behind a local proxy.

Python runs one thread at a time per process. A connector polling a thousand registers back to
back keeps a core busy on its own; inline, the agent's frames, rules, outbox and uplink share that
core with it. With ``isolation: process`` the agent starts ``python -m edge.connector_host`` for the
connector and talks to it over a socket pair; the worker runs the unchanged connector and

* encodes every reading into wire rows where it is produced (:class:`edge.packed.RowPacker`) and
  sends them in messages of up to a few thousand readings, every 5 ms at most: the agent seals
  them into outbox batches by byte concatenation and never builds, reads or re-encodes them;
* also sends, as reading objects, the readings of the tags the agent asked for (``want``: the tags
  frames and rules read — or all of them when a rule reads tags dynamically or the connector feeds
  label extraction), which update asset state exactly as inline readings do;
* reports its status on change, and its metrics every second (forwarded into the agent's own
  ``/metrics``, so ``edgeloop_connector_*`` and protocol metrics look the same either way);
* performs writes (rule actions) on request and answers with the outcome.

Nothing changes about durability. A connector that acknowledges its source (MQTT QoS 1/2) gets an
acking sink in the worker; the agent answers each message with ``durable`` after the outbox
commit that holds it (or ``not durable`` if it refused it), and only then does the worker call the
connector's callbacks. A worker that dies loses only readings nobody acknowledged; the proxy
reports ``reconnecting`` with the exit code and starts a new one with the connector's backoff. The
worker ignores SIGINT/SIGTERM (the agent stops it in order, flushing what it holds) and exits when
its socket closes, so it never outlives a killed agent.

Wire protocol: each message is a 4-byte big-endian length and a msgpack array whose first element
names it (see :func:`encode_message`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from edge.packed import PackedReadings
from protocols.base import (
    Connector,
    ConnectorConfig,
    ConnectorError,
    ConnectorState,
    ConnectorStatus,
    DeadLetter,
    DurableCallback,
    WriteError,
)
from shared.records import Quality, Reading, Value, trusted_reading
from shared.wire import pack_default, unpack_ext

__all__ = [
    "PackedSink",
    "ProcessConnector",
    "decode_message",
    "encode_message",
    "read_message",
]

log = logging.getLogger(__name__)

#: ``sink(state_readings, packed, n_readings, on_durable)``: what an isolated connector delivers
PackedSink = Callable[[Sequence[Reading], Sequence[PackedReadings], int, DurableCallback], None]

_LEN = struct.Struct("!I")
MAX_MESSAGE = 256 * 1024 * 1024
#: silence from a worker (it reports metrics every second) after which it is taken for hung
WORKER_SILENCE = 15.0
#: how long a stopping worker may take to flush and exit before it is killed
STOP_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0


def encode_message(*fields: Any) -> bytes:
    body: bytes = msgpack.packb(list(fields), use_bin_type=True, default=pack_default)
    return _LEN.pack(len(body)) + body


def decode_message(body: bytes) -> list[Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, ext_hook=unpack_ext, strict_map_key=False)
    except ValueError as exc:  # msgpack's errors and WireDecodeError are ValueErrors
        raise ConnectorError(f"connector worker sent an undecodable message: {exc}") from None
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise ConnectorError(f"connector worker sent a malformed message ({body[:40]!r}...)")
    return msg


async def read_message(reader: asyncio.StreamReader) -> list[Any] | None:
    """The next message, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ConnectorError("connector worker stream ended inside a message header") from None
    (n,) = _LEN.unpack(head)
    if n > MAX_MESSAGE:
        raise ConnectorError(f"connector worker announced a {n}-byte message (limit {MAX_MESSAGE})")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ConnectorError("connector worker stream ended inside a message") from None
    return decode_message(body)


_QUALITY = {int(q): q for q in Quality}


def _readings(cols: list[list[Any]]) -> list[Reading]:
    """Reading objects from the worker's columns (built and checked by the connector there)."""
    quality = _QUALITY
    return [
        trusted_reading(a, t, ts, v, quality[q], st)
        for a, t, ts, v, q, st in zip(*cols, strict=True)
    ]


class ProcessConnector(Connector[ConnectorConfig]):
    """Runs the connector configured by ``config`` in a worker process; same contract as inline.

    The agent registers a :data:`PackedSink` with :meth:`set_packed_sink`; without one (plain
    ``set_sink`` or ``stream()``), the packed rows are decoded back into readings and delivered
    like any connector's.
    """

    config_model = ConnectorConfig

    def __init__(self, config: ConnectorConfig) -> None:
        setattr(self, "kind", config.kind)  # noqa: B010 - metric labels use the real kind
        super().__init__(config)
        self._packed_sink: PackedSink | None = None
        self._want: frozenset[str] | None = frozenset()
        self.max_rows = 500
        self.generation = 0
        self.pid: int | None = None
        self._tables: dict[str, tuple[str, ...]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._writes: dict[int, asyncio.Future[None]] = {}
        self._write_ids = itertools.count(1)
        self._metric_last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._on_dropped: Callable[[int], None] | None = None
        self._fatal: str | None = None  # why the current worker gave up, if it said so

    # --- agent-facing --------------------------------------------------------------------

    def set_packed_sink(
        self,
        sink: PackedSink | None,
        *,
        max_rows: int = 500,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        """Deliver packed rows plus the wanted readings to ``sink`` (see :data:`PackedSink`);
        ``on_dropped(n)`` hears of readings the worker dropped because nobody read them."""
        self._packed_sink = sink
        self.max_rows = max_rows
        self._on_dropped = on_dropped

    def set_want(self, tags: frozenset[str] | None) -> None:
        """The tags whose readings the agent needs as objects (None: all of them)."""
        self._want = None if tags is None else frozenset(tags)
        self._send("want", None if self._want is None else sorted(self._want))

    def _send(self, *fields: Any) -> None:
        w = self._writer
        if w is not None and not w.is_closing():
            w.write(encode_message(*fields))

    # --- the worker's life ---------------------------------------------------------------

    async def _run(self) -> None:
        mine, theirs = socket.socketpair()
        proc: asyncio.subprocess.Process | None = None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "edge.connector_host",
                "--fd",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.pid = proc.pid
        self._fatal = None
        self.generation += 1
        self._tables = {}
        self._metric_last = {}
        reader, writer = await asyncio.open_connection(sock=mine, limit=2**20)
        self._writer = writer
        from edge.logs import JsonFormatter

        root = logging.getLogger()
        want = frozenset() if self._packed_sink is None else self._want
        self._send(
            "start",
            self.config.model_dump(mode="json"),
            None if want is None else sorted(want),
            self.max_rows,
            logging.getLevelName(root.getEffectiveLevel()),
            any(isinstance(h.formatter, JsonFormatter) for h in root.handlers),
        )
        log.info("connector %s: worker process %d started", self.name, proc.pid)
        try:
            me = asyncio.current_task()
            while True:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
                # that races with a message arriving, and stop() would then wait forever
                try:
                    async with asyncio.timeout(WORKER_SILENCE):
                        msg = await read_message(reader)
                except TimeoutError:
                    raise ConnectorError(
                        f"connector worker {proc.pid} silent for {WORKER_SILENCE:.0f}s; restarting"
                    ) from None
                if msg is None:
                    break
                self._handle(msg)
                if me is not None and me.cancelling():
                    raise asyncio.CancelledError
            async with asyncio.timeout(STOP_TIMEOUT):
                code = await proc.wait()
            why = f": {self._fatal}" if self._fatal else ""
            raise ConnectorError(f"connector worker {proc.pid} exited with code {code}{why}")
        except asyncio.CancelledError:
            # stop(): let the worker stop its connector and flush what it holds, deliver that
            await asyncio.shield(self._drain(reader, proc))
            raise
        finally:
            self._writer = None
            for fut in self._writes.values():
                if not fut.done():
                    fut.set_exception(ConnectorError(f"connector worker {proc.pid} went away"))
            self._writes.clear()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.shield(writer.wait_closed())
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())

    async def _drain(self, reader: asyncio.StreamReader, proc: asyncio.subprocess.Process) -> None:
        self._send("stop")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    msg = await read_message(reader)
                    if msg is None:
                        break
                    self._handle(msg)
                await proc.wait()
        except (TimeoutError, ConnectorError, OSError) as exc:
            log.warning(
                "connector %s: worker did not stop cleanly (%s); killing it", self.name, exc
            )

    # --- messages from the worker --------------------------------------------------------

    def _handle(self, msg: list[Any]) -> None:
        what = msg[0]
        if what == "data":
            self._on_data(msg)
        elif what == "status":
            _, state, error, next_at, since, attempts = msg
            self._status = ConnectorStatus(ConnectorState(state), error, next_at, since, attempts)
        elif what == "metrics":
            self._on_metrics(msg[1])
        elif what == "written":
            fut = self._writes.pop(msg[1], None)
            if fut is not None and not fut.done():
                if msg[2] is None:
                    fut.set_result(None)
                else:
                    kind, text = msg[2]
                    fut.set_exception(
                        (WriteError if kind == "WriteError" else ConnectorError)(text)
                    )
        elif what == "dead":
            letters = [
                DeadLetter(ts, src, why, bytes(data), size) for ts, src, why, data, size in msg[1]
            ]
            self._dead.ring.extend(letters)  # counted by the worker's forwarded metrics
            if self._dead_sink is not None:
                self._dead_sink(letters)
        elif what == "fatal":
            log.error("connector %s: worker failed: %s", self.name, msg[1])
            self._fatal = str(msg[1])
            self._status = ConnectorStatus(ConnectorState.RECONNECTING, msg[1])
        else:
            raise ConnectorError(f"connector worker sent an unknown message {what!r}")

    def _on_data(self, msg: list[Any]) -> None:
        _, seq, acking, news, frags, cols, dropped = msg
        if dropped:
            if self._on_dropped is not None:
                self._on_dropped(dropped)
            log.warning(
                "connector %s: worker dropped %d readings (agent too slow)", self.name, dropped
            )
        tables = self._tables
        for asset, added in news.items():
            tables[asset] = (*tables.get(asset, ()), *added)
        source = (self.name, self.generation)
        packed = [
            PackedReadings(asset, source, tables[asset], n, rows) for asset, _len, n, rows in frags
        ]
        n = sum(p.n for p in packed)
        if not n:  # nothing storable (dead letters only, or values the worker could not encode)
            if acking:
                if self._packed_sink is not None and self._dead_sink is not None:
                    # acknowledged once the dead letters that came before it are stored
                    self._packed_sink([], [], 0, self._durable_reply(seq))
                else:
                    self._send("durable", [seq], True)  # or the worker waits for it forever
            return
        self.readings_total += n
        self._m_readings.inc(n)
        on_durable: DurableCallback = self._durable_reply(seq) if acking else _no_ack
        sink = self._packed_sink
        if sink is not None:
            sink(_readings(cols) if cols else [], packed, n, on_durable)
            return
        readings = [r for p in packed for r in p.readings()]
        if self._acking_sink is not None:
            self._acking_sink(readings, on_durable)
            return
        if self._sink is not None:
            self._sink(readings)
        elif self._queue is not None:
            self._queue.put_nowait(readings)
        on_durable(True)

    def _durable_reply(self, seq: int) -> DurableCallback:
        def done(ok: bool) -> None:
            self._send("durable", [seq], ok)

        return done

    def _on_metrics(self, samples: list[list[Any]]) -> None:
        """Fold the worker's metric values into this process's metrics of the same names."""
        from prometheus_client import REGISTRY

        collectors = REGISTRY._names_to_collectors
        for family, mtype, sample, labels, value in samples:
            metric = collectors.get(family)
            if metric is None:
                continue
            key = (sample, tuple(sorted(labels.items())))
            prev = self._metric_last.get(key, 0.0)
            self._metric_last[key] = value
            try:
                if mtype == "gauge":
                    metric.labels(**labels).set(value)  # type: ignore[attr-defined]
                    continue
                delta = value - prev
                if delta <= 0:
                    continue
                if mtype == "counter" and sample.endswith("_total"):
                    metric.labels(**labels).inc(delta)  # type: ignore[attr-defined]
                elif mtype == "histogram":
                    _histogram_add(metric, sample, labels, delta)
            except (ValueError, KeyError, AttributeError) as exc:
                log.debug("connector %s: metric %s not forwarded: %s", self.name, sample, exc)

    # --- actions -------------------------------------------------------------------------

    async def write(self, tag: str, value: Value) -> None:
        if self._writer is None:
            raise ConnectorError(f"connector {self.name!r}: its worker process is not running")
        wid = next(self._write_ids)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes[wid] = fut
        self._send("write", wid, tag, value)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await fut
        except TimeoutError:
            raise ConnectorError(
                f"connector {self.name!r}: no answer to a write of {tag!r} in {WRITE_TIMEOUT:.0f}s"
            ) from None
        finally:
            self._writes.pop(wid, None)


def _no_ack(ok: bool) -> None:
    return None


def _histogram_add(metric: Any, sample: str, labels: dict[str, str], delta: float) -> None:
    """Add a worker histogram's increments (cumulative bucket counts, sum) to ``metric``."""
    if sample.endswith("_sum"):
        metric.labels(**labels)._sum.inc(delta)
    elif sample.endswith("_bucket"):
        # the worker's buckets are cumulative, ours hold each bucket's own count: adding the
        # cumulative increment of bucket i to bucket i and taking it from bucket i+1, for every
        # i, leaves each bucket with its own increment once all of them are forwarded
        le = labels.pop("le")
        child = metric.labels(**labels)
        bounds = child._upper_bounds
        i = bounds.index(float(le))
        child._buckets[i].inc(delta)
        if i + 1 < len(bounds):
            child._buckets[i + 1].inc(-delta)
