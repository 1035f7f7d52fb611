"""The durable outbox: every record the agent accepts, until the cloud has applied it.

SQLite in WAL mode, on one dedicated thread (the event loop hands work over and never waits on
the disk itself). :meth:`Outbox.append` takes what the agent accepted in one tick, splits it into
batches of one kind and one asset (at most ``batch_size`` records each), numbers them with the
next ``batch_seq`` values, encodes each with the wire codec, and stores the encoded batches and
the new next sequence number in ONE transaction. From then on a batch is immutable: what the
uplink sends, and resends after a crash, an outage or a lost broker log, is the same bytes under
the same identity ``(agent_id, incarnation, batch_seq)`` — which is what lets the cloud drop a
batch it had in fact received.

The incarnation is a random id made when the outbox file is created: a gateway whose state
directory was wiped (reinstall, new SD card) starts a new incarnation and a new numbering, which
the cloud keeps apart from the old one instead of taking the new batches for replays.

A batch's life: *to send* -> (the broker acked it) *sent*, remembering the partition and offset
it got -> deleted when the cloud says it has applied it (:meth:`apply_acks`, the end-to-end
acknowledgement; a broker ack is not the end of the line: brokers lose logs, topics are
re-created). A sent batch goes back to *to send* when the broker reuses its offset (the
partition's log was reset under it), or when the cloud asks for a replay (:meth:`requeue`).

Durability: with ``synchronous=NORMAL`` in WAL mode a committed transaction is in the WAL file
(the OS page cache) when ``append`` returns, so it survives the agent being SIGKILLed; a power
loss or kernel crash may lose the last transactions. ``synchronous: full`` fsyncs every commit and
survives power loss too, at a cost in throughput.

Bounded by bytes (encoded sizes plus a per-batch overhead), sent and unsent batches alike. When
an append does not fit, room is made first by *releasing* the oldest sent batches (the broker
holds them; only the end-to-end guarantee is given up, counted by ``on_release``), then by the
overflow policy: ``drop_oldest`` deletes the oldest unsent batches, ``drop_newest`` refuses
incoming batches that do not fit; both count the records dropped, by kind (a dropped batch
leaves a gap in ``batch_seq`` the cloud can see).

A record the wire cannot encode never fails the append: it is quarantined, that is stored as a
dead-letter event (:func:`shared.records.dead_letter_event`) with the reason, counted through
``on_quarantine``, and the rest of the tick is stored as usual.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import secrets
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
from shared.records import Heartbeat, Reading, Record, dead_letter_event
from shared.wire import Batch, Kind, decode_batch, encode_batch, kind_of

__all__ = [
    "AppliedAck",
    "ClaimedBatch",
    "Outbox",
    "OutboxError",
    "OutboxStats",
    "SentBatch",
    "Storable",
]

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS identity (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dropped (
    lo INTEGER PRIMARY KEY,
    hi INTEGER NOT NULL,
    batches INTEGER NOT NULL,
    records INTEGER NOT NULL,
    ts_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS released (
    lo INTEGER PRIMARY KEY,
    hi INTEGER NOT NULL,
    batches INTEGER NOT NULL,
    records INTEGER NOT NULL,
    ts_ns INTEGER NOT NULL
);
"""
#: columns added with the end-to-end acknowledgement (ALTER TABLE on an older outbox file):
#: sent = 1 once the broker acked (part/off: where it went last; sends: how often; sent_ns: when
#: the broker first acked it)
_ADDED_COLUMNS = (
    ("sent", "INTEGER NOT NULL DEFAULT 0"),
    ("part", "INTEGER"),
    ("off", "INTEGER"),
    ("sends", "INTEGER NOT NULL DEFAULT 0"),
    ("sent_ns", "INTEGER"),
)
_INDEXES = """
CREATE INDEX IF NOT EXISTS batches_to_send ON batches(seq) WHERE sent = 0;
CREATE INDEX IF NOT EXISTS batches_sent ON batches(kind, part, off) WHERE sent = 1;
"""
_CONTROL_KEY = "control:"  # meta keys of the control topic's consumed positions, per partition


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
class SentBatch:
    """The broker acknowledged batch ``seq`` at ``offset`` of ``partition`` (of its kind's topic)."""

    seq: int
    kind: Kind
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class AppliedAck:
    """What the cloud has applied of one incarnation on one partition of one kind's topic:
    every batch sent there with ``batch_seq <= floor``, and the ``ranges`` (inclusive)."""

    incarnation: str
    kind: Kind
    partition: int
    floor: int
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class OutboxStats:
    records: int
    batches: int
    nbytes: int
    oldest_ns: int | None
    next_seq: int
    #: batches the broker acked that the cloud has not yet said it applied
    unacked: int = 0
    #: when the oldest of those was acked by the broker (ns), None when there is none
    oldest_unacked_ns: int | None = None
    low_seq: int | None = None
    incarnation: str = ""


def _key(rec: Record) -> str:
    return rec.agent_id if type(rec) is Heartbeat else rec.asset  # type: ignore[union-attr]


_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1


def encode_readings(
    agent_id: str, incarnation: str, seq: int, created_ns: int, chunk: Sequence[Reading]
) -> bytes:
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
            return encode_batch(Batch(agent_id, seq, Kind.READING, chunk, created_ns, incarnation))
        append([ai, ti, r.ts_ns, v, r.quality, r.status])  # an IntEnum packs as its int
    body: bytes = msgpack.packb(
        [agent_id, incarnation, seq, created_ns, table, rows], use_bin_type=True
    )
    return READING_HEADER + body


def _encode(agent: str, incarnation: str, seq: int, now: int, chunk: Sequence[Any]) -> bytes:
    first = chunk[0]
    if type(first) is PackedReadings:
        return seal_packed(agent, incarnation, seq, now, chunk)
    if type(first) is Reading:
        return encode_readings(agent, incarnation, seq, now, chunk)
    return encode_batch(Batch(agent, seq, kind_of(first), chunk, now, incarnation))


def _covering(floor: int, ranges: Sequence[tuple[int, int]]) -> Callable[[int], bool]:
    """A test for "``seq`` is at or below ``floor`` or inside one of the sorted ``ranges``"."""
    starts = [lo for lo, _ in ranges]
    ends = [hi for _, hi in ranges]

    def covered(seq: int) -> bool:
        if seq <= floor:
            return True
        i = bisect.bisect_right(starts, seq) - 1
        return i >= 0 and seq <= ends[i]

    return covered


class Outbox:
    """Durable, bounded store of sealed, numbered batches. Async context manager."""

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
        on_release: Callable[[Kind, int], None] | None = None,
        on_quarantine: Callable[[str], None] | None = None,
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
        self._on_release = on_release
        self._on_quarantine = on_quarantine
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        # mirrors of the database, maintained on the outbox thread, read from the loop
        self.incarnation = ""
        #: batches numbered below this were sealed before the outbox had an incarnation (wire
        #: version 1: the cloud knows them under incarnation "")
        self.legacy_below = 0
        self.records = 0
        self.batches = 0
        self.nbytes = 0
        self.next_seq = 1
        self.low_seq: int | None = None  # the lowest batch_seq held (None: empty)
        self.unacked = 0  # batches in the sent state
        self.dropped: dict[Kind, int] = {}
        self.released: dict[Kind, int] = {}
        self.quarantined = 0
        self.requeued = 0

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
            have = {row[1] for row in db.execute("PRAGMA table_info(batches)")}
            for name, decl in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE batches ADD COLUMN {name} {decl}")
            db.executescript(_INDEXES)
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"{self.path}: could not switch to WAL mode (got {mode})")
            self._db = db
            self._identity()
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open the outbox at {self.path}: {exc}") from exc
        self._reload_counters()

    def _identity(self) -> None:
        """Load the incarnation, or create it with the outbox (one transaction)."""
        db = self.db
        row = db.execute("SELECT value FROM identity WHERE key='incarnation'").fetchone()
        if row is not None:
            self.incarnation = str(row[0])
            legacy = db.execute("SELECT value FROM meta WHERE key='legacy_below'").fetchone()
            self.legacy_below = int(legacy[0]) if legacy else 0
            return
        incarnation = secrets.token_hex(8)
        db.execute("BEGIN IMMEDIATE")
        try:
            held = db.execute("SELECT MAX(seq) FROM batches").fetchone()[0]
            db.execute(
                "INSERT INTO identity (key, value) VALUES ('incarnation', ?), ('created_ns', ?)",
                (incarnation, str(time.time_ns())),
            )
            if held is not None:  # an outbox of an older version: its batches keep identity ""
                self.legacy_below = int(held) + 1
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('legacy_below', ?)",
                    (self.legacy_below,),
                )
            db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.incarnation = incarnation
        log.info("outbox %s: new incarnation %s", self.path, incarnation)

    def _reload_counters(self) -> None:
        db = self.db
        b, n, size, max_seq, min_seq, sent = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(n), 0), COALESCE(SUM(LENGTH(payload)), 0), MAX(seq), "
            "MIN(seq), COALESCE(SUM(sent), 0) FROM batches"
        ).fetchone()
        self.batches, self.records, self.unacked = int(b), int(n), int(sent)
        self.nbytes = int(size) + BATCH_OVERHEAD * self.batches
        self.low_seq = None if min_seq is None else int(min_seq)
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

    def _tx(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        """Run ``fn`` in one write transaction; the counters are reloaded when it fails."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            out = fn(db)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._reload_counters()
            raise OutboxError(f"outbox {what} failed ({self.path}): {exc}") from exc
        return out

    def _after_delete(self) -> None:
        row = self.db.execute("SELECT MIN(seq) FROM batches").fetchone()
        self.low_seq = None if row[0] is None else int(row[0])

    # --- writes -------------------------------------------------------------------------

    async def append(self, records: Sequence[Storable]) -> int:
        """Seal ``records`` into numbered batches and store them in one transaction.

        Returns how many records were stored (fewer than given only under ``drop_newest``;
        :class:`~edge.packed.PackedReadings` count as the readings they hold; a quarantined
        record counts as its dead letter). Record order is kept within each (kind, asset);
        packed rows are batched per (asset, source).
        """
        if not records:
            return 0
        return await self._call(self._append, records)

    def _chunks(self, records: Sequence[Storable]) -> tuple[list[list[Any]], dict[int, int]]:
        """Split into batch-sized chunks of one kind and asset (packed: one asset and source)."""
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
        return order, packed_n

    def _seal(self, records: Sequence[Storable], first_seq: int) -> list[tuple[Any, ...]]:
        order, packed_n = self._chunks(records)
        now = time.time_ns()
        rows: list[tuple[Any, ...]] = []
        seq = first_seq
        agent, inc = self.agent_id, self.incarnation
        letters: list[Record] = []
        for chunk in order:
            try:
                payload = _encode(agent, inc, seq, now, chunk)
            except Exception as exc:  # noqa: BLE001 - one unencodable record must not stop a tick
                chunk = self._quarantine(chunk, exc, letters)
                if not chunk:
                    continue
                payload = _encode(agent, inc, seq, now, chunk)
            first = chunk[0]
            if type(first) is PackedReadings:
                rows.append(
                    (seq, int(Kind.READING), first.asset, packed_n[id(chunk)], now, payload)
                )
            else:
                rows.append((seq, int(kind_of(first)), _key(first), len(chunk), now, payload))
            seq += 1
        if letters:  # dead letters are plain events: they always encode
            rows += self._seal(letters, seq)
        return rows

    def _quarantine(self, chunk: list[Any], exc: Exception, letters: list[Record]) -> list[Any]:
        """Keep the records of ``chunk`` that encode alone; the others become dead letters."""
        kept: list[Any] = []
        for rec in chunk:
            try:
                _encode(self.agent_id, self.incarnation, 0, 0, [rec])
            except Exception as one:  # noqa: BLE001 - the reason travels with the dead letter
                kind = type(rec).__name__
                reason = f"the wire cannot encode this {kind}: {type(one).__name__}: {one}"
                letters.append(
                    dead_letter_event(
                        origin="outbox", source=kind, reason=reason, payload=repr(rec)
                    )
                )
                self.quarantined += 1
                log.error(
                    "outbox: quarantined a %s (%s); the rest of the tick is stored", kind, one
                )
                if self._on_quarantine is not None:
                    self._on_quarantine(kind.lower())
            else:
                kept.append(rec)
        if len(kept) == len(chunk):  # the chunk failed as a whole only: keep the error visible
            raise exc
        return kept

    def _append(self, records: Sequence[Storable]) -> int:
        rows = self._seal(records, self.next_seq)
        incoming = sum(len(r[5]) + BATCH_OVERHEAD for r in rows)

        def write(db: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int]:
            nonlocal incoming
            if self.nbytes + incoming > self.max_bytes:
                self._release_sent(self.nbytes + incoming - self.max_bytes)
            if self.nbytes + incoming > self.max_bytes:
                if self.overflow == "drop_newest":
                    rows_kept = self._refuse_newest(rows)
                    incoming = sum(len(r[5]) + BATCH_OVERHEAD for r in rows_kept)
                    return self._insert(db, rows_kept), incoming
                self._drop_oldest(self.nbytes + incoming - self.max_bytes)
            return self._insert(db, rows), incoming

        stored_rows, incoming = self._tx(write, "write")
        if stored_rows:
            self.next_seq = stored_rows[-1][0] + 1
            if self.low_seq is None:
                self.low_seq = stored_rows[0][0]
        self.batches += len(stored_rows)
        stored = int(sum(r[3] for r in stored_rows))
        self.records += stored
        self.nbytes += incoming
        return stored

    def _insert(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
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
        return rows

    def _refuse_newest(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
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
            return self._seal(
                [r for row in keep for r in decode_batch(row[5]).records], self.next_seq
            )
        return rows

    def _delete_oldest(self, need: int, sent: int) -> list[tuple[int, int, int]]:
        """Delete the oldest batches in state ``sent`` until ``need`` bytes are free (inside the
        transaction); returns (seq, kind, records) per deleted batch."""
        db = self.db
        out: list[tuple[int, int, int]] = []
        while need > 0:
            victims = db.execute(
                "SELECT seq, kind, n, LENGTH(payload) FROM batches WHERE sent = ? "
                "ORDER BY seq LIMIT 256",
                (sent,),
            ).fetchall()
            if not victims:
                break
            gone = []
            for seq, kind, n, size in victims:
                if need <= 0:
                    break
                gone.append((seq,))
                need -= size + BATCH_OVERHEAD
                self.batches -= 1
                self.records -= n
                self.nbytes -= size + BATCH_OVERHEAD
                out.append((seq, kind, n))
            db.executemany("DELETE FROM batches WHERE seq = ?", gone)
        if out:
            self._after_delete()
        return out

    def _release_sent(self, need: int) -> None:
        released = self._delete_oldest(need, 1)
        if not released:
            return
        self.unacked -= len(released)
        self._record_ranges("released", released)
        for _seq, kind, n in released:
            k = Kind(kind)
            self.released[k] = self.released.get(k, 0) + n
            if self._on_release is not None:
                self._on_release(k, n)
        log.warning(
            "outbox full: released %d batches the broker holds before the cloud confirmed them "
            "(outbox.max_bytes %d); they are no longer protected end to end",
            len(released),
            self.max_bytes,
        )

    def _drop_oldest(self, need: int) -> None:
        gone = self._delete_oldest(need, 0)
        for _seq, kind, n in gone:
            self._count_drop(Kind(kind), n)
        self._record_ranges("dropped", gone)

    def _record_ranges(self, table: str, gone: list[tuple[int, int, int]]) -> None:
        """Keep which numbers left without the cloud's word, as runs (inside the transaction):
        ``dropped`` by the overflow policy, ``released`` (sent, in the broker) to make room —
        the gaps a reader of the cloud's history may see, accounted for."""
        assert table in ("dropped", "released")
        db = self.db
        now = time.time_ns()
        for seq, _kind, n in sorted(gone):
            last = db.execute(
                f"SELECT lo, hi FROM {table} ORDER BY lo DESC LIMIT 1"  # noqa: S608
            ).fetchone()
            if last is not None and last[1] + 1 == seq:
                db.execute(
                    f"UPDATE {table} SET hi = ?, batches = batches + 1, "  # noqa: S608
                    "records = records + ?, ts_ns = ? WHERE lo = ?",
                    (seq, n, now, last[0]),
                )
            else:
                db.execute(
                    f"INSERT INTO {table} VALUES (?, ?, 1, ?, ?)",  # noqa: S608
                    (seq, seq, n, now),
                )

    async def dropped_ranges(self, table: str = "dropped") -> list[tuple[int, int]]:
        """The batch numbers the overflow policy dropped (or, with ``table="released"``, sent
        batches released to make room), as inclusive runs, oldest first."""
        assert table in ("dropped", "released")
        return await self._call(
            lambda: [
                (int(lo), int(hi))
                for lo, hi in self.db.execute(
                    f"SELECT lo, hi FROM {table} ORDER BY lo"  # noqa: S608
                )
            ]
        )

    def _count_drop(self, kind: Kind, n: int) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + n
        if self._on_drop is not None:
            self._on_drop(kind, n)

    # --- reads, sends and acknowledgements -------------------------------------------------

    async def claim(self, *, after_seq: int = 0, max_batches: int) -> list[ClaimedBatch]:
        """Up to ``max_batches`` batches to send with ``batch_seq > after_seq``, oldest first."""
        return await self._call(self._claim, after_seq, max_batches)

    def _claim(self, after_seq: int, max_batches: int) -> list[ClaimedBatch]:
        rows = self.db.execute(
            "SELECT seq, kind, asset, n, created_ns, payload FROM batches "
            "WHERE sent = 0 AND seq > ? ORDER BY seq LIMIT ?",
            (after_seq, max_batches),
        ).fetchall()
        return [ClaimedBatch(s, Kind(k), a, n, c, p) for s, k, a, n, c, p in rows]

    async def mark_sent(self, sent: Sequence[SentBatch]) -> int:
        """Record that the broker acknowledged these batches (they wait for the cloud now).

        A batch sent earlier to the same partition at an offset at or beyond one the broker has
        just given out again lost its place in that log (the log was reset or the topic
        re-created): it goes back to be sent again. Returns how many did.
        """
        if not sent:
            return 0
        return await self._call(self._mark_sent, list(sent))

    def _mark_sent(self, sent: list[SentBatch]) -> int:
        now = time.time_ns()

        def write(db: sqlite3.Connection) -> tuple[int, int]:
            cur = db.executemany(
                "UPDATE batches SET sent = 1, part = ?, off = ?, sends = sends + 1, "
                "sent_ns = COALESCE(sent_ns, ?) WHERE seq = ? AND sent = 0",
                [(b.partition, b.offset, now, b.seq) for b in sent],
            )
            marked = cur.rowcount
            lowest: dict[tuple[int, int], int] = {}
            for b in sent:
                key = (int(b.kind), b.partition)
                lowest[key] = min(lowest.get(key, b.offset), b.offset)
            seqs = [b.seq for b in sent]
            marks = ",".join("?" * len(seqs))
            requeued = 0
            for (kind, part), off in lowest.items():
                cur = db.execute(
                    "UPDATE batches SET sent = 0 WHERE sent = 1 AND kind = ? AND part = ? "  # noqa: S608
                    f"AND off >= ? AND seq NOT IN ({marks})",
                    (kind, part, off, *seqs),
                )
                requeued += cur.rowcount
            return marked, requeued

        marked, requeued = self._tx(write, "send bookkeeping")
        self.unacked += marked - requeued
        if requeued:
            self.requeued += requeued
            log.error(
                "the broker gave out offsets again that earlier batches held: the partition's log "
                "was reset or the topic re-created; re-sending %d batches it no longer has",
                requeued,
            )
        return requeued

    async def ack(self, seqs: Sequence[int]) -> int:
        """Forget these batches now (the uplink's ``delete_after: broker`` mode, tools);
        returns how many records left."""
        if not seqs:
            return 0
        return await self._call(self._ack, list(seqs))

    def _ack(self, seqs: list[int]) -> int:
        marks = ",".join("?" * len(seqs))

        def write(db: sqlite3.Connection) -> tuple[int, int, int, int]:
            cols = "COUNT(*), COALESCE(SUM(n), 0), COALESCE(SUM(LENGTH(payload)), 0), "
            cols += "COALESCE(SUM(sent), 0)"
            query = f"SELECT {cols} FROM batches WHERE seq IN ({marks})"  # noqa: S608
            b, n, size, sent = db.execute(query, seqs).fetchone()
            db.execute(f"DELETE FROM batches WHERE seq IN ({marks})", seqs)  # noqa: S608
            return int(b), int(n), int(size), int(sent)

        b, n, size, sent = self._tx(write, "ack")
        self._forget(b, n, size, sent)
        return n

    def _forget(self, b: int, n: int, size: int, sent: int) -> None:
        self.batches -= b
        self.records -= n
        self.nbytes -= size + BATCH_OVERHEAD * b
        self.unacked -= sent
        if b:
            self._after_delete()

    async def apply_acks(
        self, acks: Sequence[AppliedAck], positions: dict[int, int] | None = None
    ) -> int:
        """Delete what the cloud says it applied; store the control topic's ``positions`` (next
        offset per partition) in the same transaction. Returns how many batches left."""
        if not acks and not positions:
            return 0
        return await self._call(self._apply_acks, list(acks), dict(positions or {}))

    def _apply_acks(self, acks: list[AppliedAck], positions: dict[int, int]) -> int:
        def write(db: sqlite3.Connection) -> tuple[int, int, int, int]:
            doomed: set[int] = set()
            for a in acks:
                if a.incarnation == self.incarnation:
                    top = self.next_seq
                elif a.incarnation == "" and self.legacy_below:
                    top = self.legacy_below  # batches sealed before the outbox had an identity
                else:
                    continue  # another incarnation's (an outbox this gateway no longer has)
                rows = db.execute(
                    "SELECT seq FROM batches WHERE kind = ? AND part = ? AND seq < ?",
                    (int(a.kind), a.partition, top),
                ).fetchall()
                covered = _covering(a.floor, sorted(a.ranges))
                doomed.update(s for (s,) in rows if covered(s))
            b = n = size = sent = 0
            if doomed:
                seqs = sorted(doomed)
                for i in range(0, len(seqs), 500):
                    part = seqs[i : i + 500]
                    marks = ",".join("?" * len(part))
                    cols = "COUNT(*), COALESCE(SUM(n), 0), COALESCE(SUM(LENGTH(payload)), 0), "
                    cols += "COALESCE(SUM(sent), 0)"
                    got = db.execute(
                        f"SELECT {cols} FROM batches WHERE seq IN ({marks})",  # noqa: S608
                        part,
                    ).fetchone()
                    db.execute(f"DELETE FROM batches WHERE seq IN ({marks})", part)  # noqa: S608
                    b, n, size, sent = b + got[0], n + got[1], size + got[2], sent + got[3]
            if positions:
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [(f"{_CONTROL_KEY}{p}", off) for p, off in positions.items()],
                )
            return int(b), int(n), int(size), int(sent)

        b, n, size, sent = self._tx(write, "end-to-end ack")
        self._forget(b, n, size, sent)
        return b

    async def requeue(self, parts: Sequence[tuple[Kind, int]] | None = None) -> int:
        """Send sent-but-unconfirmed batches again (a replay): those that went to one of
        ``parts`` (kind, partition), or all of them."""
        return await self._call(self._requeue, None if parts is None else list(parts))

    def _requeue(self, parts: list[tuple[Kind, int]] | None) -> int:
        def write(db: sqlite3.Connection) -> int:
            if parts is None:
                return int(db.execute("UPDATE batches SET sent = 0 WHERE sent = 1").rowcount)
            cur = db.executemany(
                "UPDATE batches SET sent = 0 WHERE sent = 1 AND kind = ? AND part = ?",
                [(int(k), p) for k, p in parts],
            )
            return int(cur.rowcount)

        n = self._tx(write, "replay")
        self.unacked -= n
        self.requeued += n
        return n

    async def control_positions(self) -> dict[int, int]:
        """The control topic's next offset per partition, as last stored."""
        return await self._call(self._control_positions)

    def _control_positions(self) -> dict[int, int]:
        rows = self.db.execute(
            "SELECT key, value FROM meta WHERE key LIKE ?", (f"{_CONTROL_KEY}%",)
        ).fetchall()
        return {int(k[len(_CONTROL_KEY) :]): int(v) for k, v in rows}

    # --- inspection ---------------------------------------------------------------------

    async def stats(self) -> OutboxStats:
        return await self._call(self._stats)

    def _stats(self) -> OutboxStats:
        db = self.db
        row = db.execute("SELECT created_ns FROM batches ORDER BY seq LIMIT 1").fetchone()
        # the oldest by number: it went out first (a scan in key order stops at the first)
        unacked = db.execute(
            "SELECT sent_ns FROM batches WHERE sent = 1 ORDER BY seq LIMIT 1"
        ).fetchone()
        return OutboxStats(
            self.records,
            self.batches,
            self.nbytes,
            None if row is None else row[0],
            self.next_seq,
            self.unacked,
            None if unacked is None or unacked[0] is None else int(unacked[0]),
            self.low_seq,
            self.incarnation,
        )
