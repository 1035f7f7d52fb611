"""The outbox: durable appends, crash-safe batch numbering, acks, the overflow policy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from edge.outbox import Outbox
from shared.records import Event, Frame, Heartbeat, Reading
from shared.wire import Kind

T0 = 1_700_000_000_000_000_000


def readings(n, asset="m1", start=0):
    return [Reading(asset, "temp", T0 + start + i, float(start + i)) for i in range(n)]


async def test_batches_hold_one_kind_and_one_asset_in_order(tmp_path):
    async with Outbox(tmp_path / "o.db") as ob:
        await ob.append(
            [
                *readings(3, "m1"),
                *readings(2, "m2"),
                Frame("m1", "m1-1", T0, {"a_mean": 1.0}, 0.5, 3, 0.7, ("a_mean",)),
                Event("hot", "m2", T0, 2, "too hot", {"temp": 99.5, "big": 2**70}),
                Heartbeat("gw", T0, {"q": 3}, 5, 100, "ok", {"x": 1}),
            ]
        )
        batches = await ob.claim(after_seq=0, max_batches=10, batch_size=2)
        shape = [(b.seq, b.kind, b.asset, len(b.records)) for b in batches]
        assert shape == [
            (1, Kind.READING, "m1", 2),
            (2, Kind.READING, "m1", 1),
            (3, Kind.READING, "m2", 2),
            (4, Kind.FRAME, "m1", 1),
            (5, Kind.EVENT, "m2", 1),
            (6, Kind.HEARTBEAT, "gw", 1),
        ]
        # records come back equal to what went in, big ints included
        assert batches[0].records == readings(3)[:2]
        assert batches[4].records[0].values["big"] == 2**70
        assert batches[3].records[0].marks == ("a_mean",)
        assert await ob.ack([1, 2, 3, 4, 5, 6]) == 8
        assert ob.rows == 0 and ob.nbytes == 0


async def test_claimed_batch_is_resent_with_the_same_seq_and_records_after_restart(tmp_path):
    path = tmp_path / "o.db"
    async with Outbox(path) as ob:
        await ob.append(readings(10))
        first = await ob.claim(after_seq=0, max_batches=1, batch_size=4)
        await ob.append(readings(5, start=10))
        # stopped before the broker acknowledged batch 1
    async with Outbox(path) as ob:
        again = await ob.claim(after_seq=0, max_batches=3, batch_size=4)
        assert again[0].seq == first[0].seq == 1
        assert again[0].records == first[0].records
        assert [b.seq for b in again] == [1, 2, 3]
        await ob.ack([b.seq for b in again])
    async with Outbox(path) as ob:
        rest = await ob.claim(after_seq=0, max_batches=10, batch_size=4)
        assert [b.seq for b in rest] == [4]  # numbering never goes back, even on an empty table
        assert sum(len(b.records) for b in rest) == 3


def test_committed_rows_survive_sigkill(tmp_path):
    """A writer process is SIGKILLed mid-stream; every append it reported done is on disk."""
    path = tmp_path / "o.db"
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from edge.outbox import Outbox
        from shared.records import Reading
        async def main():
            ob = Outbox({str(path)!r})
            await ob.start()
            i = 0
            while True:
                await ob.append([Reading("m1", "t", 1 + i * 100 + k, float(k)) for k in range(100)])
                i += 1
                print(i, flush=True)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    done = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            done = int(line)
            if done >= 50:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert done >= 50

    import sqlite3

    db = sqlite3.connect(path)
    try:
        (n,) = db.execute("SELECT COUNT(*) FROM rows").fetchone()
    finally:
        db.close()
    assert n >= done * 100  # everything acknowledged to the caller, maybe one batch more


async def test_drop_oldest_makes_room_and_counts(tmp_path):
    dropped = []
    async with Outbox(
        tmp_path / "o.db", max_bytes=64 * 1024, on_drop=lambda k, n: dropped.append((k, n))
    ) as ob:
        for i in range(20):
            await ob.append(readings(100, start=i * 100))
        assert ob.nbytes <= 64 * 1024
        assert sum(n for _, n in dropped) == ob.dropped[Kind.READING] > 0
        assert ob.rows + ob.dropped[Kind.READING] == 2000
        batches = await ob.claim(after_seq=0, max_batches=100, batch_size=1000)
        values = [rec.value for b in batches for rec in b.records]
        assert values == sorted(values) and values[-1] == 1999.0  # the newest are kept


async def test_drop_oldest_removes_a_claimed_batch_whole(tmp_path):
    async with Outbox(tmp_path / "o.db", max_bytes=64 * 1024) as ob:
        await ob.append(readings(400))
        (claimed,) = await ob.claim(after_seq=0, max_batches=1, batch_size=300)
        for i in range(10):
            await ob.append(readings(100, start=1000 + i * 100))
        left = await ob.claim(after_seq=0, max_batches=100, batch_size=1000)
        assert claimed.seq not in {b.seq for b in left}
        assert all(b.seq > claimed.seq for b in left)


async def test_drop_newest_refuses_what_does_not_fit(tmp_path):
    async with Outbox(tmp_path / "o.db", max_bytes=64 * 1024, overflow="drop_newest") as ob:
        stored = 0
        for i in range(20):
            stored += await ob.append(readings(100, start=i * 100))
        assert stored < 2000 and ob.dropped[Kind.READING] == 2000 - stored
        batches = await ob.claim(after_seq=0, max_batches=100, batch_size=10_000)
        assert batches[0].records[0].value == 0.0  # the oldest are kept


async def test_stop_is_idempotent_and_closed_outbox_refuses(tmp_path):
    ob = Outbox(tmp_path / "o.db")
    await ob.stop()
    await ob.start()
    await ob.start()
    await ob.stop()
    await ob.stop()
    with pytest.raises(RuntimeError, match="not open"):
        await ob.append(readings(1))


async def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RuntimeError, match="cannot open the outbox"):
        await Outbox(blocker / "o.db").start()
