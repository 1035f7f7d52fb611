"""The outbox: durable appends sealed into numbered batches, acks, restarts, overflow policy."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from edge.outbox import Outbox
from shared.records import Event, Frame, Heartbeat, Reading
from shared.wire import Kind, decode_batch

T0 = 1_700_000_000_000_000_000


def readings(n, asset="m1", start=0):
    return [Reading(asset, "temp", T0 + start + i, float(start + i)) for i in range(n)]


def outbox(path, **kw):
    kw.setdefault("agent_id", "gw")
    return Outbox(path, **kw)


async def test_batches_hold_one_kind_and_one_asset_in_order(tmp_path):
    async with outbox(tmp_path / "o.db", batch_size=2) as ob:
        await ob.append(
            [
                *readings(3, "m1"),
                *readings(2, "m2"),
                Frame("m1", "m1-1", T0, {"a_mean": 1.0}, 0.5, 3, 0.7, ("a_mean",)),
                Event("hot", "m2", T0, 2, "too hot", {"temp": 99.5, "big": 2**70}),
                Heartbeat("gw", T0, {"q": 3}, 5, 100, "ok", {"x": 1}),
            ]
        )
        assert (ob.records, ob.batches, ob.next_seq) == (8, 6, 7)
        batches = await ob.claim(after_seq=0, max_batches=10)
        shape = [(b.seq, b.kind, b.asset, b.n) for b in batches]
        assert shape == [
            (1, Kind.READING, "m1", 2),
            (2, Kind.READING, "m1", 1),
            (3, Kind.READING, "m2", 2),
            (4, Kind.FRAME, "m1", 1),
            (5, Kind.EVENT, "m2", 1),
            (6, Kind.HEARTBEAT, "gw", 1),
        ]
        # the payload is the wire batch itself, numbered, and decodes to what went in
        wire = decode_batch(batches[0].payload)
        assert (wire.agent_id, wire.batch_seq) == ("gw", 1)
        assert batches[0].records + batches[1].records == readings(3)
        assert batches[4].records[0].values["big"] == 2**70
        assert await ob.ack([b.seq for b in batches]) == 8
        assert (ob.records, ob.batches, ob.nbytes) == (0, 0, 0)


async def test_unacked_batches_come_back_byte_identical_after_restart(tmp_path):
    path = tmp_path / "o.db"
    async with outbox(path, batch_size=4) as ob:
        await ob.append(readings(10))
        first = await ob.claim(after_seq=0, max_batches=10)
        await ob.ack([first[0].seq])
        # stopped before the broker acknowledged batches 2 and 3
    async with outbox(path, batch_size=4) as ob:
        again = await ob.claim(after_seq=0, max_batches=10)
        assert [(b.seq, b.payload) for b in again] == [(b.seq, b.payload) for b in first[1:]]
        await ob.ack([b.seq for b in again])
    async with outbox(path, batch_size=4) as ob:
        assert await ob.claim(after_seq=0, max_batches=10) == []
        await ob.append(readings(1, start=99))
        (b,) = await ob.claim(after_seq=0, max_batches=10)
        assert b.seq == 4  # numbering never goes back, even after the table emptied


def test_committed_batches_survive_sigkill(tmp_path):
    """A writer process is SIGKILLed mid-stream; every append it reported done is on disk."""
    path = tmp_path / "o.db"
    script = textwrap.dedent(
        f"""
        import asyncio
        from edge.outbox import Outbox
        from shared.records import Reading
        async def main():
            ob = Outbox({str(path)!r}, agent_id="gw", batch_size=100)
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
    db = sqlite3.connect(path)
    try:
        n, max_seq = db.execute("SELECT SUM(n), MAX(seq) FROM batches").fetchone()
        (next_seq,) = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
    finally:
        db.close()
    assert n >= done * 100  # everything acknowledged to the caller (maybe one append more)
    assert next_seq == max_seq + 1  # the sequence was committed with its batches


async def test_drop_oldest_makes_room_and_counts(tmp_path):
    dropped = []
    async with outbox(
        tmp_path / "o.db", max_bytes=64 * 1024, on_drop=lambda k, n: dropped.append((k, n))
    ) as ob:
        for i in range(40):
            await ob.append(readings(100, start=i * 100))
        assert ob.nbytes <= 64 * 1024
        assert sum(n for _, n in dropped) == ob.dropped[Kind.READING] > 0
        assert ob.records + ob.dropped[Kind.READING] == 4000
        batches = await ob.claim(after_seq=0, max_batches=1000)
        values = [rec.value for b in batches for rec in b.records]
        assert values == sorted(values) and values[-1] == 3999.0  # the newest are kept
        seqs = [b.seq for b in batches]
        assert seqs == list(range(seqs[0], 41))  # dropped from the front: one visible gap
        assert await ob.dropped_ranges() == [(1, seqs[0] - 1)]  # and that gap is on record


async def test_drop_newest_refuses_what_does_not_fit_without_gaps(tmp_path):
    async with outbox(tmp_path / "o.db", max_bytes=64 * 1024, overflow="drop_newest") as ob:
        stored = 0
        for i in range(40):
            stored += await ob.append(readings(100, start=i * 100))
        assert stored < 4000 and ob.dropped[Kind.READING] == 4000 - stored
        batches = await ob.claim(after_seq=0, max_batches=1000)
        assert batches[0].records[0].value == 0.0  # the oldest are kept
        assert [b.seq for b in batches] == list(range(1, len(batches) + 1))


async def test_stop_is_idempotent_and_closed_outbox_refuses(tmp_path):
    ob = outbox(tmp_path / "o.db")
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
        await outbox(blocker / "o.db").start()


def test_fast_reading_encoder_matches_the_wire_codec_byte_for_byte():
    from edge.outbox import encode_readings
    from shared.records import Quality, Reading
    from shared.wire import Batch, Kind, encode_batch

    values = [1.5, float("nan"), -0.0, 7, -(2**63), 2**64 - 1, True, False, "on", "", None]
    rs = [
        Reading(f"m{i % 3}", f"t{i % 5}", 1_700_000_000_000_000_000 + i, v, Quality(i % 3), i)
        for i, v in enumerate(values * 3)
    ]
    assert encode_readings("gw", "inc1", 7, 123, rs) == encode_batch(
        Batch("gw", 7, Kind.READING, rs, 123, "inc1")
    )
    big = [*rs, Reading("m1", "huge", 1_700_000_000_000_000_000, 2**70)]  # codec's extension
    assert encode_readings("gw", "inc1", 8, 5, big) == encode_batch(
        Batch("gw", 8, Kind.READING, big, 5, "inc1")
    )


async def test_interleaved_assets_keep_their_order_across_chunks(tmp_path):
    from shared.records import Reading

    rs = [Reading(a, "t", T0 + i, float(i)) for i, a in enumerate(["m1", "m2", "m1", "m1", "m2"])]
    async with outbox(tmp_path / "o.db", batch_size=2) as ob:
        await ob.append(rs)
        batches = await ob.claim(after_seq=0, max_batches=10)
    assert [(b.seq, b.asset, [r.value for r in b.records]) for b in batches] == [
        (1, "m1", [0.0, 2.0]),
        (2, "m2", [1.0, 4.0]),
        (3, "m1", [3.0]),
    ]
