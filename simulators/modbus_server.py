"""Modbus TCP server of the simulator: our own asyncio MBAP framing over pymodbus's PDU layer.

Why not ``pymodbus.server.ModbusTcpServer``: its request handler decodes only the first frame of a
TCP read and keeps a single ``last_pdu``, so a pipelining client (Node-RED, several requests in one
segment) gets one answer and times out on the rest; and its datastore API is being replaced
(SimData/SimDevice) across 3.x minors. Here every complete MBAP frame in the buffer is answered,
in order; requests are decoded and responses encoded by pymodbus's own PDU classes
(``DecodePDU``, ``ExceptionResponse``) against :class:`RegisterBank`, which holds the registers of
every unit (see :mod:`simulators.modbus_map`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pymodbus.constants import ExcCodes
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU

from simulators.modbus_map import (
    AUX_BASE,
    COILS,
    DISCRETE_INPUTS,
    INPUT_REGISTERS,
    LINE_METER_HOLDING,
    LINE_METER_UNIT,
    METER_HOLDING,
)
from simulators.scenario import FLOAT_TAGS, MachineState, Snapshot, TagStatus

__all__ = ["ModbusSimServer", "RegisterBank"]

log = logging.getLogger(__name__)

_SUPPORTED = {1, 2, 3, 4, 5, 6, 15, 16}
_READ = struct.Struct(">HH")
_MAX_FRAME = 260  # MBAP (7) + PDU (<= 253)
_F = {spec.name: i for i, spec in enumerate(FLOAT_TAGS)}

CommandSink = Callable[[str, str, bool], None]
"""(asset, command, value): a coil write the scenario must act on."""


def _f32(values: np.ndarray) -> np.ndarray:
    """float64 -> pairs of uint16, big-endian bytes, high word first."""
    return np.ascontiguousarray(values, dtype=">f4").view(">u2").astype(np.uint16)


def _u32(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.int64) & 0xFFFFFFFF
    return np.stack([(v >> 16) & 0xFFFF, v & 0xFFFF], axis=-1).reshape(-1).astype(np.uint16)


class _Unit:
    def __init__(self, ir: int, hr: int, coils: int, di: int) -> None:
        self.ir = np.zeros(ir, dtype=np.uint16)
        self.hr = np.zeros(hr, dtype=np.uint16)
        self.coils = [False] * coils
        self.di = [False] * di
        self.offline = False


class RegisterBank:
    """The registers of every unit, refreshed from a snapshot; the datastore the PDUs run on.

    Implements the two methods pymodbus's request PDUs call from ``datastore_update``:
    ``async_getValues`` / ``async_setValues`` returning values or an ``ExcCodes``.
    """

    def __init__(
        self, assets: Sequence[str], aux_registers: int = 0, on_command: CommandSink | None = None
    ) -> None:
        self.assets = list(assets)
        self.aux_registers = aux_registers
        self.on_command = on_command
        ir = INPUT_REGISTERS[-1].address + INPUT_REGISTERS[-1].width
        hr = (AUX_BASE + aux_registers) if aux_registers else (METER_HOLDING[-1].address + 2)
        self.units: dict[int, _Unit] = {
            i + 1: _Unit(ir, hr, len(COILS), len(DISCRETE_INPUTS)) for i in range(len(self.assets))
        }
        self.units[LINE_METER_UNIT] = _Unit(0, LINE_METER_HOLDING[-1].address + 2, 0, 0)
        self._meter_hr = METER_HOLDING[-1].address + 2
        self.updates = 0

    def update(self, snap: Snapshot) -> None:
        """Copy a snapshot into the registers (all units in a few numpy operations)."""
        floats = snap.floats.copy()
        floats[snap.status != TagStatus.GOOD] = np.nan
        energy = snap.floats[_F["energy"]]
        sensor_rows = [
            _F[n] for n in ("spindle_speed", "feed_rate", "spindle_temp", "vibration_rms", "power")
        ]
        status_bits = np.zeros(len(self.assets), dtype=np.int64)
        for bit, row in enumerate(sensor_rows):
            status_bits |= (snap.status[row] != TagStatus.GOOD).astype(np.int64) << bit
        ir_float = _f32(floats.T).reshape(len(self.assets), -1)  # (machines, 12)
        counters = _u32(snap.ints[1]).reshape(len(self.assets), 2)
        meter = np.concatenate(
            [
                _f32(np.stack([floats[_F["power"]], energy], axis=1)).reshape(len(self.assets), 4),
                _u32(np.floor(energy * 1000.0)).reshape(len(self.assets), 2),
            ],
            axis=1,
        )
        aux_block: np.ndarray | None = None
        if self.aux_registers:
            k = self.aux_registers
            if snap.aux.shape[0]:
                idx = np.arange(k) % snap.aux.shape[0]
                aux_block = (np.round(snap.aux[idx].T * 100.0).astype(np.int64) & 0xFFFF).astype(
                    np.uint16
                )
            else:
                base = (
                    np.arange(k)[None, :] * 31
                    + np.arange(len(self.assets))[:, None] * 7
                    + self.updates
                ) & 0xFFFF
                aux_block = base.astype(np.uint16)
        for m, _asset in enumerate(self.assets):
            u = self.units[m + 1]
            u.offline = bool(snap.offline[m])
            u.ir[0:12] = ir_float[m]
            u.ir[12] = int(snap.ints[0, m])
            u.ir[13:15] = counters[m]
            u.ir[15] = int(snap.ints[2, m]) & 0xFFFF
            u.ir[16] = int(status_bits[m])
            u.hr[0 : self._meter_hr] = meter[m]
            if aux_block is not None:
                u.hr[AUX_BASE : AUX_BASE + self.aux_registers] = aux_block[m]
            u.coils[0] = snap.alarm_lamp[m]
            u.coils[1] = snap.stop_request[m]
            state = int(snap.ints[0, m])
            u.di[0] = state == MachineState.RUNNING
            u.di[1] = state == MachineState.IDLE
            u.di[2] = bool(status_bits[m])
            u.di[3] = bool(int(snap.ints[1, m]) & 1)
        line = self.units[LINE_METER_UNIT]
        total_power = float(np.nansum(np.where(snap.offline, 0.0, snap.floats[_F["power"]])))
        total_energy = float(energy.sum())
        line.hr[0:4] = _f32(np.array([total_power, total_energy]))
        line.hr[4:6] = _u32(np.array([math.floor(total_energy * 1000.0)]))
        self.updates += 1

    # -- the datastore interface pymodbus's PDUs call
    def _unit(self, device_id: int) -> _Unit | ExcCodes:
        u = self.units.get(device_id)
        if u is None or u.offline:
            return ExcCodes.GATEWAY_NO_RESPONSE
        return u

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        u = self._unit(device_id)
        if isinstance(u, ExcCodes):
            return u
        if func_code in (3, 16, 6, 23):
            store: Any = u.hr
        elif func_code == 4:
            store = u.ir
        elif func_code in (1, 5, 15):
            store = u.coils
        elif func_code == 2:
            store = u.di
        else:
            return ExcCodes.ILLEGAL_FUNCTION
        if address < 0 or count < 1 or address + count > len(store):
            return ExcCodes.ILLEGAL_ADDRESS
        if isinstance(store, list):
            return list(store[address : address + count])
        return [int(x) for x in store[address : address + count]]

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        u = self._unit(device_id)
        if isinstance(u, ExcCodes):
            return u
        if func_code not in (5, 15) or device_id == LINE_METER_UNIT:
            # holding registers are measurements: read-only
            return ExcCodes.ILLEGAL_ADDRESS
        if address < 0 or address + len(values) > len(u.coils):
            return ExcCodes.ILLEGAL_ADDRESS
        asset = self.assets[device_id - 1]
        for i, v in enumerate(values):
            u.coils[address + i] = bool(v)
            if self.on_command is not None:
                self.on_command(asset, COILS[address + i].name, bool(v))
        return None


class ModbusSimServer:
    """Serves a :class:`RegisterBank` over Modbus TCP. Async context manager; stop is idempotent."""

    def __init__(self, bank: RegisterBank, host: str = "127.0.0.1", port: int = 5020) -> None:
        self.bank = bank
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._decoder = DecodePDU(True)
        self.requests = 0
        self.fast_reads = True  # FC 3/4 without pymodbus's PDU objects (see _read_registers)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.wait_closed()

    async def __aenter__(self) -> ModbusSimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        buf = bytearray()
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buf += chunk
                out = bytearray()
                # answer every complete frame in the buffer, in order (pipelining clients)
                while len(buf) >= 7:
                    tid, pid, length = struct.unpack_from(">HHH", buf, 0)
                    if pid != 0 or not 2 <= length <= _MAX_FRAME - 6:
                        log.warning(
                            "modbus: bad MBAP header (protocol %d, length %d); closing", pid, length
                        )
                        return
                    if len(buf) < 6 + length:
                        break
                    unit = buf[6]
                    pdu = bytes(buf[7 : 6 + length])
                    del buf[: 6 + length]
                    out += await self._answer(tid, unit, pdu)
                if out:
                    writer.write(out)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # stop() cancels connection tasks; ending normally keeps asyncio's stream callback
            # (3.11) from logging the cancellation as an error. The task is top-level: nothing
            # above it needs to see the CancelledError.
            return
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, tid: int, unit: int, pdu_bytes: bytes) -> bytes:
        self.requests += 1
        fc = pdu_bytes[0]
        if (fc == 3 or fc == 4) and len(pdu_bytes) == 5 and self.fast_reads:
            body = self._read_registers(fc, unit, pdu_bytes)
            return struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body
        return await self._answer_pdu(tid, unit, pdu_bytes)

    def _read_registers(self, fc: int, unit: int, pdu_bytes: bytes) -> bytes:
        """FC 3/4 straight from the register arrays: the same bytes pymodbus's request and
        response PDUs produce (tested against them), at a fraction of the cost — the benchmarks'
        clients read thousands of blocks a second and the simulator must not be their limit."""
        address, count = _READ.unpack_from(pdu_bytes, 1)
        if not 1 <= count <= 125:
            return bytes((fc | 0x80, ExcCodes.ILLEGAL_VALUE))
        u = self.bank._unit(unit)  # the bank's own lookup (offline, unknown units)
        if isinstance(u, ExcCodes):
            return bytes((fc | 0x80, u))
        store = u.hr if fc == 3 else u.ir
        if address + count > len(store):
            return bytes((fc | 0x80, ExcCodes.ILLEGAL_ADDRESS))
        return bytes((fc, 2 * count)) + store[address : address + count].astype(">u2").tobytes()

    async def _answer_pdu(self, tid: int, unit: int, pdu_bytes: bytes) -> bytes:
        fc = pdu_bytes[0]
        response: ModbusPDU
        if fc not in _SUPPORTED:
            response = ExceptionResponse(fc & 0x7F, ExcCodes.ILLEGAL_FUNCTION)
        else:
            try:
                request = self._decoder.decode(pdu_bytes)
            except Exception:  # noqa: BLE001 - any decode failure is the client's malformed frame
                request = None
            if request is None:
                response = ExceptionResponse(fc, ExcCodes.ILLEGAL_VALUE)
            else:
                request.dev_id = unit
                request.transaction_id = tid
                response = await request.datastore_update(self.bank, unit)  # type: ignore[arg-type]
        body = response.function_code.to_bytes(1, "big") + response.encode()
        return struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body
