"""The Modbus connector against the factory simulator's Modbus TCP server (docs/modbus-register-map.md)."""

from __future__ import annotations

import math

from protocols.modbus import ModbusConfig, ModbusConnector
from shared.records import Quality
from simulators import FactorySimulator, SimConfig
from tests.waiting import wait_until


def _machine(unit: int) -> dict:
    return {
        "unit_id": unit,
        "asset": f"m{unit}",
        "poll_interval": 0.1,
        "points": [
            {"tag": "spindle_speed", "table": "input", "address": 0, "type": "float32"},
            {"tag": "spindle_temp", "table": "input", "address": 4, "type": "float32"},
            {"tag": "power", "table": "input", "address": 8, "type": "float32", "scale": 1000},
            {"tag": "state", "table": "input", "address": 12, "type": "uint16"},
            {"tag": "part_counter", "table": "input", "address": 13, "type": "uint32"},
            {"tag": "speed_dropout", "table": "input", "address": 16, "type": "bit", "bit": 0},
            {"tag": "stop_request", "table": "coil", "address": 1, "writable": True},
            {"tag": "idle", "table": "discrete", "address": 1},
        ],
    }


async def test_reads_and_writes_the_simulated_machines():
    sim = FactorySimulator(
        SimConfig.model_validate(
            {
                "scenario": {"machines": 2, "speed": 20},
                "update_hz": 10,
                "opcua": {"enabled": False},
                "modbus": {"port": 0},
            }
        )
    )
    async with sim:
        host, port = sim.modbus_address
        cfg = ModbusConfig.model_validate(
            {
                "name": "sim-modbus",
                "transport": {"type": "tcp", "host": host, "port": port},
                "timeout": 1.0,
                "devices": [_machine(1), _machine(2)],
            }
        )
        seen: dict = {}
        conn = ModbusConnector(cfg)
        conn.set_sink(lambda batch: seen.update({(r.asset, r.tag): r for r in batch}))
        # the map is contiguous per table: one read per table and unit
        assert [(b.table, b.address, b.count) for b in conn.read_plan[1]] == [
            ("input", 0, 17),
            ("coil", 1, 1),
            ("discrete", 1, 1),
        ]
        async with conn:
            want = {(f"m{u}", p["tag"]) for u in (1, 2) for p in _machine(u)["points"]}
            await wait_until(lambda: want <= set(seen), 10, "every simulated tag")
            temp = seen[("m1", "spindle_temp")]
            assert temp.quality is Quality.GOOD
            assert math.isnan(temp.value) or 0 < temp.value < 200
            await conn.write("m2/stop_request", True)
            await wait_until(lambda: seen[("m2", "stop_request")].value is True, 10, "coil set")
            await wait_until(lambda: seen[("m2", "idle")].value is True, 15, "m2 stops and idles")
            await conn.write("m2/stop_request", False)
        assert conn.exceptions_total == 0 and conn.malformed_total == 0
