"""Simulator servers keep their schedule: 1,000 OPC UA tags at 10 Hz, 10 Modbus units x 100
registers at 10 Hz (with a client polling all of them), against raw library ceilings measured in
the same run: a bare asyncua write loop over the same nodes, and the same loop without the
scenario for Modbus register refresh."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from asyncua import ua
from pymodbus.client import AsyncModbusTcpClient

from bench.common import Result
from simulators import FactorySimulator, SimConfig
from simulators.config import ModbusServerConfig, OpcUaServerConfig, ScenarioConfig

RUN_S = 6.0


def _cfg(opcua: bool, modbus: bool) -> SimConfig:
    return SimConfig(
        scenario=ScenarioConfig(seed=1, machines=10, extra_tags=94 if opcua else 0, speed=10.0),
        update_hz=10.0,
        opcua=OpcUaServerConfig(port=0, enabled=opcua),
        modbus=ModbusServerConfig(port=0, enabled=modbus, registers=100),
    )


async def _opcua() -> list[Result]:
    async with FactorySimulator(_cfg(True, False)) as sim:
        await asyncio.sleep(RUN_S)
        s = sim.stats
        lag50, lag99 = s.percentile("lag", 50) * 1e3, s.percentile("lag", 99) * 1e3
        dur50 = s.percentile("duration", 50) * 1e3
        updates, skipped = s.updates, s.skipped
        opc = sim.opcua
        assert opc is not None
        ids = [i for row in opc._float_ids for i in row] + [i for row in opc._aux_ids for i in row]
        n_tags = len(ids)
        # raw ceiling: a bare asyncua address-space write loop over the same nodes
        server = opc._server
        assert server is not None
        write = server.iserver.aspace.write_attribute_value
        vals = np.random.default_rng(0).random(n_tags).tolist()
        t0 = time.perf_counter()
        rounds = 0
        while time.perf_counter() - t0 < 2.0:
            for nodeid, v in zip(ids, vals, strict=True):
                await write(
                    nodeid,
                    ua.AttributeIds.Value,
                    ua.DataValue(ua.Variant(v, ua.VariantType.Double)),
                )
            rounds += 1
        raw_ms = (time.perf_counter() - t0) / rounds * 1e3
    expected = RUN_S * 10
    return [
        Result(
            "sim-opcua",
            f"{n_tags} tags @10Hz: lag p50",
            lag50,
            "ms",
            higher_is_better=False,
            target="< 10 ms",
        ),
        Result(
            "sim-opcua",
            f"{n_tags} tags @10Hz: lag p99",
            lag99,
            "ms",
            higher_is_better=False,
            target="< 100 ms",
        ),
        Result(
            "sim-opcua",
            "update duration p50 (scenario + all writes)",
            dur50,
            "ms",
            "bare asyncua write loop, same nodes",
            raw_ms,
            higher_is_better=False,
            target="< 100 ms (10 Hz)",
        ),
        Result(
            "sim-opcua",
            "updates done / scheduled",
            updates / expected * 100,
            "%",
            target=f"skipped {skipped}",
        ),
    ]


async def _modbus() -> list[Result]:
    async with FactorySimulator(_cfg(False, True)) as sim:
        host, port = sim.modbus_address or ("", 0)
        client = AsyncModbusTcpClient(host, port=port, timeout=5, retries=0)
        await client.connect()
        reads = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < RUN_S:
            for unit in range(1, 11):
                rr = await client.read_holding_registers(100, count=100, device_id=unit)
                assert not rr.isError()
                reads += 1
        read_rate = reads / (time.perf_counter() - t0)
        client.close()
        s = sim.stats
        lag50, lag99 = s.percentile("lag", 50) * 1e3, s.percentile("lag", 99) * 1e3
        dur50 = s.percentile("duration", 50) * 1e3
        bank, sc = sim.bank, sim.scenario
        assert bank is not None and sc is not None
        snap = sc.snapshot()
        t1 = time.perf_counter()
        n = 0
        while time.perf_counter() - t1 < 1.0:
            bank.update(snap)  # raw: the register refresh alone, no scenario step
            n += 1
        raw_ms = (time.perf_counter() - t1) / n * 1e3
    return [
        Result(
            "sim-modbus",
            "10 units x 100 regs @10Hz: lag p50",
            lag50,
            "ms",
            higher_is_better=False,
            target="< 10 ms",
        ),
        Result(
            "sim-modbus",
            "10 units x 100 regs @10Hz: lag p99",
            lag99,
            "ms",
            higher_is_better=False,
            target="< 100 ms",
        ),
        Result(
            "sim-modbus",
            "update duration p50 (scenario + registers)",
            dur50,
            "ms",
            "register refresh alone",
            raw_ms,
            higher_is_better=False,
        ),
        Result("sim-modbus", "client reads of 100 regs while updating", read_rate, "req/s"),
    ]


def run() -> list[Result]:
    async def main() -> list[Result]:
        return await _opcua() + await _modbus()

    return asyncio.run(main())


if __name__ == "__main__":
    from bench.common import format_table

    print(format_table(run()))
