"""MQTT clients of the chaos suite: the numbered QoS 1 stream (the source of truth for the
readings) and the poison publisher.

:class:`SeqPublisher` publishes ``0, 1, 2, ...`` at QoS 1 from a paho network thread, paced, and
remembers which numbers Mosquitto acknowledged (PUBACK): those the broker owes the agent's
persistent session, so each must end up as a reading in a batch the cloud applied.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

if TYPE_CHECKING:
    from tests.chaos.ledger import WireLedger

__all__ = ["SeqPublisher", "publish_all"]


def _client(url: str, client_id: str) -> mqtt.Client:
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(1000)
    client.connect(host, int(port))
    client.loop_start()
    return client


class SeqPublisher:
    """Numbered QoS 1 messages on ``topic``; ``acked()`` is what Mosquitto acknowledged."""

    def __init__(self, url: str, topic: str) -> None:
        self.topic = topic
        self.probe_topic = topic.rsplit("/", 1)[0] + "/probe"
        self.client = _client(url, f"chaos-seq-{time.time_ns()}")
        self._infos: list[mqtt.MQTTMessageInfo] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._probes = 0

    def probe(self, ledger: WireLedger) -> bool:
        """True once a probe message reached Kafka as a reading (the agent is subscribed);
        else publish another probe."""
        from tests.chaos.rig import SEQ_ASSET

        for readings in list(ledger.readings.values()):
            if any(r.asset == SEQ_ASSET and r.tag == "probe" for r in readings):
                return True
        self._probes += 1
        self.client.publish(self.probe_topic, str(self._probes).encode(), qos=1)
        return False

    def start(self, rate: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(rate,), name="seq", daemon=True)
        self._thread.start()

    def _run(self, rate: float) -> None:
        try:
            t0 = time.monotonic()
            i = 0
            while not self._stop.is_set():
                info = self.client.publish(self.topic, str(i).encode(), qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise RuntimeError(f"publish {i}: {mqtt.error_string(info.rc)}")
                with self._lock:
                    self._infos.append(info)
                i += 1
                ahead = t0 + i / rate - time.monotonic()
                if ahead > 0:
                    self._stop.wait(ahead)  # pacing the stream, not synchronisation
        except BaseException as exc:
            self.error = exc

    @property
    def sent(self) -> int:
        with self._lock:
            return len(self._infos)

    def stop(self, within: float = 30.0) -> None:
        """Stop publishing and wait (bounded) for the outstanding acknowledgements."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        deadline = time.monotonic() + within
        with self._lock:
            infos = list(self._infos)
        for info in infos:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not info.is_published():
                info.wait_for_publish(timeout=left)

    def acked(self) -> set[int]:
        """The numbers Mosquitto acknowledged (PUBACK received)."""
        with self._lock:
            infos = list(self._infos)
        return {n for n, info in enumerate(infos) if info.is_published()}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.client.disconnect()
        self.client.loop_stop()


def publish_all(url: str, items: list[tuple[str, bytes]], within: float = 10.0) -> None:
    """Publish each (topic, payload) at QoS 1 and wait for every PUBACK (raises otherwise)."""
    client = _client(url, f"chaos-poison-{time.time_ns()}")
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in items]
        for (topic, _), info in zip(items, infos, strict=True):
            info.wait_for_publish(timeout=within)
            if not info.is_published():
                raise RuntimeError(f"no PUBACK for the message on {topic} within {within}s")
    finally:
        client.disconnect()
        client.loop_stop()


def as_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()
