"""The checker: four independent records of one run, held against each other.

* **created** — what the agent numbered: per incarnation, ``1 .. next_seq-1`` from its outbox
  file at the end (and from the copy of a state directory taken before it was wiped);
* **dropped** — what the overflow policy deleted unsent, from the outbox's ``dropped`` ranges
  (allowed, and accounted in its own column); **released** — sent batches a full outbox deleted
  before the cloud confirmed them, from its ``released`` ranges: the broker held them, so they
  must arrive unless the broker lost them too (then: ``released, then lost by the broker``);
* **applied** — the cloud's ``applied_batches`` audit rows, written in the same transaction as
  the checkpoint that covers them (a row means durably applied);
* **wire** — every identity the ledger saw on the uplink topics, with its contents.

From these: ``lost`` = created - dropped - released - destroyed - applied; ``applied twice`` = identities
with more than one audit row; ``duplicated on wire`` = wire occurrences beyond the first. A
wiped state directory destroys what the old outbox held unsent and never put on the wire
(``destroyed``, its own column); anything of it the wire saw must be applied all the same.

The source of truth for readings is the MQTT publisher: every number Mosquitto acknowledged
must be a reading inside a batch the cloud applied (read from the ledger's copy of that batch).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.records import DEAD_LETTER_RULE, Reading
from shared.wire import Kind, decode_batch
from tests.chaos.ledger import Ident, WireLedger

__all__ = ["History", "OutboxFile", "Row", "check", "read_applied", "read_events"]


@dataclass(frozen=True)
class HeldBatch:
    seq: int
    kind: Kind
    n: int
    sent: bool
    payload: bytes


@dataclass
class OutboxFile:
    """What one outbox file says: its incarnation, numbering, held batches and drops."""

    path: Path
    agent_id: str
    incarnation: str
    next_seq: int
    held: dict[int, HeldBatch]
    #: (lo, hi, batches, records) runs the overflow policy dropped
    dropped: list[tuple[int, int, int, int]]
    #: (lo, hi, batches, records) runs of sent batches released to make room
    released: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: this file is the copy of a state directory that was then wiped
    wiped: bool = False

    @classmethod
    def read(cls, path: Path, agent_id: str, *, wiped: bool = False) -> OutboxFile:
        db = sqlite3.connect(path, timeout=10)
        try:
            (inc,) = db.execute("SELECT value FROM identity WHERE key = 'incarnation'").fetchone()
            row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            next_seq = int(row[0]) if row else 1
            held = {
                int(s): HeldBatch(int(s), Kind(k), int(n), bool(sent), bytes(p))
                for s, k, n, sent, p in db.execute(
                    "SELECT seq, kind, n, sent, payload FROM batches"
                )
            }
            dropped, released = (_runs(db, "dropped"), _runs(db, "released"))
        finally:
            db.close()
        return cls(path, agent_id, str(inc), next_seq, held, dropped, released, wiped)

    def created(self) -> set[Ident]:
        return {(self.agent_id, self.incarnation, s) for s in range(1, self.next_seq)}

    def dropped_idents(self) -> set[Ident]:
        return self._idents(self.dropped)

    def released_idents(self) -> set[Ident]:
        return self._idents(self.released)

    def _idents(self, runs: list[tuple[int, int, int, int]]) -> set[Ident]:
        return {
            (self.agent_id, self.incarnation, s) for lo, hi, _, _ in runs for s in range(lo, hi + 1)
        }

    def unsent_values(self, asset: str, tag: str) -> set[Any]:
        """Values of (asset, tag) readings in the batches this file holds unsent."""
        return {
            r.value
            for b in self.held.values()
            if not b.sent and b.kind is Kind.READING
            for r in decode_batch(b.payload).records
            if isinstance(r, Reading) and r.asset == asset and r.tag == tag
        }

    @property
    def dropped_records(self) -> int:
        return sum(r for _, _, _, r in self.dropped)

    @property
    def released_records(self) -> int:
        return sum(r for _, _, _, r in self.released)


def _runs(db: sqlite3.Connection, table: str) -> list[tuple[int, int, int, int]]:
    """The (lo, hi, batches, records) runs of an outbox's ``dropped``/``released`` table."""
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone():
        return []
    return [
        (int(lo), int(hi), int(b), int(r))
        for lo, hi, b, r in db.execute(f"SELECT lo, hi, batches, records FROM {table} ORDER BY lo")
    ]


def read_applied(cloud_db: Path) -> list[Ident]:
    """Every audit row of the cloud (one per application of a batch)."""
    db = sqlite3.connect(f"file:{cloud_db}?mode=ro", uri=True, timeout=10)
    try:
        return [
            (str(a), str(i), int(s))
            for a, i, s in db.execute(
                "SELECT agent_id, incarnation, batch_seq FROM applied_batches"
            )
        ]
    finally:
        db.close()


def read_events(
    cloud_db: Path, agent_id: str, rule: str = DEAD_LETTER_RULE
) -> list[dict[str, Any]]:
    """The events of one rule the cloud stored for an agent (dead letters by default)."""
    import json

    db = sqlite3.connect(f"file:{cloud_db}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            'SELECT asset, message, "values" FROM events WHERE agent_id = ? AND rule = ?',
            (agent_id, rule),
        ).fetchall()
    finally:
        db.close()
    return [
        {"asset": a, "message": m, "values": json.loads(v) if isinstance(v, str) else v}
        for a, m, v in rows
    ]


@dataclass
class History:
    """Everything a scenario recorded, for :func:`check`."""

    agent_id: str
    outboxes: list[OutboxFile]
    applied: list[Ident]
    ledger: WireLedger
    #: numbers Mosquitto acknowledged to the publisher of the numbered stream
    acked: set[int]
    seq_asset: str
    seq_tag: str


@dataclass
class Row:
    """One line of the table."""

    scenario: str
    faults: str = ""
    lost: int = 0
    dup_on_wire: int = 0
    applied_twice: int = 0
    created: int = 0
    applied: int = 0
    dropped: int = 0
    destroyed: int = 0
    #: sent batches the full outbox deleted before the cloud confirmed them
    released: int = 0
    #: of those, the ones the broker then lost too (accounted: the agent counted the release)
    released_lost: int = 0
    mqtt_acked: int = 0
    readings_lost: int = 0
    replays: int = 0
    log_losses: int = 0
    dead_letters: int = 0
    duration_s: float = 0.0
    #: failed checks beyond the three headline numbers (each fails the run too)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    examples: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.applied_twice == 0 and not self.problems

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        return doc


def check(h: History, row: Row) -> Row:
    """Fill ``row`` with what the history says."""
    created: set[Ident] = set()
    dropped: set[Ident] = set()
    released: set[Ident] = set()
    destroyed: set[Ident] = set()
    excused_values: set[Any] = set()
    wire = h.ledger.of_agent(h.agent_id)
    for ob in h.outboxes:
        created |= ob.created()
        dropped |= ob.dropped_idents()
        released |= ob.released_idents()
        if ob.wiped:
            for b in ob.held.values():
                ident = (h.agent_id, ob.incarnation, b.seq)
                # a batch the broker acked is out of the disk's reach: it must arrive
                if not b.sent and ident not in wire:
                    destroyed.add(ident)
                    if b.kind is Kind.READING:
                        excused_values |= {
                            r.value
                            for r in decode_batch(b.payload).records
                            if isinstance(r, Reading)
                            and r.asset == h.seq_asset
                            and r.tag == h.seq_tag
                        }
    applied = Counter(i for i in h.applied if i[0] == h.agent_id)
    required = created - dropped - released - destroyed
    lost = sorted(required - set(applied))
    twice = sorted(i for i, n in applied.items() if n > 1)
    phantom = sorted(set(applied) - created)
    row.created = len(created)
    row.applied = len(applied)
    row.dropped = len(dropped & created)
    row.released = len(released & created)
    row.released_lost = len((released & created) - set(applied))
    row.destroyed = len(destroyed)
    row.lost = len(lost)
    row.applied_twice = len(twice)
    row.dup_on_wire = sum(n - 1 for i, n in h.ledger.seen.items() if i[0] == h.agent_id)
    if lost:
        row.examples["lost"] = lost[:20]
        final = h.outboxes[-1]
        still = [i for i in lost if i[1] == final.incarnation and i[2] in final.held]
        on_wire = [i for i in lost if i in wire]
        row.notes.append(
            f"of the {len(lost)} lost: {len(on_wire)} were seen on the wire, {len(still)} are "
            "still in the final outbox file"
        )
    if twice:
        row.examples["applied_twice"] = twice[:20]
    if phantom:
        row.problems.append(f"{len(phantom)} applied identities no outbox numbered")
        row.examples["phantom"] = phantom[:20]
    diverged = sorted(i for i in h.ledger.diverged if i[0] == h.agent_id)
    if diverged:
        row.problems.append(f"{len(diverged)} batches resent with different bytes")
        row.examples["diverged"] = diverged[:20]
    if h.ledger.undecodable:
        row.problems.append(f"{len(h.ledger.undecodable)} undecodable messages on the wire")
        row.examples["undecodable"] = h.ledger.undecodable[:5]
    # the source of truth: every acknowledged number is a reading of an applied batch
    got = {
        v
        for v in h.ledger.tracked_values(set(applied), h.seq_asset, h.seq_tag)
        if isinstance(v, int | float)
    }
    missing = sorted(n for n in h.acked if n not in got and n not in excused_values)
    row.mqtt_acked = len(h.acked)
    row.readings_lost = len(missing)
    if missing:
        row.examples["readings_lost"] = missing[:20]
        allowed = sum(ob.dropped_records for ob in h.outboxes)
        allowed += sum(
            r
            for ob in h.outboxes
            for lo, hi, _, r in ob.released
            if any((h.agent_id, ob.incarnation, s) not in applied for s in range(lo, hi + 1))
        )
        if len(missing) > allowed:
            row.problems.append(
                f"{len(missing)} acknowledged MQTT messages never applied as readings "
                f"(the overflow policy dropped or released unconfirmed {allowed} records)"
            )
        else:
            row.notes.append(
                f"{len(missing)} acknowledged MQTT messages not applied, within the "
                f"{allowed} records the overflow policy dropped or released unconfirmed"
            )
    return row
