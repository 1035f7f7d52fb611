"""Which batches were already applied: per agent incarnation and Kafka partition, compactly.

A batch's identity is ``(agent_id, incarnation, batch_seq)``. It lands on the partition of its
key (the asset), so every copy of a batch — a producer retry, an outbox resend after an outage,
a replay after the broker lost its log — lands on the same partition, and one partition has one
consumer at a time. The state is therefore kept per (agent, incarnation, topic, partition): a
``floor`` (every seq at or below it counts as applied) plus the sorted list of applied seqs
above it. An agent's seqs are spread over topics and partitions, so that list is sparse.

What keeps the list short without guessing: every message carries the lowest ``batch_seq`` its
agent still held when it was sent (the ``el-low`` header). Nothing below it will ever come
again from that incarnation, so the floor rises to it and the list holds only applied batches
the agent may still resend. ``window`` is a memory bound beyond that (counted as an overflow
when it has to forget an applied batch: a resend below the floor would then be taken for a
duplicate). Messages without the header (older agents) rely on ``window`` alone.

The same state, published after each checkpoint, is the end-to-end acknowledgement
(:mod:`shared.control`): a key becomes *ack-dirty* when a batch was applied or dropped as a
duplicate (the agent resent something it must be told about again).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from shared.control import decode_ranges, encode_ranges

__all__ = ["DedupeKey", "SeqTracker", "SeqWindow"]

#: (agent_id, incarnation, topic, partition)
DedupeKey = tuple[str, str, str, int]


@dataclass(slots=True)
class SeqWindow:
    floor: int = -1
    recent: list[int] = field(default_factory=list)  # sorted, all > floor

    def seen(self, seq: int) -> bool:
        if seq <= self.floor:
            return True
        i = bisect.bisect_left(self.recent, seq)
        return i < len(self.recent) and self.recent[i] == seq

    def add(self, seq: int, window: int) -> bool:
        """Mark ``seq`` applied; True when the window had to forget applied seqs for room."""
        if seq <= self.floor:
            return False
        recent = self.recent
        if not recent or seq > recent[-1]:
            recent.append(seq)
        else:
            i = bisect.bisect_left(recent, seq)
            if i < len(recent) and recent[i] == seq:
                return False
            recent.insert(i, seq)
        if len(recent) > window:
            cut = len(recent) - window
            self.floor = recent[cut - 1]
            del recent[:cut]
            return True
        return False

    def raise_floor(self, floor: int) -> None:
        """Everything at or below ``floor`` is settled (the agent holds nothing of it any more)."""
        if floor <= self.floor:
            return
        self.floor = floor
        recent = self.recent
        if recent and recent[0] <= floor:
            del recent[: bisect.bisect_right(recent, floor)]

    def encode(self) -> str:
        """Compact text: runs of consecutive seqs as ``a-b``, e.g. ``"7-9,12,15-16"``."""
        return encode_ranges(self.recent)

    @classmethod
    def decode(cls, floor: int, text: str) -> SeqWindow:
        recent: list[int] = []
        for lo, hi in decode_ranges(text):
            recent.extend(range(lo, hi + 1))
        return cls(floor, recent)


class SeqTracker:
    """The applied-batch record of every (agent, incarnation, topic, partition) consumed here."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._state: dict[DedupeKey, SeqWindow] = {}
        #: (agent, incarnation, topic) -> the partitions with state here
        self._siblings: dict[tuple[str, str, str], set[int]] = {}
        self._dirty: set[DedupeKey] = set()
        self._ack_dirty: set[DedupeKey] = set()
        self.dropped = 0
        self.overflows = 0

    def seen(self, key: DedupeKey, seq: int) -> bool:
        """Applied on this partition — or on another partition of the same topic held here: a
        topic re-created with another partition count sends a resent batch elsewhere. Such a
        batch is then marked on this partition too, so that its acknowledgement covers it where
        the agent last sent it."""
        w = self._state.get(key)
        if w is not None and w.seen(seq):
            return True
        agent, inc, topic, partition = key
        siblings = self._siblings.get((agent, inc, topic))
        if not siblings:
            return False
        for other in siblings:
            if other != partition:
                ow = self._state.get((agent, inc, topic, other))
                if ow is not None and ow.seen(seq):
                    self.mark(key, seq)
                    return True
        return False

    def mark(self, key: DedupeKey, seq: int) -> bool:
        """Record ``seq`` applied; True when the window overflowed (see the module doc)."""
        w = self._state.get(key)
        if w is None:
            w = self._new(key)
        overflow = w.add(seq, self.window)
        self._dirty.add(key)
        self._ack_dirty.add(key)
        if overflow:
            self.overflows += 1
        return overflow

    def duplicate(self, key: DedupeKey) -> None:
        """A duplicate came in: the agent still holds it, so tell it again."""
        self._ack_dirty.add(key)

    def _new(self, key: DedupeKey, window: SeqWindow | None = None) -> SeqWindow:
        w = self._state[key] = window if window is not None else SeqWindow()
        self._siblings.setdefault(key[:3], set()).add(key[3])
        return w

    def raise_floor(self, key: DedupeKey, floor: int) -> None:
        w = self._state.get(key)
        if w is None:
            w = self._new(key)
        if floor > w.floor:
            w.raise_floor(floor)
            self._dirty.add(key)

    def load(self, key: DedupeKey, window: SeqWindow) -> None:
        self._new(key, window)
        self._dirty.discard(key)

    def get(self, key: DedupeKey) -> SeqWindow | None:
        return self._state.get(key)

    def keys_of(self, agent_id: str) -> list[DedupeKey]:
        return [k for k in self._state if k[0] == agent_id]

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop state of a partition this process no longer owns (its new owner loads it)."""
        for key in [k for k in self._state if k[2] == topic and k[3] == partition]:
            del self._state[key]
            siblings = self._siblings.get(key[:3])
            if siblings is not None:
                siblings.discard(partition)
            self._dirty.discard(key)
            self._ack_dirty.discard(key)

    def take_dirty(self) -> dict[DedupeKey, SeqWindow]:
        """Entries changed since the last call (copies, safe to write from another thread)."""
        out = {
            k: SeqWindow(self._state[k].floor, list(self._state[k].recent))
            for k in self._dirty
            if k in self._state
        }
        self._dirty.clear()
        return out

    def restore_dirty(self, keys: dict[DedupeKey, SeqWindow]) -> None:
        """A write failed: those entries are dirty again."""
        self._dirty.update(k for k in keys if k in self._state)

    def take_ack_dirty(self) -> dict[DedupeKey, tuple[int, str]]:
        """(floor, ranges) of the entries to acknowledge since the last call."""
        out = {
            k: (self._state[k].floor, self._state[k].encode())
            for k in self._ack_dirty
            if k in self._state
        }
        self._ack_dirty.clear()
        return out

    def restore_ack_dirty(self, keys: set[DedupeKey]) -> None:
        self._ack_dirty.update(k for k in keys if k in self._state)

    def __len__(self) -> int:
        return len(self._state)
