"""The worker process of a connector run with ``isolation: process`` (see :mod:`edge.isolation`).

Started by the agent as ``python -m edge.connector_host --fd N`` with one end of a socket pair as
descriptor N. It waits for ``start`` (the connector's config, the tags the agent wants as reading
objects, the fragment size, logging), runs the connector, and streams ``data``, ``status``,
``metrics`` and ``written`` messages back; it obeys ``want``, ``durable``, ``write`` and ``stop``.
It exits when told to stop or when the socket closes (the agent is gone), never on SIGINT or
SIGTERM: those reach the whole process group on Ctrl-C or a service stop, and the agent stops
its workers itself, in order, after they flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from edge.isolation import encode_message, read_message
from edge.packed import RowPacker
from protocols.base import (
    NO_ACK,
    Connector,
    ConnectorError,
    DeadLetter,
    DurableCallback,
    PointSet,
    ReadingColumns,
)
from shared.records import Reading, trusted_reading

log = logging.getLogger("edge.connector_host")

FLUSH_DELAY = 0.005  # seconds readings may wait to share a message
FLUSH_AT = 4000  # readings that send a message at once
#: bytes queued to an agent that does not read, beyond which new readings are dropped (counted)
MAX_BUFFERED = 64 * 1024 * 1024
METRICS_EVERY = 1.0


def _build(config: dict[str, Any]) -> Connector[Any]:
    kind = config.get("kind")
    if kind == "synthetic":
        from edge.synthetic import SyntheticConfig, SyntheticConnector

        return SyntheticConnector(SyntheticConfig.model_validate(config))
    from protocols.base import load_connector_class

    cls = load_connector_class(str(kind))
    return cls(cls.config_model.model_validate(config))


class Host:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.packer = RowPacker()
        self.want: frozenset[str] | None = frozenset()
        # per PointSet (hashed by identity): the positions of the wanted tags in it
        self._picks: dict[PointSet, list[int]] = {}
        self.state: list[Reading] = []
        self.callbacks: list[DurableCallback] = []
        self.waiting: dict[int, list[DurableCallback]] = {}
        self.seq = 0
        self.dropped = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self.connector: Connector[Any] | None = None

    def send(self, *fields: Any) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_message(*fields))

    # --- readings in ---------------------------------------------------------------------

    def dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Sent at once: they reach the agent before the data message that acks their source."""
        self.send("dead", [[d.ts_ns, d.source, d.reason, d.payload, d.size] for d in letters])

    def sink(self, readings: Sequence[Reading], on_durable: DurableCallback) -> None:
        if self.writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.dropped += len(readings)
            on_durable(False)
            return
        self.packer.add(readings)
        want = self.want
        if want is None:
            self.state.extend(readings)
        elif want:
            self.state.extend([r for r in readings if r.tag in want])
        if on_durable is not NO_ACK:
            self.callbacks.append(on_durable)
        self._schedule_flush()

    def columns(self, batch: Sequence[ReadingColumns]) -> None:
        """The column sink: rows straight from the values; reading objects only for wanted tags."""
        if self.writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.dropped += sum(len(c) for c in batch)
            return
        self.packer.add_columns(batch)
        want = self.want
        if want is None:
            for cols in batch:
                self.state += cols.readings()
        elif want:
            picks = self._picks
            for cols in batch:
                names = cols.points
                wanted = picks.get(names)
                if wanted is None:
                    wanted = picks[names] = [i for i, t in enumerate(names.tags) if t in want]
                if wanted:
                    assets, tags, values, ts = names.assets, names.tags, cols.values, cols.ts_ns
                    self.state += [
                        trusted_reading(assets[i], tags[i], ts, values[i]) for i in wanted
                    ]
        self._schedule_flush()

    def set_want(self, want: frozenset[str] | None) -> None:
        self.want = want
        self._picks = {}

    def _schedule_flush(self) -> None:
        if self.packer.pending >= FLUSH_AT:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self.packer.pending and not self.dropped:
            return
        refused = self.packer.refused
        news, frags = self.packer.take()
        if self.packer.refused != refused and self.connector is not None:
            n = self.packer.refused - refused
            log.error("%d readings with values that cannot be encoded were dropped", n)
            for _ in range(n):
                self.connector._malformed("value cannot be encoded")
        state, self.state = self.state, []
        cols = (
            [
                [r.asset for r in state],
                [r.tag for r in state],
                [r.ts_ns for r in state],
                [r.value for r in state],
                [int(r.quality) for r in state],
                [r.status for r in state],
            ]
            if state
            else None
        )
        self.seq += 1
        callbacks, self.callbacks = self.callbacks, []
        if callbacks:
            self.waiting[self.seq] = callbacks
        dropped, self.dropped = self.dropped, 0
        self.send("data", self.seq, bool(callbacks), news, frags, cols, dropped)

    def durable(self, seqs: list[int], ok: bool) -> None:
        for seq in seqs:
            for cb in self.waiting.pop(seq, ()):
                try:
                    cb(ok)
                except Exception:
                    log.exception("a durability callback raised")

    # --- status and metrics --------------------------------------------------------------

    async def report(self) -> None:
        from prometheus_client import REGISTRY

        last: tuple[Any, ...] | None = None
        next_metrics = 0.0
        while True:
            conn = self.connector
            if conn is not None:
                st = conn.status
                now = (st.state.value, st.last_error, st.next_attempt_at, st.connected_since)
                if now != last:
                    last = now
                    self.send("status", *now, st.attempts)
            if time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + METRICS_EVERY
                samples = [
                    [fam.name, fam.type, s.name, s.labels, s.value]
                    for fam in REGISTRY.collect()
                    if fam.name.startswith("edgeloop_")
                    and fam.name != "edgeloop_connector_readings"
                    for s in fam.samples
                ]
                self.send("metrics", samples)
            await asyncio.sleep(0.1)

    # --- writes --------------------------------------------------------------------------

    async def write(self, wid: int, tag: str, value: Any) -> None:
        conn = self.connector
        try:
            if conn is None:
                raise ConnectorError("the connector is not running")
            await conn.write(tag, value)
        except Exception as exc:  # noqa: BLE001 - every outcome goes back to the agent
            self.send("written", wid, [type(exc).__name__, str(exc)])
        else:
            self.send("written", wid, None)


async def serve(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
    host = Host(writer)
    tasks: set[asyncio.Task[None]] = set()
    reporter: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(30):
            first = await read_message(reader)
        if first is None or first[0] != "start":
            log.error("connector worker: expected a start message, got %r", first and first[0])
            return 2
        _, config, want, max_rows, level, as_json = first
        from edge.logs import setup_logging

        setup_logging(level, as_json)
        host.set_want(None if want is None else frozenset(want))
        host.packer.max_rows = int(max_rows)
        try:
            conn = _build(config)
        except Exception as exc:  # noqa: BLE001 - reported, then the worker ends
            host.send("fatal", f"{type(exc).__name__}: {exc}")
            await writer.drain()
            return 3
        host.connector = conn
        conn.set_sink(host.sink, acking=True)
        conn.set_dead_letter_sink(host.dead_letters)
        conn.set_column_sink(host.columns)
        await conn.start()
        # what is alive now (modules, the connector's plan) lives as long as the worker: keep it
        # out of the collector's generations, which then only walk the readings in flight
        gc.collect()
        gc.freeze()
        reporter = asyncio.create_task(host.report(), name="connector-host:report")
        while True:
            msg = await read_message(reader)
            if msg is None or msg[0] == "stop":
                break
            what = msg[0]
            if what == "durable":
                host.durable(msg[1], bool(msg[2]))
            elif what == "want":
                host.set_want(None if msg[1] is None else frozenset(msg[1]))
            elif what == "write":
                task = asyncio.create_task(host.write(msg[1], msg[2], msg[3]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        await conn.stop()
        host.flush()
        await writer.drain()
        return 0
    finally:
        for task in [*tasks, *([reporter] if reporter else [])]:
            task.cancel()
        for task in [*tasks, *([reporter] if reporter else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if host.connector is not None:
            with contextlib.suppress(Exception):
                await host.connector.stop()
        host.durable(list(host.waiting), False)  # the agent never confirmed these
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.connector_host")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        return asyncio.run(serve(args.fd))
    except (ConnectionError, OSError) as exc:
        log.error("connector worker: lost the agent (%s)", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
