"""The Kafka-protocol broker misbehaves: stopped and restarted empty (Tansu keeps its log in
memory, like a topic deleted and re-created on Apache Kafka), frozen with SIGSTOP, and down long
enough for a tiny outbox to overflow."""

from __future__ import annotations

import random

from tests.chaos.checker import History, Row
from tests.chaos.rig import Rig, RigOptions
from tests.chaos.scenario import Scenario, under_load


async def broker_restarted_empty(rig: Rig, quick: bool, rng: random.Random) -> str:
    outage = 10.0 if quick else 60.0
    await rig.wait_agent_delivering(100)
    await under_load(rig, rng.uniform(0.5, 3.0))
    rig.step(f"broker stopped for {outage:.0f} s")
    await rig.stop_broker()
    await under_load(rig, outage)  # the outage itself
    rig.step("broker started again on the same port, empty")
    await rig.start_broker_empty()
    await rig.wait_agent_delivering(100, within=180)
    await under_load(rig, 5)
    return f"broker stopped {outage:.0f} s under load, restarted empty"


async def broker_restarted_repartitioned(rig: Rig, quick: bool, rng: random.Random) -> str:
    await broker_restarted_empty(rig, True, rng)  # a 10 s outage is enough here
    return "cloud topics with 2 partitions; broker stopped 10 s under load, restarted empty"


async def broker_paused(rig: Rig, quick: bool, rng: random.Random) -> str:
    pause = 10.0 if quick else 30.0
    await rig.wait_agent_delivering(100)
    await under_load(rig, rng.uniform(0.5, 3.0))
    rig.step(f"broker SIGSTOP for {pause:.0f} s")
    rig.pause_broker()
    await under_load(rig, pause)  # the stall itself
    rig.step("broker SIGCONT")
    await rig.resume_broker()
    await rig.wait_agent_delivering(100, within=180)
    await under_load(rig, 5)
    return f"broker SIGSTOPped {pause:.0f} s under load, then SIGCONT"


async def outbox_overflow(rig: Rig, quick: bool, rng: random.Random) -> str:
    outage = 10.0 if quick else 20.0
    await rig.wait_agent_delivering(100)
    await under_load(rig, rng.uniform(0.5, 3.0))
    rig.step(f"broker stopped for {outage:.0f} s (outbox.max_bytes 64 KiB)")
    await rig.stop_broker()
    await under_load(rig, outage)
    rig.step("broker started again, empty")
    await rig.start_broker_empty()
    await rig.wait_agent_delivering(100, within=180)
    await under_load(rig, 5)
    return f"outbox.max_bytes 64 KiB, broker down {outage:.0f} s (restarted empty)"


async def expect_overflow(rig: Rig, h: History, row: Row) -> list[str]:
    if not row.dropped:
        return ["the outbox never overflowed: the scenario tested nothing"]
    return []


SCENARIOS = [
    Scenario(
        "broker-restarted-empty",
        "the broker is stopped for 60 s under load (10 s quick) and started again on the same "
        "port with an empty log",
        broker_restarted_empty,
        quick=True,
    ),
    Scenario(
        "broker-restarted-repartitioned",
        "as broker-restarted-empty (10 s outage), with the cloud creating its topics with 2 "
        "partitions: whoever re-creates them after the loss (a producer: the broker's default of "
        "4) may give them another partition count, so a resent batch can land on another "
        "partition than its first copy",
        broker_restarted_repartitioned,
        options=RigOptions(partitions=2),
    ),
    Scenario(
        "broker-sigstop",
        "the broker is frozen with SIGSTOP for 30 s under load, then SIGCONT",
        broker_paused,
    ),
    Scenario(
        "outbox-full",
        "outbox.max_bytes 64 KiB (drop_oldest) and the broker down 20 s: the outbox overflows; "
        "drops are allowed but must be accounted in the outbox's dropped ranges",
        outbox_overflow,
        options=RigOptions(outbox_max_bytes=64 * 1024),
        expect=expect_overflow,
    ),
]
