"""Readings that arrive already encoded as wire rows, from a connector in its own process.

A connector running with ``isolation: process`` (see :mod:`edge.isolation`) encodes its readings
where they are produced: :class:`RowPacker` turns them into msgpack reading rows exactly as the
wire codec lays them out (``[asset_ix, tag_ix, ts_ns, value, quality, status]``, see
:mod:`shared.wire`), against a string table kept per asset by that worker process. The agent
receives :class:`PackedReadings` — one asset's rows as bytes plus the table they index — and the
outbox seals them into batches by concatenating bytes (:func:`seal_packed`): no reading object is
built, looked at or re-encoded in the agent for them. The batch that results decodes to the very
readings the connector produced (tests compare it with :func:`edge.outbox.encode_readings`).

Tables only grow (an index, once given, keeps its string for the life of the worker process), so
rows encoded against a shorter table stay valid under any longer one of the same ``source``.
A restarted worker starts a new table: its ``source`` carries a new generation number, and
fragments of different sources never share a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from protocols.base import PointSet, ReadingColumns
from shared.records import Quality, Reading
from shared.wire import Kind, batch_header, pack_default

__all__ = ["READING_HEADER", "PackedReadings", "RowPacker", "array_header", "seal_packed"]

#: the wire header of a reading batch (shared with the outbox's own reading encoder)
READING_HEADER = batch_header(Kind.READING)


@dataclass(frozen=True, slots=True)
class PackedReadings:
    """``n`` readings of one asset, as concatenated msgpack wire rows.

    ``table`` is the string table the rows index (at least as long as the longest index used);
    ``source`` names the table's owner (connector name and worker generation).
    """

    asset: str
    source: tuple[str, int]
    table: tuple[str, ...]
    n: int
    rows: bytes

    def readings(self) -> list[Reading]:
        """The readings these rows hold (decoded through the wire codec, fully checked)."""
        from shared.wire import decode_batch

        return list(decode_batch(seal_packed("-", "", 0, 0, [self])).records)  # type: ignore[arg-type]


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _strip_array_header(blob: bytes) -> bytes:
    first = blob[0]
    if first & 0xF0 == 0x90:
        return blob[1:]
    return blob[3:] if first == 0xDC else blob[5:]


def seal_packed(
    agent_id: str, incarnation: str, seq: int, created_ns: int, chunk: Sequence[PackedReadings]
) -> bytes:
    """One wire reading batch from fragments of one source and asset (byte concatenation)."""
    table = max((p.table for p in chunk), key=len)
    n = sum(p.n for p in chunk)
    head = msgpack.packb([agent_id, incarnation, seq, created_ns, list(table)], use_bin_type=True)
    return b"".join(
        (
            READING_HEADER,
            b"\x96",  # the 6-element body: the 5 packed above, then the rows
            _strip_array_header(head),
            array_header(n),
            *(p.rows for p in chunk),
        )
    )


def _packs(row: tuple[Any, ...]) -> bool:
    try:
        msgpack.packb(row, use_bin_type=True, default=pack_default)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


class _Index(dict[str, int]):
    """One asset's string table (the asset first), growing as new tags are looked up."""

    __slots__ = ("table",)

    def __init__(self, asset: str) -> None:
        super().__init__({asset: 0})
        self.table = [asset]

    def __missing__(self, tag: str) -> int:
        i = self[tag] = len(self.table)
        self.table.append(tag)
        return i


class RowPacker:
    """Encodes readings into per-asset wire rows; :meth:`take` hands out what accumulated.

    ``max_rows`` caps one fragment (the outbox's batch size): a batch never holds more.
    """

    def __init__(self, max_rows: int = 500) -> None:
        self.max_rows = max_rows
        self._index: dict[str, _Index] = {}
        self._sent: dict[str, int] = {}  # table length the receiving side knows, per asset
        self._rows: dict[str, list[tuple[Any, ...]]] = {}
        # per PointSet (hashed by identity): its tags' indexes in the asset's table
        self._plans: dict[PointSet, list[int]] = {}
        self.pending = 0
        self.refused = 0  # rows whose value could not be encoded (dropped, never fatal)

    def add(self, readings: Sequence[Reading]) -> None:
        if not readings:
            return
        self.pending += len(readings)
        first = readings[0].asset
        if readings[-1].asset == first and all(r.asset == first for r in readings):
            # one asset (a device's poll): one comprehension, no per-reading branching
            index = self._index_of(first)
            self._rows[first].extend(
                [(0, index[r.tag], r.ts_ns, r.value, r.quality, r.status) for r in readings]
            )  # tuples pack as arrays; an IntEnum quality packs as its int
            return
        cur: str | None = None
        index = _Index(first)
        rows: list[tuple[Any, ...]] = []
        for r in readings:
            a = r.asset
            if a != cur:
                cur = a
                index = self._index_of(a)
                rows = self._rows[a]
            rows.append((0, index[r.tag], r.ts_ns, r.value, r.quality, r.status))

    def add_columns(self, batch: Sequence[ReadingColumns]) -> None:
        """Encode blocks of good readings: one row per value, no reading object built."""
        good = int(Quality.GOOD)
        for cols in batch:
            names = cols.points
            asset = names.asset
            if asset is None:  # points of several assets: the general path
                self.add(cols.readings())
                continue
            plan = self._plans.get(names)
            if plan is None:
                index = self._index_of(asset)
                plan = self._plans[names] = [index[t] for t in names.tags]
            rows = self._rows.get(asset)
            if rows is None:
                rows = self._rows[asset] = []
            ts = cols.ts_ns
            rows.extend([(0, ix, ts, v, good, 0) for ix, v in zip(plan, cols.values, strict=True)])
            self.pending += len(plan)

    def _index_of(self, asset: str) -> _Index:
        got = self._index.get(asset)
        if got is None:
            got = self._index[asset] = _Index(asset)
            self._sent[asset] = 0
        if asset not in self._rows:
            self._rows[asset] = []
        return got

    def take(self) -> tuple[dict[str, list[str]], list[tuple[str, int, int, bytes]]]:
        """(new table entries per asset, fragments ``(asset, table_len, n, rows)``)."""
        news: dict[str, list[str]] = {}
        frags: list[tuple[str, int, int, bytes]] = []
        cap = self.max_rows
        for asset, rows in self._rows.items():
            if not rows:
                continue
            table = self._index[asset].table
            sent = self._sent[asset]
            if len(table) > sent:
                news[asset] = table[sent:]
                self._sent[asset] = len(table)
            for i in range(0, len(rows), cap):
                part = rows[i : i + cap]
                try:
                    blob = msgpack.packb(part, use_bin_type=True, default=pack_default)
                except (TypeError, ValueError, OverflowError):
                    before = len(part)
                    part = [row for row in part if _packs(row)]
                    self.refused += before - len(part)
                    if not part:
                        continue
                    blob = msgpack.packb(part, use_bin_type=True, default=pack_default)
                frags.append((asset, len(table), len(part), _strip_array_header(blob)))
        self._rows = {}
        self.pending = 0
        return news, frags
