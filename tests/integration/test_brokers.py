"""The fixtures' brokers are real: Kafka protocol through aiokafka, MQTT through paho."""

import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import create_engine, text

from shared.records import Frame, Quality, Reading
from shared.topics import Topics
from shared.wire import Batch, Kind, decode_batch, encode_batch
from tests.mqtt_roundtrip import mqtt_round_trip


async def test_batch_produced_to_kafka_is_consumed_by_a_group_and_decodes_equal(kafka_broker):
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:8]}")
    readings = [
        Reading(
            f"machine-{i % 3}", f"tag-{i}", 1_700_000_000_000_000_000 + i, i * 0.5, Quality.GOOD
        )
        for i in range(200)
    ]
    batches = [
        Batch("agent-1", seq, Kind.READING, readings[seq * 50 : (seq + 1) * 50], created_ns=seq)
        for seq in range(4)
    ]
    frame_batch = Batch("agent-1", 4, Kind.FRAME, [Frame("machine-0", "part-1", 5, {"x": 1.0})])

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_broker, acks="all", request_timeout_ms=10000
    )
    await producer.start()
    try:
        for b in [*batches, frame_batch]:
            await producer.send_and_wait(
                topics.for_kind(b.kind), encode_batch(b), key=b.records[0].asset.encode()
            )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topics.telemetry,
        topics.frames,
        bootstrap_servers=kafka_broker,
        group_id=f"g-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[Batch] = []
    try:
        deadline = time.monotonic() + 20
        while len(got) < 5 and time.monotonic() < deadline:
            polled = await consumer.getmany(timeout_ms=500)
            for msgs in polled.values():
                got.extend(decode_batch(m.value) for m in msgs)
        await consumer.commit()
    finally:
        await consumer.stop()
    got.sort(key=lambda b: b.batch_seq)
    assert got == [*batches, frame_batch]


def test_message_passes_through_the_mosquitto_fixture(mqtt_broker):
    host, port = mqtt_broker.removeprefix("mqtt://").split(":")
    assert mqtt_round_trip(host, int(port), "plant/line1/m1/temp", b"21.5") == [b"21.5"]


def test_postgres_fixture_gives_a_fresh_database(postgres_url):
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE probe (id int)"))
            conn.execute(text("INSERT INTO probe VALUES (1)"))
            assert conn.execute(text("SELECT count(*) FROM probe")).scalar() == 1
    finally:
        engine.dispose()


def test_kafka_broker_can_be_killed_and_restarted_on_the_same_port(kafka_broker_factory):
    broker = kafka_broker_factory()
    port, pid = broker.port, broker.pid
    broker.kill()
    assert not broker.running
    broker.start()
    assert broker.port == port and broker.pid != pid

    async def produce():
        p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
        await p.start()
        try:
            await p.send_and_wait("after-restart", b"x")
        finally:
            await p.stop()

    asyncio.run(produce())
