"""Conformance harness for the MQTT connector: a real Mosquitto and a paho publisher thread.

The publisher sends a number to ``plant/line1/<asset>/<tag>`` for every expected tag every 50 ms
and reconnects on its own (paho's loop thread) while the broker restarts.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.services import MosquittoBroker, find_mosquitto
from protocols.base import BackoffConfig, Connector, ConnectorConfig
from protocols.mqtt import MqttConfig, MqttConnector

TAGS = {("press-1", "temperature"), ("press-1", "pressure"), ("oven-2", "temperature")}


class Publisher:
    """Publishes every tag every ``period`` seconds from a thread until stopped."""

    def __init__(self, host: str, port: int, period: float = 0.05) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="harness-publisher")
        self.client.reconnect_delay_set(0.05, 0.5)
        self.host, self.port, self.period = host, port, period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="harness-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.period):
            i += 1
            for asset, tag in sorted(TAGS):
                self.client.publish(f"plant/line1/{asset}/{tag}", str(i * 0.5), qos=0)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.client.disconnect()
        self.client.loop_stop()


class MqttHarness:
    kind = "mqtt"

    def __init__(self) -> None:
        self.broker: MosquittoBroker | None = None
        self.publisher: Publisher | None = None

    async def start_server(self) -> None:
        if find_mosquitto() is None:
            import pytest

            pytest.skip("mosquitto is not installed")
        self.broker = await asyncio.to_thread(MosquittoBroker().start)
        self.publisher = Publisher(self.broker.host, self.broker.port)
        self.publisher.start()

    async def stop_server(self) -> None:
        assert self.broker is not None
        await asyncio.to_thread(self.broker.stop)

    async def restart_server(self) -> None:
        assert self.broker is not None
        await asyncio.to_thread(self.broker.restart)

    def config(self) -> ConnectorConfig:
        assert self.broker is not None
        return MqttConfig(
            name="mqtt-conformance",
            url=self.broker.url,
            client_id="conformance-agent",
            backoff=BackoffConfig(initial=0.05, max=0.5),
            subscriptions=[{"topic": "plant/{line}/{asset}/{tag}", "qos": 1}],
        )

    def connector(self, config: ConnectorConfig) -> Connector[Any]:
        assert isinstance(config, MqttConfig)
        return MqttConnector(config)

    def expected_tags(self) -> set[tuple[str, str]]:
        return set(TAGS)

    async def inject_malformed(self) -> None:
        assert self.publisher is not None
        self.publisher.publish("plant/line1/press-1/temperature", b"\xff not a number")

    async def close(self) -> None:
        if self.publisher is not None:
            await asyncio.to_thread(self.publisher.stop)
            self.publisher = None
        if self.broker is not None:
            await asyncio.to_thread(self.broker.close)
            self.broker = None


def make_harness() -> MqttHarness:
    return MqttHarness()
