"""The factory simulator: a seeded production line served over OPC UA, Modbus TCP and MQTT.

The pure scenario (:class:`Scenario`, :func:`iter_labels`) needs only numpy; the servers
(:class:`FactorySimulator`) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from simulators.config import ScenarioConfig, SimConfig
from simulators.scenario import Scenario, Snapshot, TruthEvent, iter_labels

if TYPE_CHECKING:
    from simulators.factory import FactorySimulator

__all__ = [
    "FactorySimulator",
    "Scenario",
    "ScenarioConfig",
    "SimConfig",
    "Snapshot",
    "TruthEvent",
    "iter_labels",
]


def __getattr__(name: str) -> Any:
    if name == "FactorySimulator":
        from simulators.factory import FactorySimulator

        return FactorySimulator
    raise AttributeError(f"module 'simulators' has no attribute {name!r}")
