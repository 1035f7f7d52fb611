"""The batch wire codec: what travels as the value of every uplink Kafka message.

Layout (schema version 2; docs/ARCHITECTURE.md "The wire contract")::

    b"EL"  u8 schema_version  u8 kind
    msgpack([agent_id, incarnation, batch_seq, created_ns, strings, records])

* ``kind`` says which record type the batch holds (one type per batch, one topic per type).
* ``incarnation`` names the agent's outbox: a random id made when the outbox is created, so a
  gateway that lost its state directory starts a new numbering instead of replaying old numbers.
* ``strings`` is a table of the asset and tag names the records use; records refer to them by
  index, so a batch of 500 readings of 20 tags carries each name once.
* Each record is a positional msgpack array (see ``_ENCODERS``); field order is the contract.
* Integers outside the signed/unsigned 64-bit range travel as msgpack ext type 1 (big-endian
  two's complement) so no Python int is refused; floats are float64 (NaN and infinities survive).

Schema version 1 (no ``incarnation``: a 5-element body) is still read, as incarnation ``""``.

``(agent_id, incarnation, batch_seq)`` identifies a batch: the edge numbers its batches with a
monotonically increasing sequence per incarnation that survives restarts, and the cloud applies
each identity once.

:func:`decode_batch` never raises anything but :class:`WireDecodeError` on bad input. With
``quarantine=True`` a record that fails validation does not fail its batch: it is left out and
listed in :attr:`Batch.rejected` with the reason, so one bad record costs only itself.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import chain
from typing import Any

import msgpack

from shared.records import (
    Event,
    Frame,
    Heartbeat,
    Label,
    Reading,
    Record,
    RecordError,
    slot_setters,
)

__all__ = [
    "MAGIC",
    "SCHEMA_VERSION",
    "Batch",
    "Kind",
    "WireDecodeError",
    "batch_header",
    "decode_batch",
    "encode_batch",
    "kind_of",
    "pack_default",
    "unpack_ext",
]

MAGIC = b"EL"
SCHEMA_VERSION = 2
#: schema versions this build decodes
READABLE_VERSIONS = (1, 2)
_HEADER = struct.Struct("!2sBB")
_EXT_BIGINT = 1
_I64_MIN, _I64_MAX, _U64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
#: longest incarnation id accepted (the edge makes 16 hex digits)
MAX_INCARNATION = 64
#: Upper bound on a decoded batch (a guard against a corrupt length field allocating gigabytes).
MAX_BATCH_BYTES = 64 * 1024 * 1024


class WireDecodeError(ValueError):
    """The bytes are not a valid edgeloop batch; the message says what was wrong and where."""


class Kind(IntEnum):
    READING = 1
    FRAME = 2
    EVENT = 3
    LABEL = 4
    HEARTBEAT = 5


_KIND_OF_TYPE: dict[type, Kind] = {
    Reading: Kind.READING,
    Frame: Kind.FRAME,
    Event: Kind.EVENT,
    Label: Kind.LABEL,
    Heartbeat: Kind.HEARTBEAT,
}


def kind_of(record: Record) -> Kind:
    return _KIND_OF_TYPE[type(record)]


@dataclass(frozen=True, slots=True)
class Batch:
    """A numbered batch of records of one kind from one agent's outbox (its incarnation).

    ``rejected`` lists the records a quarantining decode left out: ``(index, reason)``.
    """

    agent_id: str
    batch_seq: int
    kind: Kind
    records: Sequence[Record]
    created_ns: int = 0
    incarnation: str = ""
    rejected: tuple[tuple[int, str], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.agent_id, str) or not self.agent_id:
            raise RecordError(f"Batch.agent_id: expected a non-empty string, got {self.agent_id!r}")
        if type(self.batch_seq) is not int or not 0 <= self.batch_seq <= _I64_MAX:
            raise RecordError(
                f"Batch.batch_seq: expected an integer from 0 to 2**63-1, got {self.batch_seq!r}"
            )
        if not isinstance(self.incarnation, str) or len(self.incarnation) > MAX_INCARNATION:
            raise RecordError(
                f"Batch.incarnation: expected a string of at most {MAX_INCARNATION} characters, "
                f"got {self.incarnation!r}"
            )
        if type(self.created_ns) is not int or not 0 <= self.created_ns <= _I64_MAX:
            raise RecordError(
                f"Batch.created_ns: expected integer nanoseconds, got {self.created_ns!r}"
            )
        object.__setattr__(self, "kind", Kind(self.kind))
        for i, rec in enumerate(self.records):
            if _KIND_OF_TYPE.get(type(rec)) is not self.kind:
                raise RecordError(
                    f"Batch.records[{i}]: a {self.kind.name} batch cannot hold a "
                    f"{type(rec).__name__}"
                )


# --- values that may hold any Python int -------------------------------------------------


def _enc_any(value: Any) -> Any:
    if type(value) is int and not _I64_MIN <= value <= _U64_MAX:
        n = (value.bit_length() + 8) // 8
        return msgpack.ExtType(_EXT_BIGINT, value.to_bytes(n, "big", signed=True))
    if isinstance(value, dict):
        return {k: _enc_any(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_enc_any(v) for v in value]
    return value


def pack_default(value: Any) -> Any:
    """msgpack ``default`` for hand-built payloads: an int beyond 64 bits as the big-integer
    extension (msgpack calls it for nothing else it can pack)."""
    if type(value) is int:
        n = (value.bit_length() + 8) // 8
        return msgpack.ExtType(_EXT_BIGINT, value.to_bytes(n, "big", signed=True))
    raise TypeError(f"cannot encode a {type(value).__name__}")


def unpack_ext(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook`` matching :func:`pack_default` (raises WireDecodeError otherwise)."""
    return _ext_hook(code, data)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise WireDecodeError(f"unknown msgpack extension type {code}")


# --- per-kind positional layouts ---------------------------------------------------------


class _Strings:
    __slots__ = ("index", "table")

    def __init__(self) -> None:
        self.table: list[str] = []
        self.index: dict[str, int] = {}

    def ref(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.table)
            self.table.append(s)
        return i


def _enc_reading(r: Reading, s: _Strings) -> list[Any]:
    return [s.ref(r.asset), s.ref(r.tag), r.ts_ns, _enc_any(r.value), int(r.quality), r.status]


def _enc_frame(r: Frame, s: _Strings) -> list[Any]:
    return [
        s.ref(r.asset),
        r.key,
        r.ts_ns,
        [[s.ref(k), v] for k, v in r.features.items()],
        r.prediction,
        r.model_version,
        r.score,
        list(r.marks),
    ]


def _enc_event(r: Event, s: _Strings) -> list[Any]:
    return [s.ref(r.rule), s.ref(r.asset), r.ts_ns, int(r.severity), r.message, _enc_any(r.values)]


def _enc_label(r: Label, s: _Strings) -> list[Any]:
    return [s.ref(r.asset), r.key, r.ts_ns, _enc_any(r.target)]


def _enc_heartbeat(r: Heartbeat, s: _Strings) -> list[Any]:
    return [
        r.agent_id,
        r.ts_ns,
        r.models,
        r.outbox_depth,
        r.outbox_bytes,
        r.status,
        _enc_any(r.info),
    ]


def _at(t: list[str], i: object) -> str:
    """``t[i]`` for a string-table index that must be an int in range (no negative wrap)."""
    if type(i) is not int or not 0 <= i < len(t):
        raise IndexError(f"string-table index {i!r} outside 0..{len(t) - 1}")
    return t[i]


def _dec_reading(f: list[Any], t: list[str]) -> Reading:
    asset, tag, ts, value, quality, status = f
    return Reading(_at(t, asset), _at(t, tag), ts, value, quality, status)


def _dec_frame(f: list[Any], t: list[str]) -> Frame:
    asset, key, ts, feats, pred, version, score, marks = f
    features = {_at(t, k): v for k, v in feats}
    return Frame(_at(t, asset), key, ts, features, pred, version, score, tuple(marks))


def _dec_event(f: list[Any], t: list[str]) -> Event:
    rule, asset, ts, sev, msg, values = f
    return Event(_at(t, rule), _at(t, asset), ts, sev, msg, values)


def _dec_label(f: list[Any], t: list[str]) -> Label:
    asset, key, ts, target = f
    return Label(_at(t, asset), key, ts, target)


def _dec_heartbeat(f: list[Any], t: list[str]) -> Heartbeat:
    agent, ts, models, depth, nbytes, status, info = f
    return Heartbeat(agent, ts, models, depth, nbytes, status, info)


# --- batch fast paths ----------------------------------------------------------------------
# Frames and labels are the learning hot path. These check a whole batch column by column
# (type sets, C-level loops) with exactly the rules of the records' validating constructors,
# and build the records without running them again. On any doubt they return None and the
# batch goes through the per-record path, which raises the precise error.

_NoneType = type(None)
_FRAME_NUMBER = frozenset((_NoneType, int, float))
_FRAME_VERSION = frozenset((_NoneType, int))
_NUMBERS = frozenset((int, float))
_TARGETS = frozenset((bool, int, float))
_LIST = frozenset((list,))
_STR = frozenset((str,))
_INT = frozenset((int,))


_FRAME_SET = slot_setters(Frame)  # asset, key, ts_ns, features, prediction, model_version, ...
_LABEL_SET = slot_setters(Label)  # asset, key, ts_ns, target
_new = object.__new__


def _fast_frames(rows: list[Any], t: list[str]) -> list[Record] | None:
    if set(map(type, rows)) != _LIST or set(map(len, rows)) != {8}:
        return None
    try:
        a_i, keys, tss, feats, preds, versions, scores, marks = zip(*rows, strict=True)
        if set(map(type, a_i)) != _INT or min(a_i) < 0:
            return None
        assets = [t[i] for i in a_i]
        lut = dict(enumerate(t))  # a dict: a negative index is a KeyError, not a wrap-around
        features = [{lut[k]: v for k, v in f} for f in feats]
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    if (
        not all(assets)
        or set(map(type, keys)) != _STR
        or not all(keys)
        or set(map(type, tss)) != _INT
        or min(tss) < 0
        or max(tss) > _I64_MAX
        or not set(map(type, preds)) <= _FRAME_NUMBER
        or not set(map(type, scores)) <= _FRAME_NUMBER
        or not set(map(type, versions)) <= _FRAME_VERSION
        or set(map(type, marks)) != _LIST
        or not set(map(type, chain.from_iterable(map(dict.values, features)))) <= _NUMBERS
    ):
        return None
    s_asset, s_key, s_ts, s_feat, s_pred, s_ver, s_score, s_marks = _FRAME_SET
    out: list[Record] = []
    append = out.append
    for asset, key, ts, feat, pred, ver, score, mark in zip(
        assets, keys, tss, features, preds, versions, scores, marks, strict=True
    ):
        r = _new(Frame)
        s_asset(r, asset)
        s_key(r, key)
        s_ts(r, ts)
        s_feat(r, feat)
        s_pred(r, pred)
        s_ver(r, ver)
        s_score(r, score)
        s_marks(r, tuple(mark) if mark else ())
        append(r)
    return out


def _fast_labels(rows: list[Any], t: list[str]) -> list[Record] | None:
    if set(map(type, rows)) != _LIST or set(map(len, rows)) != {4}:
        return None
    try:
        a_i, keys, tss, targets = zip(*rows, strict=True)
        if set(map(type, a_i)) != _INT or min(a_i) < 0:
            return None
        assets = [t[i] for i in a_i]
    except (TypeError, ValueError, IndexError):
        return None
    target_types = set(map(type, targets))
    if (
        not all(assets)
        or set(map(type, keys)) != _STR
        or not all(keys)
        or set(map(type, tss)) != _INT
        or min(tss) < 0
        or max(tss) > _I64_MAX
        or not target_types <= _TARGETS
        or (float in target_types and not all(map(math.isfinite, targets)))  # NaN, inf
    ):
        return None
    s_asset, s_key, s_ts, s_target = _LABEL_SET
    out: list[Record] = []
    append = out.append
    for asset, key, ts, target in zip(assets, keys, tss, targets, strict=True):
        r = _new(Label)
        s_asset(r, asset)
        s_key(r, key)
        s_ts(r, ts)
        s_target(r, target)
        append(r)
    return out


_FAST: dict[Kind, Callable[[list[Any], list[str]], list[Record] | None]] = {
    Kind.FRAME: _fast_frames,
    Kind.LABEL: _fast_labels,
}
# agent_id, batch_seq, kind, records, created_ns, incarnation, rejected
_BATCH_SET = slot_setters(Batch)


_ENCODERS: dict[Kind, Callable[[Any, _Strings], list[Any]]] = {
    Kind.READING: _enc_reading,
    Kind.FRAME: _enc_frame,
    Kind.EVENT: _enc_event,
    Kind.LABEL: _enc_label,
    Kind.HEARTBEAT: _enc_heartbeat,
}
_DECODERS: dict[Kind, Callable[[list[Any], list[str]], Record]] = {
    Kind.READING: _dec_reading,
    Kind.FRAME: _dec_frame,
    Kind.EVENT: _dec_event,
    Kind.LABEL: _dec_label,
    Kind.HEARTBEAT: _dec_heartbeat,
}


def encode_batch(batch: Batch) -> bytes:
    """Encode a batch to its compact binary form (deterministic for equal batches)."""
    strings = _Strings()
    enc = _ENCODERS[batch.kind]
    records = [enc(r, strings) for r in batch.records]
    body: bytes = msgpack.packb(
        [
            batch.agent_id,
            batch.incarnation,
            batch.batch_seq,
            batch.created_ns,
            strings.table,
            records,
        ],
        use_bin_type=True,
    )
    return _HEADER.pack(MAGIC, SCHEMA_VERSION, int(batch.kind)) + body


def batch_header(kind: Kind) -> bytes:
    """The 4 bytes every batch of ``kind`` starts with (for encoders that build the body)."""
    return _HEADER.pack(MAGIC, SCHEMA_VERSION, int(kind))


def decode_batch(data: bytes | bytearray | memoryview, *, quarantine: bool = False) -> Batch:
    """Decode bytes made by :func:`encode_batch` (schema version 2, or 1).

    Raises :class:`WireDecodeError` (and nothing else) when the bytes are truncated, not a
    batch, of an unknown schema version or kind, have a bad header, or — unless ``quarantine``
    — hold a record that fails validation. With ``quarantine`` such records are left out and
    listed in :attr:`Batch.rejected` as ``(index, reason)``.
    """
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise WireDecodeError(f"truncated batch: {len(data)} bytes, the header alone is 4")
    magic, version, kind_code = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireDecodeError(f"not an edgeloop batch: magic {magic!r}, expected {MAGIC!r}")
    if version not in READABLE_VERSIONS:
        raise WireDecodeError(
            f"unsupported schema version {version}; this build reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        kind = Kind(kind_code)
    except ValueError:
        raise WireDecodeError(f"unknown record kind {kind_code}") from None
    if len(data) > MAX_BATCH_BYTES:
        raise WireDecodeError(f"batch of {len(data)} bytes exceeds the {MAX_BATCH_BYTES} limit")
    bigints: list[int] = []

    def ext_hook(code: int, payload: bytes) -> Any:
        bigints.append(code)
        return _ext_hook(code, payload)

    try:
        body = msgpack.unpackb(
            data[_HEADER.size :],
            raw=False,
            ext_hook=ext_hook,
            strict_map_key=False,
        )
    except WireDecodeError:
        raise
    except Exception as exc:
        raise WireDecodeError(f"corrupt {kind.name} batch body: {exc}") from exc
    size = 5 if version == 1 else 6
    if not isinstance(body, list) or len(body) != size:
        raise WireDecodeError(
            f"corrupt {kind.name} batch: body is not a {size}-element array (version {version})"
        )
    if version == 1:
        agent_id, batch_seq, created_ns, table, rows = body
        incarnation = ""
    else:
        agent_id, incarnation, batch_seq, created_ns, table, rows = body
    if not isinstance(table, list) or not all(isinstance(s, str) for s in table):
        raise WireDecodeError("corrupt batch: the string table is not a list of strings")
    if not isinstance(rows, list):
        raise WireDecodeError("corrupt batch: records are not an array")
    try:
        header = Batch(agent_id, batch_seq, kind, (), created_ns, incarnation)
    except (RecordError, ValueError) as exc:
        raise WireDecodeError(f"corrupt batch header: {exc}") from exc
    fast = _FAST.get(kind)
    if fast is not None and rows and not bigints:
        fast_records = fast(rows, table)
        if fast_records is not None:
            _BATCH_SET[3](header, fast_records)  # the validated header, with its records
            return header
    dec = _DECODERS[kind]
    records: list[Record] = []
    rejected: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, list):
                raise TypeError("record is not an array")
            records.append(dec(row, table))
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            if not quarantine:
                raise WireDecodeError(f"corrupt {kind.name} record #{i}: {exc}") from exc
            rejected.append((i, f"{kind.name} record #{i}: {exc}"))
    _BATCH_SET[3](header, records)
    if rejected:
        _BATCH_SET[6](header, tuple(rejected))
    return header
