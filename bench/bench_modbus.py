"""Modbus connector readings/s vs a raw pymodbus read loop of the same registers, same server, same run.

Setup: one pymodbus TCP server in a child process (so its CPU is not charged to the client side)
with 10 units x 100 holding registers. Both sides poll as fast as the server answers, one request
at a time on one connection (what a real Modbus TCP device allows):

* raw ceiling: ``AsyncModbusTcpClient.read_holding_registers(0, count=100)`` per unit in a loop,
  counting registers (no decoding, no records);
* connector: :class:`ModbusConnector` with 1000 int16 points (poll_interval 0), counting the
  ``Reading`` records delivered to its sink (decoded, timestamped, validated);
* per-tag baseline: the same raw client reading one register per request, as gateways without
  read coalescing do. Reported as a second row so the gain of coalescing is visible.

Rounds alternate raw/connector and each side keeps its best round (the machine is shared).
``python -m bench.bench_modbus`` prints the table without touching bench/results.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time

from bench.common import Result, format_table

UNITS = 10
REGISTERS = 100
SECONDS = 2.5
ROUNDS = 2


def _serve(port: int) -> None:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def main() -> None:
        devices = [
            SimDevice(
                id=u,
                simdata=[
                    SimData(
                        0,
                        values=[(u * 1000 + i) % 65536 for i in range(REGISTERS)],
                        datatype=DataType.REGISTERS,
                    )
                ],
            )
            for u in range(1, UNITS + 1)
        ]
        server = ModbusTcpServer(devices, address=("127.0.0.1", port))
        await server.serve_forever()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"bench Modbus server did not listen on {port}")


async def _raw(port: int, seconds: float, per_tag: bool = False) -> float:
    from pymodbus.client import AsyncModbusTcpClient

    client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0, timeout=2, retries=0)
    assert await client.connect()
    n = 0
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            for unit in range(1, UNITS + 1):
                if per_tag:
                    for address in range(REGISTERS):
                        r = await client.read_holding_registers(address, count=1, device_id=unit)
                        n += len(r.registers)
                else:
                    r = await client.read_holding_registers(0, count=REGISTERS, device_id=unit)
                    n += len(r.registers)
        return n / (time.perf_counter() - t0)
    finally:
        client.close()


async def _connector(port: int, seconds: float) -> float:
    from protocols.modbus import ModbusConfig, ModbusConnector

    cfg = ModbusConfig.model_validate(
        {
            "name": "bench-modbus",
            "transport": {"type": "tcp", "host": "127.0.0.1", "port": port},
            "timeout": 2.0,
            "retries": 0,
            "devices": [
                {
                    "unit_id": u,
                    "asset": f"machine-{u:02d}",
                    "poll_interval": 0,
                    "points": [{"tag": f"r{i:03d}", "address": i} for i in range(REGISTERS)],
                }
                for u in range(1, UNITS + 1)
            ],
        }
    )
    count = 0

    def sink(batch) -> None:  # type: ignore[no-untyped-def]
        nonlocal count
        count += len(batch)

    conn = ModbusConnector(cfg)
    conn.set_sink(sink)
    async with conn:
        deadline = time.monotonic() + 10
        while count == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"connector delivered nothing: {conn.status}")
            await asyncio.sleep(0.01)
        start, t0 = count, time.perf_counter()
        await asyncio.sleep(seconds)
        rate = (count - start) / (time.perf_counter() - t0)
    bad = conn.exceptions_total + conn.no_response_total
    if bad:
        raise RuntimeError(f"connector saw {bad} failed requests during the benchmark")
    return rate


async def _measure(port: int) -> tuple[float, float, float]:
    raw_best = conn_best = 0.0
    for _ in range(ROUNDS):
        raw_best = max(raw_best, await _raw(port, SECONDS))
        conn_best = max(conn_best, await _connector(port, SECONDS))
    per_tag = await _raw(port, SECONDS / 2, per_tag=True)
    return conn_best, raw_best, per_tag


def run() -> list[Result]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_modbus", "--serve", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        conn, raw, per_tag = asyncio.run(_measure(port))
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    shape = f"{UNITS} units x {REGISTERS} regs"
    return [
        Result(
            "modbus",
            f"readings/s ({shape})",
            conn,
            "rdg/s",
            "raw pymodbus read loop",
            raw,
            target=">= 0.8x",
        ),
        Result(
            "modbus",
            "readings/s vs per-tag polling",
            conn,
            "rdg/s",
            "raw pymodbus, 1 request/tag",
            per_tag,
            target="coalescing gain",
        ),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]))
    else:
        print(format_table(run()))
