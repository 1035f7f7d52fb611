"""Processes that die: the agent SIGKILLed under load, the cloud SIGKILLed, and a gateway that
loses its state directory (SIGKILL, ``state_dir`` deleted, restarted with the same agent_id)."""

from __future__ import annotations

import random

from tests.chaos.checker import History, Row, read_events
from tests.chaos.rig import AGENT_ID, Rig
from tests.chaos.scenario import Scenario, under_load

NEW_INCARNATION_RULE = "edgeloop.new_incarnation"  # cloud.service.NEW_INCARNATION_RULE


async def agent_kills(rig: Rig, quick: bool, rng: random.Random) -> str:
    n = 2 if quick else 10
    for i in range(n):
        await rig.wait_agent_delivering(50)  # the (restarted) agent is delivering again
        await under_load(rig, rng.uniform(0.5, 5.0))  # the kill lands anywhere in a tick
        rig.step(f"SIGKILL agent ({i + 1}/{n}), restart at once")
        await rig.kill_agent()
        rig.start_agent()
    await rig.wait_agent_delivering(20)
    await under_load(rig, 3)
    return f"{n} agent SIGKILLs under load, each restarted at once"


async def cloud_kills(rig: Rig, quick: bool, rng: random.Random) -> str:
    n = 1 if quick else 3
    for i in range(n):
        await rig.wait_agent_delivering(50)
        await under_load(rig, rng.uniform(0.5, 4.0))
        rig.step(f"SIGKILL cloud ({i + 1}/{n})")
        await rig.kill_cloud()
        await under_load(rig, rng.uniform(2.0, 6.0))  # down for a moment; the agent goes on
        rig.step("cloud restarted")
        await rig.start_cloud()
    await rig.wait_agent_delivering(50)
    await under_load(rig, 3)
    return f"{n} cloud SIGKILLs under load, each down 2-6 s"


async def state_wipe(rig: Rig, quick: bool, rng: random.Random) -> str:
    await rig.wait_agent_delivering(100)
    await under_load(rig, rng.uniform(0.5, 3.0))
    rig.step("SIGKILL agent, state_dir copied aside and deleted, restarted (same agent_id)")
    await rig.wipe_agent_state()
    rig.start_agent()
    await rig.wait_agent_delivering(100)
    await under_load(rig, 5)
    return "agent SIGKILLed, its state directory deleted, restarted with the same agent_id"


async def expect_new_incarnation(rig: Rig, h: History, row: Row) -> list[str]:
    incarnations = [ob.incarnation for ob in h.outboxes]
    problems = []
    if len(set(incarnations)) != len(incarnations):
        problems.append(f"the wiped outbox came back with an old incarnation: {incarnations}")
    recorded = read_events(rig.cloud_db, AGENT_ID, NEW_INCARNATION_RULE)
    if not any(e["values"].get("incarnation") == incarnations[-1] for e in recorded):
        problems.append("the cloud recorded no new-incarnation event for the wiped gateway")
    row.notes.append(f"incarnations {' -> '.join(incarnations)}")
    return problems


SCENARIOS = [
    Scenario(
        "agent-sigkill",
        "the agent is SIGKILLed under load 10 times (2 in the quick subset) at random moments "
        "and restarted at once",
        agent_kills,
        quick=True,
    ),
    Scenario(
        "cloud-sigkill",
        "the cloud is SIGKILLed under load 3 times (1 quick), stays down 2-6 s, restarts",
        cloud_kills,
    ),
    Scenario(
        "state-wiped",
        "the agent is SIGKILLed, its state directory (outbox) copied aside and deleted, and it "
        "restarts with the same agent_id: a new incarnation",
        state_wipe,
        expect=expect_new_incarnation,
    ),
]
