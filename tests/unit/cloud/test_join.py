"""Frames meet their late labels: windows per asset and stream, bounds, every loss counted."""

from __future__ import annotations

import pickle

from cloud.config import JoinConfig
from cloud.join import JoinBuffer
from shared.records import Frame, Label

S = 1_000_000_000
T0 = 1_700_000_000 * S


def frame(i: int, asset: str = "press-1", t: float | None = None) -> Frame:
    ts = T0 + int((i if t is None else t) * S)
    return Frame(asset, f"{asset}-{i}", ts, {"temp": float(i)})


def label(i: int, asset: str = "press-1", t: float | None = None, y: int = 1) -> Label:
    ts = T0 + int((i + 5 if t is None else t) * S)
    return Label(asset, f"{asset}-{i}", ts, y)


def buf(**kw) -> JoinBuffer:
    return JoinBuffer(JoinConfig(**{"window_s": 60, "label_wait_s": 30, **kw}))


def test_a_late_label_joins_its_waiting_frame():
    j = buf()
    assert j.add_frame(frame(1)) is None
    pair = j.add_label(label(1))
    assert pair is not None and pair[0].key == "press-1-1" and pair[1].target == 1
    assert (j.stats.joined, j.stats.waited, j.pending_frames) == (1, 1, 0)
    assert j.stats.wait_s_sum == 5.0


def test_labels_before_frames_wait_for_them():
    j = buf()
    assert j.add_label(label(1)) is None
    assert j.pending_labels == 1
    pair = j.add_frame(frame(1))
    assert pair is not None and (j.stats.joined, j.stats.waited, j.pending_labels) == (1, 0, 0)


def test_a_frame_expires_when_its_assets_labels_pass_the_window_and_its_label_is_late():
    j = buf()
    j.add_frame(frame(1, t=0))
    j.add_frame(frame(2, t=10))
    j.add_label(label(3, t=65))  # labels of press-1 reached t=65: frame 1 (t=0) is out
    assert j.stats.never_labelled == 1 and j.pending_frames == 1
    assert j.add_label(label(1, t=66)) is None
    assert j.stats.late_labels == 1
    assert j.add_label(label(2, t=66)) is not None  # t=10 is still inside the window


def test_a_label_more_than_the_window_after_its_frame_is_late_whatever_the_order():
    j = buf()
    j.add_frame(frame(1, t=0))
    assert j.add_label(label(1, t=61)) is None
    assert (j.stats.never_labelled, j.stats.late_labels) == (1, 1)


def test_one_stream_fetched_far_ahead_of_the_other_loses_nothing():
    # all labels of two assets first (a backlog drained in partition order), then the frames
    j = buf()
    for asset in ("press-1", "press-2"):
        for i in range(500):
            assert j.add_label(label(i, asset, t=i * 0.5 + 5)) is None
    joined = sum(
        j.add_frame(frame(i, asset, t=i * 0.5)) is not None
        for asset in ("press-2", "press-1")
        for i in range(500)
    )
    assert joined == 1000
    assert (j.stats.orphan_labels, j.stats.never_labelled, j.pending_labels) == (0, 0, 0)


def test_another_assets_clock_expires_nothing():
    j = buf()
    j.add_frame(frame(1, "press-1", t=0))
    j.add_label(label(9, "press-2", t=1000))
    assert j.stats.never_labelled == 0
    assert j.add_label(label(1, "press-1", t=5)) is not None


def test_never_labelled_frames_and_orphan_labels_are_counted():
    j = buf()
    j.add_label(label(1, t=0))  # its frame never comes
    j.add_frame(frame(2, t=31))  # press-1 frames passed 0 + 30 s: the label is an orphan
    assert (j.stats.orphan_labels, j.pending_labels) == (1, 0)
    j.add_label(label(3, t=100))  # frame 2 (t=31) never labelled
    assert j.stats.never_labelled == 1
    # too old on arrival: counted at once, never buffered
    assert j.add_frame(frame(4, t=10)) is None and j.pending_frames == 0
    assert j.stats.never_labelled == 2
    assert j.add_label(label(5, t=0)) is None  # frames are at t=31: past 0 + 30
    assert (j.stats.orphan_labels, j.pending_labels) == (2, 1)  # label 3 (t=100) still waits


def test_memory_bounds_evict_the_oldest_and_count_it():
    j = buf(max_pending_frames=3, max_pending_labels=2)
    for i in range(5):
        j.add_frame(frame(i, t=i))
    assert j.pending_frames == 3 and j.stats.evicted_for_space == 2
    assert j.stats.never_labelled == 2
    assert j.add_label(label(0, t=6)) is None and j.stats.late_labels == 1
    assert j.add_label(label(4, t=6)) is not None
    for i in range(10, 14):
        j.add_label(label(i, "press-2", t=i))
    assert j.pending_labels == 2 and j.stats.orphan_labels == 2
    assert j.stats.evicted_for_space == 4


def test_duplicates_keep_the_newest_and_are_counted():
    j = buf()
    j.add_frame(frame(1))
    j.add_frame(Frame("press-1", "press-1-1", T0 + 2 * S, {"temp": 2.0}))
    j.add_label(label(7))
    j.add_label(label(7, y=0))
    assert (j.stats.duplicate_frames, j.stats.duplicate_labels) == (1, 1)
    pair = j.add_label(label(1))
    assert pair is not None and pair[0].features == {"temp": 2.0}
    pair = j.add_frame(frame(7))
    assert pair is not None and pair[1].target == 0


def test_pending_state_and_clocks_survive_a_pickle_round_trip():
    j = buf()
    j.add_frame(frame(1, t=0))
    j.add_label(label(2, t=40))
    j2 = pickle.loads(pickle.dumps(j))
    assert (j2.pending_frames, j2.pending_labels) == (1, 1)
    assert j2.clocks("press-1") == j.clocks("press-1")
    assert j2.add_label(label(1, t=45)) is not None
    j2.add_label(label(9, t=100))  # the restored clock and queue still expire in order
    assert j2.stats.orphan_labels == 0 and j2.watermark_ns == T0 + 100 * S
