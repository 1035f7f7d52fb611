"""``isolation: process``: a connector in its own worker process behaves like an inline one.

Against the simulator's real Modbus server and the Tansu broker: readings arrive through the
packed path, the worker's protocol metrics show up in the agent's registry (counters and
histograms), writes and their errors cross the process boundary, a SIGKILLed worker is replaced
and the stream goes on exactly once, and stopping leaves no process behind.
"""

from __future__ import annotations

import os
import signal

import pytest
from prometheus_client import REGISTRY

from edge.agent import Agent
from edge.config import EdgeConfig
from edge.isolation import ProcessConnector
from protocols.base import ConnectorState, WriteError
from protocols.modbus import ModbusConfig
from tests.integration.edge.kit import Collector
from tests.integration.edge.test_durability import _alive
from tests.integration.edge.test_simulator import modbus_connector
from tests.waiting import wait_until

factory = pytest.importorskip("simulators.factory")
from simulators.config import SimConfig  # noqa: E402


def sim_config() -> SimConfig:
    return SimConfig.model_validate(
        {
            "scenario": {"seed": 5, "machines": 2, "speed": 20.0, "fault_interval": None},
            "update_hz": 20,
            "opcua": {"enabled": False},
            "modbus": {"port": 0},
            "mqtt": {"enabled": False},
        }
    )


async def test_worker_readings_metrics_and_writes_cross_the_process_boundary():
    async with factory.FactorySimulator(sim_config()) as sim:
        host, port = sim.modbus_address
        cfg = modbus_connector(host, port, "process")
        cfg["name"] = "iso-modbus"
        conn = ProcessConnector(ModbusConfig.model_validate(cfg))
        got: list = []
        conn.set_sink(got.extend)  # no packed sink: rows come back as readings
        try:
            async with conn:
                await wait_until(lambda: len(got) > 200, 30, "readings from the worker")
                assert conn.status.state is ConnectorState.CONNECTED
                pid = conn.pid
                assert pid is not None and pid != os.getpid() and _alive(pid)
                tags = {(r.asset, r.tag) for r in got}
                assert ("m1", "spindle_temp") in tags and ("m2", "part_counter") in tags
                assert all(r.ts_ns > 0 for r in got)

                await conn.write("m2/alarm_lamp", True)
                await wait_until(lambda: sim.scenario.alarm_lamp[1], 10, "m2's lamp on")
                with pytest.raises(WriteError, match="has no tag 'nope'"):
                    await conn.write("nope", 1)
                with pytest.raises(WriteError, match="expected true or false"):
                    await conn.write("m1/alarm_lamp", 3)

                def sample(name: str, **labels: str) -> float:
                    return REGISTRY.get_sample_value(name, labels) or 0.0

                # the worker's metrics, forwarded into this process's registry once a second
                await wait_until(
                    lambda: (
                        sample(
                            "edgeloop_modbus_requests_total", connector="iso-modbus", outcome="ok"
                        )
                        > 50
                    ),
                    10,
                    "forwarded request counts",
                )
                n = sample("edgeloop_modbus_request_seconds_count", connector="iso-modbus")
                inf = sample(
                    "edgeloop_modbus_request_seconds_bucket", connector="iso-modbus", le="+Inf"
                )
                assert n > 50 and inf == n
                assert sample("edgeloop_modbus_request_seconds_sum", connector="iso-modbus") > 0
                await wait_until(
                    lambda: (
                        sample(
                            "edgeloop_connector_writes_total",
                            connector="iso-modbus",
                            kind="modbus",
                            outcome="ok",
                        )
                        >= 1
                    ),
                    10,
                    "the write counted",
                )
                assert sample(
                    "edgeloop_connector_readings_total", connector="iso-modbus", kind="modbus"
                ) >= len(got)
        finally:
            await conn.stop()
        assert conn.status.state is ConnectorState.STOPPED
        await wait_until(lambda: not _alive(pid), 10, "the worker process gone")


async def test_a_killed_worker_is_replaced_and_the_stream_stays_exactly_once(
    tmp_path, kafka_broker
):
    cfg = EdgeConfig.model_validate(
        {
            "agent_id": "gw-iso",
            "state_dir": str(tmp_path / "state"),
            "connectors": [
                {
                    "kind": "synthetic",
                    "name": "iso-load",
                    "assets": ["m1", "m2"],
                    "tags": ["t0", "t1", "t2"],
                    "interval": 0.01,
                    "cycle": 0.3,
                    "isolation": "process",
                    "backoff": {"initial": 0.2, "max": 1.0},
                }
            ],
            "frames": [
                {
                    "asset": a,
                    "trigger": {"tag": "part_counter"},
                    "features": [{"tag": "t0", "aggs": ["mean"]}],
                }
                for a in ("m1", "m2")
            ],
            "rules": [{"name": "hot", "when": "r.t1 > 55.0", "clear": "r.t1 < 45.0"}],
            "uplink": {
                "bootstrap_servers": kafka_broker,
                "linger_ms": 5,
                "delete_after": "broker",  # no cloud here to confirm batches
            },
            "http": {"port": None},
        }
    )
    async with Collector(kafka_broker, "gw-iso") as col:
        agent = Agent(cfg)
        conn = agent.connectors["iso-load"]
        assert isinstance(conn, ProcessConnector)
        try:
            await agent.start()
            await wait_until(lambda: len(col.readings) > 500, 30, "readings in Kafka")
            await wait_until(lambda: len(col.frames) >= 2, 30, "frames from wanted readings")
            first = conn.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await wait_until(
                lambda: conn.generation == 2 and conn.status.state is ConnectorState.CONNECTED,
                20,
                "a new worker",
            )
            assert conn.pid != first and not _alive(first)
            reconnects = REGISTRY.get_sample_value(
                "edgeloop_connector_reconnects_total",
                {"connector": "iso-load", "kind": "synthetic"},
            )
            assert reconnects is not None and reconnects >= 1
            seen = len(col.readings)
            await wait_until(lambda: len(col.readings) > seen + 500, 30, "readings again")
            assert agent.degraded_reasons() == []
        finally:
            await agent.stop()
        second = conn.pid
        assert second is not None
        await wait_until(lambda: not _alive(second), 10, "no worker left after stop")
        await wait_until(
            lambda: len(col.seqs("gw-iso")) == agent.outbox.next_seq - 1, 30, "every batch"
        )
    col.assert_exactly_once("gw-iso")
    # frames were cut from the readings the worker sent as objects (the trigger and t0)
    assert {f.asset for f in col.frames} == {"m1", "m2"}
    assert all("t0_mean" in f.features for f in col.frames)
