"""The control topic: what the cloud tells edge agents about their data.

``<prefix>.control`` carries small JSON messages from the cloud to the agents, keyed by the agent
id they concern (``*``: every agent). Two kinds (``"v": 1``):

``applied`` — the end-to-end acknowledgement. What the cloud has applied, durably (the message is
published only after the checkpoint holding it committed), of one agent incarnation, per
partition of an uplink topic::

    {"v": 1, "type": "applied", "agent_id": "gw-1", "incarnation": "9f2c...", "ts_ns": ...,
     "instance": "cloud-0", "parts": [["edgeloop.telemetry", 3, 1041, "1043-1050,1052"], ...]}

Each part is ``[topic, partition, floor, ranges]``: every batch of that incarnation sent to that
partition with ``batch_seq <= floor`` is applied, and so is every ``batch_seq`` inside
``ranges`` (inclusive runs, ``"a-b,c"``). The state is cumulative (not a delta), so the latest
message per (agent, incarnation, topic, partition) is all an agent needs, and a lost message is
repaired by the next one.

``replay`` — send again what is not confirmed. The cloud found a gap it cannot close from the
broker (its log was lost, truncated or replaced)::

    {"v": 1, "type": "replay", "agent_id": "*", "reason": "...", "id": "...", "ts_ns": ...,
     "parts": [["edgeloop.telemetry", 3], ...]}

An agent answering a replay re-sends every batch it holds that the cloud has not confirmed and
that it had sent to one of ``parts`` (all of them when ``parts`` is absent); the cloud drops what
it had already applied by the batch identity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BROADCAST",
    "AppliedPart",
    "ControlError",
    "ControlMessage",
    "decode_control",
    "decode_ranges",
    "encode_applied",
    "encode_ranges",
    "encode_replay",
]

#: the key (and agent_id) of a message for every agent
BROADCAST = "*"
_VERSION = 1
#: the longest ranges text a message may carry (a bound against a corrupt message)
MAX_RANGES_CHARS = 4 * 1024 * 1024


class ControlError(ValueError):
    """A control message that cannot be read; the reason says what was wrong."""


@dataclass(frozen=True, slots=True)
class AppliedPart:
    topic: str
    partition: int
    floor: int
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ControlMessage:
    type: str  # "applied" | "replay"
    agent_id: str
    incarnation: str = ""
    parts: tuple[AppliedPart, ...] = ()
    reason: str = ""
    id: str = ""
    ts_ns: int = 0
    #: replay: the (topic, partition)s whose log was lost; None: everything unconfirmed
    replay_parts: tuple[tuple[str, int], ...] | None = None


def encode_ranges(seqs: Sequence[int]) -> str:
    """Sorted, distinct ints as runs: ``[7, 8, 9, 12, 15, 16]`` -> ``"7-9,12,15-16"``."""
    parts: list[str] = []
    i = 0
    while i < len(seqs):
        j = i
        while j + 1 < len(seqs) and seqs[j + 1] == seqs[j] + 1:
            j += 1
        parts.append(str(seqs[i]) if i == j else f"{seqs[i]}-{seqs[j]}")
        i = j + 1
    return ",".join(parts)


def decode_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """``"7-9,12"`` -> ``((7, 9), (12, 12))``; raises :class:`ControlError` on anything else."""
    if len(text) > MAX_RANGES_CHARS:
        raise ControlError(f"ranges of {len(text)} characters exceed {MAX_RANGES_CHARS}")
    out: list[tuple[int, int]] = []
    for part in filter(None, text.split(",")):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ControlError(f"bad range {part!r}") from None
        if a < 0 or b < a:
            raise ControlError(f"bad range {part!r}")
        out.append((a, b))
    return tuple(out)


def encode_applied(
    agent_id: str,
    incarnation: str,
    parts: Sequence[tuple[str, int, int, str]],
    *,
    instance: str,
    ts_ns: int,
) -> bytes:
    doc = {
        "v": _VERSION,
        "type": "applied",
        "agent_id": agent_id,
        "incarnation": incarnation,
        "instance": instance,
        "ts_ns": ts_ns,
        "parts": [list(p) for p in parts],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def encode_replay(
    agent_id: str,
    reason: str,
    *,
    id: str,
    instance: str,
    ts_ns: int,
    parts: Sequence[tuple[str, int]] | None = None,
) -> bytes:
    doc: dict[str, Any] = {
        "v": _VERSION,
        "type": "replay",
        "agent_id": agent_id,
        "reason": reason,
        "id": id,
        "instance": instance,
        "ts_ns": ts_ns,
    }
    if parts is not None:
        doc["parts"] = [list(p) for p in parts]
    return json.dumps(doc, separators=(",", ":")).encode()


def _need(doc: dict[str, Any], key: str, typ: type) -> Any:
    v = doc.get(key)
    if not isinstance(v, typ) or isinstance(v, bool):
        raise ControlError(f"{key!r}: expected {typ.__name__}, got {v!r}"[:200])
    return v


def decode_control(data: bytes | None) -> ControlMessage:
    """Parse one control message; raises :class:`ControlError` (only) on bad input."""
    if data is None:
        raise ControlError("empty message (tombstone)")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ControlError("not a JSON object")
    if doc.get("v") != _VERSION:
        raise ControlError(f"unknown control message version {doc.get('v')!r}")
    kind = _need(doc, "type", str)
    agent = _need(doc, "agent_id", str)
    ts = doc.get("ts_ns", 0)
    ts = ts if isinstance(ts, int) and not isinstance(ts, bool) else 0
    if kind == "replay":
        raw_parts = doc.get("parts")
        parts: tuple[tuple[str, int], ...] | None = None
        if raw_parts is not None:
            if not isinstance(raw_parts, list) or not all(
                isinstance(p, list)
                and len(p) == 2
                and isinstance(p[0], str)
                and isinstance(p[1], int)
                and not isinstance(p[1], bool)
                for p in raw_parts
            ):
                raise ControlError(f"bad replay parts {raw_parts!r}"[:200])
            parts = tuple((p[0], p[1]) for p in raw_parts)
        return ControlMessage(
            "replay",
            agent,
            reason=str(doc.get("reason", ""))[:500],
            id=str(doc.get("id", ""))[:100],
            ts_ns=ts,
            replay_parts=parts,
        )
    if kind != "applied":
        raise ControlError(f"unknown control message type {kind!r}")
    incarnation = _need(doc, "incarnation", str)
    raw = _need(doc, "parts", list)
    applied: list[AppliedPart] = []
    for p in raw:
        if (
            not isinstance(p, list)
            or len(p) != 4
            or not isinstance(p[0], str)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in p[1:3])
            or not isinstance(p[3], str)
        ):
            raise ControlError(f"bad part {p!r}"[:200])
        applied.append(AppliedPart(p[0], p[1], p[2], decode_ranges(p[3])))
    return ControlMessage("applied", agent, incarnation, tuple(applied), ts_ns=ts)
