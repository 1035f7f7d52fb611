"""Kafka topic names, all under one configurable prefix.

Uplink topics carry encoded batches keyed by asset (per-asset order); ``models`` is keyed by
model name and meant to be compacted (the latest manifest per model). ``control`` carries the
cloud's end-to-end acknowledgements and replay requests to the agents (:mod:`shared.control`),
keyed by agent id. Where the broker does not compact (the embedded Tansu build), readers keep
the latest value per key themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.wire import Kind

__all__ = ["DEFAULT_PREFIX", "Topics"]

DEFAULT_PREFIX = "edgeloop"
_VALID = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _VALID.match(self.prefix) or self.prefix in {".", ".."}:
            raise ValueError(
                f"topic prefix {self.prefix!r}: expected 1-200 characters of letters, digits, "
                "'.', '_' or '-'"
            )

    def _name(self, leaf: str) -> str:
        return f"{self.prefix}.{leaf}"

    @property
    def telemetry(self) -> str:
        return self._name("telemetry")

    @property
    def frames(self) -> str:
        return self._name("frames")

    @property
    def events(self) -> str:
        return self._name("events")

    @property
    def labels(self) -> str:
        return self._name("labels")

    @property
    def agents(self) -> str:
        return self._name("agents")

    @property
    def models(self) -> str:
        return self._name("models")

    @property
    def control(self) -> str:
        return self._name("control")

    def for_kind(self, kind: Kind) -> str:
        """The uplink topic a batch of this kind goes to."""
        return {
            Kind.READING: self.telemetry,
            Kind.FRAME: self.frames,
            Kind.EVENT: self.events,
            Kind.LABEL: self.labels,
            Kind.HEARTBEAT: self.agents,
        }[Kind(kind)]

    def kind_of(self, topic: str) -> Kind | None:
        """The record kind an uplink topic carries (None for any other topic)."""
        for kind in Kind:
            if self.for_kind(kind) == topic:
                return kind
        return None

    def uplink(self) -> tuple[str, ...]:
        """Every topic an edge agent produces to and the cloud ingests from."""
        return (self.telemetry, self.frames, self.events, self.labels, self.agents)

    def all(self) -> tuple[str, ...]:
        return (*self.uplink(), self.models, self.control)
