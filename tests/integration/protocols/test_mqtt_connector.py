"""The MQTT connector against a real Mosquitto: every feature, and no QoS 1 loss across outages."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import shutil
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.services import MosquittoBroker, free_port
from protocols.base import ConnectorError, ConnectorState, WriteError
from protocols.mqtt import MqttConfig, MqttConnector
from shared.records import Quality
from tests.waiting import wait_until

FAST = {"initial": 0.05, "max": 0.5}


class Sink:
    def __init__(self) -> None:
        self.readings = []

    def __call__(self, batch) -> None:
        self.readings.extend(batch)

    def values(self, tag: str | None = None) -> list:
        return [r.value for r in self.readings if tag is None or r.tag == tag]


class Peer:
    """A plain paho client in its own network thread (the device or the other application)."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str = "",
        persistent: bool = False,
        protocol=mqtt.MQTTv311,
    ):
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent if protocol == mqtt.MQTTv311 else None,
            protocol=protocol,
        )
        self.client.reconnect_delay_set(0.05, 0.5)
        self.received: list[mqtt.MQTTMessage] = []
        self.client.on_message = lambda c, u, m: self.received.append(m)
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()

    def publish(self, topic: str, payload, qos: int = 1, retain: bool = False):
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    async def publish_all(self, items, qos: int = 1) -> None:
        infos = [self.publish(t, p, qos) for t, p in items]
        await asyncio.to_thread(lambda: [i.wait_for_publish(10) for i in infos])

    async def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        await asyncio.to_thread(self.subscribed.wait, 10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(url_or_broker, **kw) -> Peer:
        host, port = _hostport(url_or_broker)
        p = Peer(host, port, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _hostport(x) -> tuple[str, int]:
    if isinstance(x, MosquittoBroker):
        return x.host, x.port
    host, port = x.removeprefix("mqtt://").split(":")
    return host, int(port)


def _config(url: str, **kw) -> MqttConfig:
    base = {
        "name": "mqtt-test",
        "url": url,
        "backoff": FAST,
        "subscriptions": [{"topic": "plant/{line}/{asset}/{tag}", "asset": "{line}.{asset}"}],
    }
    base.update(kw)
    return MqttConfig.model_validate(base)


async def _connected(conn: MqttConnector, within: float = 10) -> None:
    await wait_until(lambda: conn.status.state is ConnectorState.CONNECTED, within, "connected")


# --- mapping and parsing -----------------------------------------------------------------------


async def test_number_payloads_map_topic_fields_to_asset_and_tag(mqtt_broker, peers):
    sink = Sink()
    conn = MqttConnector(_config(mqtt_broker, client_id="map-test", persistent_session=False))
    conn.set_sink(sink)
    async with conn:
        await _connected(conn)
        pub = peers(mqtt_broker)
        await pub.publish_all(
            [
                ("plant/l1/press/temp", "21.5"),
                ("plant/l2/oven/on", "true"),
                ("plant/l2/oven/count", "7"),
            ]
        )
        await wait_until(lambda: len(sink.readings) == 3, 10, "three readings")
    got = {(r.asset, r.tag): r.value for r in sink.readings}
    assert got == {("l1.press", "temp"): 21.5, ("l2.oven", "on"): True, ("l2.oven", "count"): 7}
    assert all(r.quality is Quality.GOOD and r.ts_ns > 0 for r in sink.readings)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_every_protocol_and_qos_delivers_each_message_once(mqtt_broker, peers, protocol, qos):
    sink = Sink()
    conn = MqttConnector(
        _config(
            mqtt_broker,
            protocol=protocol,
            client_id=f"qos-{protocol}-{qos}",
            persistent_session=False,
            subscriptions=[{"topic": f"q{qos}/{{asset}}/{{tag}}", "qos": qos}],
        )
    )
    conn.set_sink(sink)
    async with conn:
        await _connected(conn)
        pub = peers(mqtt_broker)
        await pub.publish_all([(f"q{qos}/m/seq", str(i)) for i in range(200)], qos=qos)
        await wait_until(lambda: len(sink.readings) >= 200, 15, "200 readings")
        await asyncio.sleep(0.2)  # room for a duplicate to show up, if one were sent
    assert sorted(sink.values()) == list(range(200))


async def test_json_fields_with_source_timestamp_and_quality_give_several_readings(
    mqtt_broker, peers
):
    sink = Sink()
    cfg = _config(
        mqtt_broker,
        client_id="json-test",
        subscriptions=[
            {
                "topic": "json/{asset}/telemetry",
                "tag": "{field}",
                "payload": {
                    "format": "json",
                    "fields": {"temperature": "data.temp", "speed": "data.rpm"},
                    "timestamp": "ts",
                    "timestamp_format": "iso8601",
                    "quality": "status",
                },
            },
            {
                "topic": "json/{asset}/state",
                "tag": "state",
                "payload": {
                    "format": "json",
                    "value": "s",
                    "timestamp": "t",
                    "timestamp_format": "epoch_ms",
                },
            },
        ],
    )
    conn = MqttConnector(cfg)
    conn.set_sink(sink)
    async with conn:
        await _connected(conn)
        pub = peers(mqtt_broker)
        doc = {
            "data": {"temp": 80.25, "rpm": 1500},
            "ts": "2024-05-01T12:00:00.5Z",
            "status": 0x80000000,
        }
        await pub.publish_all(
            [
                ("json/press-1/telemetry", json.dumps(doc)),
                ("json/press-1/state", json.dumps({"s": "RUNNING", "t": 1714564800000})),
            ]
        )
        await wait_until(lambda: len(sink.readings) == 3, 10, "three readings")
    by_tag = {r.tag: r for r in sink.readings}
    t0 = int(dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC).timestamp()) * 10**9
    assert by_tag["temperature"].value == 80.25 and by_tag["speed"].value == 1500
    assert by_tag["temperature"].ts_ns == t0 + 500_000_000
    assert by_tag["speed"].quality is Quality.BAD and by_tag["speed"].status == 0x80000000
    assert by_tag["state"].value == "RUNNING" and by_tag["state"].ts_ns == 1714564800000 * 10**6
    assert {r.asset for r in sink.readings} == {"press-1"}


async def test_malformed_payloads_are_dead_lettered_with_their_reason(mqtt_broker, peers, tmp_path):
    sink = Sink()
    letters = tmp_path / "dead.jsonl"
    cfg = _config(
        mqtt_broker,
        client_id="dead-test",
        dead_letter={"size": 3, "path": str(letters)},
        subscriptions=[
            {"topic": "dl/{asset}/n/{tag}"},
            {
                "topic": "dl/{asset}/j/line{n}",
                "tag": "v{n}",
                "payload": {"format": "json", "value": "v", "timestamp": "ts"},
            },
        ],
    )
    conn = MqttConnector(cfg)
    conn.set_sink(sink)
    async with conn:
        await _connected(conn)
        pub = peers(mqtt_broker)
        await pub.publish_all(
            [
                ("dl/a/n/t", "12"),
                ("dl/a/n/t", b"\xff\x00binary"),  # not a number
                ("dl/a/j/line1", "{not json"),
                ("dl/a/j/line1", '{"x": 1, "ts": 1700000000}'),  # selector finds nothing
                ("dl/a/j/line1", '{"v": [1, 2], "ts": 1700000000}'),  # wrong type
                ("dl/a/j/line1", '{"v": 1, "ts": "tomorrow"}'),  # bad timestamp
                ("dl/a/j/cell1", '{"v": 1, "ts": 1700000000}'),  # filter matches, template not
                ("dl/a/j/line2", '{"v": 5, "ts": 1700000000}'),
            ]
        )
        await wait_until(lambda: conn.malformed_total == 6, 10, "six malformed messages")
        await wait_until(lambda: len(sink.readings) == 2, 10, "the two good readings")
        assert conn.status.state is ConnectorState.CONNECTED
    assert [(r.tag, r.value) for r in sink.readings] == [("t", 12), ("v2", 5)]
    ring = conn.dead_letters
    assert len(ring) == 3  # bounded: the oldest were dropped
    assert "expected a scalar value" in ring[0].reason
    assert "not ISO-8601" in ring[1].reason
    assert "matches no subscription template" in ring[2].reason
    lines = [json.loads(line) for line in letters.read_text().splitlines()]
    assert len(lines) == 6
    reasons = [line["reason"] for line in lines]
    assert "not a number" in reasons[0] and "payload_b64" in lines[0]
    assert "not JSON" in reasons[1]
    assert "found nothing" in reasons[2]
    assert "expected a scalar value, got list" in reasons[3]
    assert (
        lines[4]["source"] == "dl/a/j/line1" and lines[4]["payload"] == '{"v": 1, "ts": "tomorrow"}'
    )


async def test_stream_delivers_batches_without_a_sink(mqtt_broker, peers):
    conn = MqttConnector(_config(mqtt_broker, client_id="stream-test", persistent_session=False))
    got = []

    async def consume():
        async for batch in conn.stream():
            got.extend(batch)

    async with conn:
        task = asyncio.create_task(consume())
        await _connected(conn)
        await peers(mqtt_broker).publish_all([("plant/l/a/t", str(i)) for i in range(50)])
        await wait_until(lambda: len(got) == 50, 10, "50 streamed readings")
    await asyncio.wait_for(task, 5)


# --- sessions and outages ----------------------------------------------------------------------


class SeqPublisher:
    """Publishes QoS 1 sequence numbers from a thread, with its own persistent session."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.topic = topic
        self.peer = Peer(broker.host, broker.port, client_id="seq-publisher", persistent=True)
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            # while the broker is down paho queues these and sends them after reconnecting
            self.peer.publish(self.topic, str(self.count), qos=1)
            self.count += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.count

    def all_acked(self) -> bool:
        return len(self.peer.client._out_messages) == 0

    def close(self) -> None:
        self.stop()
        self.peer.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_no_qos1_message_is_lost_while_the_broker_restarts(mqtt_broker_factory, protocol):
    broker = mqtt_broker_factory()
    sink = Sink()
    conn = MqttConnector(
        _config(
            broker.url,
            protocol=protocol,
            client_id=f"restart-{protocol}",
            subscriptions=[{"topic": "seq/{asset}/{tag}", "qos": 1}],
        )
    )
    conn.set_sink(sink)
    async with conn:
        await _connected(conn)
        pub = SeqPublisher(broker, "seq/m/n")
        try:
            await wait_until(lambda: len(sink.readings) > 100, 10, "readings before the outage")
            await asyncio.to_thread(broker.stop)
            gap_start = pub.count
            await wait_until(
                lambda: conn.status.state is ConnectorState.RECONNECTING, 10, "outage noticed"
            )
            assert conn.status.last_error and conn.status.next_attempt_at is not None
            await wait_until(lambda: pub.count > gap_start + 200, 10, "publishing during the gap")
            await asyncio.to_thread(broker.start)
            await _connected(conn, 15)
            assert conn.session_present
            mark = pub.count
            await wait_until(lambda: pub.count > mark + 200, 10, "publishing after the restart")
            total = pub.stop()
            await wait_until(pub.all_acked, 15, "the publisher's queue acknowledged")
            await wait_until(
                lambda: set(sink.values()) >= set(range(total)), 20, f"all {total} sequence numbers"
            )
        finally:
            pub.close()
    seen = set(sink.values())
    assert seen == set(range(total))
    assert total > gap_start + 200


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_qos1_messages_sent_while_the_agent_is_away_arrive_when_it_returns(
    mqtt_broker, peers, protocol
):
    cfg = _config(
        mqtt_broker,
        protocol=protocol,
        client_id=f"away-{protocol}",
        subscriptions=[{"topic": f"away{protocol}/{{asset}}/{{tag}}", "qos": 1}],
    )
    async with MqttConnector(cfg) as first:
        await _connected(first)
    pub = peers(mqtt_broker)
    await pub.publish_all([(f"away{protocol}/m/n", str(i)) for i in range(300)])
    sink = Sink()
    second = MqttConnector(cfg)
    second.set_sink(sink)
    async with second:
        await _connected(second)
        assert second.session_present
        await wait_until(lambda: len(sink.readings) >= 300, 10, "the 300 queued messages")
    assert sorted(sink.values()) == list(range(300))


async def test_messages_the_sink_refused_are_not_acked_and_come_back(mqtt_broker, peers):
    cfg = _config(
        mqtt_broker,
        protocol="3.1.1",
        client_id="refusing-sink",
        subscriptions=[{"topic": "ack/{asset}/{tag}", "qos": 1}],
    )
    calls = []

    def failing(batch):
        calls.append(batch)
        raise RuntimeError("agent queue full")

    first = MqttConnector(cfg)
    first.set_sink(failing)
    async with first:
        await _connected(first)
        await peers(mqtt_broker).publish_all([("ack/m/n", "1")])
        await wait_until(lambda: bool(calls), 10, "the sink called")
    sink = Sink()
    second = MqttConnector(cfg)
    second.set_sink(sink)
    async with second:
        await wait_until(lambda: sink.values() == [1], 10, "the unacked message redelivered")


# --- security -----------------------------------------------------------------------------------


def _pki(tmp: Path) -> dict[str, Path]:
    now = dt.datetime.now(dt.UTC)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k, name):
        p = tmp / name
        p.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return p

    def cert(subject, issuer, pub, signer, *, ca=False, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signer, hashes.SHA256())

    out = {}
    ca_key = key()
    ca = cert("edgeloop test CA", "edgeloop test CA", ca_key.public_key(), ca_key, ca=True)
    for name, c in (("ca", ca),):
        out[name] = tmp / f"{name}.pem"
        out[name].write_bytes(c.public_bytes(serialization.Encoding.PEM))
    for name, san in (
        ("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", None),
    ):
        k = key()
        c = cert(name, "edgeloop test CA", k.public_key(), ca_key, san=san)
        out[name] = tmp / f"{name}.pem"
        out[name].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        out[f"{name}_key"] = write_key(k, f"{name}.key")
    return out


@pytest.fixture
def secure_broker(tmp_path):
    """Mosquitto with a plain listener, a TLS listener, a mutual-TLS listener and a password file."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    pki = _pki(tmp_path)
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "edge", "s3cret"], check=True)
    tls_port, mtls_port = free_port(), free_port()
    extra = (
        f"password_file {pw}\n"
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {pki['ca']}\ncertfile {pki['server']}\nkeyfile {pki['server_key']}\n"
        f"listener {mtls_port} 127.0.0.1\n"
        f"cafile {pki['ca']}\ncertfile {pki['server']}\nkeyfile {pki['server_key']}\n"
        "require_certificate true\n"
    )
    with MosquittoBroker(extra_config=extra) as broker:
        yield broker, pki, tls_port, mtls_port


async def _reads_over(cfg: MqttConfig, plain_url: str, peers) -> None:
    sink = Sink()
    conn = MqttConnector(cfg)
    conn.set_sink(sink)
    async with conn:
        await _connected(conn)
        await peers(plain_url).publish_all([("plant/l/a/t", "1")])
        await wait_until(lambda: sink.values() == [1], 10, f"a reading over {cfg.url}")


async def _refused(cfg: MqttConfig, expect: str) -> None:
    conn = MqttConnector(cfg)
    async with conn:
        await wait_until(lambda: conn.status.attempts >= 2, 10, "failed attempts")
        assert conn.status.state is ConnectorState.RECONNECTING
        assert expect in (conn.status.last_error or ""), conn.status.last_error


async def test_tls_verifies_the_broker_against_the_given_ca(secure_broker, peers):
    broker, pki, tls_port, _ = secure_broker
    url = f"mqtts://127.0.0.1:{tls_port}"
    await _reads_over(
        _config(url, client_id="tls-ok", persistent_session=False, tls={"ca_file": str(pki["ca"])}),
        broker.url,
        peers,
    )
    # the system trust store does not know our CA: refused, never silently trusted
    await _refused(_config(url, client_id="tls-untrusted"), "CERTIFICATE_VERIFY_FAILED")


async def test_mutual_tls_with_a_client_certificate(secure_broker, peers):
    broker, pki, _, mtls_port = secure_broker
    url = f"mqtts://127.0.0.1:{mtls_port}"
    tls = {
        "ca_file": str(pki["ca"]),
        "cert_file": str(pki["client"]),
        "key_file": str(pki["client_key"]),
    }
    await _reads_over(
        _config(url, client_id="mtls-ok", persistent_session=False, tls=tls), broker.url, peers
    )
    await _refused(
        _config(url, client_id="mtls-nocert", tls={"ca_file": str(pki["ca"])}),
        "closed before CONNACK",
    )


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_username_and_password(secure_broker, peers, protocol):
    broker, *_ = secure_broker
    await _reads_over(
        _config(
            broker.url,
            protocol=protocol,
            client_id=f"user-ok-{protocol}",
            username="edge",
            password="s3cret",
            persistent_session=False,
        ),
        broker.url,
        peers,
    )
    await _refused(
        _config(
            broker.url, protocol=protocol, client_id="user-bad", username="edge", password="nope"
        ),
        "refused the connection",
    )


# --- actions -----------------------------------------------------------------------------------


async def test_write_publishes_to_the_command_topic_of_the_tag(mqtt_broker, peers):
    sink = Sink()
    cfg = _config(
        mqtt_broker,
        client_id="write-test",
        persistent_session=False,
        commands={"topic": "plant/{line}/{asset}/{tag}/set", "tags": ["speed", "mode"]},
    )
    conn = MqttConnector(cfg)
    conn.set_sink(sink)
    device = peers(mqtt_broker)
    await device.subscribe("plant/+/+/+/set")
    async with conn:
        await _connected(conn)
        await device.publish_all([("plant/l3/press/speed", "10"), ("plant/l3/press/mode", "1")])
        await wait_until(lambda: len(sink.readings) == 2, 10, "the tags seen")
        await conn.write("speed", 42.5)
        await conn.write("mode", True)
        with pytest.raises(WriteError, match="not writable"):
            await conn.write("temp", 1)
        await wait_until(lambda: len(device.received) == 2, 10, "the commands at the device")
    assert [(m.topic, m.payload) for m in device.received] == [
        ("plant/l3/press/speed/set", b"42.5"),
        ("plant/l3/press/mode/set", b"true"),
    ]


async def test_write_without_known_topic_fields_says_which_is_missing(mqtt_broker):
    cfg = _config(
        mqtt_broker,
        client_id="write-missing",
        persistent_session=False,
        commands={
            "topic": "plant/{line}/{asset}/{tag}/set",
            "payload": "json",
            "fields": {"line": "l9"},
        },
    )
    async with MqttConnector(cfg) as conn:
        await _connected(conn)
        with pytest.raises(WriteError, match=r"no value for \{asset\}"):
            await conn.write("speed", 1)


async def test_publish_for_actions_waits_for_the_broker_and_can_retain(mqtt_broker, peers):
    conn = MqttConnector(_config(mqtt_broker, client_id="publish-test", persistent_session=False))
    with pytest.raises(ConnectorError, match="not connected"):
        await conn.publish("alarms/press", b"x")
    async with conn:
        await _connected(conn)
        await conn.publish("alarms/press-1", '{"level": "high"}', qos=1, retain=True)
        await conn.publish("alarms/press-2", b"fire", qos=2)
        with pytest.raises(ConnectorError, match="wildcard"):
            await conn.publish("alarms/#", b"x")
    late = peers(mqtt_broker)
    await late.subscribe("alarms/#")
    await wait_until(lambda: len(late.received) == 1, 10, "the retained message")
    assert late.received[0].payload == b'{"level": "high"}' and late.received[0].retain
