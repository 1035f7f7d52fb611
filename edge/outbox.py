"""The durable outbox: every reading, frame, event and heartbeat the agent accepts, until Kafka acks.

SQLite in WAL mode, on one dedicated thread (the event loop never waits on disk for more than a
hand-off). Records are appended in one transaction per call (the agent appends once per tick).

Durability: with ``synchronous=NORMAL`` in WAL mode a committed transaction is in the WAL file
(the OS page cache) when ``append`` returns, so it survives the agent being SIGKILLed; a power
loss or kernel crash may lose the last transactions. ``synchronous: full`` fsyncs every commit and
survives power loss too.

Batch numbering: :meth:`Outbox.claim` assigns the next ``batch_seq`` values and the row ids they
cover in one transaction *before* anything is sent, and the next sequence number lives in the same
database. A batch that was claimed but not acknowledged when the agent stopped (or crashed) is
claimed again after a restart with the same ``batch_seq`` and the same records, which is what lets
the cloud drop it if it had in fact arrived. Rows leave only via :meth:`ack` (after the broker
acknowledged their batch) or the overflow policy (counted).

Bounded by bytes (payload sizes plus a per-row overhead estimate): ``drop_oldest`` deletes the
oldest rows (and the rest of any claimed batch they belong to, so no batch is ever resent
different); ``drop_newest`` refuses what does not fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import msgpack

from shared.records import Event, Frame, Heartbeat, Reading, Record
from shared.wire import Kind, kind_of

__all__ = ["ClaimedBatch", "Outbox", "OutboxError", "OutboxStats"]

T = TypeVar("T")
ROW_OVERHEAD = 48  # bytes per row beyond its payload: id, kind, asset ref, timestamps, b-tree
_EXT_BIGINT = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    asset TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    seq INTEGER
);
CREATE INDEX IF NOT EXISTS rows_seq ON rows(seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(RuntimeError):
    """The outbox database cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class ClaimedBatch:
    """Records of one kind and one asset under one ``batch_seq``, ready to send."""

    seq: int
    kind: Kind
    asset: str
    records: list[Record]
    nbytes: int
    oldest_ns: int


@dataclass(frozen=True, slots=True)
class OutboxStats:
    rows: int
    nbytes: int
    claimed_rows: int
    oldest_ns: int | None
    next_seq: int


# --- per-row payloads (asset is a column) ----------------------------------------------------


def _default(obj: Any) -> Any:
    if type(obj) is int:  # beyond 64 bits
        return msgpack.ExtType(
            _EXT_BIGINT, obj.to_bytes((obj.bit_length() + 8) // 8, "big", signed=True)
        )
    raise TypeError(f"cannot store {type(obj).__name__} in the outbox")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise OutboxError(f"unknown extension type {code} in an outbox row")


def _fields(rec: Record) -> list[Any]:
    if type(rec) is Reading:
        return [rec.tag, rec.ts_ns, rec.value, int(rec.quality), rec.status]
    if type(rec) is Frame:
        return [
            rec.key,
            rec.ts_ns,
            rec.features,
            rec.prediction,
            rec.model_version,
            rec.score,
            list(rec.marks),
        ]
    if type(rec) is Event:
        return [rec.rule, rec.ts_ns, int(rec.severity), rec.message, rec.values]
    if type(rec) is Heartbeat:
        return [
            rec.agent_id,
            rec.ts_ns,
            rec.models,
            rec.outbox_depth,
            rec.outbox_bytes,
            rec.status,
            rec.info,
        ]
    raise OutboxError(f"the outbox does not store {type(rec).__name__} records")


def _pack(rec: Record) -> bytes:
    out: bytes = msgpack.packb(_fields(rec), use_bin_type=True, default=_default)
    return out


def _unpack(kind: int, asset: str, payload: bytes) -> Record:
    f = msgpack.unpackb(payload, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    if kind == Kind.READING:
        return Reading(asset, f[0], f[1], f[2], f[3], f[4])
    if kind == Kind.FRAME:
        return Frame(asset, f[0], f[1], f[2], f[3], f[4], f[5], tuple(f[6]))
    if kind == Kind.EVENT:
        return Event(f[0], asset, f[1], f[2], f[3], f[4])
    if kind == Kind.HEARTBEAT:
        return Heartbeat(f[0], f[1], f[2], f[3], f[4], f[5], f[6])
    raise OutboxError(f"unknown record kind {kind} in an outbox row")


def _asset_of(rec: Record) -> str:
    return rec.agent_id if type(rec) is Heartbeat else rec.asset  # type: ignore[union-attr]


class Outbox:
    """Durable, bounded FIFO of records with crash-safe batch numbering. Async context manager."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest",
        synchronous: Literal["normal", "full"] = "normal",
        on_drop: Callable[[Kind, int], None] | None = None,
    ) -> None:
        if overflow not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"overflow policy {overflow!r}: expected drop_oldest or drop_newest")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.synchronous = synchronous
        self._on_drop = on_drop
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        # mirrors of the database, maintained on the outbox thread, read from the loop
        self.rows = 0
        self.nbytes = 0
        self.claimed_rows = 0
        self.next_seq = 1
        self.dropped: Tally[Kind] = Tally()

    # --- lifecycle ----------------------------------------------------------------------

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
        n, b = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM rows").fetchone()
        self.rows = int(n)
        self.nbytes = int(b) + ROW_OVERHEAD * self.rows
        self.claimed_rows = int(
            db.execute("SELECT COUNT(*) FROM rows WHERE seq IS NOT NULL").fetchone()[0]
        )
        row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        max_seq = db.execute("SELECT MAX(seq) FROM rows").fetchone()[0]
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

    async def append(self, records: Sequence[Record]) -> int:
        """Store ``records`` durably in one transaction; return how many were stored.

        When the outbox is full, ``drop_oldest`` makes room by deleting the oldest rows;
        ``drop_newest`` stores only what fits. Every dropped record is counted.
        """
        if not records:
            return 0
        now = time.time_ns()
        rows = [(int(kind_of(r)), _asset_of(r), _pack(r), now) for r in records]
        return await self._call(self._append, rows)

    def _append(self, rows: list[tuple[int, str, bytes, int]]) -> int:
        db = self.db
        incoming = sum(len(p) + ROW_OVERHEAD for _, _, p, _ in rows)
        try:
            db.execute("BEGIN IMMEDIATE")
            if self.nbytes + incoming > self.max_bytes:
                if self.overflow == "drop_newest":
                    room = self.max_bytes - self.nbytes
                    keep: list[tuple[int, str, bytes, int]] = []
                    for row in rows:
                        size = len(row[2]) + ROW_OVERHEAD
                        if size <= room:
                            keep.append(row)
                            room -= size
                        else:
                            self._count_drop(Kind(row[0]), 1)
                    rows = keep
                    incoming = sum(len(p) + ROW_OVERHEAD for _, _, p, _ in rows)
                else:
                    self._drop_oldest(self.nbytes + incoming - self.max_bytes)
            db.executemany(
                "INSERT INTO rows (kind, asset, payload, created_ns) VALUES (?, ?, ?, ?)", rows
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._reload_counters()
            raise OutboxError(f"outbox write failed ({self.path}): {exc}") from exc
        self.rows += len(rows)
        self.nbytes += incoming
        return len(rows)

    def _drop_oldest(self, need: int) -> None:
        """Delete the oldest rows until ``need`` bytes are free (inside the open transaction)."""
        db = self.db
        while need > 0:
            chunk = db.execute(
                "SELECT id, kind, LENGTH(payload), seq FROM rows ORDER BY id LIMIT 2000"
            ).fetchall()
            if not chunk:
                break
            victims: dict[int, tuple[int, int, int | None]] = {}
            seqs: set[int] = set()
            acc = 0
            for rid, kind, size, seq in chunk:
                if acc >= need:
                    break
                victims[rid] = (kind, size, seq)
                acc += size + ROW_OVERHEAD
                if seq is not None:
                    seqs.add(seq)
            if seqs:
                # a claimed batch goes whole: it must never be resent with different contents
                marks = ",".join("?" * len(seqs))
                for rid, kind, size, seq in db.execute(
                    f"SELECT id, kind, LENGTH(payload), seq FROM rows WHERE seq IN ({marks})",  # noqa: S608
                    tuple(seqs),
                ):
                    victims[rid] = (kind, size, seq)
            db.executemany("DELETE FROM rows WHERE id = ?", [(rid,) for rid in victims])
            removed = sum(size + ROW_OVERHEAD for _, size, _ in victims.values())
            self.rows -= len(victims)
            self.nbytes -= removed
            self.claimed_rows -= sum(1 for *_, seq in victims.values() if seq is not None)
            for kind, n in Tally(Kind(k) for k, _, _ in victims.values()).items():
                self._count_drop(kind, n)
            need -= removed

    def _count_drop(self, kind: Kind, n: int) -> None:
        self.dropped[kind] += n
        if self._on_drop is not None:
            self._on_drop(kind, n)

    def _reload_counters(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            n, b = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM rows"
            ).fetchone()
            self.rows, self.nbytes = int(n), int(b) + ROW_OVERHEAD * int(n)

    # --- batches ------------------------------------------------------------------------

    async def claim(
        self, *, after_seq: int, max_batches: int, batch_size: int
    ) -> list[ClaimedBatch]:
        """Batches to send, in ``batch_seq`` order: first those claimed earlier with a sequence
        above ``after_seq`` (resent with their original numbers), then new ones numbered now."""
        return await self._call(self._claim, after_seq, max_batches, batch_size)

    def _claim(self, after_seq: int, max_batches: int, batch_size: int) -> list[ClaimedBatch]:
        db = self.db
        out: list[ClaimedBatch] = []
        seqs = [
            s
            for (s,) in db.execute(
                "SELECT DISTINCT seq FROM rows WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, max_batches),
            )
        ]
        for seq in seqs:
            rows = db.execute(
                "SELECT kind, asset, payload, created_ns FROM rows WHERE seq = ? ORDER BY id",
                (seq,),
            ).fetchall()
            out.append(self._batch(seq, rows))
        room = max_batches - len(out)
        if room <= 0:
            return out
        fresh = db.execute(
            "SELECT id, kind, asset, payload, created_ns FROM rows WHERE seq IS NULL "
            "ORDER BY id LIMIT ?",
            (room * batch_size,),
        ).fetchall()
        if not fresh:
            return out
        groups: dict[tuple[int, str], list[list[tuple[Any, ...]]]] = {}
        order: list[list[tuple[Any, ...]]] = []
        for row in fresh:
            key = (row[1], row[2])
            chunks = groups.setdefault(key, [])
            if not chunks or len(chunks[-1]) >= batch_size:
                chunk: list[tuple[Any, ...]] = []
                chunks.append(chunk)
                order.append(chunk)
            chunks[-1].append(row)
        order = order[:room]
        updates: list[tuple[int, int]] = []
        seq = self.next_seq
        new: list[ClaimedBatch] = []
        for chunk in order:
            updates += [(seq, row[0]) for row in chunk]
            new.append(self._batch(seq, [r[1:] for r in chunk]))
            seq += 1
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("UPDATE rows SET seq = ? WHERE id = ?", updates)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('next_seq', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (seq,),
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise OutboxError(f"outbox claim failed ({self.path}): {exc}") from exc
        self.next_seq = seq
        self.claimed_rows += len(updates)
        return out + new

    @staticmethod
    def _batch(seq: int, rows: Iterable[tuple[Any, ...]]) -> ClaimedBatch:
        rows = list(rows)
        kind, asset = rows[0][0], rows[0][1]
        records = [_unpack(k, a, p) for k, a, p, _ in rows]
        nbytes = sum(len(p) + ROW_OVERHEAD for _, _, p, _ in rows)
        return ClaimedBatch(seq, Kind(kind), asset, records, nbytes, min(r[3] for r in rows))

    async def ack(self, seqs: Sequence[int]) -> int:
        """Forget the batches the broker acknowledged; returns rows removed."""
        if not seqs:
            return 0
        return await self._call(self._ack, list(seqs))

    def _ack(self, seqs: list[int]) -> int:
        db = self.db
        marks = ",".join("?" * len(seqs))
        try:
            db.execute("BEGIN IMMEDIATE")
            n, b = db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM rows WHERE seq IN ({marks})",  # noqa: S608
                seqs,
            ).fetchone()
            db.execute(f"DELETE FROM rows WHERE seq IN ({marks})", seqs)  # noqa: S608
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise OutboxError(f"outbox ack failed ({self.path}): {exc}") from exc
        self.rows -= int(n)
        self.nbytes -= int(b) + ROW_OVERHEAD * int(n)
        self.claimed_rows -= int(n)
        return int(n)

    # --- inspection ---------------------------------------------------------------------

    async def stats(self) -> OutboxStats:
        return await self._call(self._stats)

    def _stats(self) -> OutboxStats:
        row = self.db.execute("SELECT created_ns FROM rows ORDER BY id LIMIT 1").fetchone()
        return OutboxStats(
            self.rows,
            self.nbytes,
            self.claimed_rows,
            None if row is None else row[0],
            self.next_seq,
        )
