from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from simulators import FactorySimulator, SimConfig
from simulators.config import FaultSpec, ModbusServerConfig, OpcUaServerConfig, ScenarioConfig


def frozen_config(**scenario) -> SimConfig:
    """A simulator whose update loop practically never fires (0.01 Hz): tests step it with
    ``update_once()`` so what the servers show can be compared exactly with the scenario."""
    base = {"seed": 3, "fault_interval": None, "anomaly_interval": None, "speed": 1.0}
    return SimConfig(
        scenario=ScenarioConfig(**(base | scenario)),
        update_hz=0.01,
        opcua=OpcUaServerConfig(port=0),
        modbus=ModbusServerConfig(port=0),
    )


@pytest.fixture
async def frozen_sim() -> AsyncIterator[FactorySimulator]:
    cfg = frozen_config(faults=[FaultSpec(asset="m3", at=5.0, duration=1e6)])
    async with FactorySimulator(cfg) as sim:
        yield sim


def step(sim: FactorySimulator, to_t: float) -> None:
    assert sim.scenario is not None
    sim.scenario.advance_to(to_t)
