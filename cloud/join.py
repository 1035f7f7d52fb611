"""Joining frames with their late labels by (asset, key), in bounded time and memory.

Time is event time, kept **per asset and per stream**: a frame of asset ``A`` expires (counted
``never_labelled``) once a label of ``A`` newer than ``frame.ts + window_s`` arrived; a label that
came before its frame expires (``orphan_labels``) once a frame of ``A`` newer than
``label.ts + label_wait_s`` arrived. Frames and labels of one asset share a Kafka key, so each
stream of one asset is read in order from one partition, while the two streams, and the
partitions of different assets, are read at whatever pace the consumer fetches them (a backlog,
a restart, a rebalance). A single watermark over everything would let a stream that was fetched
ahead expire entries the other stream is still about to match; per-asset, per-stream clocks make
the outcome independent of that interleaving, so a replay or a restart from a checkpoint joins
exactly as the first pass did. A label whose timestamp is more than ``window_s`` after its frame
is late whatever the order they arrive in.

Memory is bounded: when a buffer is full its oldest entry (by arrival) leaves first and is
counted (``evicted_for_space`` plus ``never_labelled`` or ``orphan_labels``). Frames of an asset
whose labels stop coming altogether stay until that bound pushes them out. Nothing leaves
silently: labels for expired frames are counted as ``late``, duplicates are counted too.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cloud.config import JoinConfig
from shared.records import Frame, Label

__all__ = ["JoinBuffer", "JoinStats", "Joined"]

_NS = 1_000_000_000


@dataclass(slots=True)
class JoinStats:
    frames: int = 0
    labels: int = 0
    joined: int = 0
    #: frames that had to wait for a label (the label was not there first)
    waited: int = 0
    #: total event-time wait of joined frames, seconds (label ts minus frame ts)
    wait_s_sum: float = 0.0
    never_labelled: int = 0
    late_labels: int = 0
    orphan_labels: int = 0
    duplicate_frames: int = 0
    duplicate_labels: int = 0
    evicted_for_space: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__slots__}


Joined = tuple[Frame, Label]
_Key = tuple[str, str]


class JoinBuffer:
    """Pairs frames and labels; :meth:`add_frame` / :meth:`add_label` return completed pairs."""

    def __init__(self, config: JoinConfig) -> None:
        self.config = config
        self.stats = JoinStats()
        # everything pending, in arrival order (the space bound evicts from the front) ...
        self._frames: OrderedDict[_Key, Frame] = OrderedDict()
        self._labels: OrderedDict[_Key, Label] = OrderedDict()
        # ... and per asset, in arrival order (time expiry scans an asset's front)
        self._asset_frames: dict[str, OrderedDict[str, None]] = {}
        self._asset_labels: dict[str, OrderedDict[str, None]] = {}
        #: newest event time seen per asset on each stream
        self._frame_clock: dict[str, int] = {}
        self._label_clock: dict[str, int] = {}
        self._expired: OrderedDict[_Key, None] = OrderedDict()
        self._window_ns = int(config.window_s * _NS)
        self._label_wait_ns = int(config.label_wait_s * _NS)

    @property
    def pending_frames(self) -> int:
        return len(self._frames)

    @property
    def pending_labels(self) -> int:
        return len(self._labels)

    @property
    def watermark_ns(self) -> int:
        """The newest event time seen on either stream, any asset (0 before the first)."""
        return max(
            max(self._frame_clock.values(), default=0), max(self._label_clock.values(), default=0)
        )

    def clocks(self, asset: str) -> tuple[int | None, int | None]:
        """(newest frame ts, newest label ts) seen for ``asset``."""
        return self._frame_clock.get(asset), self._label_clock.get(asset)

    # -- expiry ------------------------------------------------------------------------------

    def _expire_frames(self, asset: str, label_ts: int) -> None:
        """A label of ``asset`` at ``label_ts`` arrived: its frames older than the window go."""
        if label_ts <= self._label_clock.get(asset, -1):
            return
        self._label_clock[asset] = label_ts
        queue = self._asset_frames.get(asset)
        if not queue:
            return
        cut = label_ts - self._window_ns
        frames = self._frames
        # arrival order is event order within one asset's partition; stop at the first in window
        while queue:
            key = next(iter(queue))
            if frames[(asset, key)].ts_ns >= cut:
                break
            queue.popitem(last=False)
            del frames[(asset, key)]
            self._forget((asset, key))

    def _expire_labels(self, asset: str, frame_ts: int) -> None:
        """A frame of ``asset`` at ``frame_ts`` arrived: labels waiting longer than allowed go."""
        if frame_ts <= self._frame_clock.get(asset, -1):
            return
        self._frame_clock[asset] = frame_ts
        queue = self._asset_labels.get(asset)
        if not queue:
            return
        cut = frame_ts - self._label_wait_ns
        labels = self._labels
        while queue:
            key = next(iter(queue))
            if labels[(asset, key)].ts_ns >= cut:
                break
            queue.popitem(last=False)
            del labels[(asset, key)]
            self.stats.orphan_labels += 1

    def _forget(self, key: _Key) -> None:
        self.stats.never_labelled += 1
        if self.config.remember_expired:
            self._expired[key] = None
            if len(self._expired) > self.config.remember_expired:
                self._expired.popitem(last=False)

    # -- the two streams -------------------------------------------------------------------------

    def add_frame(self, frame: Frame) -> Joined | None:
        self.stats.frames += 1
        asset = frame.asset
        key = (asset, frame.key)
        self._expire_labels(asset, frame.ts_ns)
        label = self._labels.pop(key, None)
        if label is not None:
            del self._asset_labels[asset][frame.key]
            self.stats.joined += 1
            return frame, label
        queue = self._asset_frames.get(asset)
        if queue is None:
            queue = self._asset_frames[asset] = OrderedDict()
        if key in self._frames:
            # the same (asset, key) framed twice: keep the newer frame, count the older
            self.stats.duplicate_frames += 1
            del self._frames[key]
            del queue[frame.key]
        label_clock = self._label_clock.get(asset)
        if label_clock is not None and frame.ts_ns < label_clock - self._window_ns:
            # this asset's labels are already past this frame's window
            self._forget(key)
            return None
        self._frames[key] = frame
        queue[frame.key] = None
        if len(self._frames) > self.config.max_pending_frames:
            (old_asset, old_key), _ = self._frames.popitem(last=False)
            del self._asset_frames[old_asset][old_key]
            self.stats.evicted_for_space += 1
            self._forget((old_asset, old_key))
        return None

    def add_label(self, label: Label) -> Joined | None:
        self.stats.labels += 1
        asset = label.asset
        key = (asset, label.key)
        self._expire_frames(asset, label.ts_ns)
        frame = self._frames.pop(key, None)
        if frame is not None:
            del self._asset_frames[asset][label.key]
            self.stats.joined += 1
            self.stats.waited += 1
            self.stats.wait_s_sum += max(0, label.ts_ns - frame.ts_ns) / _NS
            return frame, label
        if key in self._expired:
            del self._expired[key]
            self.stats.late_labels += 1
            return None
        queue = self._asset_labels.get(asset)
        if queue is None:
            queue = self._asset_labels[asset] = OrderedDict()
        if key in self._labels:
            self.stats.duplicate_labels += 1
            del self._labels[key]
            del queue[label.key]
        frame_clock = self._frame_clock.get(asset)
        if frame_clock is not None and label.ts_ns < frame_clock - self._label_wait_ns:
            # this asset's frames are already past the time this label may wait
            self.stats.orphan_labels += 1
            return None
        self._labels[key] = label
        queue[label.key] = None
        if len(self._labels) > self.config.max_pending_labels:
            (old_asset, old_key), _ = self._labels.popitem(last=False)
            del self._asset_labels[old_asset][old_key]
            self.stats.orphan_labels += 1
            self.stats.evicted_for_space += 1
        return None

    # -- checkpoints -----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(),
            "stats": self.stats,
            "frame_clock": dict(self._frame_clock),
            "label_clock": dict(self._label_clock),
            "frames": list(self._frames.values()),
            "labels": list(self._labels.values()),
            "expired": list(self._expired),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(JoinConfig.model_validate(state["config"]))  # type: ignore[misc]
        self.stats = state["stats"]
        # checkpoints written before per-asset clocks carry none: they restart from the data
        self._frame_clock = dict(state.get("frame_clock", {}))
        self._label_clock = dict(state.get("label_clock", {}))
        for f in state["frames"]:
            self._frames[(f.asset, f.key)] = f
            self._asset_frames.setdefault(f.asset, OrderedDict())[f.key] = None
        for lb in state["labels"]:
            self._labels[(lb.asset, lb.key)] = lb
            self._asset_labels.setdefault(lb.asset, OrderedDict())[lb.key] = None
        for k in state["expired"]:
            self._expired[(k[0], k[1])] = None

    def reconfigure(self, config: JoinConfig) -> None:
        """Apply a (possibly changed) config to restored state."""
        self.config = config
        self._window_ns = int(config.window_s * _NS)
        self._label_wait_ns = int(config.label_wait_s * _NS)
