"""Poison input on all three protocols, under load. Nothing may stop the data path: inputs that
cannot become readings are dead-letter events that reach the cloud, MQTT messages are acked once
their dead letter is durable (never redelivered forever), bad Modbus registers are bad-quality
readings, and everything else keeps flowing (the numbered stream loses nothing)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

from shared.records import Quality, Reading
from tests.chaos.checker import History, Row, read_events
from tests.chaos.load import as_json, publish_all
from tests.chaos.rig import AGENT_ID, Rig, RigOptions
from tests.chaos.scenario import Scenario, under_load
from tests.waiting import wait_until

STATUS_DECODE_ERROR = 0x102  # protocols.modbus.STATUS_DECODE_ERROR
MODBUS_ILLEGAL_ADDRESS = 0x02
#: the MQTT poison: (tag, payload) on poison/p1/<tag>; each must become a dead letter
MQTT_POISON_TAGS = ("json", "ts_huge", "iso2200", "iso9999", "not_utf8", "digits")
BIG = 10**30  # an integer beyond 64 bits: the wire carries it, it must arrive as a reading


def mqtt_poison(now_ms: int) -> list[tuple[str, bytes]]:
    t = "poison/p1/"
    return [
        (t + "before", as_json({"v": 1.0, "ts": now_ms})),
        (t + "json", b'{"v": 1.0, "ts": '),
        (t + "ts_huge", b'{"v": 2.0, "ts": 99999999999999999999999}'),
        (t + "iso2200", as_json({"v": 3.0, "ts": "2200-01-01T00:00:00Z"})),
        (t + "iso9999", as_json({"v": 4.0, "ts": "9999-12-31T23:59:59Z"})),
        (t + "not_utf8", b"\xff\xfe\xfd{\x80 not text"),
        (t + "digits", b'{"v": ' + b"7" * 5000 + b', "ts": ' + str(now_ms).encode() + b"}"),
        (t + "bigint", json.dumps({"v": BIG, "ts": now_ms + 1}).encode()),
        (t + "after", as_json({"v": 5.0, "ts": now_ms + 2})),
    ]


async def poison(rig: Rig, quick: bool, rng: random.Random) -> str:
    assert rig.mosquitto is not None and rig.device is not None
    device = rig.device
    await rig.wait_agent_delivering(50)
    rig.marks["poison"] = time.time_ns()
    rig.step("poison: MQTT messages published (all PUBACKed), device poisoned")
    await asyncio.to_thread(
        publish_all, rig.mosquitto.url, mqtt_poison(time.time_ns() // 1_000_000)
    )
    device.send("poison")
    await wait_until(lambda: "poisoned" in device.log_text(), 20, "the device poisoned")
    await under_load(rig, 5)
    what = "MQTT x6, OPC UA x4, Modbus x3 poison inputs under load"
    if not quick:
        # the agent must not wedge on what its sources redeliver after a crash
        rig.step("SIGKILL agent after the poison, restart")
        await rig.kill_agent()
        rig.start_agent()
        await rig.wait_agent_delivering(50)
        what += ", then an agent SIGKILL"
    rig.marks["heal"] = time.time_ns()
    rig.step("device healed")
    device.send("heal")
    await wait_until(lambda: "healed" in device.log_text(), 20, "the device healed")
    await rig.wait_agent_delivering(50)
    await under_load(rig, 3)
    return what


def _applied_readings(h: History, asset: str) -> list[Reading]:
    applied = set(h.applied)
    return [r for i in applied for r in h.ledger.readings.get(i, ()) if r.asset == asset]


async def expect_poison_handled(rig: Rig, h: History, row: Row) -> list[str]:
    problems: list[str] = []
    letters = read_events(rig.cloud_db, AGENT_ID)
    sources = [str(e["values"].get("source", "")) for e in letters]
    found: dict[str, int] = {}

    def letter(where: str, key: str, needle: str) -> None:
        n = sum(needle in s for s in sources)
        found[key] = n
        if not n:
            problems.append(f"{where}: no dead letter in the cloud for {key}")

    for tag in MQTT_POISON_TAGS:
        letter("MQTT", tag, f"poison/p1/{tag}")
    for node in ("ua_far", "ua_future", "ua_blob", "ua_array"):
        letter("OPC UA", node, f"dev.{node}")
    row.notes.append(
        "dead letters in the cloud per poison input: "
        + ", ".join(f"{k} {v}" for k, v in found.items())
    )
    mqtt = {r.tag: r for r in _applied_readings(h, "p1")}
    for tag, value in (("before", 1.0), ("bigint", BIG), ("after", 5.0)):
        got = mqtt.get(tag)
        if got is None or got.value != value:
            problems.append(
                f"MQTT poison/p1/{tag}: expected a reading {value!r} applied, got "
                f"{None if got is None else got.value!r}"
            )
    poisoned, healed = rig.marks["poison"], rig.marks["heal"]
    dev = _applied_readings(h, "dev")

    def readings(tag: str) -> list[Reading]:
        return [r for r in dev if r.tag == tag]

    for tag, value in (("ua_far", 78.0), ("ua_future", 67.0)):
        if not any(r.value == value for r in readings(tag)):
            problems.append(f"OPC UA {tag}: the value after the poison ({value}) never arrived")
    for tag in ("ua_far", "ua_future"):
        bad = [r.value for r in readings(tag) if r.value in (77.0, 66.0)]
        if bad:
            problems.append(f"OPC UA {tag}: a poisoned value was applied as a reading: {bad}")
    for tag in ("ua_good", "mb_good"):
        if not any(r.ts_ns > healed for r in readings(tag)):
            problems.append(f"{tag}: no reading after the poison (the connector stopped)")
    checks: list[tuple[str, Any]] = [
        ("mb_name", lambda r: r.quality is Quality.BAD and r.status == STATUS_DECODE_ERROR),
        ("mb_beyond", lambda r: r.quality is Quality.BAD and r.status == MODBUS_ILLEGAL_ADDRESS),
        ("mb_ghost", lambda r: r.quality is Quality.BAD),
    ]
    for tag, ok in checks:
        if not any(ok(r) for r in readings(tag)):
            statuses = sorted({(int(r.quality), r.status) for r in readings(tag)})
            problems.append(
                f"Modbus {tag}: no bad-quality reading with the expected status applied "
                f"(quality, status seen: {statuses[:5]})"
            )
    if not any(r.value == "OK" and r.ts_ns > healed for r in readings("mb_name")):
        problems.append("Modbus mb_name: the good value after the poison never arrived")
    if not any(poisoned < r.ts_ns for r in readings("mb_name") if r.quality is Quality.BAD):
        problems.append("Modbus mb_name: no bad reading after the poison")
    return problems


SCENARIOS = [
    Scenario(
        "poison",
        "poison on every protocol under load — MQTT: malformed JSON, ts 99999999999999999999999, "
        "ISO years 2200 and 9999, non-UTF-8 bytes, a 5,000-digit and a 10**30 integer; OPC UA: "
        "SourceTimestamp 9999-12-31 and 2200-01-01, a ByteString, an array; Modbus: a string "
        "register that is not UTF-8, exception 0x02, a missing unit (0x0B); then (full run) an "
        "agent SIGKILL",
        poison,
        options=RigOptions(device=True, mqtt_poison=True),
        expect=expect_poison_handled,
        quick=True,
    ),
]
