"""MQTT QoS 1 through a SIGKILLed agent loses nothing: the connector acknowledges a message only
after the outbox transaction holding its reading committed, so whatever the killed agent had not
committed is redelivered by Mosquitto (persistent session) to the restarted agent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.integration.edge.kit import Collector, write_config
from tests.integration.edge.test_durability import _spawn
from tests.waiting import wait_until

pytest.importorskip("protocols.mqtt")

N = 6000  # numbered messages, ~1,500/s: the kill lands mid-stream


class Publisher:
    """Publishes ``line/m1/seq`` = 0..n-1 at QoS 1 from a paho network thread, paced."""

    def __init__(self, url: str, n: int, rate: float) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.n, self.rate = n, rate
        self.sent = 0
        self.error: BaseException | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="seq-publisher")
        self.client.max_inflight_messages_set(1000)
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            t0 = time.monotonic()
            for i in range(self.n):
                info = self.client.publish("line/m1/seq", str(i).encode(), qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise RuntimeError(f"publish {i}: {mqtt.error_string(info.rc)}")
                self.sent = i + 1
                ahead = t0 + (i + 1) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the stream, not synchronisation
            last = info
            last.wait_for_publish(timeout=30)
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.thread.join(timeout=60)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("isolation", ["inline", "process"])
async def test_mqtt_qos1_stream_survives_sigkill_without_gap(
    tmp_path: Path, kafka_broker_factory, mqtt_broker_factory, isolation: str
) -> None:
    kafka = kafka_broker_factory()
    mosq = mqtt_broker_factory()
    cfg = write_config(
        tmp_path / "edge.yaml",
        {
            "agent_id": "gw-mqtt-kill",
            "state_dir": str(tmp_path / "state"),
            "connectors": [
                {
                    "kind": "mqtt",
                    "name": "plant",
                    "url": mosq.url,
                    "client_id": "edge-mqtt-kill",  # fixed: the persistent session survives
                    "persistent_session": True,
                    "subscriptions": [{"topic": "line/{asset}/{tag}", "qos": 1}],
                    # process: the worker acks upstream only when the agent says "durable"
                    "isolation": isolation,
                }
            ],
            "uplink": {
                "bootstrap_servers": kafka.bootstrap,
                "linger_ms": 10,
                "request_timeout_ms": 3000,
                "backoff": {"initial": 0.2, "max": 2.0},
                # no cloud here: the agent's contract with the broker alone (the chaos suite and
                # tests/integration/test_end_to_end_ack.py hold the end-to-end one)
                "delete_after": "broker",
            },
            "http": {"port": None},
        },
    )
    log = tmp_path / "agent.log"
    procs: list[subprocess.Popen[bytes]] = []
    pub: Publisher | None = None

    def values(col: Collector) -> set[int]:
        return {int(r.value) for r in col.readings if r.tag == "seq"}

    try:
        async with Collector(kafka.bootstrap, "gw-mqtt-kill") as col:
            procs.append(_spawn(cfg, log))
            pub = Publisher(mosq.url, N, rate=1500)

            def probed() -> bool:  # the agent is subscribed once a probe reaches Kafka
                if any(r.tag == "probe" for r in col.readings):
                    return True
                assert pub is not None
                pub.client.publish("line/m1/probe", b"1", qos=1)
                return False

            await wait_until(probed, 40, "the agent subscribed", poll=0.5)
            pub.start()
            await wait_until(lambda: len(values(col)) > 1500, 30, "the stream in Kafka")
            os.kill(procs[0].pid, signal.SIGKILL)  # mid-stream
            assert procs[0].wait(timeout=10) == -signal.SIGKILL
            killed_at = pub.sent
            assert killed_at < N, "the kill should land mid-stream"
            procs.append(_spawn(cfg, log))
            await wait_until(lambda: pub is not None and not pub.thread.is_alive(), 40, "all sent")
            assert pub.error is None, pub.error
            await wait_until(lambda: len(values(col)) >= N, 40, "every message in Kafka")
            procs[1].send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(procs[1].wait, 30)
            assert code == 0, log.read_text()[-3000:]
    finally:
        if pub is not None:
            pub.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    got = values(col)
    missing = sorted(set(range(N)) - got)
    assert not missing, f"{len(missing)} lost, first {missing[:10]} (killed at {killed_at})"
    col.assert_exactly_once("gw-mqtt-kill")  # batches once; readings at-least-once
    assert "Traceback" not in log.read_text()
