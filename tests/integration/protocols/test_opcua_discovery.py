"""``discover opc.tcp://...`` against real servers; its starter config drives the real connector."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import yaml
from click.testing import CliRunner

from edgeloop.cli import cli
from protocols.discovery import DiscoverOptions, render_report
from protocols.opcua import OpcUaConfig, OpcUaConnector
from protocols.opcua_discovery import discover
from shared.records import Quality, Reading
from tests.integration.connectors.harness_opcua import NS_URI, OpcUaTestServer
from tests.waiting import wait_until


@pytest.fixture
async def server() -> AsyncIterator[OpcUaTestServer]:
    srv = await OpcUaTestServer().start()
    try:
        yield srv
    finally:
        await srv.close()


async def readings_from(config: dict, within: float = 10) -> list[Reading]:
    cfg = OpcUaConfig.model_validate(config)
    conn = OpcUaConnector(cfg)
    got: list[Reading] = []
    conn.set_sink(got.extend)
    expected = {(n.asset, n.tag) for n in cfg.nodes}
    async with conn:
        await wait_until(lambda: expected <= {(r.asset, r.tag) for r in got}, within, "every node")
    return got


async def test_discover_reports_types_units_rates_and_a_starter_config_that_works(server):
    report = await discover(server.url, DiscoverOptions(seconds=1.0, timeout=3.0))
    points = {p.tag: p for p in report.points}
    assert {"Temperature", "Counter", "Running", "Name", "Speed", "Blob"} <= set(points)
    assert not any(p.address.startswith("i=22") for p in report.points)  # Server object skipped
    temp = points["Temperature"]
    assert temp.asset == "Line1.M1"
    assert (temp.type, temp.unit) == ("Double", "°C")
    assert temp.address == f"nsu={NS_URI};s=Line1.M1.Temperature"
    assert temp.rate_hz is not None and temp.rate_hz > 5  # the ticker updates every 50 ms
    assert temp.minimum is not None and temp.maximum is not None and temp.minimum < temp.maximum
    assert points["Counter"].type == "UInt32"
    assert points["Running"].bad_share == 0.0
    assert "EURange" not in points and "EngineeringUnits" not in points  # properties aren't points
    assert any("Blob" in note and "ByteString" in note for note in report.notes)
    text = render_report(report)
    assert "Temperature" in text and "°C" in text

    starter = report.starter_config
    assert starter["kind"] == "opcua"
    assert "Blob" not in {n["tag"] for n in starter["nodes"]}
    got = await readings_from(starter)
    assert {r.tag for r in got} >= {"Temperature", "Counter", "Running", "Name"}


async def test_discover_cli_writes_a_starter_config_the_connector_accepts(server, tmp_path):
    out = tmp_path / "x.yaml"
    url = server.url.replace("opc.tcp://", "opcua://")  # both schemes are accepted
    # click runs asyncio.run() itself: give it a thread while this loop keeps serving OPC UA.
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["discover", url, "--seconds", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Temperature" in result.output and "starter config written" in result.output
    doc = yaml.safe_load(out.read_text())
    (starter,) = doc["connectors"]
    assert starter["endpoint"] == server.url
    got = await readings_from(starter)
    assert any(r.tag == "Temperature" for r in got)


async def test_connector_reads_the_factory_simulator_through_a_discovered_config():
    sim_mod = pytest.importorskip("simulators")
    from simulators.config import ModbusServerConfig, OpcUaServerConfig

    cfg = sim_mod.SimConfig(
        update_hz=10,
        opcua=OpcUaServerConfig(port=0),
        modbus=ModbusServerConfig(enabled=False),
    )
    async with sim_mod.FactorySimulator(cfg) as sim:
        report = await discover(sim.opcua_endpoint, DiscoverOptions(seconds=1.0, timeout=3.0))
        assert report.points and report.starter_config
        assert any(p.unit for p in report.points)
        numeric = [p for p in report.points if p.rate_hz]
        assert numeric, "the simulator updates its analog tags"
        got = await readings_from(report.starter_config, within=15)
    assets = {r.asset for r in got}
    assert len(assets) >= 2
    assert all(r.ts_ns > 0 for r in got)
    assert any(r.quality is Quality.GOOD for r in got)
