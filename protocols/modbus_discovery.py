"""``edgeloop discover modbus://host:port``: which units answer, what they map, what it looks like.

1. **Probe.** For each unit id and each table (holding, input, coil, discrete) the address range is
   read in the largest chunks the protocol allows (125 registers, 2000 bits). A chunk answered with
   "illegal data address" (or "illegal data value", which some devices use for the same thing) is
   halved until the readable runs around the holes are found: a mapped area costs one request per
   chunk, a hole costs about two requests per unmapped address at worst. A unit that does not
   answer, or that a gateway reports unreachable (exception 10/11) or failing (4), is skipped at
   its first probe. The whole probe stops after :data:`PROBE_BUDGET_S` seconds, noted in the report.
2. **Observe.** The readable runs are read again for ``--seconds`` (coalesced, like the
   connector) to see how often values change and their range.
3. **Guess types.** Bits are bool. Registers are int16 unless a run of registers holds printable
   text (string) or a register pair consistently decodes to a plausible float32 (ABCD). These are
   guesses, said so in the report: check them against the device manual.
4. **Report** a table and a starter :class:`~protocols.modbus.ModbusConfig` (as a dict) that the
   agent accepts as one entry of ``connectors``.

URL: ``modbus://host[:port]`` (Modbus TCP, port 502 by default); ``?framing=rtu`` for RTU frames
over TCP.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from protocols.discovery import DiscoveredPoint, DiscoverOptions, DiscoveryReport
from protocols.modbus import ModbusConfig
from protocols.modbus_codec import MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ

__all__ = ["PROBE_BUDGET_S", "discover"]

PROBE_BUDGET_S = 60.0
TABLES = ("holding", "input", "coil", "discrete")
PREFIX = {"holding": "hr", "input": "ir", "coil": "co", "discrete": "di"}
_ABSENT_CODES = {4, 10, 11}  # device failure, gateway path unavailable, gateway target silent
_HOLE_CODES = {2, 3}  # illegal data address, illegal data value


class _Absent(Exception):
    """The unit does not answer (or its gateway says it is unreachable)."""


class _OutOfTime(Exception):
    pass


class _NoTable(Exception):
    """The device answered "illegal function": it has no such table."""


@dataclass
class _Run:
    table: str
    start: int
    values: list[int]  # first snapshot: registers, or bits as 0/1

    @property
    def end(self) -> int:
        return self.start + len(self.values)


@dataclass
class _Series:
    """Samples of one address (or a multi-register value) over the observation window."""

    attempts: int = 0
    values: list[Any] = field(default_factory=list)


def _parse_url(url: str) -> tuple[str, int, FramerType]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise click.BadParameter(f"expected modbus://host[:port], got {url!r}")
    framing = parse_qs(parts.query).get("framing", ["socket"])[0]
    if framing not in ("socket", "rtu"):
        raise click.BadParameter(f"framing must be socket or rtu, got {framing!r} in {url!r}")
    return (
        parts.hostname,
        parts.port or 502,
        FramerType.SOCKET if framing == "socket" else FramerType.RTU,
    )


class _Prober:
    def __init__(self, client: AsyncModbusTcpClient, deadline: float) -> None:
        self.client = client
        self.deadline = deadline
        self.requests = 0

    async def read(self, unit: int, table: str, address: int, count: int) -> ModbusPDU:
        if time.monotonic() > self.deadline:
            raise _OutOfTime
        fn: Callable[..., Awaitable[ModbusPDU]] = {
            "holding": self.client.read_holding_registers,
            "input": self.client.read_input_registers,
            "coil": self.client.read_coils,
            "discrete": self.client.read_discrete_inputs,
        }[table]
        self.requests += 1
        try:
            return await fn(address, count=count, device_id=unit)
        except ModbusException as exc:
            if not self.client.connected:
                raise click.ClickException(f"connection lost while probing: {exc}") from None
            raise _Absent(str(exc)) from None

    async def scan(self, unit: int, table: str, lo: int, hi: int) -> tuple[list[_Run], bool]:
        """Readable runs of ``table`` in ``lo..hi``; and whether the unit answered at all."""
        limit = MAX_BITS_PER_READ if table in ("coil", "discrete") else MAX_REGISTERS_PER_READ
        runs: list[_Run] = []
        answered = False

        async def probe(a: int, n: int) -> None:
            nonlocal answered
            r = await self.read(unit, table, a, n)
            if not r.isError():
                answered = True
                vals = (
                    [int(b) for b in r.bits[:n]] if table in ("coil", "discrete") else r.registers
                )
                if runs and runs[-1].end == a:
                    runs[-1].values.extend(vals)
                else:
                    runs.append(_Run(table, a, list(vals)))
                return
            code = int(getattr(r, "exception_code", 0))
            if code == 1:  # illegal function: the device has no such table
                answered = True
                raise _NoTable
            if code in _ABSENT_CODES:
                raise _Absent(f"exception {code}")
            if code in _HOLE_CODES:
                answered = True
                if n > 1:
                    half = n // 2
                    await probe(a, half)
                    await probe(a + half, n - half)
            # any other code: treat the chunk as unreadable

        a = lo
        try:
            while a <= hi:
                n = min(limit, hi - a + 1)
                await probe(a, n)
                a += n
        except _NoTable:
            pass
        return runs, answered


def _text(word: int) -> bool:
    return 0x20 <= word >> 8 < 0x7F and 0x20 <= word & 0xFF < 0x7F


def _text_end(word: int) -> bool:
    """The last word of an odd-length string: one character, then NUL."""
    return 0x20 <= word >> 8 < 0x7F and word & 0xFF == 0


def _float32(hi: int, lo: int) -> float:
    value: float = struct.unpack(">f", struct.pack(">HH", hi, lo))[0]
    return value


def _plausible_float(hi: int, lo: int) -> bool:
    v = _float32(hi, lo)
    return math.isfinite(v) and 1e-3 <= abs(v) <= 1e7


def _nice_float(hi: int, lo: int) -> bool:
    v = _float32(hi, lo)
    return _float32(*struct.unpack(">HH", struct.pack(">f", float(f"{v:.6g}")))) == v


def _guess(run: _Run, samples: list[list[int]]) -> list[tuple[int, str, int]]:
    """(address, type, width) of each value in a register run, from all its samples."""
    out: list[tuple[int, str, int]] = []
    n = len(run.values)
    i = 0
    while i < n:
        # text: >= 2 registers of printable characters (no NUL inside) with >= 3 letters,
        # in every sample, then the NUL padding
        j = i
        while j < n and all(_text(s[j]) for s in samples):
            j += 1
        if j < n and j > i and all(_text_end(s[j]) for s in samples):
            j += 1
        text = bytes(b for w in run.values[i:j] for b in (w >> 8, w & 0xFF) if b)
        if j - i >= 2 and sum(chr(b).isalpha() for b in text) >= 3:
            while j < n and all(s[j] == 0 for s in samples):
                j += 1
            out.append((run.start + i, "string", j - i))
            i = j
            continue
        if i + 1 < n:
            pairs = [(s[i], s[i + 1]) for s in samples]
            his = {p[0] for p in pairs}
            los = {p[1] for p in pairs}
            live = len(los) > 1 and len(his) <= len(los)
            if all(_plausible_float(*p) for p in pairs) and (
                all(_nice_float(*p) for p in pairs) or live
            ):
                out.append((run.start + i, "float32", 2))
                i += 2
                continue
        out.append((run.start + i, "int16", 1))
        i += 1
    return out


def _decode(table: str, kind: str, regs: list[int]) -> Any:
    if table in ("coil", "discrete"):
        return bool(regs[0])
    if kind == "string":
        return bytes(b for w in regs for b in (w >> 8, w & 0xFF)).rstrip(b"\0").decode("latin-1")
    if kind == "float32":
        return _float32(regs[0], regs[1])
    return regs[0] - 0x10000 if regs[0] & 0x8000 else regs[0]


async def _observe(
    prober: _Prober, unit: int, runs: list[_Run], seconds: float
) -> tuple[dict[tuple[str, int], list[list[int] | None]], float]:
    """Samples of every run (None where the read failed), for ``seconds``."""
    samples: dict[tuple[str, int], list[list[int] | None]] = {
        (r.table, r.start): [list(r.values)] for r in runs
    }
    reads: list[tuple[_Run, int, int]] = []
    for r in runs:
        limit = MAX_BITS_PER_READ if r.table in ("coil", "discrete") else MAX_REGISTERS_PER_READ
        reads += [(r, a, min(limit, r.end - a)) for a in range(r.start, r.end, limit)]
    t0 = time.monotonic()
    period = max(0.1, min(1.0, seconds / 20))
    while time.monotonic() - t0 < seconds:
        tick = time.monotonic()
        got: dict[tuple[str, int], list[int] | None] = {k: [] for k in samples}
        for r, a, n in reads:
            key = (r.table, r.start)
            try:
                resp = await prober.read(unit, r.table, a, n)
            except (_Absent, _OutOfTime):
                resp = None
            part = got[key]
            if resp is None or resp.isError() or part is None:
                got[key] = None
                continue
            part.extend(
                [int(b) for b in resp.bits[:n]]
                if r.table in ("coil", "discrete")
                else resp.registers
            )
        for key, vals in got.items():
            samples[key].append(vals)
        await asyncio.sleep(max(0.0, period - (time.monotonic() - tick)))
    return samples, max(time.monotonic() - t0, 1e-9)


async def discover(url: str, options: DiscoverOptions) -> DiscoveryReport:
    """Probe, observe and describe a Modbus TCP device or gateway (see the module docstring)."""
    host, port, framer = _parse_url(url)
    lo, hi = options.address_range
    client = AsyncModbusTcpClient(
        host, port=port, framer=framer, reconnect_delay=0, timeout=options.timeout, retries=0
    )
    if not await client.connect():
        raise click.ClickException(f"cannot connect to {host}:{port} (modbus)")
    report = DiscoveryReport(source=url, kind="modbus")
    prober = _Prober(client, time.monotonic() + PROBE_BUDGET_S)
    devices: list[dict[str, Any]] = []
    absent: list[int] = []
    try:
        for unit in options.units:
            unit_runs: list[_Run] = []
            answered = False
            try:
                for table in TABLES:
                    runs, ok = await prober.scan(unit, table, lo, hi)
                    unit_runs += runs
                    answered = answered or ok
            except _Absent:
                pass
            except _OutOfTime:
                report.notes.append(
                    f"probe stopped after {PROBE_BUDGET_S:.0f} s at unit {unit}; "
                    "narrow --units/--range for a complete map"
                )
                break
            if not answered or not unit_runs:
                absent.append(unit)
                continue
            samples, elapsed = await _observe(prober, unit, unit_runs, options.seconds)
            devices.append(_describe_unit(report, unit, unit_runs, samples, elapsed))
    finally:
        client.close()
    if absent:
        report.notes.append(
            f"no readable data in {lo}-{hi} at unit(s) {', '.join(map(str, absent))}"
        )
    report.notes.append(
        f"{prober.requests} requests; register types are guesses (int16 unless text or a "
        "plausible float32 pair): check them against the device manual"
    )
    if devices:
        cfg = ModbusConfig.model_validate(
            {
                "name": f"modbus-{host}-{port}",
                "transport": {
                    "type": "tcp",
                    "host": host,
                    "port": port,
                    "framing": "socket" if framer == FramerType.SOCKET else "rtu",
                },
                "timeout": options.timeout,
                "devices": devices,
            }
        )
        body = cfg.model_dump(mode="json", exclude_defaults=True)
        # the discriminators must be explicit even where they equal the default
        body["transport"] = {"type": "tcp", **body["transport"]}
        report.starter_config = {"kind": "modbus", **body}
    return report


def _describe_unit(
    report: DiscoveryReport,
    unit: int,
    runs: list[_Run],
    samples: dict[tuple[str, int], list[list[int] | None]],
    elapsed: float,
) -> dict[str, Any]:
    asset = f"unit{unit}"
    points: list[dict[str, Any]] = []
    for run in runs:
        series = samples[(run.table, run.start)]
        good = [s for s in series if s is not None and len(s) == len(run.values)]
        bad_share = 1 - len(good) / len(series) if series else 0.0
        if run.table in ("coil", "discrete"):
            layout = [(run.start + i, "bool", 1) for i in range(len(run.values))]
        else:
            layout = _guess(run, good or [run.values])
        for address, kind, width in layout:
            k = address - run.start
            values = [_decode(run.table, kind, s[k : k + width]) for s in good]
            changes = sum(1 for a, b in itertools.pairwise(values) if a != b)
            numeric = [float(v) for v in values if isinstance(v, int | float)]
            tag = f"{PREFIX[run.table]}{address}"
            span = f"{address}" if width == 1 else f"{address}-{address + width - 1}"
            report.points.append(
                DiscoveredPoint(
                    asset=asset,
                    tag=tag,
                    address=f"{PREFIX[run.table]}:{span}@unit{unit}",
                    type=kind if kind != "string" else f"string[{width}]",
                    samples=len(values),
                    rate_hz=changes / elapsed if len(values) > 1 else None,
                    minimum=min(numeric) if numeric else None,
                    maximum=max(numeric) if numeric else None,
                    bad_share=bad_share,
                    example=repr(values[-1]) if values else "",
                )
            )
            point: dict[str, Any] = {"tag": tag, "table": run.table, "address": address}
            if run.table not in ("coil", "discrete"):
                point["type"] = kind
            if kind == "string":
                point["length"] = width
            points.append(point)
    return {"unit_id": unit, "asset": asset, "poll_interval": 1.0, "points": points}
