"""The records both tiers speak: readings, frames, events, labels, heartbeats.

Records are frozen, slotted dataclasses: cheap to build on the hot path (tens of thousands per
second on a gateway) and validated on construction. Invalid input raises :class:`RecordError`
(a ``ValueError``) naming the record, the field and what was expected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, TypeAlias

__all__ = [
    "DEAD_LETTER_RULE",
    "TS_MAX",
    "WIRE_INT_MAX",
    "WIRE_INT_MIN",
    "Event",
    "Frame",
    "Heartbeat",
    "Label",
    "Quality",
    "Reading",
    "Record",
    "RecordError",
    "Severity",
    "Value",
    "dead_letter_event",
    "now_ns",
    "slot_setters",
    "trusted_frame",
    "trusted_reading",
]

#: A reading's value: numbers, booleans, strings, or None when the source had no value (bad quality).
Value: TypeAlias = bool | int | float | str | None


class RecordError(ValueError):
    """A record field holds a value of the wrong type or range."""


class Quality(IntEnum):
    """Data quality, as OPC UA defines it; the protocol's own status code travels beside it."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2


class Severity(IntEnum):
    INFO = 0
    WARNING = 1
    CRITICAL = 2


def now_ns() -> int:
    """Wall-clock time in integer nanoseconds since the epoch (the timestamp unit of every record)."""
    return time.time_ns()


def _need_str(record: str, name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise RecordError(f"{record}.{name}: expected a non-empty string, got {value!r}")


#: timestamps are signed 64-bit nanoseconds on the wire: 1970-01-01 up to 2262-04-11
TS_MAX = 2**63 - 1
#: the integers a record field carries as a plain wire integer (msgpack int64 / uint64)
WIRE_INT_MIN, WIRE_INT_MAX = -(2**63), 2**64 - 1


def _need_ts(record: str, name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= TS_MAX:
        raise RecordError(
            f"{record}.{name}: expected integer nanoseconds since the epoch, 0 to {TS_MAX} "
            f"(2262-04-11), got {value!r}"
        )


def _need_wire_int(record: str, name: str, value: object) -> None:
    if type(value) is not int or not WIRE_INT_MIN <= value <= WIRE_INT_MAX:
        raise RecordError(
            f"{record}.{name}: expected an integer within the 64-bit range, got {value!r}"
        )


def _need_value(record: str, name: str, value: object) -> None:
    if value is not None and not isinstance(value, bool | int | float | str):
        raise RecordError(
            f"{record}.{name}: expected bool, int, float, str or None, got {type(value).__name__}"
        )


_NUMBER_TYPES = frozenset((int, float))
_FLOAT = frozenset((float,))


def _need_number_map(record: str, name: str, value: object) -> None:
    # fast path for the common case (every value a plain float or int, every key a str);
    # the slow path below names the offending entry
    if type(value) is dict and {type(k) for k in value} <= {str}:
        types = {type(v) for v in value.values()}
        if types <= _FLOAT or (
            types <= _NUMBER_TYPES
            and all(WIRE_INT_MIN <= v <= WIRE_INT_MAX for v in value.values() if type(v) is int)
        ):
            return
    if not isinstance(value, dict):
        raise RecordError(f"{record}.{name}: expected a mapping of name to number, got {value!r}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise RecordError(f"{record}.{name}: keys must be strings, got {key!r}")
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise RecordError(f"{record}.{name}[{key!r}]: expected a number, got {item!r}")
        if type(item) is int and not WIRE_INT_MIN <= item <= WIRE_INT_MAX:
            raise RecordError(
                f"{record}.{name}[{key!r}]: an integer beyond the 64-bit range, got {item!r}"
            )


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one tag of one asset, as the protocol delivered it.

    ``ts_ns`` is the source timestamp when the protocol gives one, else the time of receipt.
    ``status`` keeps the protocol's own status code (an OPC UA StatusCode, a Modbus exception
    code, 0 for MQTT) so nothing the device said is lost when it is mapped to ``quality``.
    """

    asset: str
    tag: str
    ts_ns: int
    value: Value
    quality: Quality = Quality.GOOD
    status: int = 0

    def __post_init__(self) -> None:
        _need_str("Reading", "asset", self.asset)
        _need_str("Reading", "tag", self.tag)
        _need_ts("Reading", "ts_ns", self.ts_ns)
        _need_value("Reading", "value", self.value)
        if not isinstance(self.quality, Quality):
            try:
                object.__setattr__(self, "quality", Quality(self.quality))
            except ValueError:
                raise RecordError(
                    f"Reading.quality: expected 0 (good), 1 (uncertain) or 2 (bad), "
                    f"got {self.quality!r}"
                ) from None
        _need_wire_int("Reading", "status", self.status)


@dataclass(frozen=True, slots=True)
class Frame:
    """One row for the model: per-asset features over a window, and the edge's prediction.

    ``key`` identifies what a label will later refer to (e.g. the part id of a machine cycle).
    ``marks`` names features built from stale or bad-quality inputs.
    """

    asset: str
    key: str
    ts_ns: int
    features: dict[str, float]
    prediction: float | None = None
    model_version: int | None = None
    score: float | None = None
    marks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _need_str("Frame", "asset", self.asset)
        _need_str("Frame", "key", self.key)
        _need_ts("Frame", "ts_ns", self.ts_ns)
        _need_number_map("Frame", "features", self.features)
        for name in ("prediction", "score"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or (type(v) is int and not WIRE_INT_MIN <= v <= WIRE_INT_MAX)
            ):
                raise RecordError(f"Frame.{name}: expected a number or None, got {v!r}")
        if self.model_version is not None:
            _need_wire_int("Frame", "model_version", self.model_version)
        if not isinstance(self.marks, tuple):
            object.__setattr__(self, "marks", tuple(self.marks))


@dataclass(frozen=True, slots=True)
class Event:
    """A rule fired on the edge."""

    rule: str
    asset: str
    ts_ns: int
    severity: Severity = Severity.INFO
    message: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need_str("Event", "rule", self.rule)
        _need_str("Event", "asset", self.asset)
        _need_ts("Event", "ts_ns", self.ts_ns)
        if not isinstance(self.severity, Severity):
            try:
                object.__setattr__(self, "severity", Severity(self.severity))
            except ValueError:
                raise RecordError(
                    f"Event.severity: expected 0 (info), 1 (warning) or 2 (critical), "
                    f"got {self.severity!r}"
                ) from None
        if not isinstance(self.message, str):
            raise RecordError(f"Event.message: expected a string, got {self.message!r}")
        if not isinstance(self.values, dict):
            raise RecordError(f"Event.values: expected a mapping, got {self.values!r}")


@dataclass(frozen=True, slots=True)
class Label:
    """The ground truth for a frame, arriving late (e.g. from a quality station)."""

    asset: str
    key: str
    ts_ns: int
    target: float | int | bool

    def __post_init__(self) -> None:
        _need_str("Label", "asset", self.asset)
        _need_str("Label", "key", self.key)
        _need_ts("Label", "ts_ns", self.ts_ns)
        if not isinstance(self.target, bool | int | float) or (
            isinstance(self.target, float) and not math.isfinite(self.target)
        ):
            raise RecordError(
                f"Label.target: expected a finite number or bool, got {self.target!r}"
            )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """An agent says it is alive, which model versions it runs, and how far behind it is."""

    agent_id: str
    ts_ns: int
    models: dict[str, int] = field(default_factory=dict)
    outbox_depth: int = 0
    outbox_bytes: int = 0
    status: str = "ok"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need_str("Heartbeat", "agent_id", self.agent_id)
        _need_ts("Heartbeat", "ts_ns", self.ts_ns)
        if not isinstance(self.models, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in self.models.items()
        ):
            raise RecordError(
                f"Heartbeat.models: expected a mapping of model name to integer version, "
                f"got {self.models!r}"
            )
        for name in ("outbox_depth", "outbox_bytes"):
            v = getattr(self, name)
            if type(v) is not int or not 0 <= v <= WIRE_INT_MAX:
                raise RecordError(f"Heartbeat.{name}: expected an integer >= 0, got {v!r}")
        if not all(v <= WIRE_INT_MAX for v in self.models.values()):
            raise RecordError(f"Heartbeat.models: a version beyond 64 bits: {self.models!r}")


Record: TypeAlias = Reading | Frame | Event | Label | Heartbeat


# --- building records whose fields are valid by construction --------------------------------
# The validating constructors cost several microseconds per record. Producers whose every field
# is valid by construction (a connector's decoded registers, the frame builder's aggregates, a
# column-checked wire batch) build ordinary, equal records without running them again.


def slot_setters(cls: type) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot setters of a frozen slotted dataclass, in field order (bypassing frozenness)."""
    return tuple(cls.__dict__[f.name].__set__ for f in fields(cls))


_new = object.__new__
_READING_SET = slot_setters(Reading)
_FRAME_SET = slot_setters(Frame)


def trusted_reading(
    asset: str, tag: str, ts_ns: int, value: Value, quality: Quality = Quality.GOOD, status: int = 0
) -> Reading:
    """A :class:`Reading` from fields the caller guarantees valid; no checks run."""
    r: Reading = _new(Reading)
    s_asset, s_tag, s_ts, s_value, s_quality, s_status = _READING_SET
    s_asset(r, asset)
    s_tag(r, tag)
    s_ts(r, ts_ns)
    s_value(r, value)
    s_quality(r, quality)
    s_status(r, status)
    return r


def trusted_frame(
    asset: str,
    key: str,
    ts_ns: int,
    features: dict[str, float],
    prediction: float | None = None,
    model_version: int | None = None,
    score: float | None = None,
    marks: tuple[str, ...] = (),
) -> Frame:
    """A :class:`Frame` from fields the caller guarantees valid; no checks run."""
    f: Frame = _new(Frame)
    s_asset, s_key, s_ts, s_feats, s_pred, s_ver, s_score, s_marks = _FRAME_SET
    s_asset(f, asset)
    s_key(f, key)
    s_ts(f, ts_ns)
    s_feats(f, features)
    s_pred(f, prediction)
    s_ver(f, model_version)
    s_score(f, score)
    s_marks(f, marks)
    return f


# --- dead letters ----------------------------------------------------------------------------

#: the rule name of the events that carry dead letters: input a tier could not take as records
DEAD_LETTER_RULE = "edgeloop.dead_letter"
#: how much of a dead letter's original input travels with it
DEAD_LETTER_PAYLOAD_MAX = 2048


def dead_letter_event(
    *,
    origin: str,
    source: str,
    reason: str,
    payload: bytes | str | None = None,
    ts_ns: int | None = None,
) -> Event:
    """An :class:`Event` that keeps what could not be taken and why, so it is stored, shipped
    and counted like any event instead of vanishing (rule :data:`DEAD_LETTER_RULE`).

    ``origin`` says who refused it (a connector's name, ``outbox``, ``agent``, ``cloud``),
    ``source`` where it came from (an MQTT topic, an OPC UA node, a record kind). The payload is
    kept as text when it is UTF-8, else base64, truncated to :data:`DEAD_LETTER_PAYLOAD_MAX`.
    """
    import base64

    values: dict[str, Any] = {"origin": origin, "source": source}
    if payload is not None:
        raw = payload.encode("utf-8", "replace") if isinstance(payload, str) else bytes(payload)
        values["size"] = len(raw)
        cut = raw[:DEAD_LETTER_PAYLOAD_MAX]
        try:
            values["payload"] = cut.decode("utf-8")
        except UnicodeDecodeError:
            values["payload_b64"] = base64.b64encode(cut).decode("ascii")
        values["truncated"] = len(raw) > DEAD_LETTER_PAYLOAD_MAX
    return Event(
        DEAD_LETTER_RULE,
        origin or "unknown",
        now_ns() if ts_ns is None or not 0 <= ts_ns <= TS_MAX else ts_ns,
        Severity.WARNING,
        reason[:1000] or "no reason given",
        values,
    )
