"""Modbus conformance harness, and the real pymodbus servers every Modbus test runs against.

:class:`ModbusTestServer` is a pymodbus 3.16 server (SimDevice datastore, TCP or RTU-over-TCP
framing, or serial RTU on a pseudo-terminal) that records every request it receives, so tests can
count what the connector actually sent (read coalescing) rather than trust the connector's word.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edgeloop.services import free_port
from protocols.base import BackoffConfig, Connector, ConnectorConfig
from protocols.modbus import ModbusConfig, ModbusConnector
from tests.waiting import wait_until


@dataclass(frozen=True)
class Request:
    unit: int
    function_code: int
    address: int
    count: int


def bits(n: int, pattern: Callable[[int], bool] = lambda i: i % 2 == 0) -> list[bool]:
    return [pattern(i) for i in range(n)]


def standard_device(unit: int = 1) -> SimDevice:
    """Coils, discretes, holding and input registers with known values (fresh on each call).

    holding 0..9 = 100*unit + i; 10..11 float32 21.5 (ABCD); 12..13 float32 21.5 (CDAB);
    20..23 string "EDGELOOP"; 30 = 0b1010_0000_0000_0101; 40..41 int32 -123456 (ABCD)
    input 0..4 = 1000 + i; coils 0..15 alternate True/False; discretes 0..15 alternate False/True.
    """
    import struct

    hi, lo = struct.unpack(">HH", struct.pack(">f", 21.5))
    i32 = list(struct.unpack(">HH", struct.pack(">i", -123456)))
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=bits(16), datatype=DataType.BITS)],
            [SimData(0, values=bits(16, lambda i: i % 2 == 1), datatype=DataType.BITS)],
            [
                SimData(0, values=[100 * unit + i for i in range(10)], datatype=DataType.REGISTERS),
                SimData(10, values=[hi, lo, lo, hi], datatype=DataType.REGISTERS),
                SimData(20, values="EDGELOOP", datatype=DataType.STRING),
                SimData(30, values=0b1010_0000_0000_0101, datatype=DataType.REGISTERS),
                SimData(40, values=i32, datatype=DataType.REGISTERS),
            ],
            [SimData(0, values=[1000 + i for i in range(5)], datatype=DataType.REGISTERS)],
        ),
    )


class ModbusTestServer:
    """A real pymodbus server on a fixed port (chosen once), restartable, counting requests.

    ``framer`` SOCKET = Modbus TCP, RTU = RTU frames over TCP. With ``serial_port`` it serves
    RTU on that (pseudo-)terminal instead of TCP.
    """

    def __init__(
        self,
        devices: Callable[[], list[SimDevice]],
        *,
        framer: FramerType = FramerType.SOCKET,
        port: int | None = None,
        serial_port: str | None = None,
        baudrate: int = 38400,
    ) -> None:
        self.devices = devices
        self.framer = framer
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.requests: list[Request] = []
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests.append(
                Request(pdu.dev_id, pdu.function_code, pdu.address, getattr(pdu, "count", 0))
            )
        return pdu

    def reads(self, unit: int | None = None) -> list[Request]:
        return [
            r
            for r in self.requests
            if r.function_code in (1, 2, 3, 4) and (unit is None or r.unit == unit)
        ]

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        if self.serial_port is not None:
            server: ModbusTcpServer | ModbusSerialServer = ModbusSerialServer(
                self.devices(),
                framer=FramerType.RTU,
                port=self.serial_port,
                baudrate=self.baudrate,
                trace_pdu=self._trace,
            )
        else:
            server = ModbusTcpServer(
                self.devices(),
                framer=self.framer,
                address=(self.host, self.port),
                trace_pdu=self._trace,
            )
        # the port may linger briefly after a stop: retry the bind within a deadline
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                await server.serve_forever(background=True)
                break
            except RuntimeError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
            await asyncio.sleep(0)  # let the transports' close callbacks run

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def client(self) -> AsyncModbusTcpClient:
        """A raw pymodbus client of this (TCP) server: the tests' independent view of it."""
        c = AsyncModbusTcpClient(
            self.host, port=self.port, framer=self.framer, reconnect_delay=0, timeout=2
        )
        if not await c.connect():
            raise AssertionError(f"test client cannot connect to {self.host}:{self.port}")
        return c


class PtyPair:
    """Two linked pseudo-terminals made by ``socat``: what one end writes, the other reads."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="edgeloop-pty-")
        self.a = str(Path(self._dir) / "a")
        self.b = str(Path(self._dir) / "b")
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        socat = shutil.which("socat")
        if socat is None:
            raise RuntimeError("socat not found (apt-get install socat)")
        self._proc = await asyncio.create_subprocess_exec(
            socat,
            f"pty,raw,echo=0,link={self.a}",
            f"pty,raw,echo=0,link={self.b}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_until(
            lambda: os.path.exists(self.a) and os.path.exists(self.b), 10, "socat pty pair"
        )

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def harness_config(port: int, *, name: str = "modbus-conformance", **extra: Any) -> ModbusConfig:
    return ModbusConfig.model_validate(
        {
            "name": name,
            "transport": {"type": "tcp", "host": "127.0.0.1", "port": port},
            "timeout": 0.5,
            "retries": 0,
            "backoff": {"initial": 0.05, "max": 0.5, "factor": 2.0, "jitter": 0.1},
            "devices": [
                {
                    "unit_id": 1,
                    "asset": "press-1",
                    "poll_interval": 0.05,
                    "points": [
                        {"tag": "count", "address": 0},
                        {"tag": "speed", "address": 1, "scale": 0.1},
                        {"tag": "temp", "address": 10, "type": "float32"},
                        {"tag": "serial", "address": 20, "type": "string", "length": 4},
                        {"tag": "running", "table": "coil", "address": 0, "writable": True},
                        {"tag": "door", "table": "discrete", "address": 1},
                        {"tag": "pressure", "table": "input", "address": 2},
                    ],
                }
            ],
            **extra,
        }
    )


class ModbusHarness:
    kind = "modbus"

    def __init__(self) -> None:
        self.server = ModbusTestServer(lambda: [standard_device(1)])

    async def start_server(self) -> None:
        await self.server.start()

    async def stop_server(self) -> None:
        await self.server.stop()

    async def restart_server(self) -> None:
        await self.server.restart()

    def config(self) -> ConnectorConfig:
        cfg = harness_config(self.server.port)
        cfg.backoff = BackoffConfig(initial=0.05, max=0.5)
        return cfg

    def connector(self, config: ConnectorConfig) -> Connector[Any]:
        assert isinstance(config, ModbusConfig)
        return ModbusConnector(config)

    def expected_tags(self) -> set[tuple[str, str]]:
        return {
            ("press-1", t)
            for t in ("count", "speed", "temp", "serial", "running", "door", "pressure")
        }

    async def inject_malformed(self) -> None:
        """The device's string registers now hold bytes that are not UTF-8 (0xFF 0xFE ...)."""
        client = await self.server.client()
        try:
            response = await client.write_registers(20, [0xFFFE, 0xC328, 0x4142, 0], device_id=1)
            assert not response.isError(), response
        finally:
            client.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.stop()


def make_harness() -> ModbusHarness:
    return ModbusHarness()
