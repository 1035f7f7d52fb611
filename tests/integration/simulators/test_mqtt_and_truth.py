"""Quality results over MQTT (plain paho subscriber) match the ground-truth file."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simulators import FactorySimulator, SimConfig
from simulators.config import (
    ModbusServerConfig,
    MqttPublisherConfig,
    OpcUaServerConfig,
    ScenarioConfig,
)
from tests.waiting import wait_until


async def test_published_quality_results_match_the_truth_file(
    mqtt_broker: str, tmp_path: Path
) -> None:
    host, port = mqtt_broker.removeprefix("mqtt://").split(":")
    got: list[dict] = []
    sensors: list[str] = []
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(c, userdata, msg) -> None:
        with lock:
            if msg.topic.endswith("/quality"):
                got.append(json.loads(msg.payload) | {"topic": msg.topic})
            else:
                sensors.append(msg.topic)

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sim-test-sub")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe("plant/line1/#", qos=1)
    sub.connect(host, int(port))
    sub.loop_start()
    try:
        await wait_until(subscribed.is_set, 10, "subscription")
        truth = tmp_path / "truth.jsonl"
        cfg = SimConfig(
            scenario=ScenarioConfig(seed=5, speed=40.0, drift_at=20.0),
            update_hz=20,
            truth=str(truth),
            opcua=OpcUaServerConfig(enabled=False),
            modbus=ModbusServerConfig(enabled=False),
            mqtt=MqttPublisherConfig(url=mqtt_broker, client_id="sim-test-pub"),
        )
        async with FactorySimulator(cfg) as sim:
            await wait_until(lambda: len(got) >= 30, 30, "30 quality results")
        n_published = sim.mqtt.published if sim.mqtt else 0
        assert n_published >= 30
        lines = [json.loads(x) for x in truth.read_text().splitlines()]
        assert lines[0]["kind"] == "meta" and lines[0]["config"]["scenario"]["seed"] == 5
        labels = {x["part_id"]: x for x in lines if x["kind"] == "label"}
        assert any(x["kind"] == "drift" for x in lines)
        await wait_until(lambda: len(got) >= len(labels), 10, "every published label")
        with lock:
            received = {m["part_id"]: m for m in got}
            assert {t.rsplit("/", 1)[1] for t in sensors} == {"ambient", "coolant"}
        assert set(received) == set(labels)
        for pid, m in received.items():
            t = labels[pid]
            assert m["topic"] == f"plant/line1/{t['asset']}/quality"
            assert (m["asset"], m["defect"], m["deviation_um"], m["ts_ns"]) == (
                t["asset"],
                t["defect"],
                t["deviation_um"],
                t["ts_ns"],
            )
            assert pid == f"{m['asset']}-{m['part_counter']}"
    finally:
        sub.loop_stop()
        sub.disconnect()
