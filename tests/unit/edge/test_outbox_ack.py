"""The outbox's end-to-end acknowledgement: a broker ack only marks a batch sent; the cloud's
word deletes it; lost logs send it again; the incarnation names the outbox."""

from __future__ import annotations

import sqlite3

import msgpack

from edge.outbox import AppliedAck, Outbox, SentBatch
from shared.records import Event, Reading
from shared.wire import Kind, decode_batch

T0 = 1_700_000_000_000_000_000


def readings(n, asset="m1", start=0):
    return [Reading(asset, "temp", T0 + start + i, float(start + i)) for i in range(n)]


def outbox(path, **kw):
    kw.setdefault("agent_id", "gw")
    kw.setdefault("batch_size", 10)
    return Outbox(path, **kw)


async def send_all(ob, partition=0, first_offset=0):
    claimed = await ob.claim(max_batches=1000)
    await ob.mark_sent(
        [SentBatch(b.seq, b.kind, partition, first_offset + i) for i, b in enumerate(claimed)]
    )
    return claimed


async def test_incarnation_is_made_with_the_outbox_and_kept_across_restarts(tmp_path):
    path = tmp_path / "o.db"
    async with outbox(path) as ob:
        first = ob.incarnation
        await ob.append(readings(5))
        (b,) = await ob.claim(max_batches=10)
        assert decode_batch(b.payload).incarnation == first
    async with outbox(path) as ob:
        assert ob.incarnation == first
    path.unlink()
    for extra in ("-wal", "-shm"):
        (tmp_path / f"o.db{extra}").unlink(missing_ok=True)
    async with outbox(path) as ob:  # the state directory was wiped: a new incarnation
        assert ob.incarnation != first and len(ob.incarnation) == 16
        await ob.append(readings(1))
        (b,) = await ob.claim(max_batches=10)
        assert b.seq == 1


async def test_broker_ack_keeps_the_batch_until_the_cloud_confirms_it(tmp_path):
    async with outbox(tmp_path / "o.db") as ob:
        await ob.append(readings(30))  # batches 1..3
        sent = await send_all(ob, partition=2)
        assert [b.seq for b in sent] == [1, 2, 3]
        assert (ob.batches, ob.unacked) == (3, 3)
        assert await ob.claim(max_batches=10) == []  # sent: not claimed again
        stats = await ob.stats()
        assert stats.unacked == 3 and stats.oldest_unacked_ns is not None
        # the cloud applied 1 and 3 of partition 2 (2 is still in flight)
        gone = await ob.apply_acks(
            [AppliedAck(ob.incarnation, Kind.READING, 2, 0, ((1, 1), (3, 3)))], {0: 17}
        )
        assert gone == 2
        assert (ob.batches, ob.records, ob.unacked, ob.low_seq) == (1, 10, 1, 2)
        assert await ob.control_positions() == {0: 17}
        # an ack for another incarnation or another partition deletes nothing
        assert await ob.apply_acks([AppliedAck("other", Kind.READING, 2, 99, ())]) == 0
        assert await ob.apply_acks([AppliedAck(ob.incarnation, Kind.READING, 1, 99, ())]) == 0
        assert await ob.apply_acks([AppliedAck(ob.incarnation, Kind.FRAME, 2, 99, ())]) == 0
        # the floor covers what was sent to that partition
        assert await ob.apply_acks([AppliedAck(ob.incarnation, Kind.READING, 2, 2, ())]) == 1
        assert (ob.batches, ob.records, ob.nbytes, ob.unacked, ob.low_seq) == (0, 0, 0, 0, None)


async def test_replay_sends_every_unconfirmed_batch_again_byte_for_byte(tmp_path):
    async with outbox(tmp_path / "o.db") as ob:
        await ob.append(readings(20))
        sent = await send_all(ob)
        assert await ob.requeue() == 2
        again = await ob.claim(max_batches=10)
        assert [(b.seq, b.payload) for b in again] == [(b.seq, b.payload) for b in sent]
        assert ob.unacked == 0 and ob.requeued == 2


async def test_offsets_given_out_again_mean_the_log_was_reset(tmp_path):
    """The broker came back empty: the next send gets offset 0 on a partition where batches
    the cloud never confirmed sat at offsets 40-41. They are sent again, without being asked."""
    async with outbox(tmp_path / "o.db") as ob:
        await ob.append(readings(20))
        await send_all(ob, partition=1, first_offset=40)
        await ob.append(readings(10, start=100))
        (b3,) = await ob.claim(max_batches=10)
        assert await ob.mark_sent([SentBatch(b3.seq, b3.kind, 1, 0)]) == 2
        assert [b.seq for b in await ob.claim(max_batches=10)] == [1, 2]
        assert ob.unacked == 1
        # offsets growing as usual requeue nothing
        await ob.append(readings(10, start=200))
        (b4,) = await ob.claim(max_batches=10, after_seq=3)
        assert await ob.mark_sent([SentBatch(b4.seq, b4.kind, 1, 1)]) == 0


async def test_a_full_outbox_releases_sent_batches_before_dropping_unsent_ones(tmp_path):
    released, dropped = [], []
    async with outbox(
        tmp_path / "o.db",
        batch_size=100,
        max_bytes=64 * 1024,
        on_release=lambda k, n: released.append(n),
        on_drop=lambda k, n: dropped.append(n),
    ) as ob:
        await ob.append(readings(1000))
        await send_all(ob)  # in the broker, not yet confirmed
        sent = ob.batches
        i = 0
        while not released:
            await ob.append(readings(100, start=10_000 + i * 100))
            i += 1
        assert not dropped  # sent batches went first
        released_runs = await ob.dropped_ranges("released")
        assert released_runs and released_runs[0][0] == 1  # the oldest, on record by number
        assert sum(hi - lo + 1 for lo, hi in released_runs) == len(released)
        assert ob.released[Kind.READING] == sum(released) and ob.nbytes <= 64 * 1024
        assert ob.unacked == sent - len(released)
        for j in range(100):  # keep going: once no sent batch is left, unsent ones drop
            await ob.append(readings(100, start=50_000 + j * 100))
        assert ob.unacked == 0 and sum(dropped) > 0


async def test_a_record_the_wire_cannot_encode_becomes_a_dead_letter_not_a_failed_tick(tmp_path):
    quarantined = []
    async with outbox(tmp_path / "o.db", on_quarantine=quarantined.append) as ob:
        bad = Event("hot", "m1", T0, 1, "x", {"when": {1, 2}})  # a set: msgpack refuses it
        stored = await ob.append([*readings(3), bad, Event("ok", "m1", T0, 1, "fine", {})])
        assert stored == 5  # 3 readings, the good event, the dead letter
        batches = await ob.claim(max_batches=10)
        records = [r for b in batches for r in b.records]
        assert [r.rule for r in records if isinstance(r, Event)] == ["ok", "edgeloop.dead_letter"]
        letter = records[-1]
        assert "cannot encode this Event" in letter.message and "TypeError" in letter.message
        assert "'hot'" in letter.values["payload"]
        assert quarantined == ["event"] and ob.quarantined == 1


async def test_an_outbox_of_an_older_version_keeps_its_batches_under_the_old_identity(tmp_path):
    path = tmp_path / "o.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE batches (seq INTEGER PRIMARY KEY, kind INTEGER NOT NULL, asset TEXT NOT NULL,
            n INTEGER NOT NULL, created_ns INTEGER NOT NULL, payload BLOB NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('next_seq', 8);
        """
    )
    from shared.wire import Batch, encode_batch

    v2 = encode_batch(Batch("gw", 7, Kind.READING, readings(2), T0))
    body = msgpack.unpackb(v2[4:])
    del body[1]  # wire version 1: no incarnation
    old = b"EL\x01\x01" + msgpack.packb(body)
    db.execute("INSERT INTO batches VALUES (7, 1, 'm1', 2, 1, ?)", (old,))
    db.commit()
    db.close()
    async with outbox(path) as ob:
        assert ob.incarnation and ob.legacy_below == 8 and ob.next_seq == 8
        (b,) = await send_all(ob, partition=0)
        assert b.seq == 7 and decode_batch(b.payload).incarnation == ""
        assert await ob.apply_acks([AppliedAck("", Kind.READING, 0, -1, ((7, 7),))]) == 1
        await ob.append(readings(1))
        (b,) = await ob.claim(max_batches=10)
        assert b.seq == 8 and decode_batch(b.payload).incarnation == ob.incarnation


async def test_a_replay_of_some_partitions_sends_only_what_went_there(tmp_path):
    async with outbox(tmp_path / "o.db") as ob:
        await ob.append(readings(20, "m1"))  # batches 1, 2
        await ob.append(readings(20, "m2"))  # batches 3, 4
        claimed = await ob.claim(max_batches=10)
        await ob.mark_sent(
            [
                SentBatch(b.seq, b.kind, 0 if b.asset == "m1" else 1, i)
                for i, b in enumerate(claimed)
            ]
        )
        assert await ob.requeue([(Kind.READING, 1), (Kind.FRAME, 0)]) == 2
        assert [b.seq for b in await ob.claim(max_batches=10)] == [3, 4]
        assert ob.unacked == 2
