"""Joining frames with their late labels by (asset, key), in bounded time and memory.

Time is event time: the watermark is the newest ``ts_ns`` seen on either stream, so a replay or a
restart from a checkpoint joins exactly as the first pass did. A frame waits ``window_s`` for its
label; a label that arrives first waits ``label_wait_s`` for its frame. When either buffer is
full the oldest entry leaves first. Nothing leaves silently: frames that expire unlabelled are
counted (``never_labelled``), labels for such frames are counted as ``late``, labels whose frame
never came are ``orphan_labels``; duplicates are counted too.
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


class JoinBuffer:
    """Pairs frames and labels; :meth:`add_frame` / :meth:`add_label` return completed pairs."""

    def __init__(self, config: JoinConfig) -> None:
        self.config = config
        self.stats = JoinStats()
        self.watermark_ns = 0
        self._frames: OrderedDict[tuple[str, str], Frame] = OrderedDict()
        self._labels: OrderedDict[tuple[str, str], Label] = OrderedDict()
        self._expired: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._window_ns = int(config.window_s * _NS)
        self._label_wait_ns = int(config.label_wait_s * _NS)

    @property
    def pending_frames(self) -> int:
        return len(self._frames)

    @property
    def pending_labels(self) -> int:
        return len(self._labels)

    def _advance(self, ts_ns: int) -> None:
        if ts_ns > self.watermark_ns:
            self.watermark_ns = ts_ns
            self._expire()

    def _expire(self) -> None:
        frame_cut = self.watermark_ns - self._window_ns
        frames = self._frames
        # insertion order approximates event order; stop at the first one still in its window
        while frames:
            key, frame = next(iter(frames.items()))
            if frame.ts_ns >= frame_cut:
                break
            frames.popitem(last=False)
            self._forget(key)
        label_cut = self.watermark_ns - self._label_wait_ns
        labels = self._labels
        while labels:
            key, label = next(iter(labels.items()))
            if label.ts_ns >= label_cut:
                break
            labels.popitem(last=False)
            self.stats.orphan_labels += 1

    def _forget(self, key: tuple[str, str]) -> None:
        self.stats.never_labelled += 1
        if self.config.remember_expired:
            self._expired[key] = None
            if len(self._expired) > self.config.remember_expired:
                self._expired.popitem(last=False)

    def add_frame(self, frame: Frame) -> Joined | None:
        self.stats.frames += 1
        key = (frame.asset, frame.key)
        label = self._labels.pop(key, None)
        if label is not None:
            self._advance(frame.ts_ns)
            self.stats.joined += 1
            return frame, label
        if key in self._frames:
            # the same (asset, key) framed twice: keep the newer frame, count the older
            self.stats.duplicate_frames += 1
            del self._frames[key]
        self._frames[key] = frame
        if len(self._frames) > self.config.max_pending_frames:
            old_key, _ = self._frames.popitem(last=False)
            self.stats.evicted_for_space += 1
            self._forget(old_key)
        self._advance(frame.ts_ns)
        return None

    def add_label(self, label: Label) -> Joined | None:
        self.stats.labels += 1
        key = (label.asset, label.key)
        frame = self._frames.pop(key, None)
        if frame is not None:
            self.stats.joined += 1
            self.stats.waited += 1
            self.stats.wait_s_sum += max(0, label.ts_ns - frame.ts_ns) / _NS
            self._advance(label.ts_ns)
            return frame, label
        if key in self._expired:
            del self._expired[key]
            self.stats.late_labels += 1
            self._advance(label.ts_ns)
            return None
        if key in self._labels:
            self.stats.duplicate_labels += 1
            del self._labels[key]
        self._labels[key] = label
        if len(self._labels) > self.config.max_pending_labels:
            self._labels.popitem(last=False)
            self.stats.orphan_labels += 1
            self.stats.evicted_for_space += 1
        self._advance(label.ts_ns)
        return None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(),
            "stats": self.stats,
            "watermark_ns": self.watermark_ns,
            "frames": list(self._frames.values()),
            "labels": list(self._labels.values()),
            "expired": list(self._expired),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(JoinConfig.model_validate(state["config"]))  # type: ignore[misc]
        self.stats = state["stats"]
        self.watermark_ns = state["watermark_ns"]
        for f in state["frames"]:
            self._frames[(f.asset, f.key)] = f
        for lb in state["labels"]:
            self._labels[(lb.asset, lb.key)] = lb
        for k in state["expired"]:
            self._expired[(k[0], k[1])] = None

    def reconfigure(self, config: JoinConfig) -> None:
        """Apply a (possibly changed) config to restored state."""
        self.config = config
        self._window_ns = int(config.window_s * _NS)
        self._label_wait_ns = int(config.label_wait_s * _NS)
