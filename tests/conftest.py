"""Real brokers for the tests: Tansu (Kafka protocol), Mosquitto, and the machine's PostgreSQL.

``kafka_broker`` / ``mqtt_broker`` are session-wide and yield an address; tests that stop or
restart a broker use ``kafka_broker_factory`` / ``mqtt_broker_factory`` and get their own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from edgeloop.services import MosquittoBroker, TansuBroker, find_mosquitto

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
PG_ADMIN_URL = os.environ.get("EDGELOOP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """Bootstrap address of a Tansu broker on a free loopback port (shared by the session)."""
    with TansuBroker() as broker:
        yield broker.bootstrap


@pytest.fixture
def kafka_broker_factory() -> Iterator[Callable[[], TansuBroker]]:
    """Start private Tansu brokers a test may stop, kill and restart; all are stopped after."""
    started: list[TansuBroker] = []

    def make() -> TansuBroker:
        broker = TansuBroker().start()
        started.append(broker)
        return broker

    yield make
    for b in started:
        b.close()


def _need_mosquitto() -> None:
    if find_mosquitto() is None:
        if IN_CI:
            pytest.fail("mosquitto is not installed; `make test` installs it as root")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[str]:
    """URL (mqtt://127.0.0.1:PORT) of a Mosquitto on a free port with persistence on."""
    _need_mosquitto()
    with MosquittoBroker() as broker:
        yield broker.url


@pytest.fixture
def mqtt_broker_factory() -> Iterator[Callable[[], MosquittoBroker]]:
    _need_mosquitto()
    started: list[MosquittoBroker] = []

    def make() -> MosquittoBroker:
        broker = MosquittoBroker().start()
        started.append(broker)
        return broker

    yield make
    for b in started:
        b.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh database on the local PostgreSQL, dropped after the session.

    Skips with the reason when no PostgreSQL answers, except under CI=true where it fails.
    """
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required under CI: {exc}")
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL}: {exc}")
    name = f"edgeloop_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            host_part = PG_ADMIN_URL.rsplit("/", 1)[0].split("://", 1)[1]
            yield f"postgresql+psycopg://{host_part}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
