"""The demo's MQTT fallback: amqtt answers MQTT where Mosquitto is not installed."""

from edgeloop.services import AmqttBroker
from tests.mqtt_roundtrip import mqtt_round_trip


def test_amqtt_broker_carries_a_message():
    with AmqttBroker() as broker:
        assert mqtt_round_trip(broker.host, broker.port, "plant/l1/m1/q", b"1") == [b"1"]
