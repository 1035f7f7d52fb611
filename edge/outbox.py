"""The durable outbox: every reading, frame, event and heartbeat the agent accepts, until Kafka acks.

SQLite in WAL mode, on one dedicated thread (the event loop hands work over and never waits on
the disk itself). :meth:`Outbox.append` takes what the agent accepted in one tick, splits it into
batches of one kind and one asset (at most ``batch_size`` records each), numbers them with the
next ``batch_seq`` values, encodes each with the wire codec, and stores the encoded batches and
the new next sequence number in ONE transaction. From then on a batch is immutable: what the
uplink sends, and resends after a crash or an outage, is the same bytes under the same
``batch_seq`` — which is what lets the cloud drop a batch it had in fact received. Sealing batches
at append time also makes the hot path cheap: one row per batch, not per record, and the uplink
reads ready-to-send bytes.

Durability: with ``synchronous=NORMAL`` in WAL mode a committed transaction is in the WAL file
(the OS page cache) when ``append`` returns, so it survives the agent being SIGKILLed; a power
loss or kernel crash may lose the last transactions. ``synchronous: full`` fsyncs every commit and
survives power loss too, at a cost in throughput.

Batches leave only via :meth:`ack` (after the broker acknowledged them) or the overflow policy.
Bounded by bytes (encoded sizes plus a per-batch overhead): ``drop_oldest`` deletes the oldest
batches to make room, ``drop_newest`` refuses incoming batches that do not fit; both count the
records dropped, by kind (a dropped batch leaves a gap in ``batch_seq`` the cloud can see).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import msgpack

from edge.packed import READING_HEADER, PackedReadings, seal_packed
from shared.records import Heartbeat, Reading, Record
from shared.wire import Batch, Kind, decode_batch, encode_batch, kind_of

__all__ = ["ClaimedBatch", "Outbox", "OutboxError", "OutboxStats", "Storable"]

T = TypeVar("T")
#: what the outbox stores: records, and reading rows an isolated connector encoded already
Storable = Record | PackedReadings
BATCH_OVERHEAD = 64  # bytes per stored batch beyond its payload (row header, index entries)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    asset TEXT NOT NULL,
    n INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(RuntimeError):
    """The outbox database cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class ClaimedBatch:
    """One sealed batch: its number, what it holds, and the exact bytes to send."""

    seq: int
    kind: Kind
    asset: str
    n: int
    created_ns: int
    payload: bytes

    @property
    def nbytes(self) -> int:
        return len(self.payload) + BATCH_OVERHEAD

    @property
    def records(self) -> list[Record]:
        return list(decode_batch(self.payload).records)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    records: int
    batches: int
    nbytes: int
    oldest_ns: int | None
    next_seq: int


def _key(rec: Record) -> str:
    return rec.agent_id if type(rec) is Heartbeat else rec.asset  # type: ignore[union-attr]


_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1


def encode_readings(agent_id: str, seq: int, created_ns: int, chunk: Sequence[Reading]) -> bytes:
    """:func:`shared.wire.encode_batch` for a reading batch, byte for byte, without its per-record
    function calls and re-checks (the readings were validated when the connector built them).

    Falls back to ``encode_batch`` for a value that needs the codec's big-integer extension.
    """
    index: dict[str, int] = {}
    table: list[str] = []
    rows: list[list[Any]] = []
    append = rows.append
    for r in chunk:
        a = r.asset
        ai = index.get(a)
        if ai is None:
            ai = index[a] = len(table)
            table.append(a)
        t = r.tag
        ti = index.get(t)
        if ti is None:
            ti = index[t] = len(table)
            table.append(t)
        v = r.value
        tv = type(v)
        if tv is int and not _I64_MIN <= v <= _U64_MAX:  # type: ignore[operator]
            return encode_batch(Batch(agent_id, seq, Kind.READING, chunk, created_ns))
        append([ai, ti, r.ts_ns, v, r.quality, r.status])  # an IntEnum packs as its int
    body: bytes = msgpack.packb([agent_id, seq, created_ns, table, rows], use_bin_type=True)
    return READING_HEADER + body


class Outbox:
    """Durable, bounded FIFO of sealed, numbered batches. Async context manager."""

    def __init__(
        self,
        path: str | Path,
        *,
        agent_id: str,
        batch_size: int = 500,
        max_bytes: int = 256 * 1024 * 1024,
        overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest",
        synchronous: Literal["normal", "full"] = "normal",
        on_drop: Callable[[Kind, int], None] | None = None,
    ) -> None:
        if overflow not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"overflow policy {overflow!r}: expected drop_oldest or drop_newest")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.agent_id = agent_id
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.synchronous = synchronous
        self._on_drop = on_drop
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        # mirrors of the database, maintained on the outbox thread, read from the loop
        self.records = 0
        self.batches = 0
        self.nbytes = 0
        self.next_seq = 1
        self.dropped: dict[Kind, int] = {}

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._executor is not None

    async def start(self) -> None:
        """Open (or create) the database and load its counters. Idempotent."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox")
        try:
            await self._call(self._open)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def stop(self) -> None:
        """Checkpoint and close. Safe to call twice."""
        ex, self._executor = self._executor, None
        if ex is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(ex, self._close)
        finally:
            ex.shutdown(wait=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise OutboxError("the outbox is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"{self.path}: could not switch to WAL mode (got {mode})")
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open the outbox at {self.path}: {exc}") from exc
        self._db = db
        self._reload_counters()

    def _reload_counters(self) -> None:
        db = self.db
        b, n, size, max_seq = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(n), 0), COALESCE(SUM(LENGTH(payload)), 0), MAX(seq) "
            "FROM batches"
        ).fetchone()
        self.batches, self.records = int(b), int(n)
        self.nbytes = int(size) + BATCH_OVERHEAD * self.batches
        row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        self.next_seq = max(int(row[0]) if row else 1, (max_seq or 0) + 1)

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError("the outbox is not open")
        return self._db

    # --- writes -------------------------------------------------------------------------

    async def append(self, records: Sequence[Storable]) -> int:
        """Seal ``records`` into numbered batches and store them in one transaction.

        Returns how many records were stored (fewer than given only under ``drop_newest``;
        :class:`~edge.packed.PackedReadings` count as the readings they hold). Record order is
        kept within each (kind, asset); packed rows are batched per (asset, source).
        """
        if not records:
            return 0
        return await self._call(self._append, records)

    def _seal(self, records: Sequence[Storable], first_seq: int) -> list[tuple[Any, ...]]:
        groups: dict[tuple[type, str], list[list[Any]]] = {}
        order: list[list[Any]] = []
        size = self.batch_size
        # records come in runs of one kind and asset (a device's poll): look the group up once
        # per run; a chunk is full at batch_size records
        cur_t: type | None = None
        cur_k = ""
        chunk: list[Any] = []
        chunks: list[list[Any]] = []
        packed: dict[tuple[str, tuple[str, int]], list[list[PackedReadings]]] = {}
        packed_n: dict[int, int] = {}  # id(chunk) -> readings in it
        for rec in records:
            t = type(rec)
            if t is PackedReadings:  # rows from an isolated connector: chunk by reading count
                p: PackedReadings = rec  # type: ignore[assignment]
                pchunks = packed.get((p.asset, p.source))
                if pchunks is None:
                    pchunks = packed[(p.asset, p.source)] = [[]]
                    order.append(pchunks[0])
                pchunk = pchunks[-1]
                if pchunk and packed_n[id(pchunk)] + p.n > size:
                    pchunk = []
                    pchunks.append(pchunk)
                    order.append(pchunk)
                pchunk.append(p)
                packed_n[id(pchunk)] = packed_n.get(id(pchunk), 0) + p.n
                continue
            k = rec.agent_id if t is Heartbeat else rec.asset  # type: ignore[union-attr]
            if t is not cur_t or k != cur_k:
                cur_t, cur_k = t, k
                key = (t, k)
                got = groups.get(key)
                if got is None:
                    got = groups[key] = [[]]
                    order.append(got[0])
                chunks = got
                chunk = chunks[-1]
            if len(chunk) >= size:
                chunk = []
                chunks.append(chunk)
                order.append(chunk)
            chunk.append(rec)
        now = time.time_ns()
        rows = []
        seq = first_seq
        agent = self.agent_id
        for chunk in order:
            first = chunk[0]
            if type(first) is PackedReadings:
                kind = Kind.READING
                payload = seal_packed(agent, seq, now, chunk)
                rows.append((seq, int(kind), first.asset, packed_n[id(chunk)], now, payload))
                seq += 1
                continue
            if type(first) is Reading:
                kind = Kind.READING
                payload = encode_readings(agent, seq, now, chunk)
            else:
                kind = kind_of(first)
                payload = encode_batch(Batch(agent, seq, kind, chunk, now))
            rows.append((seq, int(kind), _key(first), len(chunk), now, payload))
            seq += 1
        return rows

    def _append(self, records: Sequence[Storable]) -> int:
        db = self.db
        rows = self._seal(records, self.next_seq)
        incoming = sum(len(r[5]) + BATCH_OVERHEAD for r in rows)
        try:
            db.execute("BEGIN IMMEDIATE")
            if self.nbytes + incoming > self.max_bytes:
                if self.overflow == "drop_newest":
                    room = self.max_bytes - self.nbytes
                    keep = []
                    for row in rows:
                        size = len(row[5]) + BATCH_OVERHEAD
                        if size <= room:
                            room -= size
                            keep.append(row)
                        else:
                            self._count_drop(Kind(row[1]), row[3])
                    if len(keep) != len(rows):  # renumber: refused batches leave no gap
                        rows = self._seal(
                            [r for row in keep for r in decode_batch(row[5]).records],
                            self.next_seq,
                        )
                    incoming = sum(len(r[5]) + BATCH_OVERHEAD for r in rows)
                else:
                    self._drop_oldest(self.nbytes + incoming - self.max_bytes)
            db.executemany(
                "INSERT INTO batches (seq, kind, asset, n, created_ns, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            next_seq = rows[-1][0] + 1 if rows else self.next_seq
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('next_seq', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (next_seq,),
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._reload_counters()
            raise OutboxError(f"outbox write failed ({self.path}): {exc}") from exc
        self.next_seq = next_seq
        self.batches += len(rows)
        stored = int(sum(r[3] for r in rows))
        self.records += stored
        self.nbytes += incoming
        return stored

    def _drop_oldest(self, need: int) -> None:
        """Delete the oldest batches until ``need`` bytes are free (inside the transaction)."""
        db = self.db
        while need > 0:
            victims = db.execute(
                "SELECT seq, kind, n, LENGTH(payload) FROM batches ORDER BY seq LIMIT 256"
            ).fetchall()
            if not victims:
                return
            gone = []
            for seq, kind, n, size in victims:
                if need <= 0:
                    break
                gone.append((seq,))
                need -= size + BATCH_OVERHEAD
                self.batches -= 1
                self.records -= n
                self.nbytes -= size + BATCH_OVERHEAD
                self._count_drop(Kind(kind), n)
            db.executemany("DELETE FROM batches WHERE seq = ?", gone)

    def _count_drop(self, kind: Kind, n: int) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + n
        if self._on_drop is not None:
            self._on_drop(kind, n)

    # --- reads and acks -----------------------------------------------------------------

    async def claim(self, *, after_seq: int, max_batches: int) -> list[ClaimedBatch]:
        """Up to ``max_batches`` batches with ``batch_seq > after_seq``, oldest first."""
        return await self._call(self._claim, after_seq, max_batches)

    def _claim(self, after_seq: int, max_batches: int) -> list[ClaimedBatch]:
        rows = self.db.execute(
            "SELECT seq, kind, asset, n, created_ns, payload FROM batches WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after_seq, max_batches),
        ).fetchall()
        return [ClaimedBatch(s, Kind(k), a, n, c, p) for s, k, a, n, c, p in rows]

    async def ack(self, seqs: Sequence[int]) -> int:
        """Forget the batches the broker acknowledged; returns how many records left."""
        if not seqs:
            return 0
        return await self._call(self._ack, list(seqs))

    def _ack(self, seqs: list[int]) -> int:
        db = self.db
        marks = ",".join("?" * len(seqs))
        try:
            db.execute("BEGIN IMMEDIATE")
            cols = "COUNT(*), COALESCE(SUM(n), 0), COALESCE(SUM(LENGTH(payload)), 0)"
            query = f"SELECT {cols} FROM batches WHERE seq IN ({marks})"  # noqa: S608
            b, n, size = db.execute(query, seqs).fetchone()
            db.execute(f"DELETE FROM batches WHERE seq IN ({marks})", seqs)  # noqa: S608
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise OutboxError(f"outbox ack failed ({self.path}): {exc}") from exc
        self.batches -= int(b)
        self.records -= int(n)
        self.nbytes -= int(size) + BATCH_OVERHEAD * int(b)
        return int(n)

    # --- inspection ---------------------------------------------------------------------

    async def stats(self) -> OutboxStats:
        return await self._call(self._stats)

    def _stats(self) -> OutboxStats:
        row = self.db.execute("SELECT created_ns FROM batches ORDER BY seq LIMIT 1").fetchone()
        return OutboxStats(
            self.records,
            self.batches,
            self.nbytes,
            None if row is None else row[0],
            self.next_seq,
        )
