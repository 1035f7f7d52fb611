"""Which batches were already applied: (agent_id, batch_seq) per Kafka partition, compactly.

A batch lands on the partition of its key (the asset), so every copy of a batch — a producer
retry, an outbox replay after an outage — lands on the same partition, and one partition has one
consumer at a time. The state is therefore kept per (agent, topic, partition): a ``floor`` (every
seq at or below it counts as applied) plus the set of applied seqs above it. An agent's seqs are
spread over topics and partitions, so that set is sparse, not contiguous; it is bounded by
``window``: when it grows past it the floor rises to the oldest remembered seq. A batch arriving
more than ``window`` applied batches out of order on its own partition would be dropped as a
duplicate — far beyond what a producer's in-flight window reorders.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ["DedupeKey", "SeqTracker", "SeqWindow"]

#: (agent_id, topic, partition)
DedupeKey = tuple[str, str, int]


@dataclass(slots=True)
class SeqWindow:
    floor: int = -1
    recent: list[int] = field(default_factory=list)  # sorted, all > floor

    def seen(self, seq: int) -> bool:
        if seq <= self.floor:
            return True
        i = bisect.bisect_left(self.recent, seq)
        return i < len(self.recent) and self.recent[i] == seq

    def add(self, seq: int, window: int) -> None:
        if seq <= self.floor:
            return
        recent = self.recent
        if not recent or seq > recent[-1]:
            recent.append(seq)
        else:
            i = bisect.bisect_left(recent, seq)
            if i < len(recent) and recent[i] == seq:
                return
            recent.insert(i, seq)
        if len(recent) > window:
            cut = len(recent) - window
            self.floor = recent[cut - 1]
            del recent[:cut]

    def encode(self) -> str:
        """Compact text: runs of consecutive seqs as ``a-b``, e.g. ``"7-9,12,15-16"``."""
        parts: list[str] = []
        r = self.recent
        i = 0
        while i < len(r):
            j = i
            while j + 1 < len(r) and r[j + 1] == r[j] + 1:
                j += 1
            parts.append(str(r[i]) if i == j else f"{r[i]}-{r[j]}")
            i = j + 1
        return ",".join(parts)

    @classmethod
    def decode(cls, floor: int, text: str) -> SeqWindow:
        recent: list[int] = []
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            recent.extend(range(int(lo), int(hi or lo) + 1))
        return cls(floor, recent)


class SeqTracker:
    """The applied-batch record of every (agent, topic, partition) this process consumes."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._state: dict[DedupeKey, SeqWindow] = {}
        self._dirty: set[DedupeKey] = set()
        self.dropped = 0

    def seen(self, key: DedupeKey, seq: int) -> bool:
        w = self._state.get(key)
        return w is not None and w.seen(seq)

    def mark(self, key: DedupeKey, seq: int) -> None:
        w = self._state.get(key)
        if w is None:
            w = self._state[key] = SeqWindow()
        w.add(seq, self.window)
        self._dirty.add(key)

    def load(self, key: DedupeKey, window: SeqWindow) -> None:
        self._state[key] = window
        self._dirty.discard(key)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop state of a partition this process no longer owns (its new owner loads it)."""
        for key in [k for k in self._state if k[1] == topic and k[2] == partition]:
            del self._state[key]
            self._dirty.discard(key)

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

    def __len__(self) -> int:
        return len(self._state)
