"""MQTT side of the simulator: quality results and wireless sensors as JSON (paho-mqtt 2.x).

Topics ``<prefix>/<line>/<asset>/quality|ambient|coolant``; payloads in docs/simulator.md.
paho runs its network loop in its own thread; :meth:`publish` only enqueues (thread-safe).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
import time
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simulators.config import MqttPublisherConfig
from simulators.scenario import TruthEvent

__all__ = ["MqttPublisher", "iso"]

log = logging.getLogger(__name__)

TOLERANCE_UM = 30.0


def iso(ts_ns: int) -> str:
    return (
        dt.datetime.fromtimestamp(ts_ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    )


class MqttPublisher:
    """Publishes to one broker. ``start`` waits (bounded) for the CONNACK; ``stop`` is idempotent.

    paho reconnects by itself (1 s doubling to 30 s) if the broker goes away; messages published
    meanwhile are queued by paho (QoS >= 1).
    """

    def __init__(
        self, config: MqttPublisherConfig, line: str, connect_timeout: float = 10.0
    ) -> None:
        self.config = config
        self.line = line
        self.connect_timeout = connect_timeout
        url = urlparse(config.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if url.scheme == "mqtts" else 1883)
        self.username = url.username
        self.password = url.password
        self.tls = url.scheme == "mqtts"
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self.published = 0

    def topic(self, asset: str, leaf: str) -> str:
        return f"{self.config.topic_prefix}/{self.line}/{asset}/{leaf}"

    async def start(self) -> None:
        if self._client is not None:
            return
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.config.client_id, protocol=mqtt.MQTTv311
        )
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set()
        client.reconnect_delay_set(1, 30)
        client.max_queued_messages_set(100_000)

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if not reason.is_failure:
                self._connected.set()

        def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            self._connected.clear()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.connect_async(self.host, self.port, keepalive=30)
        client.loop_start()
        self._client = client
        deadline = time.monotonic() + self.connect_timeout
        while not self._connected.is_set():
            if time.monotonic() > deadline:
                await self.stop()
                raise ConnectionError(
                    f"MQTT broker {self.config.url} did not accept a connection within {self.connect_timeout} s"
                )
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)

    async def __aenter__(self) -> MqttPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def publish(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        if self._client is None:
            return
        self._client.publish(
            topic, json.dumps(payload, separators=(",", ":")), qos=self.config.qos, retain=retain
        )
        self.published += 1

    def publish_label(self, event: TruthEvent) -> None:
        d = event.data
        self.publish(
            self.topic(d["asset"], "quality"),
            {
                "asset": d["asset"],
                "part_id": d["part_id"],
                "part_counter": d["part_counter"],
                "defect": d["defect"],
                "deviation_um": d["deviation_um"],
                "tolerance_um": TOLERANCE_UM,
                "ts_ns": event.ts_ns,
                "ts": iso(event.ts_ns),
                "finished_ts_ns": d["finished_ts_ns"],
            },
        )

    def publish_wireless(self, asset: str, values: dict[str, float], ts_ns: int) -> None:
        common = {
            "battery_pct": values["battery_pct"],
            "rssi_dbm": values["rssi_dbm"],
            "ts_ns": ts_ns,
            "ts": iso(ts_ns),
        }
        self.publish(
            self.topic(asset, "ambient"),
            {
                "asset": asset,
                "sensor": "ambient",
                "temperature_c": values["ambient.temperature_c"],
                "humidity_pct": values["ambient.humidity_pct"],
                **common,
            },
        )
        self.publish(
            self.topic(asset, "coolant"),
            {
                "asset": asset,
                "sensor": "coolant",
                "temperature_c": values["coolant.temperature_c"],
                "concentration_pct": values["coolant.concentration_pct"],
                **common,
            },
        )
