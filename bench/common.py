"""The one table every benchmark reports into."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    bench: str
    metric: str
    value: float
    unit: str
    ceiling_name: str = ""
    ceiling: float | None = None
    target: str = ""
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        if self.ceiling in (None, 0) or self.value == 0:
            return None
        assert self.ceiling is not None
        return self.value / self.ceiling if self.higher_is_better else self.ceiling / self.value


def rate(fn: Callable[[], int], min_seconds: float = 1.0) -> float:
    """Items per second of ``fn`` (which returns how many items it processed), over >= min_seconds."""
    n, t0 = 0, time.perf_counter()
    while True:
        n += fn()
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return n / dt


def format_table(results: list[Result]) -> str:
    head = ("benchmark", "metric", "edgeloop", "raw ceiling", "ceiling", "ratio", "target")
    rows = [head]
    for r in results:
        ceiling = "" if r.ceiling is None else f"{r.ceiling:,.1f} {r.unit}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        rows.append(
            (
                r.bench,
                r.metric,
                f"{r.value:.2f}x" if r.unit == "x" else f"{r.value:,.1f} {r.unit}",
                r.ceiling_name,
                ceiling,
                ratio,
                r.target,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
