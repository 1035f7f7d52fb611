"""Modbus connector against real pymodbus servers: values, coalescing, exceptions, writes, faults."""

from __future__ import annotations

import asyncio
import math
import struct
from collections import Counter
from typing import Any

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.simulator import DataType, SimData, SimDevice

from protocols.base import ConnectorState, WriteError
from protocols.modbus import (
    STATUS_DECODE_ERROR,
    STATUS_DISCONNECTED,
    STATUS_NO_RESPONSE,
    ModbusConfig,
    ModbusConnector,
)
from shared.records import Quality, Reading
from tests.integration.connectors.harness_modbus import (
    ModbusTestServer,
    PtyPair,
    standard_device,
)
from tests.waiting import wait_until


class Sink:
    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.blocks = 0  # ReadingColumns received (columns mode)

    def __call__(self, batch) -> None:
        self.readings.extend(batch)

    def columns(self, batch) -> None:
        for cols in batch:
            self.blocks += 1
            assert len(cols) == len(cols.points)
            self.readings.extend(cols.readings())

    def attach(self, conn: ModbusConnector, columns: bool) -> None:
        """Readings to this sink; with ``columns`` good blocks come as ReadingColumns too."""
        conn.set_sink(self)
        if columns:
            conn.set_column_sink(self.columns)

    def latest(self) -> dict[tuple[str, str], Reading]:
        return {(r.asset, r.tag): r for r in self.readings}

    def value(self, asset: str, tag: str) -> Any:
        r = self.latest().get((asset, tag))
        return None if r is None else r.value

    def has_good(self, keys) -> bool:
        latest = self.latest()
        return all(k in latest and latest[k].quality is Quality.GOOD for k in keys)


def config(port: int, devices: list[dict], **extra: Any) -> ModbusConfig:
    return ModbusConfig.model_validate(
        {
            "name": f"modbus-test-{port}",
            "transport": {"type": "tcp", "host": "127.0.0.1", "port": port},
            "timeout": 0.3,
            "retries": 0,
            "backoff": {"initial": 0.1, "max": 0.4, "jitter": 0.0},
            "devices": devices,
            **extra,
        }
    )


ALL_TYPES = [
    {"tag": "count", "address": 0},
    {"tag": "count_u", "address": 3, "type": "uint16"},
    {"tag": "speed", "address": 1, "scale": 0.5, "offset": -10},
    {"tag": "temp", "address": 10, "type": "float32"},
    {"tag": "temp_cdab", "address": 12, "type": "float32", "word_order": "little"},
    {"tag": "serial", "address": 20, "type": "string", "length": 4},
    {"tag": "b0", "address": 30, "type": "bit", "bit": 0},
    {"tag": "b1", "address": 30, "type": "bit", "bit": 1},
    {"tag": "b15", "address": 30, "type": "bit", "bit": 15},
    {"tag": "flag", "address": 30, "type": "bool"},
    {"tag": "total", "address": 40, "type": "int32"},
    {"tag": "coil0", "table": "coil", "address": 0},
    {"tag": "coil1", "table": "coil", "address": 1},
    {"tag": "di1", "table": "discrete", "address": 1},
    {"tag": "pressure", "table": "input", "address": 4},
]


@pytest.fixture
async def server():
    s = ModbusTestServer(lambda: [standard_device(1), standard_device(2)])
    await s.start()
    yield s
    await s.stop()


@pytest.mark.parametrize("columns", [False, True], ids=["readings", "columns"])
async def test_every_type_and_table_decodes_to_the_device_values(server, columns):
    sink = Sink()
    conn = ModbusConnector(
        config(
            server.port, [{"unit_id": 2, "asset": "m2", "poll_interval": 0.05, "points": ALL_TYPES}]
        )
    )
    sink.attach(conn, columns)
    async with conn:
        await wait_until(
            lambda: sink.has_good({("m2", p["tag"]) for p in ALL_TYPES}), 10, "all good"
        )
    v = {tag: r.value for (_, tag), r in sink.latest().items()}
    assert v["count"] == 200 and v["count_u"] == 203
    assert v["speed"] == pytest.approx(201 * 0.5 - 10)
    assert v["temp"] == 21.5 and v["temp_cdab"] == 21.5
    assert v["serial"] == "EDGELOOP"
    assert (v["b0"], v["b1"], v["b15"], v["flag"]) == (True, False, True, True)
    assert v["total"] == -123456
    assert (v["coil0"], v["coil1"], v["di1"]) == (True, False, True)
    assert v["pressure"] == 1004
    assert all(r.status == 0 and r.ts_ns > 0 for r in sink.readings)
    # readings built on the hot path without re-validation pass validation and compare equal
    for r in sink.readings:
        again = Reading(r.asset, r.tag, r.ts_ns, r.value, r.quality, r.status)
        assert again == r and hash(again) == hash(r) and type(r) is Reading
    assert (sink.blocks > 0) is columns
    assert conn.readings_total == len(sink.readings)


async def three_polls(
    port: int, odd: dict[str, Any], columns: bool
) -> tuple[Sink, ModbusConnector, ConnectorState]:
    """Unit 1 polled for ``count`` (holding 0), ``odd`` and ``coil0`` until three polls arrived;
    the sink, the stopped connector and its state while running."""
    points = [{"tag": "count", "address": 0}, odd, {"tag": "coil0", "table": "coil", "address": 0}]
    sink = Sink()
    conn = ModbusConnector(
        config(port, [{"unit_id": 1, "asset": "m", "poll_interval": 0.05, "points": points}])
    )
    sink.attach(conn, columns)
    async with conn:
        await wait_until(lambda: len(sink.readings) >= 9, 10, "three polls")
        state = conn.status.state
    return sink, conn, state


@pytest.mark.parametrize("columns", [False, True], ids=["readings", "columns"])
async def test_a_value_that_does_not_decode_is_bad_and_its_block_neighbours_good(server, columns):
    # registers 10..11 hold float32 21.5 (0x41AC 0x0000): 0xAC cannot start a UTF-8 character
    sink, conn, _ = await three_polls(
        server.port, {"tag": "text", "address": 10, "type": "string", "length": 2}, columns
    )
    latest = sink.latest()
    assert latest[("m", "text")].quality is Quality.BAD
    assert latest[("m", "text")].status == STATUS_DECODE_ERROR
    assert latest[("m", "count")].quality is Quality.GOOD and latest[("m", "count")].value == 100
    assert latest[("m", "coil0")].value is True
    assert conn.malformed_total >= 3
    # the register block went the per-reading way; the coil block still came as columns
    assert (sink.blocks > 0) is columns


async def test_coalescing_reads_300_registers_in_three_requests():
    def device():
        return [
            SimDevice(
                id=1, simdata=[SimData(0, values=list(range(300)), datatype=DataType.REGISTERS)]
            )
        ]

    s = ModbusTestServer(device)
    await s.start()
    try:
        points = [{"tag": f"r{i}", "address": i} for i in range(300)]
        sink = Sink()
        conn = ModbusConnector(
            config(s.port, [{"unit_id": 1, "asset": "a", "poll_interval": 0.05, "points": points}])
        )
        conn.set_sink(sink)
        async with conn:
            await wait_until(lambda: len(sink.readings) >= 3 * 300, 10, "three polls")
        reads = Counter((r.function_code, r.address, r.count) for r in s.reads())
        assert set(reads) == {(3, 0, 125), (3, 125, 125), (3, 250, 50)}
        # every poll sends exactly those three requests: no per-tag reads, ever
        assert max(reads.values()) - min(reads.values()) <= 1
        assert sink.latest()[("a", "r299")].value == 299
    finally:
        await s.stop()


@pytest.mark.parametrize("columns", [False, True], ids=["readings", "columns"])
async def test_an_illegal_address_spoils_only_its_own_block(server, columns):
    # register 900 is not mapped on the device
    sink, conn, state = await three_polls(server.port, {"tag": "ghost", "address": 900}, columns)
    latest = sink.latest()
    assert latest[("m", "ghost")].quality is Quality.BAD
    assert latest[("m", "ghost")].status == ExcCodes.ILLEGAL_ADDRESS
    assert latest[("m", "count")].quality is Quality.GOOD
    assert latest[("m", "coil0")].value is True
    assert conn.exceptions_total >= 3
    assert state is ConnectorState.CONNECTED


async def test_a_read_bridging_an_unmapped_hole_is_split_once_and_stays_split(server):
    # holding 14..19 are unmapped: the coalesced read 0..23 gets "illegal address"
    points = [
        {"tag": "count", "address": 0},
        {"tag": "speed", "address": 1},
        {"tag": "temp", "address": 10, "type": "float32"},
        {"tag": "serial", "address": 20, "type": "string", "length": 4},
    ]
    sink = Sink()
    conn = ModbusConnector(
        config(server.port, [{"unit_id": 1, "asset": "m", "poll_interval": 0.05, "points": points}])
    )
    conn.set_sink(sink)
    assert [(b.address, b.count) for b in conn.read_plan[1]] == [(0, 24)]
    async with conn:
        await wait_until(
            lambda: sink.has_good({("m", "count"), ("m", "temp"), ("m", "serial")}), 10, "good"
        )
        mark = len(server.reads())
        await wait_until(lambda: len(server.reads()) >= mark + 9, 10, "three more polls")
    assert [(b.address, b.count) for b in conn.read_plan[1]] == [(0, 2), (10, 2), (20, 4)]
    assert conn.splits_total == 1
    assert all(
        r.quality is Quality.GOOD for r in sink.readings
    )  # the split happened within the poll
    assert {(r.address, r.count) for r in server.reads()[mark:]} == {(0, 2), (10, 2), (20, 4)}


WRITABLE = [
    {"tag": "setpoint", "address": 0, "scale": 0.1, "writable": True},
    {"tag": "temp", "address": 10, "type": "float32", "writable": True},
    {
        "tag": "temp_cdab",
        "address": 12,
        "type": "float32",
        "word_order": "little",
        "writable": True,
    },
    {"tag": "total", "address": 40, "type": "int32", "writable": True},
    {"tag": "serial", "address": 20, "type": "string", "length": 4, "writable": True},
    {"tag": "b1", "address": 30, "type": "bit", "bit": 1, "writable": True},
    {"tag": "b0", "address": 30, "type": "bit", "bit": 0, "writable": True},
    {"tag": "coil1", "table": "coil", "address": 1, "writable": True},
    {"tag": "ghost", "address": 900, "writable": True},
    {"tag": "locked", "address": 5},
    {"tag": "pressure", "table": "input", "address": 4},
]


async def test_writes_reach_the_device_in_the_configured_encoding(server):
    conn = ModbusConnector(
        config(
            server.port, [{"unit_id": 1, "asset": "m", "poll_interval": 0.1, "points": WRITABLE}]
        )
    )
    raw = await server.client()
    try:
        async with conn:
            await wait_until(lambda: conn.status.state is ConnectorState.CONNECTED, 10, "connected")
            await conn.write("setpoint", 12.3)
            await conn.write("temp", -1.5)
            await conn.write("m/temp_cdab", 1.0)
            await conn.write("total", -2)
            await conn.write("serial", "AB")
            await conn.write("b1", True)
            await conn.write("b0", False)
            await conn.write("coil1", True)
            regs = (await raw.read_holding_registers(0, count=1, device_id=1)).registers
            assert regs == [123]
            regs = (await raw.read_holding_registers(10, count=4, device_id=1)).registers
            assert struct.unpack(">f", struct.pack(">HH", *regs[:2]))[0] == -1.5
            assert regs[2:] == [0x0000, 0x3F80]  # CDAB
            regs = (await raw.read_holding_registers(40, count=2, device_id=1)).registers
            assert regs == [0xFFFF, 0xFFFE]
            regs = (await raw.read_holding_registers(20, count=4, device_id=1)).registers
            assert regs == [0x4142, 0, 0, 0]
            (word,) = (await raw.read_holding_registers(30, count=1, device_id=1)).registers
            assert word == 0b1010_0000_0000_0110  # bit 1 set, bit 0 cleared, the rest kept
            assert (await raw.read_coils(1, count=1, device_id=1)).bits[0] is True

            with pytest.raises(WriteError, match="exception 2 \\(illegal data address\\)"):
                await conn.write("ghost", 1)
            with pytest.raises(WriteError, match="not writable"):
                await conn.write("locked", 1)
            with pytest.raises(WriteError, match="read-only input table"):
                await conn.write("pressure", 1)
            with pytest.raises(WriteError, match="expected a number"):
                await conn.write("temp", "hot")
            with pytest.raises(WriteError, match="out of range"):
                await conn.write("setpoint", 4000.0)
            assert conn.status.state is ConnectorState.CONNECTED
    finally:
        raw.close()


async def test_writes_jump_the_queue_but_never_overlap_a_request():
    in_flight = 0
    overlap = 0
    release = asyncio.Event()

    async def slow(fc, start, address, count, regs, values):
        nonlocal in_flight, overlap
        in_flight += 1
        overlap = max(overlap, in_flight)
        try:
            if values is None and not release.is_set():
                # reads are slow, so the connector's queue fills up with them
                await asyncio.sleep(0.03)
        finally:
            in_flight -= 1
        return None

    def devices():
        return [
            SimDevice(
                id=u,
                simdata=[SimData(0, values=list(range(10)), datatype=DataType.REGISTERS)],
                action=slow,
            )
            for u in range(1, 7)
        ]

    s = ModbusTestServer(devices)
    await s.start()
    try:
        devs = [
            {
                "unit_id": u,
                "asset": f"m{u}",
                "poll_interval": 0,
                "points": [{"tag": "sp", "address": 0, "writable": True}],
            }
            for u in range(1, 7)
        ]
        conn = ModbusConnector(config(s.port, devs, timeout=2.0))
        async with conn:
            await wait_until(lambda: len(s.reads()) > 20, 10, "polling under way")
            positions = []
            for value in (11, 12, 13):
                before = len(s.requests)
                await conn.write("m3/sp", value)
                index = next(
                    i for i, r in enumerate(s.requests) if r.function_code == 6 and i >= before
                )
                positions.append(index - before)
        # five other units had reads waiting; the write went out right after the one in flight
        assert max(positions) <= 1, positions
        assert overlap == 1, "the server saw two requests of one connection at once"
    finally:
        release.set()
        await s.stop()


@pytest.mark.parametrize("columns", [False, True], ids=["readings", "columns"])
async def test_device_gone_gives_one_bad_reading_per_point_backs_off_then_recovers(columns):
    s = ModbusTestServer(lambda: [standard_device(1)])
    await s.start()
    points = [{"tag": "count", "address": 0}, {"tag": "coil0", "table": "coil", "address": 0}]
    sink = Sink()
    conn = ModbusConnector(
        config(
            s.port,
            [{"unit_id": 1, "asset": "m", "poll_interval": 0.02, "points": points}],
            backoff={"initial": 0.1, "max": 0.4, "factor": 2.0, "jitter": 0.0},
        )
    )
    sink.attach(conn, columns)
    try:
        async with conn:
            await wait_until(lambda: sink.has_good({("m", "count"), ("m", "coil0")}), 10, "good")
            await s.stop()
            await wait_until(lambda: conn.status.state is ConnectorState.RECONNECTING, 10, "loss")
            # a few backoff rounds with the device away
            await wait_until(lambda: conn.status.attempts >= 3, 10, "three reconnect attempts")
            status = conn.status
            assert status.next_attempt_at is not None and status.last_error
            bad = [r for r in sink.readings if r.quality is Quality.BAD]
            assert sorted(r.tag for r in bad) == ["coil0", "count"]  # once per point, no flood
            assert {r.status for r in bad} == {STATUS_DISCONNECTED}
            mark = len(sink.readings)
            await s.start()
            await wait_until(
                lambda: conn.status.state is ConnectorState.CONNECTED, 10, "reconnected"
            )
            await wait_until(
                lambda: any(r.quality is Quality.GOOD for r in sink.readings[mark:]),
                10,
                "good again",
            )
            assert conn.status.attempts == 0  # backoff reset after success
    finally:
        await s.stop()


@pytest.mark.parametrize("columns", [False, True], ids=["readings", "columns"])
async def test_a_unit_that_stops_answering_is_bad_once_and_polled_with_backoff(server, columns):
    # unit 7 is configured but absent: pymodbus answers nothing for it (like a dead RS-485 drop)
    gone = asyncio.Event()

    async def mute(fc, start, address, count, regs, values):
        if gone.is_set():
            await asyncio.sleep(0.6)  # longer than the client's timeout: no answer in time
        return None

    s = ModbusTestServer(
        lambda: [
            standard_device(1),
            SimDevice(
                id=7, simdata=[SimData(0, values=[5] * 4, datatype=DataType.REGISTERS)], action=mute
            ),
        ]
    )
    await s.start()
    sink = Sink()
    devs = [
        {
            "unit_id": 1,
            "asset": "ok",
            "poll_interval": 0.05,
            "points": [{"tag": "count", "address": 0}],
        },
        {
            "unit_id": 7,
            "asset": "mute",
            "poll_interval": 0.05,
            "points": [{"tag": "a", "address": 0}, {"tag": "b", "address": 1}],
        },
    ]
    conn = ModbusConnector(
        config(s.port, devs, timeout=0.2, backoff={"initial": 0.5, "max": 1.0, "jitter": 0.0})
    )
    sink.attach(conn, columns)
    try:
        async with conn:
            await wait_until(lambda: sink.has_good({("ok", "count"), ("mute", "a")}), 10, "good")
            gone.set()
            await wait_until(lambda: conn.no_response_total >= 1, 10, "a timeout")
            mark_unit7 = len(s.reads(7))
            mark_ok = len(s.reads(1))
            await wait_until(lambda: len(s.reads(1)) >= mark_ok + 20, 10, "unit 1 keeps polling")
            bad = [r for r in sink.readings if r.asset == "mute" and r.quality is Quality.BAD]
            assert sorted(r.tag for r in bad) == ["a", "b"]
            assert {r.status for r in bad} == {STATUS_NO_RESPONSE}
            # late answers of the silent unit are not mistaken for the healthy unit's
            assert all(r.quality is Quality.GOOD for r in sink.readings if r.asset == "ok")
            # while unit 1 polled 20 times, the silent unit was retried only at backoff pace
            assert len(s.reads(7)) - mark_unit7 <= 4
            assert conn.status.state is ConnectorState.CONNECTED
            gone.clear()
            mark = len(sink.readings)
            await wait_until(
                lambda: any(
                    r.asset == "mute" and r.quality is Quality.GOOD for r in sink.readings[mark:]
                ),
                10,
                "unit 7 back",
            )
    finally:
        gone.clear()
        await s.stop()


async def test_rtu_framing_over_tcp():
    s = ModbusTestServer(lambda: [standard_device(1)], framer=FramerType.RTU)
    await s.start()
    try:
        cfg = config(
            s.port, [{"unit_id": 1, "asset": "m", "poll_interval": 0.05, "points": ALL_TYPES}]
        )
        cfg.transport.framing = "rtu"  # type: ignore[union-attr]
        sink = Sink()
        conn = ModbusConnector(cfg)
        conn.set_sink(sink)
        async with conn:
            await wait_until(
                lambda: sink.has_good({("m", p["tag"]) for p in ALL_TYPES}), 10, "all good"
            )
        assert sink.value("m", "temp_cdab") == 21.5
    finally:
        await s.stop()


async def test_serial_rtu_through_a_pseudo_terminal_pair():
    pty = PtyPair()
    await pty.start()
    s = ModbusTestServer(
        lambda: [standard_device(1), standard_device(2)], serial_port=pty.a, baudrate=38400
    )
    try:
        await s.start()
        points = [
            p for p in ALL_TYPES if p["tag"] in ("count", "temp", "serial", "coil0", "pressure")
        ]
        points = [*points, {"tag": "sp", "address": 5, "writable": True}]
        cfg = ModbusConfig.model_validate(
            {
                "name": "modbus-serial",
                "transport": {"type": "serial", "port": pty.b, "baudrate": 38400, "parity": "N"},
                "timeout": 0.5,
                "retries": 1,
                "devices": [
                    {"unit_id": 1, "asset": "m1", "poll_interval": 0.05, "points": points},
                    {"unit_id": 2, "asset": "m2", "poll_interval": 0.05, "points": points},
                ],
            }
        )
        sink = Sink()
        conn = ModbusConnector(cfg)
        conn.set_sink(sink)
        async with conn:
            want = {(a, p["tag"]) for a in ("m1", "m2") for p in points}
            await wait_until(lambda: sink.has_good(want), 15, "both units over RTU")
            await conn.write("m2/sp", 4242)
            await wait_until(lambda: sink.value("m2", "sp") == 4242, 10, "written value read back")
        assert sink.value("m1", "count") == 100 and sink.value("m2", "count") == 200
        assert sink.value("m1", "temp") == 21.5 and sink.value("m1", "serial") == "EDGELOOP"
        assert not math.isnan(sink.value("m2", "temp"))
    finally:
        await s.stop()
        await pty.stop()
