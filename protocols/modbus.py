"""Modbus connector: TCP, RTU over TCP and serial RTU, with read coalescing and one request queue.

Data flow for one connection::

    device pollers (one task per unit id, own interval) ──┐
                                                          ├─▶ RequestQueue ─▶ pymodbus client ─▶ line
    write(tag, value) (jumps the queue) ──────────────────┘     (one request in flight)

* Every device's points are planned into the fewest read requests per table
  (:func:`protocols.modbus_codec.plan_reads`), once, at construction.
* All requests of a connection go through one :class:`RequestQueue`: a serial line or a TCP gateway
  answers one request at a time, and writes must not wait behind a long poll cycle. A write is
  queued ahead of every waiting read but never interrupts the request in flight.
* A Modbus exception response (illegal address, device failure, ...) turns the points of that one
  block into ``Quality.BAD`` readings with the exception code in ``Reading.status``; the other blocks
  are unaffected. A unit that stops answering gets one bad-quality reading per point (on the
  transition, not every poll) and is polled with the connector's backoff until it answers again.
  A lost connection does the same for every unit and is re-established by the base class
  supervisor with :class:`~protocols.base.BackoffConfig`.
* Values the device sends that cannot be decoded (a string register holding invalid UTF-8) are
  counted as malformed and delivered as bad quality with :data:`STATUS_DECODE_ERROR`.

Status codes in ``Reading.status``: 0 good; 1..255 the device's Modbus exception code;
:data:`STATUS_NO_RESPONSE`, :data:`STATUS_DISCONNECTED`, :data:`STATUS_DECODE_ERROR` for conditions
the protocol has no code for.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TypeVar, cast

from prometheus_client import Counter, Histogram
from pydantic import Field, model_validator
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from protocols.base import (
    WRITES,
    Backoff,
    Connector,
    ConnectorConfig,
    ConnectorError,
    ConnectorState,
    PointSet,
    ReadingColumns,
    WriteError,
)
from protocols.modbus_codec import (
    BIT_TABLES,
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    MAX_REGISTERS_PER_WRITE,
    DataType,
    DecodeError,
    EncodeError,
    Order,
    ReadBlock,
    Span,
    Table,
    encode_value,
    make_decoder,
    plan_reads,
    register_width,
)
from shared.config import ConfigModel
from shared.records import Quality, Reading, Value, trusted_reading

__all__ = [
    "STATUS_DECODE_ERROR",
    "STATUS_DISCONNECTED",
    "STATUS_NO_RESPONSE",
    "ModbusConfig",
    "ModbusConnector",
    "ModbusDevice",
    "ModbusPoint",
    "RequestQueue",
    "SerialTransport",
    "TcpTransport",
]

#: ``Reading.status`` when the unit did not answer within timeout and retries.
STATUS_NO_RESPONSE = 0x100
#: ``Reading.status`` when the connection to the device or gateway is lost.
STATUS_DISCONNECTED = 0x101
#: ``Reading.status`` when the registers could not be decoded as the configured type.
STATUS_DECODE_ERROR = 0x102

ILLEGAL_DATA_ADDRESS = 2

REQUESTS = Counter(
    "edgeloop_modbus_requests_total",
    "Modbus requests by outcome (ok, exception, no_response)",
    ["connector", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "edgeloop_modbus_request_seconds",
    "Modbus request round trip, queue wait excluded",
    ["connector"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)

# --- configuration ---------------------------------------------------------------------


class TcpTransport(ConfigModel):
    """Modbus TCP (MBAP framing), or RTU frames carried over TCP (serial-to-Ethernet bridges)."""

    type: Literal["tcp"] = "tcp"
    host: str = Field(..., min_length=1)
    port: int = Field(502, ge=1, le=65535)
    framing: Literal["socket", "rtu"] = Field(
        "socket", description="socket = Modbus TCP (MBAP header); rtu = RTU frames over TCP"
    )


class SerialTransport(ConfigModel):
    """Modbus RTU on a serial line (RS-485/RS-232)."""

    type: Literal["serial"] = "serial"
    port: str = Field(..., min_length=1, description="Serial device, e.g. /dev/ttyUSB0")
    baudrate: int = Field(19200, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


Transport = Annotated[TcpTransport | SerialTransport, Field(discriminator="type")]


class ModbusPoint(ConfigModel):
    """One value on a device, mapped to an asset/tag."""

    tag: str = Field(..., min_length=1)
    asset: str | None = Field(None, min_length=1, description="Defaults to the device's asset")
    table: Table = "holding"
    address: int = Field(..., ge=0, le=65535, description="0-based protocol address")
    type: DataType | None = Field(
        None, description="Default: int16 for registers, bool for coils and discrete inputs"
    )
    bit: int | None = Field(None, ge=0, le=15, description="Bit index (0 = LSB) for type bit")
    length: int | None = Field(
        None, ge=1, le=MAX_REGISTERS_PER_READ, description="String length in registers"
    )
    byte_order: Order | None = Field(None, description="Default: the device's byte_order")
    word_order: Order | None = Field(None, description="Default: the device's word_order")
    encoding: str = "utf-8"
    scale: float = 1.0
    offset: float = 0.0
    writable: bool = False
    unit: str = Field("", description="Engineering unit (documentation only)")

    @model_validator(mode="after")
    def _check(self) -> ModbusPoint:
        bits = self.table in BIT_TABLES
        if self.type is None:
            self.type = "bool" if bits else "int16"
        if bits and self.type != "bool":
            raise ValueError(f"{self.table} points hold single bits: type must be bool")
        if self.type == "bit" and self.bit is None:
            raise ValueError("type bit needs bit: 0..15 (0 = least significant)")
        if self.type != "bit" and self.bit is not None:
            raise ValueError(f"bit is only for type bit, not {self.type}")
        if self.type == "string" and self.length is None:
            raise ValueError("type string needs length (registers, 2 bytes each)")
        if self.type != "string" and self.length is not None:
            raise ValueError(f"length is only for type string, not {self.type}")
        if self.writable and self.table in ("input", "discrete"):
            raise ValueError(f"{self.table} is a read-only table: writable must be false")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        if self.type in ("bool", "bit", "string") and (self.scale != 1 or self.offset != 0):
            raise ValueError(f"scale and offset apply to numbers, not {self.type}")
        width = register_width(self.type, self.length)
        if self.address + width > 65536:
            raise ValueError(f"address {self.address} + {width} registers runs past 65535")
        try:
            "".encode(self.encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {self.encoding!r}") from None
        return self

    @property
    def width(self) -> int:
        assert self.type is not None
        return register_width(self.type, self.length)


class ModbusDevice(ConfigModel):
    """One unit id on the connection, polled at its own interval."""

    unit_id: int = Field(1, ge=0, le=255)
    asset: str = Field(..., min_length=1)
    poll_interval: float = Field(1.0, ge=0, description="Seconds between polls (0 = back to back)")
    byte_order: Order = "big"
    word_order: Order = "big"
    max_gap: int | None = Field(
        None, ge=0, description="Default: the connection's max_gap (registers)"
    )
    points: list[ModbusPoint] = Field(..., min_length=1)


class ModbusConfig(ConnectorConfig):
    """A Modbus connection (TCP, RTU over TCP or serial RTU) and the devices behind it."""

    kind: Literal["modbus"] = "modbus"
    transport: Transport
    timeout: float = Field(1.0, gt=0, description="Seconds to wait for each response")
    retries: int = Field(1, ge=0, le=10, description="Resends after a timeout, per request")
    max_gap: int = Field(
        8, ge=0, le=MAX_REGISTERS_PER_READ, description="Unused registers a read may span"
    )
    max_bit_gap: int = Field(
        64, ge=0, le=MAX_BITS_PER_READ, description="Unused coils/discretes a read may span"
    )
    max_registers_per_read: int = Field(MAX_REGISTERS_PER_READ, ge=1, le=MAX_REGISTERS_PER_READ)
    max_bits_per_read: int = Field(MAX_BITS_PER_READ, ge=1, le=MAX_BITS_PER_READ)
    devices: list[ModbusDevice] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ModbusConfig:
        seen: dict[tuple[str, str], str] = {}
        units: set[int] = set()
        for d, dev in enumerate(self.devices):
            if dev.unit_id in units:
                raise ValueError(
                    f"devices[{d}]: unit_id {dev.unit_id} appears twice; "
                    "put all its points in one device"
                )
            units.add(dev.unit_id)
            for p, point in enumerate(dev.points):
                key = (point.asset or dev.asset, point.tag)
                where = f"devices[{d}].points[{p}]"
                if key in seen:
                    raise ValueError(f"{where}: asset/tag {key[0]}/{key[1]} already at {seen[key]}")
                seen[key] = where
                if point.table not in BIT_TABLES and point.width > self.max_registers_per_read:
                    raise ValueError(
                        f"{where}: {point.width} registers exceed "
                        f"max_registers_per_read {self.max_registers_per_read}"
                    )
        return self


# --- readings on the hot path ------------------------------------------------------------

#: A good-quality reading built without re-running its field checks: every field is valid by
#: construction (asset and tag checked by the config, ``ts_ns`` from ``time.time_ns()``, the value
#: from the codec). Validating again cost 4x the time of a 100-register poll's decoding (see
#: bench/bench_modbus.py); the result is an ordinary, equal ``Reading``.
_good = trusted_reading


# --- the request queue ---------------------------------------------------------------------

T = TypeVar("T")

WRITE_PRIORITY = 0
READ_PRIORITY = 1


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    run: Callable[[], Awaitable[Any]] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)


class RequestQueue:
    """One connection's requests, one at a time; writes go ahead of waiting reads.

    ``submit`` returns what the request returned, or raises what it raised. A request already
    running is never interrupted by a newer one, whatever its priority. ``close`` fails every
    waiting request with ``error``.
    """

    def __init__(self) -> None:
        self._queue: asyncio.PriorityQueue[_Job] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._closed: BaseException | None = None

    async def submit(self, priority: int, run: Callable[[], Awaitable[T]]) -> T:
        if self._closed is not None:
            raise self._closed
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(priority, next(self._seq), run, future))
        return await future

    async def serve(self) -> None:
        """Run requests until cancelled (the connection's single worker)."""
        me = asyncio.current_task()
        assert me is not None
        while True:
            # Python 3.11's asyncio.wait_for (inside pymodbus) can swallow a cancellation that
            # races with the response arriving; the request stays marked, so honour it here.
            if me.cancelling():
                raise asyncio.CancelledError
            job = await self._queue.get()
            if job.future.done():  # its submitter was cancelled while it waited
                continue
            try:
                result = await job.run()
            except asyncio.CancelledError:
                job.future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - handed to the submitter, who decides
                if not job.future.done():
                    job.future.set_exception(exc)
            else:
                if not job.future.done():
                    job.future.set_result(result)

    def close(self, error: BaseException) -> None:
        self._closed = error
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(error)

    def __len__(self) -> int:
        return self._queue.qsize()


# --- the connector -----------------------------------------------------------------------


class _ConnectionLost(ConnectorError):
    """The link to the device or gateway is gone; the supervisor reconnects with backoff."""


class _NoResponse(ConnectorError):
    """The unit did not answer within timeout and retries (the link itself is still up)."""


@dataclass(slots=True)
class _Point:
    asset: str
    tag: str
    config: ModbusPoint
    unit_id: int
    table: str
    address: int
    width: int
    byte_order: str
    word_order: str
    decode: Callable[[Sequence[int], int], bool | int | float | str]


@dataclass(slots=True)
class _Block:
    read: ReadBlock
    # (point, index of its first register/bit in the block's response)
    points: list[tuple[_Point, int]]
    names: PointSet = field(init=False)  # the points' assets and tags, for ReadingColumns

    def __post_init__(self) -> None:
        self.names = PointSet(
            [pt.asset for pt, _ in self.points], [pt.tag for pt, _ in self.points]
        )


@dataclass(slots=True)
class _Device:
    config: ModbusDevice
    points: list[_Point]
    blocks: list[_Block]
    online: bool | None = None  # None: not polled yet


def _compile(config: ModbusConfig) -> list[_Device]:
    devices: list[_Device] = []
    for dev in config.devices:
        points: list[_Point] = []
        for p in dev.points:
            assert p.type is not None
            byte_order = p.byte_order or dev.byte_order
            word_order = p.word_order or dev.word_order
            points.append(
                _Point(
                    asset=p.asset or dev.asset,
                    tag=p.tag,
                    config=p,
                    unit_id=dev.unit_id,
                    table=p.table,
                    address=p.address,
                    width=1 if p.table in BIT_TABLES else p.width,
                    byte_order=byte_order,
                    word_order=word_order,
                    decode=make_decoder(
                        p.type,
                        byte_order=byte_order,
                        word_order=word_order,
                        bit=p.bit,
                        length=p.length,
                        encoding=p.encoding,
                        scale=p.scale,
                        offset=p.offset,
                    ),
                )
            )
        blocks: list[_Block] = []
        for table in ("holding", "input", "coil", "discrete"):
            mine = [pt for pt in points if pt.table == table]
            if not mine:
                continue
            bits = table in BIT_TABLES
            spans = [Span(i, pt.address, pt.width) for i, pt in enumerate(mine)]
            for read in plan_reads(
                table,
                spans,
                max_gap=config.max_bit_gap if bits else (dev.max_gap or config.max_gap),
                max_count=config.max_bits_per_read if bits else config.max_registers_per_read,
            ):
                members = [(mine[cast(int, s.key)], s.address - read.address) for s in read.members]
                blocks.append(_Block(read, members))
        devices.append(_Device(dev, points, blocks))
    return devices


class ModbusConnector(Connector[ModbusConfig]):
    """Polls Modbus devices and writes to them; see the module docstring for the data flow."""

    kind: ClassVar[str] = "modbus"
    config_model: ClassVar[type[ConnectorConfig]] = ModbusConfig

    def __init__(self, config: ModbusConfig) -> None:
        super().__init__(config)
        self._devices = _compile(config)
        self._by_key: dict[str, _Point] = {}
        tag_count: dict[str, int] = {}
        for dev in self._devices:
            for pt in dev.points:
                self._by_key[f"{pt.asset}/{pt.tag}"] = pt
                tag_count[pt.tag] = tag_count.get(pt.tag, 0) + 1
        for dev in self._devices:
            for pt in dev.points:
                if tag_count[pt.tag] == 1:
                    self._by_key.setdefault(pt.tag, pt)
        self._ambiguous = {t for t, n in tag_count.items() if n > 1}
        self._client: ModbusBaseClient | None = None
        self._requests: RequestQueue | None = None
        self._lost = False
        # plain counters for tests and status pages; Prometheus carries the same numbers
        self.requests_total = 0
        self.exceptions_total = 0
        self.no_response_total = 0
        self.splits_total = 0  # coalesced reads split after an illegal-address exception
        self._m_ok = REQUESTS.labels(self.name, "ok")
        self._m_exception = REQUESTS.labels(self.name, "exception")
        self._m_no_response = REQUESTS.labels(self.name, "no_response")
        self._m_seconds = REQUEST_SECONDS.labels(self.name)

    @property
    def read_plan(self) -> dict[int, list[ReadBlock]]:
        """The read requests of one poll, by unit id (what coalescing produced)."""
        return {d.config.unit_id: [b.read for b in d.blocks] for d in self._devices}

    # --- connection ------------------------------------------------------------------

    def _make_client(self) -> ModbusBaseClient:
        cfg = self.config
        t = cfg.transport
        # reconnect_delay=0: pymodbus must not reconnect on its own; the supervisor does, with
        # the configured backoff, so the status and metrics tell the truth.
        if isinstance(t, TcpTransport):
            return AsyncModbusTcpClient(
                t.host,
                port=t.port,
                framer=FramerType.SOCKET if t.framing == "socket" else FramerType.RTU,
                reconnect_delay=0,
                timeout=cfg.timeout,
                retries=cfg.retries,
                name=self.name,
                trace_connect=self._on_connect_change,
            )
        return AsyncModbusSerialClient(
            t.port,
            framer=FramerType.RTU,
            baudrate=t.baudrate,
            bytesize=t.bytesize,
            parity=t.parity,
            stopbits=t.stopbits,
            reconnect_delay=0,
            timeout=cfg.timeout,
            retries=cfg.retries,
            name=self.name,
            trace_connect=self._on_connect_change,
        )

    def _on_connect_change(self, connected: bool) -> None:
        if not connected:
            self._lost = True

    def _where(self) -> str:
        t = self.config.transport
        return f"{t.host}:{t.port}" if isinstance(t, TcpTransport) else t.port

    async def _run(self) -> None:
        client = self._make_client()
        self._client = client
        self._lost = False
        requests = RequestQueue()
        try:
            if not await client.connect():
                raise _ConnectionLost(f"cannot connect to {self._where()}")
            self._requests = requests
            self._set_status(ConnectorState.CONNECTED)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(requests.serve(), name=f"{self.name}:requests")
                for dev in self._devices:
                    tg.create_task(
                        self._poll_device(dev), name=f"{self.name}:unit{dev.config.unit_id}"
                    )
        except _ConnectionLost as exc:
            self._announce_lost(str(exc))
            raise
        except ExceptionGroup as group:
            # a poller or the worker failed (normally _ConnectionLost): every unit is now unknown
            first = _first_leaf(group)
            self._announce_lost(f"{type(first).__name__}: {first}")
            raise first from None
        finally:
            self._requests = None
            requests.close(_ConnectionLost(f"connection to {self._where()} closed"))
            client.close()
            self._client = None

    async def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _announce_lost(self, reason: str) -> None:
        """One bad-quality reading per point of every unit not already known to be down."""
        now = time.time_ns()
        out: list[Reading] = []
        for dev in self._devices:
            if dev.online is not False:
                dev.online = False
                out += [
                    Reading(pt.asset, pt.tag, now, None, Quality.BAD, STATUS_DISCONNECTED)
                    for pt in dev.points
                ]
        self._emit(out)

    # --- requests --------------------------------------------------------------------

    async def _execute(self, request: Callable[[], Awaitable[ModbusPDU]]) -> ModbusPDU:
        """Run one request on the line (called by the queue's worker only)."""
        client = self._client
        if client is None or self._lost or not client.connected:
            raise _ConnectionLost(f"connection to {self._where()} lost")
        t0 = time.perf_counter()
        try:
            response = await request()
        except ConnectionException as exc:
            raise _ConnectionLost(f"connection to {self._where()} lost: {exc}") from None
        except ModbusIOException as exc:
            if self._lost or not client.connected:
                raise _ConnectionLost(f"connection to {self._where()} lost: {exc}") from None
            self.no_response_total += 1
            self._m_no_response.inc()
            raise _NoResponse(str(exc)) from None
        except ModbusException as exc:
            raise _ConnectionLost(f"protocol failure on {self._where()}: {exc}") from None
        self._m_seconds.observe(time.perf_counter() - t0)
        self.requests_total += 1
        if response.isError():
            self.exceptions_total += 1
            self._m_exception.inc()
            self._m_errors.inc()
        else:
            self._m_ok.inc()
        return response

    def _read(self, unit: int, read: ReadBlock) -> Callable[[], Awaitable[ModbusPDU]]:
        client = self._client
        assert client is not None
        fn = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }[read.table]
        return lambda: self._execute(lambda: fn(read.address, count=read.count, device_id=unit))

    # --- polling ---------------------------------------------------------------------

    async def _poll_device(self, dev: _Device) -> None:
        """Poll one unit at its interval; back off while it does not answer."""
        loop = asyncio.get_running_loop()
        interval = dev.config.poll_interval
        backoff = Backoff(self.config.backoff)
        next_at = loop.time()
        while True:
            answered = await self._poll_once(dev)
            now = loop.time()
            if answered:
                backoff.reset()
                next_at += interval
                if next_at < now:  # fell behind (slow line): skip missed polls, never burst
                    next_at = now
            else:
                next_at = now + max(interval, backoff.next_delay())
            await asyncio.sleep(max(0.0, next_at - now))

    async def _poll_once(self, dev: _Device) -> bool:
        """Read every block of one unit; False when the unit did not answer."""
        requests = self._requests
        assert requests is not None
        unit = dev.config.unit_id
        out: list[Reading] = []
        cols: list[ReadingColumns] = []
        i = 0
        while i < len(dev.blocks):
            block = dev.blocks[i]
            try:
                response = await requests.submit(READ_PRIORITY, self._read(unit, block.read))
            except _NoResponse as exc:
                if dev.online is not False:
                    dev.online = False
                    now = time.time_ns()
                    out += [
                        Reading(pt.asset, pt.tag, now, None, Quality.BAD, STATUS_NO_RESPONSE)
                        for pt in dev.points
                    ]
                    self._emit_columns(cols)  # the good reads before it, then the marks
                    self._emit(out)
                    self._set_status(
                        ConnectorState.CONNECTED, error=f"unit {unit}: no response ({exc})"
                    )
                return False
            now = time.time_ns()
            if response.isError():
                code = int(getattr(response, "exception_code", 0)) or 0
                parts = _split(block) if code == ILLEGAL_DATA_ADDRESS else []
                if parts:
                    # The coalesced read spans an address the device does not map (gap fill
                    # crossed a hole). Read its parts separately from now on, starting now.
                    dev.blocks[i : i + 1] = parts
                    self.splits_total += 1
                    continue
                out += [
                    Reading(pt.asset, pt.tag, now, None, Quality.BAD, code)
                    for pt, _ in block.points
                ]
            elif (values := self._decode_values(block, response)) is not None:
                cols.append(
                    ReadingColumns(block.names, now, values)
                )  # readings without a column sink
            else:
                out += self._decode_failed(block, response, now)
            i += 1
        dev.online = True
        self._emit(out)
        self._emit_columns(cols)
        return True

    def _decode_values(self, block: _Block, response: ModbusPDU) -> list[Value] | None:
        """The block's values when all decode; None sends it to :meth:`_decode_failed`."""
        if block.read.table in BIT_TABLES:
            bits = response.bits
            return [bool(bits[i]) for _, i in block.points]
        regs = response.registers
        if len(regs) < block.read.count:
            return None
        try:
            return [pt.decode(regs, i) for pt, i in block.points]
        except DecodeError:
            return None

    def _decode_failed(self, block: _Block, response: ModbusPDU, now: int) -> list[Reading]:
        """A register block that did not decode whole: a short response marks every point bad,
        else each point that fails is bad and its neighbours keep their values (counted)."""
        regs = response.registers
        if len(regs) < block.read.count:
            self._malformed(f"short response: {len(regs)} of {block.read.count} registers")
            return [
                Reading(pt.asset, pt.tag, now, None, Quality.BAD, STATUS_DECODE_ERROR)
                for pt, _ in block.points
            ]
        out: list[Reading] = []
        for pt, i in block.points:
            try:
                out.append(_good(pt.asset, pt.tag, now, pt.decode(regs, i)))
            except DecodeError as exc:
                self._malformed(f"{pt.asset}/{pt.tag}: {exc}")
                out.append(Reading(pt.asset, pt.tag, now, None, Quality.BAD, STATUS_DECODE_ERROR))
        return out

    # --- writes ----------------------------------------------------------------------

    def _point_for_write(self, tag: str) -> _Point:
        point = self._by_key.get(tag)
        if point is None:
            if tag in self._ambiguous:
                options = sorted(k for k, p in self._by_key.items() if p.tag == tag and "/" in k)
                raise WriteError(f"tag {tag!r} exists on several assets; use one of {options}")
            raise WriteError(f"connector {self.name!r} has no tag {tag!r}")
        if point.table in ("input", "discrete"):
            raise WriteError(f"{point.asset}/{point.tag} is in the read-only {point.table} table")
        if not point.config.writable:
            raise WriteError(f"{point.asset}/{point.tag} is not writable (set writable: true)")
        return point

    def _encode_write(
        self, point: _Point, value: Value
    ) -> Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]:
        cfg = point.config
        unit = point.unit_id
        if point.table == "coil" or cfg.type in ("bool", "bit"):
            if not isinstance(value, bool):
                raise WriteError(
                    f"{point.asset}/{point.tag} is a {cfg.type}: expected true or false, "
                    f"got {type(value).__name__} {value!r}"
                )
            if point.table == "coil":
                return lambda c: c.write_coil(point.address, value, device_id=unit)
            if cfg.type == "bool":
                return lambda c: c.write_register(point.address, int(value), device_id=unit)
            return self._bit_write(point, value)
        assert cfg.type is not None
        try:
            regs = encode_value(
                value,
                cfg.type,
                byte_order=point.byte_order,
                word_order=point.word_order,
                length=cfg.length,
                encoding=cfg.encoding,
                scale=cfg.scale,
                offset=cfg.offset,
            )
        except EncodeError as exc:
            raise WriteError(f"{point.asset}/{point.tag}: {exc}") from None
        if len(regs) > MAX_REGISTERS_PER_WRITE:
            raise WriteError(f"{point.asset}/{point.tag}: {len(regs)} registers exceed one write")
        if len(regs) == 1:
            return lambda c: c.write_register(point.address, regs[0], device_id=unit)
        return lambda c: c.write_registers(point.address, regs, device_id=unit)

    def _bit_write(
        self, point: _Point, value: bool
    ) -> Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]:
        """Read-modify-write of one bit in a holding register, atomic on this connection.

        Not atomic against other masters; devices that support FC22 (mask write) are rare enough
        that read-modify-write is the portable choice.
        """
        assert point.config.bit is not None
        bit = point.config.bit
        if point.byte_order == "little":
            bit = (bit + 8) % 16
        mask = 1 << bit
        unit = point.unit_id

        async def rmw(c: ModbusBaseClient) -> ModbusPDU:
            current = await c.read_holding_registers(point.address, count=1, device_id=unit)
            if current.isError():
                return current
            word = current.registers[0]
            word = (word | mask) if value else (word & ~mask)
            return await c.write_register(point.address, word, device_id=unit)

        return rmw

    async def write(self, tag: str, value: Value) -> None:
        """Write ``value`` to ``tag`` (``tag`` alone when unique, else ``asset/tag``).

        Queued ahead of waiting reads. Raises :class:`WriteError` for an unknown, read-only or
        non-writable tag, a value of the wrong type or out of range (checked before anything is
        sent), no connection, no response, or an exception response from the device.
        """
        point = self._point_for_write(tag)
        op = self._encode_write(point, value)
        requests = self._requests
        client = self._client
        if requests is None or client is None:
            self._m_writes_failed()
            raise WriteError(f"{point.asset}/{point.tag}: not connected to {self._where()}")
        # the request in flight, then ours (two for a bit's read-modify-write), plus slack
        budget = 3 * self.config.timeout * (self.config.retries + 1) + 1.0
        try:
            async with asyncio.timeout(budget):
                response = await requests.submit(
                    WRITE_PRIORITY, lambda: self._execute(lambda: op(client))
                )
        except (_ConnectionLost, _NoResponse, TimeoutError) as exc:
            self._m_writes_failed()
            raise WriteError(
                f"{point.asset}/{point.tag}: write failed: {exc or 'timeout'}"
            ) from None
        if response.isError():
            self._m_writes_failed()
            code = int(getattr(response, "exception_code", 0))
            raise WriteError(
                f"{point.asset}/{point.tag}: device refused the write with Modbus exception "
                f"{code} ({_EXCEPTION_NAMES.get(code, 'unknown')})"
            )
        WRITES.labels(self.name, self.kind, "ok").inc()

    def _m_writes_failed(self) -> None:
        WRITES.labels(self.name, self.kind, "error").inc()


def _split(block: _Block) -> list[_Block]:
    """Smaller reads covering ``block``'s points: first without gap fill, then one per point.

    Returns ``[]`` when the block is already a single point (nothing left to split).
    """
    read = block.read
    by_span = {id(s): pt for s, (pt, _) in zip(read.members, block.points, strict=True)}
    for max_gap in (0, -1):
        if max_gap == 0:
            reads = plan_reads(read.table, read.members, max_gap=0, max_count=read.count)
        else:  # one read per distinct (address, width)
            groups: dict[tuple[int, int], list[Span]] = {}
            for s in read.members:
                groups.setdefault((s.address, s.width), []).append(s)
            reads = [ReadBlock(read.table, a, w, tuple(m)) for (a, w), m in sorted(groups.items())]
        if len(reads) > 1:
            return [
                _Block(r, [(by_span[id(s)], s.address - r.address) for s in r.members])
                for r in reads
            ]
    return []


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
