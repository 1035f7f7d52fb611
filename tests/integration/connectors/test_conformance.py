"""One suite, every connector: lifecycle, delivery, reconnect, malformed input, config round-trip."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from protocols.base import ConnectorState, load_connector_class
from shared.config import parse_config
from shared.records import Reading
from tests.waiting import wait_until as wait_for

_HERE = Path(__file__).parent
HARNESS_MODULES = sorted(
    m.name for m in pkgutil.iter_modules([str(_HERE)]) if m.name.startswith("harness_")
)

pytestmark = pytest.mark.skipif(not HARNESS_MODULES, reason="no connector harness yet")


@pytest.fixture(params=HARNESS_MODULES or ["none"])
async def harness(request) -> AsyncIterator[Any]:
    module = importlib.import_module(f"{__package__}.{request.param}")
    h = module.make_harness() if hasattr(module, "make_harness") else module.HARNESS
    await h.start_server()
    try:
        yield h
    finally:
        await h.close()


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def __call__(self, batch) -> None:
        self.readings.extend(batch)

    def seen(self) -> set[tuple[str, str]]:
        return {(r.asset, r.tag) for r in self.readings}


async def test_start_and_stop_are_idempotent(harness):
    conn = harness.connector(harness.config())
    await conn.stop()  # before start: harmless
    await conn.start()
    await conn.start()
    await conn.stop()
    await conn.stop()
    assert conn.status.state is ConnectorState.STOPPED
    async with harness.connector(harness.config()) as again:
        await wait_for(lambda: again.status.state is ConnectorState.CONNECTED, 10, "connected")


async def test_every_expected_tag_delivers_readings(harness):
    sink = Collector()
    conn = harness.connector(harness.config())
    conn.set_sink(sink)
    async with conn:
        await wait_for(lambda: harness.expected_tags() <= sink.seen(), 15, "a reading of every tag")
    assert all(r.ts_ns > 0 for r in sink.readings)


async def test_reconnects_after_its_server_restarts(harness):
    sink = Collector()
    conn = harness.connector(harness.config())
    conn.set_sink(sink)
    async with conn:
        await wait_for(lambda: bool(sink.readings), 15, "first readings")
        await harness.stop_server()
        await wait_for(
            lambda: conn.status.state is not ConnectorState.CONNECTED, 15, "loss noticed"
        )
        assert conn.status.last_error
        await harness.restart_server()
        await wait_for(lambda: conn.status.state is ConnectorState.CONNECTED, 15, "reconnect")
        mark = len(sink.readings)
        await wait_for(lambda: len(sink.readings) > mark, 15, "readings after restart")


async def test_malformed_input_is_counted_and_never_fatal(harness):
    sink = Collector()
    conn = harness.connector(harness.config())
    conn.set_sink(sink)
    async with conn:
        await wait_for(lambda: bool(sink.readings), 15, "first readings")
        before = conn.malformed_total
        await harness.inject_malformed()
        await wait_for(lambda: conn.malformed_total > before, 15, "malformed input counted")
        mark = len(sink.readings)
        await wait_for(lambda: len(sink.readings) > mark, 15, "readings after malformed input")
        assert conn.status.state is ConnectorState.CONNECTED


async def test_config_round_trips_through_yaml(harness):
    cfg = harness.config()
    model = type(cfg)
    assert model.model_validate(cfg.model_dump()) == cfg
    text = yaml.safe_dump(cfg.model_dump(mode="json"))
    assert parse_config(text, model) == cfg


async def test_connector_is_registered_by_entry_point(harness):
    cls = load_connector_class(harness.kind)
    assert isinstance(harness.connector(harness.config()), cls)
