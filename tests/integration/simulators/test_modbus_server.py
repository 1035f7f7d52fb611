"""The line read and driven through a plain pymodbus client, and raw pipelined MBAP frames."""

from __future__ import annotations

import asyncio
import math
import struct

from pymodbus.client import AsyncModbusTcpClient

from simulators.modbus_map import LINE_METER_UNIT
from tests.integration.simulators.conftest import step


def f32(regs: list[int]) -> float:
    return struct.unpack(">f", struct.pack(">HH", *regs))[0]


async def test_registers_follow_the_scenario_and_coils_drive_it(frozen_sim) -> None:
    sim = frozen_sim
    step(sim, 40.0)
    await sim.update_once()
    snap = sim.scenario.snapshot()
    host, port = sim.modbus_address
    client = AsyncModbusTcpClient(host, port=port, timeout=5, retries=0)
    await client.connect()
    try:
        rr = await client.read_input_registers(0, count=17, device_id=2)
        assert not rr.isError()
        r = rr.registers
        assert math.isclose(f32(r[4:6]), snap.value("m2", "spindle_temp"), rel_tol=1e-6)
        assert math.isclose(f32(r[0:2]), snap.value("m2", "spindle_speed"), rel_tol=1e-6)
        assert r[12] == snap.value("m2", "state")
        assert (r[13] << 16) | r[14] == snap.value("m2", "part_counter") > 0
        meter = await client.read_holding_registers(0, count=6, device_id=1)
        assert math.isclose(f32(meter.registers[2:4]), snap.value("m1", "energy"), rel_tol=1e-6)
        line = await client.read_holding_registers(0, count=2, device_id=LINE_METER_UNIT)
        assert f32(line.registers) > 0

        # exceptions: illegal address, read-only register, offline machine (m3), unknown unit
        bad = await client.read_input_registers(16, count=2, device_id=1)
        assert bad.isError() and bad.exception_code == 0x02
        ro = await client.write_register(0, 1, device_id=1)
        assert ro.isError() and ro.exception_code == 0x02
        off = await client.read_input_registers(0, count=2, device_id=3)
        assert off.isError() and off.exception_code == 0x0B
        unknown = await client.read_coils(0, count=1, device_id=42)
        assert unknown.isError() and unknown.exception_code == 0x0B

        # the stop request coil stops the machine
        wr = await client.write_coil(1, True, device_id=1)
        assert not wr.isError()
        assert sim.scenario.stop_request[0]
        step(sim, 45.0)
        await sim.update_once()
        di = await client.read_discrete_inputs(0, count=4, device_id=1)
        assert di.bits[:2] == [False, True]  # not running, idle
        coils = await client.read_coils(0, count=2, device_id=1)
        assert coils.bits[:2] == [False, True]
        await client.write_coils(0, [True, False], device_id=1)
        assert sim.scenario.alarm_lamp[0] and not sim.scenario.stop_request[0]
    finally:
        client.close()


async def test_every_pipelined_request_in_one_segment_is_answered(frozen_sim) -> None:
    host, port = frozen_sim.modbus_address
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        frames = b"".join(
            struct.pack(">HHHBBHH", tid, 0, 6, unit, 4, 0, 2)
            for tid, unit in ((1, 1), (2, 2), (3, 1), (4, 99))
        )
        writer.write(frames)  # four requests in a single send()
        await writer.drain()
        answers = {}
        for _ in range(4):
            head = await asyncio.wait_for(reader.readexactly(7), 5)
            tid, _, length, unit = struct.unpack(">HHHB", head)
            answers[tid] = (unit, await asyncio.wait_for(reader.readexactly(length - 1), 5))
        assert sorted(answers) == [1, 2, 3, 4]
        assert answers[1][1][:2] == b"\x04\x04" and answers[2][1][:2] == b"\x04\x04"
        assert answers[4] == (99, b"\x84\x0b")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_fast_register_reads_answer_byte_for_byte_like_pymodbus(frozen_sim) -> None:
    """The simulator answers FC 3/4 without pymodbus's PDU objects; every answer — values and
    exceptions (bad count, illegal address, offline and unknown units) — is the same bytes."""
    sim = frozen_sim
    step(sim, 40.0)
    await sim.update_once()
    server = sim.modbus
    cases = [
        (fc, unit, address, count)
        for fc in (3, 4)
        for unit in (1, 2, 3, 42, LINE_METER_UNIT)
        for address, count in ((0, 1), (0, 17), (4, 2), (13, 2), (16, 2), (0, 125), (5, 0),
                               (0, 126), (65535, 1), (100, 20))
    ]  # fmt: skip
    for fc, unit, address, count in cases:
        pdu = struct.pack(">BHH", fc, address, count)
        server.fast_reads = True
        fast = await server._answer(7, unit, pdu)
        server.fast_reads = False
        slow = await server._answer(7, unit, pdu)
        assert fast == slow, (fc, unit, address, count, fast, slow)
    server.fast_reads = True
