"""The alert rules and the Grafana dashboard name metrics our running tiers really export.

A real stack on this machine: the factory simulator (OPC UA, Modbus TCP, MQTT to Mosquitto), an
edge agent built from the compose stack's own edge.yaml (only the addresses rewritten to the
local servers), and the cloud service from the compose cloud.yaml with the secrets and addresses
injected as EDGELOOP__ environment overrides (as compose and Helm do), on a private Tansu broker
and PostgreSQL. Both /metrics endpoints are scraped and parsed with prometheus_client's parser;
the Dockerfiles' HEALTHCHECK commands are run against both /healthz endpoints."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid

import httpx
import pytest
import yaml

from cloud.config import CloudConfig
from edge.agent import Agent
from edge.config import EdgeConfig
from shared.config import load_config
from tests.integration.cloud.stream import EdgeProducer, Stream
from tests.unit.deploy.kit import (
    DEPLOY,
    PROMETHEUS_OWN,
    alert_rules,
    compose,
    dashboards,
    exposed_names,
    grafana_queries,
    mounts,
    promql_metric_names,
)
from tests.waiting import wait_until

factory = pytest.importorskip("simulators.factory")
from simulators.config import SimConfig  # noqa: E402

pytestmark = pytest.mark.postgres


def local_edge_config(tmp_path, sim, mqtt_url: str, bootstrap: str):
    """The compose edge.yaml with its service addresses pointed at the local servers."""
    path = mounts(compose()["services"]["edge"])["/etc/edgeloop/edge.yaml"]
    doc = yaml.safe_load(path.read_text())
    host, port = sim.modbus_address
    for c in doc["connectors"]:
        if c["kind"] == "opcua":
            c["endpoint"] = sim.opcua_endpoint
        elif c["kind"] == "modbus":
            c["transport"].update(host=host, port=port)
        elif c["kind"] == "mqtt":
            c["url"] = mqtt_url
            c["client_id"] = f"deploy-test-{uuid.uuid4().hex[:8]}"
    doc["state_dir"] = str(tmp_path / "edge-state")
    doc["uplink"]["bootstrap_servers"] = bootstrap
    doc["http"] = {"host": "127.0.0.1", "port": 0}
    doc["heartbeat_interval"] = 0.5
    return EdgeConfig.model_validate(doc)


def local_cloud_config(bootstrap: str, postgres_url: str) -> CloudConfig:
    path = mounts(compose()["services"]["cloud"])["/etc/edgeloop/cloud.yaml"]
    environ = {
        "EDGELOOP__API__TOKEN": "deploy-test-token-0123456789abc",
        "EDGELOOP__DATABASE__URL": postgres_url,
        "EDGELOOP__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "EDGELOOP__KAFKA__SESSION_TIMEOUT_S": "2",  # Tansu holds a join for half of it
        "EDGELOOP__API__HOST": "127.0.0.1",
        "EDGELOOP__API__PORT": "0",
        "EDGELOOP__CHECKPOINT_INTERVAL_S": "0.5",
        "EDGELOOP__INSTANCE": f"deploy-{uuid.uuid4().hex[:8]}",
    }
    return load_config(path, CloudConfig, environ=environ)


def healthcheck_command(dockerfile: str) -> list[str]:
    text = (DEPLOY / "docker" / dockerfile).read_text()
    m = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", text, re.M)
    assert m is not None, f"{dockerfile}: no exec-form HEALTHCHECK CMD"
    return yaml.safe_load(m.group(1))


async def run_healthcheck(dockerfile: str, port: int) -> int:
    argv = healthcheck_command(dockerfile)
    assert argv[0] == "python"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv[1:],
        env={"EDGELOOP_HEALTH_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_running_edge_and_cloud_export_every_metric_the_alerts_and_dashboard_use(
    tmp_path, kafka_broker_factory, mqtt_broker, postgres_url
):
    broker = kafka_broker_factory()
    cloud_cfg = local_cloud_config(broker.bootstrap, postgres_url)
    sim_cfg = SimConfig.model_validate(
        {
            "scenario": {"seed": 1, "machines": 4, "speed": 20.0, "fault_interval": None},
            "update_hz": 20,
            "opcua": {"port": 0},
            "modbus": {"port": 0},
            "mqtt": {"url": mqtt_broker, "client_id": f"deploy-sim-{uuid.uuid4().hex[:8]}"},
        }
    )
    async with factory.FactorySimulator(sim_cfg) as sim:
        from cloud.service import CloudService

        async with CloudService(cloud_cfg) as svc:
            # labelled parts so the learners, the champion and its metrics exist
            stream = Stream(assets=("m1", "m2"))
            async with EdgeProducer(broker.bootstrap, cloud_cfg.kafka.topics()) as producer:
                await producer.send_parts(stream.parts(400))
            await wait_until(
                lambda: svc.learners["quality"].champion is not None, 60, "a first champion"
            )
            edge_cfg = local_edge_config(tmp_path, sim, mqtt_broker, broker.bootstrap)
            async with Agent(edge_cfg) as agent:
                await wait_until(
                    lambda: (
                        all(c.status.state == "connected" for c in agent.connectors.values())
                        and agent.frames_built >= 4
                        and agent.uplink.acked_batches > 0
                        and len(svc.fleet) >= 1
                    ),
                    60,
                    "all three connectors connected, frames built, batches acked, a heartbeat",
                )
                edge_port, cloud_port = agent.http.port, svc.api_port
                async with httpx.AsyncClient(timeout=10) as http:
                    edge_text = (await http.get(f"http://127.0.0.1:{edge_port}/metrics")).text
                    cloud_text = (await http.get(f"http://127.0.0.1:{cloud_port}/metrics")).text
                    edge_health = await http.get(f"http://127.0.0.1:{edge_port}/healthz")
                    cloud_health = await http.get(f"http://127.0.0.1:{cloud_port}/healthz")
                edge_hc = await run_healthcheck("Dockerfile.edge", edge_port)
                cloud_hc = await run_healthcheck("Dockerfile.cloud", cloud_port)
                wrong_port_hc = await run_healthcheck("Dockerfile.edge", cloud_port + 1)

    assert edge_health.status_code == 200 and cloud_health.status_code == 200
    assert edge_health.json()["status"] == "ok", edge_health.json()
    assert (edge_hc, cloud_hc) == (0, 0)
    assert wrong_port_hc != 0  # the healthcheck does fail when nothing answers

    sampled, declared = set(), set()
    for text in (edge_text, cloud_text):
        s, d = exposed_names(text)
        sampled |= s
        declared |= d
    known = sampled | declared | PROMETHEUS_OWN
    # what this stack must have produced samples for, not merely declared
    assert {
        "edgeloop_edge_readings_total",
        "edgeloop_edge_outbox_depth",
        "edgeloop_edge_uplink_records_total",
        "edgeloop_connector_connected",
        "edgeloop_modbus_request_seconds_bucket",
        "edgeloop_cloud_ingest_records_total",
        "edgeloop_cloud_champion_metric",
        "edgeloop_cloud_champion_version",
        "edgeloop_cloud_prequential",
    } <= sampled

    unknown = {}
    for rule in alert_rules():
        missing = promql_metric_names(rule["expr"]) - known
        if missing:
            unknown[rule["alert"]] = sorted(missing)
    assert unknown == {}, f"alert rules name metrics nobody exports: {unknown}"
    metric_names = set()
    for rule in alert_rules():
        metric_names |= promql_metric_names(rule["expr"])
    assert len(metric_names - PROMETHEUS_OWN) >= 15

    for path, dash in dashboards():
        bad = {}
        for where, expr in grafana_queries(dash):
            names = promql_metric_names(expr)
            assert names, f"{path.name} {where}: no metric in {expr!r}"
            if names - known:
                bad[where] = sorted(names - known)
        assert bad == {}, f"{path.name}: queries name metrics nobody exports: {bad}"
