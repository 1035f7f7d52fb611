"""``edgeloop demo``: the whole loop on one machine.

Until the closed loop is built this brings up the embedded brokers, proves a round trip through
each, and lists which parts of edgeloop exist so far.
"""

from __future__ import annotations

import asyncio
import importlib

import click

from edgeloop.cli import COMMANDS
from edgeloop.services import MosquittoBroker, TansuBroker, find_mosquitto


async def _kafka_round_trip(bootstrap: str) -> str:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=10000)
    await producer.start()
    try:
        await producer.send_and_wait("edgeloop.demo", b"hello")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        "edgeloop.demo", bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), timeout=10)
    finally:
        await consumer.stop()
    return msg.value.decode() if msg.value else ""


def _built(target: str) -> bool:
    module_name, _, attr = target.partition(":")
    try:
        return hasattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError:
        return False


@click.command()
def demo() -> None:
    """Run the whole loop on embedded defaults (Tansu, an MQTT broker, simulator, cloud, edge)."""
    click.echo("edgeloop demo: the closed loop is not built yet; here is what exists so far.\n")
    with TansuBroker() as kafka:
        echoed = asyncio.run(_kafka_round_trip(kafka.bootstrap))
        click.echo(
            f"  Kafka-protocol broker (Tansu) on {kafka.bootstrap}: round trip {echoed!r} ok"
        )
    if find_mosquitto():
        with MosquittoBroker() as mqtt:
            click.echo(f"  MQTT broker (Mosquitto) on {mqtt.url}: CONNACK ok")
    else:
        click.echo("  MQTT broker: Mosquitto not on PATH (the demo will use amqtt)")
    click.echo("\n  command groups:")
    for name, (target, help_) in COMMANDS.items():
        state = "ready" if _built(target) else "not built yet"
        click.echo(f"    edgeloop {name:<9} {state:<14} {help_}")
