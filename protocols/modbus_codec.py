"""The pure half of the Modbus connector: register values <-> Python values, and read planning.

Nothing here does I/O, so every rule can be unit-tested on its own.

**Byte and word order.** A value of more than one register is the canonical big-endian byte string
``A B C D ...`` (A most significant). ``byte_order`` says how the two bytes sit inside each 16-bit
register, ``word_order`` how the registers follow each other:

========== ========== ====== ==========================================
byte_order word_order name   registers of float32 1.0 (0x3F800000)
========== ========== ====== ==========================================
big        big        ABCD   ``[0x3F80, 0x0000]`` (Modbus standard)
big        little     CDAB   ``[0x0000, 0x3F80]`` (common in PLCs)
little     big        BADC   ``[0x803F, 0x0000]``
little     little     DCBA   ``[0x0000, 0x803F]``
========== ========== ====== ==========================================

Strings use ``byte_order`` only (first character in the high byte when big) and ignore
``word_order``; trailing NUL bytes are stripped.

**Read planning.** :func:`plan_reads` merges the spans a device needs from one table into the
fewest read requests: spans are sorted by address and grouped greedily while the group stays within
the per-request limit (125 registers, 2000 bits) and every unrequested hole inside it is at most
``max_gap`` long. Greedy left-to-right grouping is optimal for this problem: any contiguous
subgroup of a feasible group is feasible, so extending the current group as far as possible never
costs a request.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BIT_TABLES",
    "MAX_BITS_PER_READ",
    "MAX_REGISTERS_PER_READ",
    "MAX_REGISTERS_PER_WRITE",
    "REGISTER_TABLES",
    "DataType",
    "DecodeError",
    "EncodeError",
    "Order",
    "ReadBlock",
    "Span",
    "Table",
    "apply_scale",
    "decode_registers",
    "encode_value",
    "invert_scale",
    "make_decoder",
    "plan_reads",
    "register_width",
]

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal[
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "bool",
    "bit",
    "string",
]
Order = Literal["big", "little"]

REGISTER_TABLES: frozenset[str] = frozenset({"holding", "input"})
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})
MAX_REGISTERS_PER_READ = 125  # Modbus spec: FC3/FC4 quantity 1..125
MAX_BITS_PER_READ = 2000  # Modbus spec: FC1/FC2 quantity 1..2000
MAX_REGISTERS_PER_WRITE = 123  # Modbus spec: FC16 quantity 1..123

_STRUCT: dict[str, str] = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
_WIDTH: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
    "bool": 1,
    "bit": 1,
}
INTEGER_TYPES: frozenset[str] = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
FLOAT_TYPES: frozenset[str] = frozenset({"float32", "float64"})
_INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38


class DecodeError(ValueError):
    """Registers that cannot be turned into the configured value (e.g. invalid UTF-8)."""


class EncodeError(ValueError):
    """A value that cannot be written as the configured type (wrong type, out of range)."""


def register_width(data_type: str, length: int | None = None) -> int:
    """Registers one value of ``data_type`` occupies (``length`` for strings)."""
    if data_type == "string":
        if not length or length < 1:
            raise ValueError("a string needs its length in registers (>= 1)")
        return length
    return _WIDTH[data_type]


# --- register words <-> bytes ----------------------------------------------------------


def _to_bytes(regs: Sequence[int], byte_order: str, word_order: str) -> bytes:
    words = regs if word_order == "big" else list(reversed(regs))
    out = bytearray(2 * len(words))
    if byte_order == "big":
        for i, w in enumerate(words):
            out[2 * i] = w >> 8
            out[2 * i + 1] = w & 0xFF
    else:
        for i, w in enumerate(words):
            out[2 * i] = w & 0xFF
            out[2 * i + 1] = w >> 8
    return bytes(out)


def _from_bytes(data: bytes, byte_order: str, word_order: str) -> list[int]:
    if byte_order == "big":
        words = [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]
    else:
        words = [data[i] | (data[i + 1] << 8) for i in range(0, len(data), 2)]
    return words if word_order == "big" else words[::-1]


# --- decoding ---------------------------------------------------------------------------


def decode_registers(
    regs: Sequence[int],
    data_type: str,
    *,
    byte_order: str = "big",
    word_order: str = "big",
    bit: int | None = None,
    encoding: str = "utf-8",
) -> bool | int | float | str:
    """Decode the registers of one value (exactly ``register_width`` of them).

    Raises :class:`DecodeError` when the registers do not hold a valid value of the type (only
    strings can fail: integer and float bit patterns are always valid, NaN included).
    """
    if data_type == "bit":
        assert bit is not None
        word = regs[0] if byte_order == "big" else ((regs[0] & 0xFF) << 8) | (regs[0] >> 8)
        return bool((word >> bit) & 1)
    if data_type == "bool":
        return regs[0] != 0
    if data_type == "string":
        raw = _to_bytes(regs, byte_order, "big").rstrip(b"\x00")
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DecodeError(
                f"registers {[f'0x{r:04X}' for r in regs]} are not valid {encoding}: {exc.reason} "
                f"at byte {exc.start}"
            ) from None
    fmt = _STRUCT[data_type]
    value: int | float = struct.unpack(">" + fmt, _to_bytes(regs, byte_order, word_order))[0]
    return value


def apply_scale(raw: int | float, scale: float, offset: float) -> int | float:
    """Engineering value: ``raw * scale + offset`` (integers stay integers when unscaled)."""
    if scale == 1.0 and offset == 0.0:
        return raw
    return raw * scale + offset


def make_decoder(
    data_type: str,
    *,
    byte_order: str = "big",
    word_order: str = "big",
    bit: int | None = None,
    length: int | None = None,
    encoding: str = "utf-8",
    scale: float = 1.0,
    offset: float = 0.0,
) -> Callable[[Sequence[int], int], bool | int | float | str]:
    """A fast ``decode(block_registers, index)`` for one point, with scale/offset applied.

    The hot path of every poll: the common one-register cases avoid ``struct`` entirely.
    """
    width = register_width(data_type, length)
    unscaled = scale == 1.0 and offset == 0.0
    if data_type in ("uint16", "int16") and byte_order == "big":
        signed = data_type == "int16"
        if unscaled:
            if signed:
                return lambda regs, i: regs[i] - 0x10000 if regs[i] & 0x8000 else regs[i]
            return lambda regs, i: regs[i]
        if signed:
            return lambda regs, i: (
                (regs[i] - 0x10000 if regs[i] & 0x8000 else regs[i]) * scale + offset
            )
        return lambda regs, i: regs[i] * scale + offset
    if data_type in ("bool", "bit", "string"):

        def decode_plain(regs: Sequence[int], i: int) -> bool | int | float | str:
            return decode_registers(
                regs[i : i + width],
                data_type,
                byte_order=byte_order,
                word_order=word_order,
                bit=bit,
                encoding=encoding,
            )

        return decode_plain
    unpack = struct.Struct(">" + _STRUCT[data_type]).unpack

    def decode_number(regs: Sequence[int], i: int) -> int | float:
        raw: int | float = unpack(_to_bytes(regs[i : i + width], byte_order, word_order))[0]
        return raw if unscaled else raw * scale + offset

    return decode_number


# --- encoding (writes) -----------------------------------------------------------------


def invert_scale(value: float, data_type: str, scale: float, offset: float) -> int | float:
    """The raw register value for engineering ``value``; integers must land on an integer.

    Raises :class:`EncodeError` when the result is not representable in ``data_type``.
    """
    raw = value if scale == 1.0 and offset == 0.0 else (value - offset) / scale
    if data_type in INTEGER_TYPES:
        if not math.isfinite(raw):
            raise EncodeError(f"{value!r} is not a finite number; {data_type} needs one")
        nearest = round(raw)
        if abs(raw - nearest) > 1e-6 * max(1.0, abs(raw)):
            raise EncodeError(
                f"{value!r} is not representable as {data_type} with scale {scale} and offset "
                f"{offset} (raw value {raw!r} is not an integer)"
            )
        lo, hi = _INT_RANGE[data_type]
        if not lo <= nearest <= hi:
            raise EncodeError(
                f"{value!r} is out of range: raw value {nearest} outside {data_type} {lo}..{hi}"
            )
        return int(nearest)
    if data_type == "float32" and math.isfinite(raw) and abs(raw) > _FLOAT32_MAX:
        raise EncodeError(f"{value!r} is out of range for float32 (|x| <= {_FLOAT32_MAX:.4g})")
    return float(raw)


def encode_value(
    value: object,
    data_type: str,
    *,
    byte_order: str = "big",
    word_order: str = "big",
    length: int | None = None,
    encoding: str = "utf-8",
    scale: float = 1.0,
    offset: float = 0.0,
) -> list[int]:
    """Registers to write for ``value`` (scale/offset inverted). Bits are not handled here.

    Raises :class:`EncodeError` naming what was wrong (type, range, string length).
    """
    if data_type in ("bool", "bit"):
        raise EncodeError(f"{data_type} values are written as bits, not registers")
    if data_type == "string":
        if not isinstance(value, str):
            raise EncodeError(f"expected a string, got {type(value).__name__} {value!r}")
        width = register_width("string", length)
        try:
            data = value.encode(encoding)
        except UnicodeEncodeError as exc:
            raise EncodeError(f"{value!r} cannot be encoded as {encoding}: {exc.reason}") from None
        if len(data) > 2 * width:
            raise EncodeError(
                f"string of {len(data)} bytes does not fit {width} registers ({2 * width} bytes)"
            )
        return _from_bytes(data.ljust(2 * width, b"\x00"), byte_order, "big")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EncodeError(
            f"expected a number for {data_type}, got {type(value).__name__} {value!r}"
        )
    raw = invert_scale(
        float(value) if isinstance(value, float) else value, data_type, scale, offset
    )
    try:
        data = struct.pack(">" + _STRUCT[data_type], raw)
    except (struct.error, OverflowError) as exc:
        raise EncodeError(f"{value!r} cannot be packed as {data_type}: {exc}") from None
    return _from_bytes(data, byte_order, word_order)


# --- read planning ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """One point's need from a table: ``width`` registers (or bits) from ``address``."""

    key: Hashable
    address: int
    width: int

    @property
    def end(self) -> int:
        return self.address + self.width


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: ``count`` registers/bits of ``table`` from ``address``."""

    table: str
    address: int
    count: int
    members: tuple[Span, ...]

    @property
    def end(self) -> int:
        return self.address + self.count


def plan_reads(
    table: str, spans: Sequence[Span], *, max_gap: int, max_count: int | None = None
) -> list[ReadBlock]:
    """The fewest read requests covering every span, sorted by address.

    Each span lands in exactly one block and wholly inside it; no block is longer than
    ``max_count`` (default: the Modbus limit for the table); no hole of unrequested addresses
    inside a block is longer than ``max_gap``. Raises ``ValueError`` for a span longer than
    ``max_count`` (it could never be read in one request).
    """
    if max_count is None:
        max_count = MAX_BITS_PER_READ if table in BIT_TABLES else MAX_REGISTERS_PER_READ
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    ordered = sorted(spans, key=lambda s: (s.address, s.end))
    blocks: list[ReadBlock] = []
    members: list[Span] = []
    start = end = 0
    for span in ordered:
        if span.width > max_count:
            raise ValueError(
                f"{span.key!r}: {span.width} {'bits' if table in BIT_TABLES else 'registers'} "
                f"exceed the {max_count} one request can read"
            )
        if members and span.address - end <= max_gap and max(end, span.end) - start <= max_count:
            members.append(span)
            end = max(end, span.end)
            continue
        if members:
            blocks.append(ReadBlock(table, start, end - start, tuple(members)))
        members = [span]
        start, end = span.address, span.end
    if members:
        blocks.append(ReadBlock(table, start, end - start, tuple(members)))
    return blocks
