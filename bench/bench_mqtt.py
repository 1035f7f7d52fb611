"""MQTT connector readings/s vs a raw paho subscriber loop, same Mosquitto, same run.

A publisher in a separate process publishes bare numbers to 50 topics as fast as it can (QoS 0,
then QoS 1). While it runs, a raw paho subscriber (``client.loop()`` in a loop, ``on_message``
only counts) and the MqttConnector (topic template -> asset/tag, number parsing, Reading
records, batched sink, manual acks for QoS 1) each subscribe alone for a measured window;
the phases alternate raw/connector twice and the best window of each is reported.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import Result
from edgeloop.services import MosquittoBroker

WARMUP = 0.5
WINDOW = float(os.environ.get("EDGELOOP_BENCH_MQTT_SECONDS", "3"))
TOPICS = [f"bench/m{i % 10}/t{i % 5}" for i in range(50)]


def _publisher(host: str, port: int, qos: int, stop: mp.synchronize.Event, sent: mp.Value) -> None:  # type: ignore[name-defined]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{qos}")
    client.max_inflight_messages_set(2000)
    client.connect(host, port, keepalive=30)
    n = 0
    while not stop.is_set():
        for _ in range(200):
            client.publish(TOPICS[n % 50], str(n % 1000 * 0.5), qos=qos)
            n += 1
        client.loop(0)
        # keep paho's own queues short: the broker, not our memory, absorbs the backlog
        while (
            len(client._out_packet) > 2000 or len(client._out_messages) > 4000
        ) and not stop.is_set():
            client.loop(0.01)
        sent.value = n
    client.disconnect()


def _raw(host: str, port: int, qos: int) -> float:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{qos}")
    count = [0]

    def on_message(c, u, m) -> None:
        count[0] += 1

    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.subscribe("bench/#", qos=qos)
    t_end = time.monotonic() + WARMUP
    while time.monotonic() < t_end:
        client.loop(0.05)
    n0, t0 = count[0], time.perf_counter()
    t_end = time.monotonic() + WINDOW
    while time.monotonic() < t_end:
        client.loop(0.05)
    rate = (count[0] - n0) / (time.perf_counter() - t0)
    client.disconnect()
    return rate


def _connector(url: str, qos: int) -> float:
    from protocols.base import ConnectorState
    from protocols.mqtt import MqttConfig, MqttConnector

    async def main() -> float:
        cfg = MqttConfig(
            name=f"bench-{qos}",
            url=url,
            protocol="3.1.1",
            client_id=f"bench-conn-{qos}",
            persistent_session=False,
            subscriptions=[{"topic": "bench/{asset}/{tag}", "qos": qos}],
        )
        count = [0]
        conn = MqttConnector(cfg)
        conn.set_sink(lambda batch: count.__setitem__(0, count[0] + len(batch)))
        async with conn:
            deadline = time.monotonic() + 10
            while conn.status.state is not ConnectorState.CONNECTED:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"connector did not connect: {conn.status}")
                await asyncio.sleep(0.01)
            await asyncio.sleep(WARMUP)
            n0, t0 = count[0], time.perf_counter()
            await asyncio.sleep(WINDOW)
            rate = (count[0] - n0) / (time.perf_counter() - t0)
            if conn.malformed_total:
                raise RuntimeError(f"{conn.malformed_total} malformed messages in the bench")
        return rate

    return asyncio.run(main())


def _measure(broker: MosquittoBroker, qos: int) -> tuple[float, float, float]:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    sent = ctx.Value("q", 0)
    pub = ctx.Process(target=_publisher, args=(broker.host, broker.port, qos, stop, sent))
    pub.start()
    try:
        t0 = time.perf_counter()
        raw, conn = [], []
        for _ in range(2):
            raw.append(_raw(broker.host, broker.port, qos))
            conn.append(_connector(broker.url, qos))
        pub_rate = sent.value / (time.perf_counter() - t0)
    finally:
        stop.set()
        pub.join(10)
        if pub.is_alive():
            pub.kill()
    return max(conn), max(raw), pub_rate


def run() -> list[Result]:
    results: list[Result] = []
    with MosquittoBroker() as broker:
        for qos in (0, 1):
            conn, raw, pub = _measure(broker, qos)
            results.append(
                Result(
                    "mqtt",
                    f"connector readings/s QoS {qos} (publisher {pub:,.0f}/s)",
                    conn,
                    "rec/s",
                    f"raw paho subscriber QoS {qos}",
                    raw,
                    target=">= 0.8x",
                )
            )
    return results
