"""Every scenario of the suite, in the order a full run takes them."""

from __future__ import annotations

from tests.chaos import scenarios_broker, scenarios_crash, scenarios_poison
from tests.chaos.scenario import Scenario

SCENARIOS: list[Scenario] = [
    *scenarios_crash.SCENARIOS,
    *scenarios_broker.SCENARIOS,
    *scenarios_poison.SCENARIOS,
]
BY_NAME = {s.name: s for s in SCENARIOS}
