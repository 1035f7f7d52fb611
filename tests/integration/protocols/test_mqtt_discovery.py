"""`edgeloop discover mqtt://...` end to end: report, starter config, and the connector reading with it."""

from __future__ import annotations

import asyncio
import json
import threading

import paho.mqtt.client as mqtt
import yaml
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.cli import cli
from protocols.base import ConnectorState
from protocols.mqtt import MqttConfig, MqttConnector
from tests.waiting import wait_until, wait_until_sync


class Plant:
    """Publishes a small plant: numbers per tag, JSON telemetry, a text state, a binary blob."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plant")
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        c = self.client
        c.publish("disc/line1/press-1/info", json.dumps({"fw": "1.2"}), retain=True)
        while not self._stop.wait(0.02):
            i = self.ticks
            for line, asset in (("line1", "press-1"), ("line2", "press-2")):
                c.publish(f"disc/{line}/{asset}/temperature", f"{20 + i % 10}.5")
                c.publish(f"disc/{line}/{asset}/count", str(i))
            c.publish(
                "cell/oven-1/telemetry",
                json.dumps(
                    {
                        "ts": 1_700_000_000_000 + i,
                        "temp": 180 + i % 5,
                        "motor": {"amps": 3.5},
                        "q": 0,
                    }
                ),
            )
            c.publish(
                "cell/oven-2/telemetry",
                json.dumps(
                    {"ts": 1_700_000_000_000 + i, "temp": 170, "motor": {"amps": 2}, "q": 0}
                ),
            )
            c.publish("state/oven-1", "RUNNING")
            c.publish("blob/cam", b"\xff\xd8\xff\x00")
            self.ticks += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()


def test_discover_reports_topics_and_writes_a_config_the_connector_reads_with(
    mqtt_broker, tmp_path
):
    plant = Plant(mqtt_broker)
    try:
        wait_until_sync(lambda: plant.ticks > 2, 10, "the plant publishing")
        out = tmp_path / "mqtt.yaml"
        result = CliRunner().invoke(
            cli, ["discover", mqtt_broker, "--seconds", "2", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        text = result.output
        for expected in (
            "disc/line1/press-1/temperature",
            "temp",
            "motor.amps",
            "state/oven-1",
            "blob/cam",
        ):
            assert expected in text, expected
        data = yaml.safe_load(out.read_text())
        cfg = MqttConfig.model_validate(data["connectors"][0])
        topics = {s.topic: s for s in cfg.subscriptions}
        assert topics["disc/{l1}/{asset}/{tag}"].asset == "{l1}.{asset}"
        json_sub = topics["cell/{asset}/telemetry"]
        assert json_sub.payload.format == "json" and json_sub.payload.timestamp == '"ts"'
        assert json_sub.payload.quality == '"q"'
        assert set(json_sub.payload.fields) == {"temp", "motor.amps"}

        async def read_with_it():
            got = []
            conn = MqttConnector(
                MqttConfig.model_validate(
                    {**data["connectors"][0], "backoff": {"initial": 0.05, "max": 0.5}}
                )
            )
            conn.set_sink(got.extend)
            async with conn:
                await wait_until(
                    lambda: conn.status.state is ConnectorState.CONNECTED, 10, "connected"
                )
                want = {
                    ("line1.press-1", "temperature"),
                    ("line2.press-2", "count"),
                    ("oven-1", "temp"),
                    ("oven-2", "motor.amps"),
                    ("state", "oven-1"),
                }
                await wait_until(
                    lambda: want <= {(r.asset, r.tag) for r in got}, 10, f"readings of {want}"
                )
            oven = [r for r in got if r.asset == "oven-1" and r.tag == "temp"]
            assert all(r.ts_ns // 10**6 >= 1_700_000_000_000 for r in oven)  # source timestamps
            return conn.malformed_total

        assert asyncio.run(read_with_it()) == 0  # the binary topic has no subscription
    finally:
        plant.close()
