"""Poison input never stops the agent (issue 13, defect 2).

An MQTT JSON payload with ``"ts": 99999999999999999999999`` used to pass the connector and make
the outbox encoder raise ``OverflowError``: the tick task died, nothing from any connector was
committed again, ``/healthz`` said ok, and the unacked QoS 1 message wedged the agent again after
every restart. Now the message is a dead letter (stored durably, then acked), and everything
else goes on.
"""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt
import pytest

from edge.agent import Agent
from edge.config import EdgeConfig
from protocols.base import ConnectorState
from shared.records import DEAD_LETTER_RULE, Event, Reading
from tests.waiting import wait_until, wait_until_async

pytest.importorskip("protocols.mqtt")


def config(tmp_path, url: str, isolation: str) -> EdgeConfig:
    return EdgeConfig.model_validate(
        {
            "agent_id": "gw-poison",
            "state_dir": str(tmp_path / "state"),
            "connectors": [
                {
                    "kind": "mqtt",
                    "name": "plant",
                    "url": url,
                    "client_id": f"poison-{isolation}",
                    "isolation": isolation,
                    "subscriptions": [
                        {
                            "topic": "line/{asset}/{tag}",
                            "qos": 1,
                            "payload": {"format": "json", "value": "v", "timestamp": "ts"},
                        }
                    ],
                },
                {
                    "kind": "synthetic",
                    "name": "other",
                    "assets": ["m9"],
                    "tags": ["x"],
                    "interval": 0.05,
                },
            ],
            "uplink": {"bootstrap_servers": "127.0.0.1:1", "backoff": {"max": 1.0}},
            "http": {"port": None},
        }
    )


def publish(url: str, items: list[tuple[str, dict]]) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.time_ns()}")
    client.connect(host, int(port))
    client.loop_start()
    try:
        for topic, body in items:
            info = client.publish(topic, json.dumps(body).encode(), qos=1)
            info.wait_for_publish(timeout=10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


async def stored(agent: Agent) -> list:
    """Every record the outbox holds (no Kafka here: nothing has left it)."""
    return [r for b in await agent.outbox.claim(max_batches=100_000) for r in b.records]


@pytest.mark.parametrize("isolation", ["inline", "process"])
async def test_an_absurd_timestamp_is_a_dead_letter_and_nothing_else_stops(
    tmp_path, mqtt_broker_factory, isolation
):
    mosq = mqtt_broker_factory()
    cfg = config(tmp_path, mosq.url, isolation)
    now_ms = time.time_ns() // 1_000_000
    async with Agent(cfg) as agent:
        conn = agent.connectors["plant"]
        await wait_until(lambda: conn.status.state is ConnectorState.CONNECTED, 20, "connected")
        publish(
            mosq.url,
            [
                ("line/m1/temp", {"v": 1.0, "ts": now_ms}),
                ("line/m1/temp", {"v": 2.0, "ts": 99999999999999999999999}),
                ("line/m1/temp", {"v": 3.0, "ts": "2200-01-01T00:00:00Z"}),
                ("line/m1/temp", {"v": 4.0, "ts": now_ms + 1}),
            ],
        )

        async def got(value: float) -> bool:
            return value in temp_values(await stored(agent))

        await wait_until_async(lambda: got(4.0), 20, "the good message after the poison")
        other_before = agent.accepted_readings
        await wait_until(
            lambda: agent.accepted_readings > other_before + 20, 10, "the other connector going on"
        )
        records = await stored(agent)
        health = agent.health()
    assert temp_values(records) == [1.0, 4.0]
    letters = [r for r in records if isinstance(r, Event) and r.rule == DEAD_LETTER_RULE]
    assert len(letters) == 2
    assert all(e.asset == "plant" and e.values["source"] == "line/m1/temp" for e in letters)
    assert "outside 1970..2262" in letters[0].message
    assert "99999999999999999999999" in letters[0].values["payload"]
    assert "ahead of the gateway clock" in letters[1].message
    assert health["status"] != "failing" and agent.tick_errors == 0
    assert health["dead_letters"] == 2

    # the poison messages were acknowledged once their dead letters were stored: a restart
    # (persistent session) gets no redelivery, and a new message comes through
    async with Agent(cfg) as agent:
        conn = agent.connectors["plant"]
        await wait_until(lambda: conn.status.state is ConnectorState.CONNECTED, 20, "connected")
        publish(mosq.url, [("line/m1/temp", {"v": 5.0, "ts": now_ms + 2})])
        await wait_until_async(lambda: got(5.0), 20, "the message after the restart")
        records = await stored(agent)
    letters = [r for r in records if isinstance(r, Event) and r.rule == DEAD_LETTER_RULE]
    assert len(letters) == 2  # the same two, from before the restart: nothing redelivered
    assert temp_values(records) == [1.0, 4.0, 5.0]


def temp_values(records: list) -> list[float]:
    return [r.value for r in records if isinstance(r, Reading) and r.tag == "temp"]


async def test_a_core_task_that_dies_fails_the_agent_loudly(tmp_path, monkeypatch):
    """If a core loop dies anyway, the agent must not live on half alive: /healthz says failing
    with the reason and `edge run` exits non-zero so systemd restarts it."""
    from edge import cli

    cfg = EdgeConfig.model_validate(
        {
            "agent_id": "gw-dies",
            "state_dir": str(tmp_path / "state"),
            "connectors": [
                {"kind": "synthetic", "name": "s", "assets": ["m"], "tags": ["x"], "interval": 0.05}
            ],
            "uplink": {"bootstrap_servers": "127.0.0.1:1"},
            "http": {"port": 0},
        }
    )
    calls = 0
    real = Agent._house_loop

    async def dying(self: Agent) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("the disk said no")

    monkeypatch.setattr(Agent, "_house_loop", dying)
    try:
        code = await cli.run_agent(cfg, flush_timeout=0.5)
    finally:
        monkeypatch.setattr(Agent, "_house_loop", real)
    assert code == 1 and calls == 1
