"""Data availability check: what a source offers, as a table and a starter connector config.

Each protocol provides ``protocols.<scheme>_discovery.discover(url, options) -> DiscoveryReport``
(an async function); ``edgeloop discover URL`` dispatches on the URL scheme (opcua, modbus, mqtt).
The starter config is a dict the agent's config accepts as one entry of ``connectors``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["DiscoverOptions", "DiscoveredPoint", "DiscoveryReport", "render_report"]


@dataclass(frozen=True, slots=True)
class DiscoverOptions:
    seconds: float = 10.0  # how long to observe (update rates, value ranges)
    units: tuple[int, ...] = (1,)  # Modbus unit ids to probe
    address_range: tuple[int, int] = (0, 999)  # Modbus addresses to probe, inclusive
    timeout: float = 5.0  # per request / connect


@dataclass(slots=True)
class DiscoveredPoint:
    asset: str
    tag: str
    address: str  # NodeId, "hr:40001@unit1", topic...
    type: str
    samples: int = 0
    rate_hz: float | None = None
    minimum: float | None = None
    maximum: float | None = None
    bad_share: float = 0.0
    unit: str = ""
    example: str = ""


@dataclass(slots=True)
class DiscoveryReport:
    source: str
    kind: str
    points: list[DiscoveredPoint] = field(default_factory=list)
    starter_config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def render_report(report: DiscoveryReport, width: int = 160) -> str:
    table = Table(title=f"{report.kind} source {report.source}: {len(report.points)} points")
    for col in (
        "asset",
        "tag",
        "address",
        "type",
        "unit",
        "samples",
        "rate/s",
        "min",
        "max",
        "bad %",
    ):
        table.add_column(col, overflow="fold")
    for p in report.points:
        table.add_row(
            p.asset,
            p.tag,
            p.address,
            p.type,
            p.unit,
            str(p.samples),
            _num(p.rate_hz),
            _num(p.minimum),
            _num(p.maximum),
            f"{100 * p.bad_share:.0f}",
        )
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False).print(table)
    for note in report.notes:
        buf.write(f"note: {note}\n")
    return buf.getvalue()
