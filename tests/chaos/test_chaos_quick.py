"""The quick subset of the chaos suite, in ``make test``: the scenarios marked ``quick`` with their
short faults (two agent SIGKILLs, the broker restarted empty after a 10 s outage, poison on all
three protocols), against real processes, held to the same promise as ``make chaos``: nothing
lost, nothing applied twice, every check of the row passed. ``python -m tests.chaos --quick``
runs the same and prints the table; the long scenarios are never collected by pytest."""

from __future__ import annotations

import json

import pytest

from edgeloop.services import find_mosquitto
from tests.chaos.catalog import SCENARIOS
from tests.chaos.scenario import run_scenario
from tests.conftest import IN_CI

pytestmark = pytest.mark.slow

QUICK = [s for s in SCENARIOS if s.quick]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", QUICK, ids=[s.name for s in QUICK])
async def test_chaos_scenario_loses_nothing_and_applies_nothing_twice(scenario):
    if find_mosquitto() is None:
        if IN_CI:
            pytest.fail("mosquitto is not installed; `make test` installs it as root")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    row = await run_scenario(scenario, quick=True)
    report = json.dumps(row.to_json(), indent=1, default=str)
    assert row.lost == 0, f"{row.lost} batches lost: {report}"
    assert row.applied_twice == 0, f"{row.applied_twice} batches applied twice: {report}"
    assert not row.problems, f"failed checks: {report}"
    assert row.created > 0 and row.applied >= row.created - row.dropped - row.destroyed
