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


def _firing(actions: list[dict]):
    from edge.config import RuleConfig
    from edge.rules import RuleEngine

    eng = RuleEngine(
        [RuleConfig.model_validate({"name": "hot", "when": "r.temp > 80.0", "actions": actions})]
    )
    ctx = {"asset": "oven-2", "r": {"temp": 91.0}, "age": {}, "f": {}, "has_frame": False}
    [firing] = eng.evaluate("oven-2", {**ctx, "prediction": -1.0, "score": -1.0}, 0.0, 1)
    return firing


async def _run_action(action: dict, caplog) -> tuple[bool, float, str]:
    """(succeeded, seconds it took, what was logged) for one MQTT action of a firing rule."""
    import time

    from edge.rules import ActionRunner

    results: list[tuple[str, str, bool]] = []
    async with ActionRunner({}, on_result=lambda *a: results.append(a)) as runner:
        t0 = time.monotonic()
        runner.dispatch(_firing([action]))
        await wait_until(lambda: results, 30, "the action's outcome")
        took = time.monotonic() - t0
    return results[0][2], took, caplog.text


async def test_rule_alarm_published_to_a_broker_of_its_own(mqtt_broker, caplog):
    sub = Subscriber(mqtt_broker, "alarms/oven-2")
    try:
        assert sub.ready.wait(10)
        action = {"type": "mqtt", "url": mqtt_broker, "topic": "alarms/{asset}", "timeout": 5}
        ok, _, _ = await _run_action(action, caplog)
        assert ok
        await wait_until(lambda: sub.messages, 10, "the alarm")
    finally:
        sub.close()
    assert sub.messages[0][1]["rule"] == "hot" and sub.messages[0][1]["temp"] == 91.0


@pytest.fixture
def password_broker(tmp_path):
    """Mosquitto with a password file (user edge / s3cret)."""
    import shutil
    import subprocess

    from edgeloop.services import MosquittoBroker

    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "edge", "s3cret"], check=True)
    with MosquittoBroker(extra_config=f"password_file {pw}\n") as broker:
        yield broker


async def test_a_broker_that_refuses_or_never_answers_fails_the_action_clearly(
    password_broker, caplog
):
    import os
    import signal

    broker = password_broker
    base = {"type": "mqtt", "url": broker.url, "topic": "alarms/{asset}", "timeout": 1.0}
    ok, _, _ = await _run_action({**base, "username": "edge", "password": "s3cret"}, caplog)
    assert ok
    ok, took, logged = await _run_action({**base, "username": "edge", "password": "no"}, caplog)
    assert not ok and took < 5
    assert f"MQTT broker {broker.host}:{broker.port} refused the connection" in logged
    # a broker that accepts TCP but never answers (stopped): no CONNACK, bounded wait
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        ok, took, logged = await _run_action(base, caplog)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert not ok and took < 5
    assert f"no CONNACK from MQTT broker {broker.host}:{broker.port} within 1.0s" in logged


def test_an_mqtt_action_url_is_checked_with_the_config():
    from pydantic import ValidationError

    from edge.config import MqttAction

    for url, why in [
        ("tcp://h:1883", "expected mqtt://host"),
        ("mqtt://", "no host"),
        ("mqtt://h:99999", "bad port"),
        ("mqtt://u:p@h", "put credentials in username/password"),
    ]:
        with pytest.raises(ValidationError, match=why):
            MqttAction.model_validate({"type": "mqtt", "url": url, "topic": "t"})
    with pytest.raises(ValidationError, match="username/password are for 'url'"):
        MqttAction.model_validate({"type": "mqtt", "connector": "c", "topic": "t", "username": "u"})
