"""``edgeloop discover modbus://...`` against a real pymodbus server, end to end to a working config."""

from __future__ import annotations

import asyncio
import contextlib

import yaml
from click.testing import CliRunner

from edgeloop.cli import cli
from protocols.discovery import DiscoverOptions
from protocols.modbus import ModbusConfig, ModbusConnector
from protocols.modbus_discovery import discover
from shared.records import Quality
from tests.integration.connectors.harness_modbus import ModbusTestServer, standard_device
from tests.waiting import wait_until


async def _drive_register_5(server: ModbusTestServer, stop: asyncio.Event) -> None:
    """Change unit 1's holding register 5 while discovery observes it."""
    client = await server.client()
    try:
        value = 0
        while not stop.is_set():
            value += 1
            await client.write_register(5, value, device_id=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    finally:
        client.close()


async def test_discover_finds_units_maps_and_types():
    server = ModbusTestServer(lambda: [standard_device(1), standard_device(3)])
    await server.start()
    stop = asyncio.Event()
    driver = asyncio.create_task(_drive_register_5(server, stop))
    try:
        report = await discover(
            f"modbus://127.0.0.1:{server.port}",
            DiscoverOptions(seconds=1.0, units=(1, 2, 3), address_range=(0, 49), timeout=0.5),
        )
    finally:
        stop.set()
        await driver
        await server.stop()
    by_addr = {p.address: p for p in report.points}
    assert {p.asset for p in report.points} == {"unit1", "unit3"}
    assert by_addr["hr:0@unit1"].type == "int16" and by_addr["hr:0@unit1"].example == "100"
    assert by_addr["hr:10-11@unit1"].type == "float32"
    assert by_addr["hr:10-11@unit1"].example == "21.5"
    assert by_addr["hr:20-23@unit3"].type == "string[4]"
    assert by_addr["hr:20-23@unit3"].example == "'EDGELOOP'"
    assert "hr:15@unit1" not in by_addr  # unmapped hole
    assert {f"co:{i}@unit1" for i in range(16)} <= set(by_addr)
    assert "co:16@unit1" not in by_addr
    assert {f"ir:{i}@unit1" for i in range(5)} <= set(by_addr)
    changing = by_addr["hr:5@unit1"]
    assert changing.rate_hz is not None and changing.rate_hz > 2
    assert changing.maximum is not None and changing.maximum > changing.minimum
    assert by_addr["hr:6@unit1"].rate_hz == 0
    assert all(p.bad_share == 0 for p in report.points)
    assert any("unit(s) 2" in n for n in report.notes)


async def test_cli_writes_a_starter_config_the_connector_runs(tmp_path):
    server = ModbusTestServer(lambda: [standard_device(1), standard_device(2)])
    await server.start()
    out = tmp_path / "x.yaml"
    try:
        result = await asyncio.to_thread(
            CliRunner().invoke,
            cli,
            [
                "discover",
                f"modbus://127.0.0.1:{server.port}",
                "--units",
                "1-4",
                "--range",
                "0-49",
                "--seconds",
                "0.3",
                "--timeout",
                "0.5",
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        assert "hr:10-11@unit2" in result.output and "float32" in result.output
        assert "unit(s) 3, 4" in result.output
        doc = yaml.safe_load(out.read_text())
        cfg = ModbusConfig.model_validate(doc["connectors"][0])
        assert [d.unit_id for d in cfg.devices] == [1, 2]
        for dev in cfg.devices:
            dev.poll_interval = 0.05
        conn = ModbusConnector(cfg)
        seen = {}
        conn.set_sink(lambda batch: seen.update({(r.asset, r.tag): r for r in batch}))
        want = {(d.asset, p.tag) for d in cfg.devices for p in d.points}
        async with conn:
            await wait_until(lambda: want <= set(seen), 10, "a reading of every discovered point")
        assert all(r.quality is Quality.GOOD for r in seen.values())
        assert seen[("unit2", "hr0")].value == 200
        assert seen[("unit1", "hr10")].value == 21.5
        assert seen[("unit1", "hr20")].value == "EDGELOOP"
        assert seen[("unit1", "co0")].value is True
    finally:
        await server.stop()


async def test_discover_refuses_an_unreachable_device():
    from edgeloop.services import free_port

    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["discover", f"modbus://127.0.0.1:{free_port()}", "--seconds", "0", "--timeout", "0.5"],
    )
    assert result.exit_code != 0
    assert "cannot connect" in result.output
