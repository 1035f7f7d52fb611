"""The demo's MQTT fallback: amqtt answers MQTT where Mosquitto is not installed."""

import threading

import paho.mqtt.client as mqtt

from edgeloop.services import AmqttBroker


def test_amqtt_broker_carries_a_message():
    with AmqttBroker() as broker:
        got: list[bytes] = []
        subscribed, arrived = threading.Event(), threading.Event()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="s")
        sub.on_subscribe = lambda *a: subscribed.set()

        def on_message(_c, _u, msg):
            got.append(msg.payload)
            arrived.set()

        sub.on_message = on_message
        sub.connect(broker.host, broker.port)
        sub.subscribe("plant/#", qos=1)
        sub.loop_start()
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="p")
        try:
            assert subscribed.wait(10)
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            pub.publish("plant/l1/m1/q", b"1", qos=1).wait_for_publish(timeout=10)
            assert arrived.wait(10)
        finally:
            pub.loop_stop()
            pub.disconnect()
            sub.loop_stop()
            sub.disconnect()
        assert got == [b"1"]
