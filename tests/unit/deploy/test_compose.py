"""deploy/compose and deploy/docker: files parse, references resolve, ports agree with the mounted
configs, and those configs validate against the real config models (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from cloud.config import CloudConfig
from edge.config import EdgeConfig
from shared.config import load_config
from tests.unit.deploy.kit import (
    COMPOSE_DIR,
    COMPOSE_ENV,
    DEPLOY,
    PROMETHEUS,
    REPO,
    compose,
    container_ports,
    mounts,
    service_environment,
    substitute,
)

DOCKERFILES = sorted(
    p for p in (DEPLOY / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore"
)


def edge_config():
    svc = compose()["services"]["edge"]
    path = mounts(svc)["/etc/edgeloop/edge.yaml"]
    return load_config(path, EdgeConfig, environ=service_environment(svc))


def cloud_config():
    svc = compose()["services"]["cloud"]
    path = mounts(svc)["/etc/edgeloop/cloud.yaml"]
    return load_config(path, CloudConfig, environ=service_environment(svc))


def hostport(address: str, default_port: int) -> tuple[str, int]:
    u = urlsplit(address if "://" in address else f"x://{address}")
    return u.hostname or "", u.port or default_port


def test_every_deploy_yaml_and_json_file_parses():
    import json

    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    yamls = [p for p in files if p.suffix in {".yml", ".yaml"} and "templates" not in p.parts]
    jsons = [p for p in files if p.suffix == ".json"]
    assert len(yamls) >= 8 and jsons
    for p in yamls:
        text = p.read_text()
        if p.name == "docker-compose.yml":
            text = substitute(text, COMPOSE_ENV)
        assert yaml.safe_load(text) is not None, p
    for p in jsons:
        json.loads(p.read_text())


def test_compose_refuses_to_start_without_secrets():
    with pytest.raises(KeyError, match="EDGELOOP_API_TOKEN"):
        compose({"POSTGRES_PASSWORD": "x"})


def test_compose_has_the_whole_stack_with_official_images():
    services = compose()["services"]
    assert set(services) >= {
        "kafka", "postgres", "cloud", "edge", "simulator", "prometheus", "grafana", "mosquitto",
    }  # fmt: skip
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"].startswith("postgres:")
    for name, svc in services.items():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin an image tag"


def test_compose_builds_from_dockerfiles_that_exist_and_mounts_files_that_exist():
    services = compose()["services"]
    built = {}
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert context == REPO, f"{name}: build context must be the repo root"
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            built[name] = dockerfile.name
        for target, host in mounts(svc).items():
            assert host.exists(), f"{name}: mounts {host} (as {target}), which does not exist"
    assert built == {
        "cloud": "Dockerfile.cloud",
        "edge": "Dockerfile.edge",
        "simulator": "Dockerfile.sim",
    }


def test_kafka_runs_kraft_single_node_with_consistent_listeners():
    env = service_environment(compose()["services"]["kafka"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["CLUSTER_ID"]
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocol_map = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(listeners) == set(protocol_map)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    node, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert node == env["KAFKA_NODE_ID"]
    assert voter.split(":")[1] == listeners["CONTROLLER"].split(":")[-1]
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    # the edge and the cloud bootstrap from the advertised in-network listener
    internal = advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert edge_config().uplink.bootstrap_servers == internal
    assert cloud_config().kafka.bootstrap_servers == internal
    assert hostport(internal, 9092)[1] == int(listeners["PLAINTEXT"].split(":")[-1])


def test_mounted_edge_config_validates_and_points_at_the_compose_services():
    services = compose()["services"]
    cfg = edge_config()
    assert cfg.http.host == "0.0.0.0"
    assert str(cfg.state_dir) == "/var/lib/edgeloop"
    assert "/var/lib/edgeloop" in [v.split(":")[1] for v in services["edge"]["volumes"]]
    sim_cmd = services["simulator"]["command"]
    dockerfile = (DEPLOY / "docker" / "Dockerfile.sim").read_text()
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    assert entry is not None
    argv = [*yaml.safe_load(entry.group(1)), *sim_cmd]
    sim_opts = dict(
        a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--") and "=" in a
    )
    sim_opts.update(
        {argv[i].removeprefix("--"): argv[i + 1] for i, a in enumerate(argv[:-1])
         if a.startswith("--") and "=" not in a and not argv[i + 1].startswith("--")}
    )  # fmt: skip
    kinds = {c.kind: c for c in cfg.connectors}
    assert set(kinds) == {"opcua", "modbus", "mqtt"}
    host, port = hostport(kinds["opcua"].endpoint, 4840)
    assert host == "simulator" and port == int(sim_opts["opcua-port"])
    assert kinds["modbus"].transport.host == "simulator"
    assert kinds["modbus"].transport.port == int(sim_opts["modbus-port"])
    assert {port, kinds["modbus"].transport.port} <= container_ports(services["simulator"])
    mqtt_host, mqtt_port = hostport(kinds["mqtt"].url, 1883)
    assert (mqtt_host, mqtt_port) == hostport(sim_opts["mqtt-url"], 1883)
    assert mqtt_port in container_ports(services[mqtt_host])
    conf = mounts(services["mosquitto"])["/mosquitto/config/mosquitto.conf"].read_text()
    assert re.search(rf"^listener {mqtt_port}\b", conf, re.M)
    # frames cover every machine the simulator runs
    machines = int(sim_opts["machines"])
    assert {f.asset for f in cfg.frames} == {f"m{i}" for i in range(1, machines + 1)}


def test_mounted_cloud_config_validates_with_the_secrets_compose_injects():
    cfg = cloud_config()
    assert cfg.environment == "production"
    assert cfg.api.token is not None
    assert cfg.api.token.get_secret_value() == COMPOSE_ENV["EDGELOOP_API_TOKEN"]
    url = cfg.database.url
    assert url.startswith("postgresql+psycopg://")
    u = urlsplit(url)
    assert (u.hostname, u.port, u.path) == ("postgres", 5432, "/edgeloop")
    assert u.password == COMPOSE_ENV["POSTGRES_PASSWORD"]
    pg = service_environment(compose()["services"]["postgres"])
    assert (u.username, u.path.strip("/")) == (pg["POSTGRES_USER"], pg["POSTGRES_DB"])
    assert cfg.api.host == "0.0.0.0"


def test_published_and_scraped_ports_are_the_ones_the_configs_use():
    services = compose()["services"]
    edge_port = edge_config().http.port
    cloud_port = cloud_config().api.port
    assert edge_port in container_ports(services["edge"])
    assert cloud_port in container_ports(services["cloud"])
    assert service_environment(services["edge"])["EDGELOOP_HEALTH_PORT"] == str(edge_port)
    assert service_environment(services["cloud"])["EDGELOOP_HEALTH_PORT"] == str(cloud_port)
    prom = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in prom["scrape_configs"]
    }
    assert targets["edgeloop-edge"] == [f"edge:{edge_port}"]
    assert targets["edgeloop-cloud"] == [f"cloud:{cloud_port}"]
    prom_mounts = mounts(services["prometheus"])
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS.resolve()
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert prom_mounts["/etc/prometheus/alerts.yml"].name == "alerts.yml"
    assert 9090 in container_ports(services["prometheus"])
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    gmounts = mounts(services["grafana"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/edgeloop.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert gmounts[dash_dir] == (DEPLOY / "grafana/dashboards").resolve()
    home = service_environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (gmounts[dash_dir] / Path(home).relative_to(dash_dir)).is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck(dockerfile: Path):
    text = dockerfile.read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert re.search(r"^COPY --from=build ", text, re.M)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    # every directory it copies exists in the build context
    for m in re.finditer(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in shlex.split(m.group(1)):
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}: missing"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ".venv" in ignore.read_text().split()


@pytest.mark.parametrize(
    ("dockerfile", "config"),
    [("Dockerfile.edge", edge_config), ("Dockerfile.cloud", cloud_config)],
)
def test_dockerfile_exposes_and_healthchecks_the_configured_port(dockerfile, config):
    text = (DEPLOY / "docker" / dockerfile).read_text()
    cfg = config()
    port = cfg.http.port if dockerfile == "Dockerfile.edge" else cfg.api.port
    assert re.search(rf"^EXPOSE {port}$", text, re.M)
    assert f"EDGELOOP_HEALTH_PORT={port}" in text
    assert "/healthz" in text
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    tier = "edge" if dockerfile == "Dockerfile.edge" else "cloud"
    assert entry is not None and yaml.safe_load(entry.group(1)) == ["edgeloop", tier, "run"]
