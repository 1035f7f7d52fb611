"""A built-in, in-process source: deterministic signals for trying an agent without a device.

``kind: synthetic`` produces ``assets x tags`` readings every ``interval`` seconds (sine waves
with a per-tag phase, plus an optional part counter that increments every ``cycle`` seconds).
Writes are kept in :attr:`SyntheticConnector.written` so rule write-backs can be observed.
Useful for smoke tests of a gateway's outbox and uplink, and as the agent's own test source.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Literal

from pydantic import Field

from protocols.base import Connector, ConnectorConfig, ConnectorState, WriteError
from shared.records import Quality, Reading, Value

__all__ = ["SyntheticConfig", "SyntheticConnector"]


class SyntheticConfig(ConnectorConfig):
    kind: Literal["synthetic"] = "synthetic"
    assets: list[str] = Field(default_factory=lambda: ["machine-1"], min_length=1)
    tags: list[str] = Field(default_factory=lambda: ["temperature"], min_length=1)
    interval: float = Field(0.1, gt=0, description="seconds between scans of every tag")
    counter_tag: str | None = Field("part_counter", description="a part counter tag, or null")
    cycle: float = Field(1.0, gt=0, description="seconds per part (counter increment)")
    amplitude: float = 10.0
    offset: float = 50.0
    writable: list[str] = Field(default_factory=list, description="tags that accept writes")


class SyntheticConnector(Connector[SyntheticConfig]):
    kind = "synthetic"
    config_model = SyntheticConfig

    def __init__(self, config: SyntheticConfig) -> None:
        super().__init__(config)
        self.written: list[tuple[str, Value]] = []
        self.overrides: dict[tuple[str, str], Value] = {}
        self.scans = 0

    def set_value(self, asset: str, tag: str, value: Value) -> None:
        """Pin a tag to a value (tests drive rules with this)."""
        self.overrides[(asset, tag)] = value

    async def _run(self) -> None:
        c = self.config
        self._set_status(ConnectorState.CONNECTED)
        start = time.monotonic()
        next_at = start
        while True:
            now_ns = time.time_ns()
            t = time.monotonic() - start
            batch: list[Reading] = []
            for a_i, asset in enumerate(c.assets):
                for t_i, tag in enumerate(c.tags):
                    value = self.overrides.get((asset, tag))
                    if value is None:
                        value = c.offset + c.amplitude * math.sin(t + 0.7 * t_i + 1.3 * a_i)
                    batch.append(Reading(asset, tag, now_ns, value, Quality.GOOD))
                if c.counter_tag:
                    batch.append(Reading(asset, c.counter_tag, now_ns, int(t // c.cycle)))
            self.scans += 1
            self._emit(batch)
            next_at += c.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def write(self, tag: str, value: Value) -> None:
        if tag not in self.config.writable:
            raise WriteError(f"synthetic connector {self.name!r}: tag {tag!r} is not writable")
        self.written.append((tag, value))
