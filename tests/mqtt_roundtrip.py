"""One QoS 1 message through a real MQTT broker with plain paho clients (checks a broker works)."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt


def mqtt_round_trip(host: str, port: int, topic: str, payload: bytes) -> list[bytes]:
    """Subscribe to ``topic``, publish ``payload`` at QoS 1, return what the subscriber got."""
    received: list[bytes] = []
    subscribed, arrived = threading.Event(), threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="roundtrip-sub")
    sub.on_subscribe = lambda *a: subscribed.set()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.payload)
        arrived.set()

    sub.on_message = on_message
    sub.connect(host, port)
    sub.subscribe(topic, qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="roundtrip-pub")
    try:
        assert subscribed.wait(10), "no SUBACK within 10 s"
        pub.connect(host, port)
        pub.loop_start()
        pub.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
        assert arrived.wait(10), "the message did not arrive within 10 s"
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()
    return received
