"""MQTT in and out through the agent: readings from Mosquitto via the MQTT connector, and a rule
whose alarm is published back through that same connector's publish()."""

from __future__ import annotations

import pytest

from edge.agent import Agent
from edge.config import EdgeConfig
from protocols.base import ConnectorState
from tests.integration.edge.kit import Subscriber
from tests.waiting import wait_until

pytest.importorskip("protocols.mqtt")


async def test_rule_alarm_published_through_the_mqtt_connector(tmp_path, mqtt_broker):
    cfg = EdgeConfig.model_validate(
        {
            "agent_id": "gw-mqtt",
            "state_dir": str(tmp_path / "state"),
            "connectors": [
                {
                    "kind": "mqtt",
                    "name": "plant",
                    "url": mqtt_broker,
                    "client_id": "edge-mqtt-test",
                    "subscriptions": [{"topic": "sensors/{asset}/{tag}"}],
                }
            ],
            "rules": [
                {
                    "name": "too_hot",
                    "when": "has(r.temp) && r.temp > 80.0",
                    "clear": "r.temp < 70.0",
                    "actions": [{"type": "mqtt", "connector": "plant", "topic": "alarms/{asset}"}],
                }
            ],
            "uplink": {"bootstrap_servers": "127.0.0.1:1", "backoff": {"max": 1.0}},
            "http": {"port": None},
        }
    )
    sub = Subscriber(mqtt_broker, "alarms/oven-1")  # not "#": other tests retain alarms/*
    try:
        assert sub.ready.wait(10)
        async with Agent(cfg) as agent:
            conn = agent.connectors["plant"]
            await wait_until(
                lambda: conn.status.state is ConnectorState.CONNECTED, 20, "MQTT connected"
            )
            for value in (20.0, 85.0):
                await conn.publish("sensors/oven-1/temp", str(value).encode(), qos=1)
            await wait_until(lambda: sub.messages, 20, "the alarm on alarms/oven-1")
            # no Kafka at all: the agent fired the rule anyway and keeps everything buffered
            assert agent.outbox.records >= 2 and agent.uplink.last_error is not None
    finally:
        sub.close()
    topic, body = sub.messages[0]
    assert topic == "alarms/oven-1"
    assert body["rule"] == "too_hot" and body["asset"] == "oven-1" and body["temp"] == 85.0
