"""Asset state (last value per tag, staleness) and the frame builder.

Each reading updates its asset's :class:`TagState`: the last reading and, for tags that feed a
frame, running window statistics (count, mean and variance by Welford's method, min, max, first,
last) — constant memory however long a machine cycle lasts. A frame is cut per asset on its
trigger: every ``period`` seconds (checked each tick), or when the ``tag`` trigger changes value
(e.g. the part counter: the frame then covers exactly one cycle and is keyed ``<asset>-<n>``,
the simulator's part id, by default; ``key`` is a template over {asset}, {value}, {ts_ms}).

Feature ``<tag>_<agg>``: ``last``, ``mean``, ``min``, ``max``, ``std`` (population) over the good
numeric values in the window; ``delta`` is the last value minus the last value at the previous
frame (or minus the window's first value for the first frame). A tag with no new value in the
window but a fresh, good last value contributes that value (std 0, delta 0).

A tag is *stale* when nothing arrived for ``stale_after`` seconds and *bad* when its latest
reading has bad quality or is not a number. ``on_stale`` then decides: ``skip`` the frame
(counted), ``impute_last`` good value, or ``mark`` (computed from what there is, NaN when there
is nothing). Every feature built from a stale or bad input is named in ``Frame.marks``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from edge.config import AGGREGATES, FeatureConfig, FrameConfig
from shared.records import Quality, Reading, Value

__all__ = ["AssetState", "FrameBuilder", "PendingFrame", "TagState", "parse_feature_name"]

_NAN = float("nan")


def parse_feature_name(name: str) -> tuple[str, str]:
    """``temperature_mean`` -> ("temperature", "mean"); raises ValueError otherwise."""
    tag, sep, agg = name.rpartition("_")
    if not sep or not tag or agg not in AGGREGATES:
        raise ValueError(
            f"feature {name!r} does not read <tag>_<agg> with agg one of {', '.join(AGGREGATES)}"
        )
    return tag, agg


def _number(v: Value) -> float | None:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float):
        f = float(v)
        return f if math.isfinite(f) else None
    return None


class TagState:
    """The last reading of a tag and its window statistics since the asset's last frame."""

    __slots__ = (
        "first",
        "last",
        "last_good",
        "m2",
        "max",
        "mean",
        "min",
        "n",
        "prev_frame_last",
        "reading",
        "seen_at",
        "windowed",
    )

    def __init__(self, windowed: bool = True) -> None:
        self.reading: Reading | None = None
        self.seen_at = 0.0  # monotonic receipt time
        self.windowed = windowed  # keeps window statistics (the tag feeds a feature)
        self.last_good: float | None = None
        self.prev_frame_last: float | None = None
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.first = _NAN
        self.last = _NAN

    def observe(self, r: Reading, at: float) -> None:
        self.reading = r
        self.seen_at = at
        if self.windowed:
            self.add(r)

    def add(self, r: Reading) -> None:
        """Fold a reading into the window statistics (bad or non-numeric values are left out)."""
        if r.quality is Quality.BAD:
            return
        x = _number(r.value)
        if x is None:
            return
        self.last_good = x
        self.n += 1
        if self.n == 1:
            self.first = x
        self.last = x
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x

    def bad(self) -> bool:
        r = self.reading
        return r is None or r.quality is Quality.BAD or _number(r.value) is None

    def aggregate(self, agg: str, *, from_last: bool) -> float:
        """One aggregate over the window; ``from_last`` uses the last good value alone."""
        if from_last or self.n == 0:
            v = self.last_good
            if v is None:
                return _NAN
            if agg == "std":
                return 0.0
            if agg == "delta":
                return 0.0 if self.prev_frame_last is None else v - self.prev_frame_last
            return v
        if agg == "last":
            return self.last
        if agg == "mean":
            return self.mean
        if agg == "min":
            return self.min
        if agg == "max":
            return self.max
        if agg == "std":
            return math.sqrt(self.m2 / self.n)
        base = self.prev_frame_last if self.prev_frame_last is not None else self.first
        return self.last - base


@dataclass(slots=True)
class AssetState:
    name: str
    tags: dict[str, TagState] = field(default_factory=dict)
    trigger_value: Value = None
    next_due: float = 0.0  # monotonic time of the next periodic frame

    def tag(self, name: str, windowed: bool = True) -> TagState:
        st = self.tags.get(name)
        if st is None:
            st = self.tags[name] = TagState(windowed)
        return st

    def values(self) -> dict[str, Value]:
        return {t: s.reading.value for t, s in self.tags.items() if s.reading is not None}

    def ages(self, now: float) -> dict[str, float]:
        return {t: now - s.seen_at for t, s in self.tags.items() if s.reading is not None}


@dataclass(frozen=True, slots=True)
class PendingFrame:
    """A frame's features, cut and waiting to be scored."""

    asset: str
    key: str
    ts_ns: int
    features: dict[str, float]
    marks: tuple[str, ...]


class FrameBuilder:
    """Keeps per-asset state and cuts frames; single-threaded, driven by the agent's tick."""

    def __init__(self, frames: Sequence[FrameConfig]) -> None:
        self.specs = {f.asset: f for f in frames}
        self.assets: dict[str, AssetState] = {}
        self._features: dict[str, list[tuple[str, str, str]]] = {}  # asset -> (name, tag, agg)
        self._model_features: list[tuple[str, str, str]] = []
        self.skipped = 0  # frames skipped by the on_stale policy
        for spec in frames:
            self._features[spec.asset] = self._expand(spec.features)
        self._triggers = {f.asset: f.trigger.tag for f in frames if f.trigger.tag is not None}
        self._special_tags: dict[str, frozenset[str]] = {}

    @staticmethod
    def _expand(features: Iterable[FeatureConfig]) -> list[tuple[str, str, str]]:
        return [(f"{f.tag}_{a}", f.tag, a) for f in features for a in f.aggs]

    def use_model_features(self, names: Sequence[str]) -> None:
        """Assets configured without ``features`` take the model's (from its manifest)."""
        self._model_features = [(n, *parse_feature_name(n)) for n in names]
        self._special_tags.clear()
        for asset, st in self.assets.items():
            wanted = self._windowed_tags(asset)
            for name, ts in st.tags.items():
                ts.windowed = name in wanted

    def _windowed_tags(self, asset: str) -> set[str]:
        return {tag for _, tag, _ in self.features_of(asset)} if asset in self.specs else set()

    def features_of(self, asset: str) -> list[tuple[str, str, str]]:
        return self._features.get(asset) or self._model_features

    def state(self, asset: str) -> AssetState:
        st = self.assets.get(asset)
        if st is None:
            st = self.assets[asset] = AssetState(asset)
        return st

    def observe(self, readings: Iterable[Reading], now: float | None = None) -> list[PendingFrame]:
        """Apply readings in order; return frames cut by tag triggers along the way."""
        at = time.monotonic() if now is None else now
        out: list[PendingFrame] = []
        specs = self.specs
        assets = self.assets
        # readings come in per-device batches: look an asset's state up when the asset changes.
        # A tag that feeds no window and triggers nothing only needs its last reading of the
        # call (all of them get the same receipt time): those are collected in ``last`` and
        # applied once per tag after the loop; window and trigger tags are applied in order.
        cur: str | None = None
        st: AssetState | None = None
        tags: dict[str, TagState] = {}
        special: frozenset[str] = frozenset()
        last: dict[str, Reading] = {}
        lasts: list[tuple[AssetState, dict[str, Reading]]] = []
        for r in readings:
            asset = r.asset
            if asset != cur:
                cur = asset
                st = assets.get(asset)
                if st is None:
                    st = self.state(asset)
                tags = st.tags
                special = self._special(asset)
                last = {}
                lasts.append((st, last))
            tag = r.tag
            if tag not in special:
                last[tag] = r
                continue
            assert st is not None
            if tag == self._triggers.get(asset):
                spec = specs[asset]
                prev, st.trigger_value = st.trigger_value, r.value
                if prev is not None and r.value != prev and r.quality is not Quality.BAD:
                    key = spec.key_template().format(
                        asset=asset, value=r.value, ts_ms=r.ts_ns // 1_000_000
                    )
                    frame = self._cut(st, spec, key, r.ts_ns, at)
                    if frame is not None:
                        out.append(frame)
            ts = tags.get(tag)
            if ts is None:
                ts = st.tag(tag, tag in self._windowed_tags(asset))
            ts.reading = r
            ts.seen_at = at
            if ts.windowed:
                ts.add(r)
        for st, last in lasts:
            tags = st.tags
            for tag, r in last.items():
                ts = tags.get(tag)
                if ts is None:
                    ts = tags[tag] = TagState(False)
                ts.reading = r
                ts.seen_at = at
        return out

    def state_tags(self) -> frozenset[str]:
        """Every tag some frame reads: triggers and window (feature) tags, over all assets."""
        tags: set[str] = set(self._triggers.values())
        for asset in self.specs:
            tags |= self._windowed_tags(asset)
        return frozenset(tags)

    def _special(self, asset: str) -> frozenset[str]:
        """Tags of ``asset`` whose every reading counts: window (feature) tags and the trigger."""
        got = self._special_tags.get(asset)
        if got is None:
            trig = self._triggers.get(asset)
            got = frozenset(self._windowed_tags(asset) | ({trig} if trig else set()))
            self._special_tags[asset] = got
        return got

    def due(self, now: float | None = None) -> list[PendingFrame]:
        """Frames whose period elapsed (call once per tick)."""
        at = time.monotonic() if now is None else now
        out: list[PendingFrame] = []
        for asset, spec in self.specs.items():
            period = spec.trigger.period
            if period is None:
                continue
            st = self.state(asset)
            if st.next_due == 0.0:
                st.next_due = at + period
                continue
            if at < st.next_due:
                continue
            # keep the cadence; after a long stall, do not emit a burst of catch-up frames
            st.next_due = max(st.next_due + period, at)
            ts = time.time_ns()
            key = spec.key_template().format(asset=asset, value="", ts_ms=ts // 1_000_000)
            frame = self._cut(st, spec, key, ts, at)
            if frame is not None:
                out.append(frame)
        return out

    def _cut(
        self, st: AssetState, spec: FrameConfig, key: str, ts_ns: int, now: float
    ) -> PendingFrame | None:
        feats = self.features_of(st.name)
        values: dict[str, float] = {}
        marks: list[str] = []
        skip = False
        for name, tag, agg in feats:
            ts = st.tags.get(tag)
            if ts is None:
                unhealthy, from_last = True, False
            else:
                unhealthy = ts.bad() or now - ts.seen_at > spec.stale_after
                from_last = ts.n == 0 or (unhealthy and spec.on_stale == "impute_last")
            if unhealthy:
                if spec.on_stale == "skip":
                    skip = True
                    break
                marks.append(name)
            values[name] = _NAN if ts is None else ts.aggregate(agg, from_last=from_last)
        for ts in st.tags.values():
            if ts.n:
                ts.prev_frame_last = ts.last
            ts.reset()
        if skip or not feats:
            if skip:
                self.skipped += 1
            return None
        return PendingFrame(st.name, key, ts_ns, values, tuple(marks))
