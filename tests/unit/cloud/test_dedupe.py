"""Which batches were already applied: floors, sparse windows, run-length text, dirty tracking,
the agents' low-water mark and the acknowledgement state."""

from __future__ import annotations

from cloud.dedupe import SeqTracker, SeqWindow


def test_window_remembers_sparse_seqs_and_raises_the_floor_past_its_bound():
    w = SeqWindow()
    for seq in (3, 7, 5, 9):
        w.add(seq, window=3)
    # four applied, bound three: the floor rose to the oldest remembered
    assert (w.floor, w.recent) == (3, [5, 7, 9])
    assert w.seen(1) and w.seen(3) and w.seen(7)
    assert not w.seen(4) and not w.seen(6) and not w.seen(10)
    w.add(6, window=3)  # out of order, inside the window: still applied once
    assert (w.floor, w.recent) == (5, [6, 7, 9])
    w.add(6, window=3)
    w.add(2, window=3)  # at or below the floor: already counted as applied
    assert (w.floor, w.recent) == (5, [6, 7, 9])


def test_window_text_round_trips_runs_and_singletons():
    w = SeqWindow(4, [7, 8, 9, 12, 15, 16])
    assert w.encode() == "7-9,12,15-16"
    assert SeqWindow.decode(4, w.encode()) == w
    assert SeqWindow.decode(-1, "") == SeqWindow()


def test_tracker_keys_by_agent_incarnation_topic_partition_and_reports_dirty_copies():
    t = SeqTracker(window=16)
    t.mark(("edge-1", "i1", "frames", 0), 1)
    t.mark(("edge-1", "i1", "frames", 1), 2)
    t.mark(("edge-2", "i1", "frames", 0), 1)
    assert t.seen(("edge-1", "i1", "frames", 0), 1)
    # seq 2 was applied from partition 1; a copy on partition 0 (the topic re-created with
    # another partition count) is a duplicate all the same
    assert t.seen(("edge-1", "i1", "frames", 0), 2)
    assert not t.seen(("edge-1", "i1", "frames", 0), 3)
    assert not t.seen(("edge-3", "i1", "frames", 0), 1)
    dirty = t.take_dirty()
    assert set(dirty) == {
        ("edge-1", "i1", "frames", 0),
        ("edge-1", "i1", "frames", 1),
        ("edge-2", "i1", "frames", 0),
    }
    dirty[("edge-1", "i1", "frames", 0)].recent.append(99)  # a copy: the live state is untouched
    assert not t.seen(("edge-1", "i1", "frames", 0), 99)
    assert t.take_dirty() == {}
    t.restore_dirty(dirty)  # a failed write makes them dirty again
    assert len(t.take_dirty()) == 3


def test_tracker_forgets_revoked_partitions_and_loads_their_saved_state():
    t = SeqTracker(window=16)
    t.mark(("edge-1", "i1", "frames", 0), 1)
    t.mark(("edge-1", "i1", "labels", 0), 2)
    t.forget_partition("frames", 0)
    assert not t.seen(("edge-1", "i1", "frames", 0), 1)
    assert t.seen(("edge-1", "i1", "labels", 0), 2)
    t.load(("edge-1", "i1", "frames", 0), SeqWindow(10, [12]))
    assert t.seen(("edge-1", "i1", "frames", 0), 10) and t.seen(("edge-1", "i1", "frames", 0), 12)
    assert not t.seen(("edge-1", "i1", "frames", 0), 11)
    assert ("edge-1", "i1", "frames", 0) not in t.take_dirty()  # loaded, not changed


def test_incarnations_of_one_agent_never_shadow_each_other():
    """A gateway that lost its state starts at batch_seq 1 again under a new incarnation: its
    new batches are not the old incarnation's duplicates."""
    t = SeqTracker(window=16)
    for seq in range(1, 11):
        t.mark(("gw", "old", "frames", 0), seq)
    assert t.seen(("gw", "old", "frames", 0), 3)
    assert not t.seen(("gw", "new", "frames", 0), 3)


def test_low_water_mark_raises_the_floor_and_keeps_the_list_short():
    t = SeqTracker(window=16)
    key = ("gw", "i1", "telemetry", 2)
    for seq in (3, 5, 8, 13):
        t.mark(key, seq)
    t.raise_floor(key, 7)  # the agent holds nothing below 8 any more
    w = t.get(key)
    assert w is not None and (w.floor, w.recent) == (7, [8, 13])
    assert t.seen(key, 6)  # settled: the agent will never send it again
    t.raise_floor(key, 4)  # a lower mark (an older message) changes nothing
    assert (w.floor, w.recent) == (7, [8, 13])


def test_window_overflow_is_reported():
    t = SeqTracker(window=3)
    key = ("gw", "i1", "frames", 0)
    assert [t.mark(key, s) for s in (1, 2, 3, 4)] == [False, False, False, True]
    assert t.overflows == 1


def test_ack_state_covers_applied_batches_and_duplicates_until_taken():
    t = SeqTracker(window=16)
    a, b = ("gw", "i1", "frames", 0), ("gw", "i1", "labels", 1)
    t.mark(a, 4)
    t.mark(a, 5)
    t.mark(a, 9)
    assert t.take_ack_dirty() == {a: (-1, "4-5,9")}
    assert t.take_ack_dirty() == {}
    t.mark(b, 2)
    t.duplicate(a)  # the agent resent 4: tell it again
    acks = t.take_ack_dirty()
    assert acks == {a: (-1, "4-5,9"), b: (-1, "2")}
    t.restore_ack_dirty(set(acks))  # the checkpoint failed: publish them with the next one
    assert set(t.take_ack_dirty()) == {a, b}


def test_a_batch_applied_on_another_partition_of_the_topic_is_a_duplicate():
    """A topic re-created with another partition count sends a resent batch to another
    partition: it must not be applied twice, and its acknowledgement must name it where the
    agent last sent it."""
    t = SeqTracker(window=16)
    t.mark(("gw", "i1", "telemetry", 0), 638)
    t.take_ack_dirty()
    assert t.seen(("gw", "i1", "telemetry", 2), 638)
    assert not t.seen(("gw", "i1", "telemetry", 2), 639)
    assert not t.seen(("gw", "i1", "frames", 2), 638)  # another topic: another numbering use
    assert t.take_ack_dirty() == {("gw", "i1", "telemetry", 2): (-1, "638")}
    t.forget_partition("telemetry", 0)
    assert not t.seen(("gw", "i1", "telemetry", 3), 637)
