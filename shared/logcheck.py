"""Is a Kafka log shorter than what a consumer already read? Answered without false alarms.

Both tiers watch their consumers' positions against the log ends to notice a broker that lost
acknowledged records (a restart without storage, a re-created topic): a position beyond the end
of the log can only mean the log was replaced. The end is read two ways: the high watermark of
the last fetch response, and a ListOffsets request. Neither is trusted alone — the embedded Tansu
broker answers ListOffsets with stale, too-low ends under concurrent produce (measured: 465 of
1,200 checks below the position while nothing was lost), and a fetch response can be older than
the position — so :class:`LogEndWatch` takes the larger of the two and calls a partition short
only when it is found short twice in a row at the same position: a consumer parked beyond the end
of a shorter log does not move, one reading a healthy log does. The two sightings must be at
least ``min_interval`` seconds apart, so that a healthy consumer had time to move on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["LogEndWatch", "log_ends"]

TP = TypeVar("TP")


async def log_ends(
    consumer: Any, tps: list[TP], *, tries: int = 3, pause: float = 0.1
) -> dict[TP, int]:
    """The end offset of each partition: the largest of ``tries`` ListOffsets answers and the
    consumer's last high watermark (a stale answer is only ever too low)."""
    best: dict[TP, int] = {}
    for i in range(tries):
        ends = await consumer.end_offsets(tps)
        for tp, end in ends.items():
            if end is not None and end > best.get(tp, -1):
                best[tp] = end
        if i + 1 < tries:
            await asyncio.sleep(pause)
    for tp in tps:
        hw = consumer.highwater(tp)
        if hw is not None and hw > best.get(tp, -1):
            best[tp] = hw
    return best


class LogEndWatch:
    """Partitions whose log ended below their position on two checks in a row."""

    def __init__(self, min_interval: float = 1.0) -> None:
        self.min_interval = min_interval
        #: partition -> (position, monotonic time) when first found short
        self._suspects: dict[Any, tuple[int, float]] = {}

    def check(
        self, positions: Mapping[TP, int], ends: Mapping[TP, int], now: float | None = None
    ) -> list[TP]:
        """Feed one observation; returns the partitions now known short (forgotten then)."""
        now = time.monotonic() if now is None else now
        short: list[TP] = []
        for tp, pos in positions.items():
            end = ends.get(tp)
            if end is None or end >= pos:
                self._suspects.pop(tp, None)
                continue
            seen = self._suspects.get(tp)
            if seen is None or seen[0] != pos:
                self._suspects[tp] = (pos, now)
            elif now - seen[1] >= self.min_interval:
                short.append(tp)
                del self._suspects[tp]
        return short

    def forget(self, tps: Iterable[Any]) -> None:
        for tp in tps:
            self._suspects.pop(tp, None)
