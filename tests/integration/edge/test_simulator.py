"""Simulator -> agent -> Kafka over real Modbus TCP: readings, frames per machine cycle scored by
an ONNX model exported from scikit-learn, rule events, a write-back to the simulator's coil, and
an MQTT alarm published through Mosquitto."""

from __future__ import annotations

import numpy as np
import pytest

from edge.agent import Agent
from edge.config import EdgeConfig
from tests.integration.edge.kit import Collector, Subscriber
from tests.unit.edge.modelkit import FEATURES, export
from tests.waiting import wait_until

pytest.importorskip("protocols.modbus")
factory = pytest.importorskip("simulators.factory")
from simulators.config import SimConfig  # noqa: E402

MACHINES = ["m1", "m2"]


def modbus_connector(host: str, port: int, isolation: str = "inline") -> dict:
    points = [
        {"tag": "spindle_temp", "table": "input", "address": 4, "type": "float32"},
        {"tag": "vibration_rms", "table": "input", "address": 6, "type": "float32"},
        {"tag": "power", "table": "input", "address": 8, "type": "float32"},
        {"tag": "part_counter", "table": "input", "address": 13, "type": "uint32"},
        {"tag": "alarm_lamp", "table": "coil", "address": 0, "writable": True},
    ]
    return {
        "kind": "modbus",
        "name": "line1",
        "transport": {"type": "tcp", "host": host, "port": port},
        "timeout": 2.0,
        "isolation": isolation,
        "devices": [
            {"unit_id": i + 1, "asset": a, "poll_interval": 0.05, "points": points}
            for i, a in enumerate(MACHINES)
        ],
    }


@pytest.mark.parametrize("isolation", ["inline", "process"])
async def test_simulator_through_agent_into_kafka_with_write_back(
    tmp_path, kafka_broker, mqtt_broker, isolation
):
    path, mpath, sk = export(tmp_path)
    sim_cfg = SimConfig.model_validate(
        {
            "scenario": {"seed": 3, "machines": 2, "speed": 20.0, "fault_interval": None},
            "update_hz": 20,
            "opcua": {"enabled": False},
            "modbus": {"port": 0},
            "mqtt": {"enabled": False},
        }
    )
    sub = Subscriber(mqtt_broker, "alarms/#")
    try:
        assert sub.ready.wait(10)
        async with (
            factory.FactorySimulator(sim_cfg) as sim,
            Collector(kafka_broker, f"gw-sim-{isolation}") as col,
        ):
            host, port = sim.modbus_address
            cfg = EdgeConfig.model_validate(
                {
                    "agent_id": f"gw-sim-{isolation}",
                    "state_dir": str(tmp_path / "state"),
                    "connectors": [modbus_connector(host, port, isolation)],
                    "frames": [{"asset": a, "trigger": {"tag": "part_counter"}} for a in MACHINES],
                    "model": {"path": str(path), "manifest": str(mpath)},
                    "rules": [
                        {
                            "name": "part_scored",
                            "assets": ["m1"],
                            "when": "has_frame && prediction >= 0.0",
                            "message": "{asset}: part scored {prediction}",
                            "actions": [
                                {
                                    "type": "write",
                                    "connector": "line1",
                                    "tag": "{asset}/alarm_lamp",
                                    "value": True,
                                },
                                {
                                    "type": "mqtt",
                                    "url": mqtt_broker,
                                    "topic": "alarms/{asset}/{rule}",
                                },
                            ],
                        }
                    ],
                    "uplink": {
                        "bootstrap_servers": kafka_broker,
                        "linger_ms": 5,
                        "delete_after": "broker",  # no cloud to confirm batches
                    },
                    "http": {"port": None},
                }
            )
            async with Agent(cfg) as agent:
                await wait_until(
                    lambda: len(col.frames) >= 2 and col.events and sub.messages,
                    60,
                    "a scored part, its event and its MQTT alarm",
                )
                await wait_until(
                    lambda: sim.scenario.alarm_lamp[0], 20, "the alarm lamp coil of m1 set"
                )
                assert agent.degraded_reasons() == []
    finally:
        sub.close()
    readings = col.readings
    assert {(r.asset, r.tag) for r in readings} >= {
        (a, t) for a in MACHINES for t in ("spindle_temp", "vibration_rms", "power", "part_counter")
    }
    frames = col.frames
    # one frame per machine cycle, keyed by the simulator's part id
    for f in frames:
        assert f.key.startswith(f"{f.asset}-") and int(f.key.split("-")[1]) >= 1
    x = np.array([[f.features[n] for n in FEATURES] for f in frames])
    assert [f.prediction for f in frames] == [float(v) for v in sk.predict(x)]
    event = next(e for e in col.events if e.rule == "part_scored")
    assert event.asset == "m1" and event.message.startswith("m1: part scored")
    topic, body = sub.messages[0]
    assert topic == "alarms/m1/part_scored" and body["rule"] == "part_scored"
    assert sim.scenario.alarm_lamp[1] is False  # the rule only applies to m1
    col.assert_exactly_once(f"gw-sim-{isolation}")
