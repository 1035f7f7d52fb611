"""``edgeloop sim``: run the factory simulator, one server alone, or step it without servers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from simulators.config import (
    ModbusServerConfig,
    MqttPublisherConfig,
    OpcUaServerConfig,
    OpcUaUser,
    ScenarioConfig,
    SimConfig,
)

__all__ = ["sim"]


def _scenario_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--seed", type=int, default=1, show_default=True, help="Scenario seed."),
        click.option("--machines", type=int, default=4, show_default=True),
        click.option(
            "--line",
            default="line1",
            show_default=True,
            help="Line name (OPC UA folder, MQTT topic level).",
        ),
        click.option(
            "--speed",
            type=float,
            default=1.0,
            show_default=True,
            help="Scenario seconds per wall second.",
        ),
        click.option(
            "--drift-at",
            type=float,
            default=None,
            help="Scenario seconds: new material lot (defect mechanism changes).",
        ),
        click.option(
            "--recalibration-at",
            type=float,
            default=None,
            help="Scenario seconds: m2 spindle_temp reads +4.0.",
        ),
        click.option(
            "--extra-tags",
            type=int,
            default=0,
            show_default=True,
            help="aux_NNN tags per machine (scale tests).",
        ),
        click.option("--no-faults", is_flag=True, help="No random machine outages."),
        click.option("--no-anomalies", is_flag=True, help="No random sensor anomalies."),
        click.option(
            "--truth",
            type=click.Path(dir_okay=False),
            default=None,
            help="Write ground truth JSONL here.",
        ),
        click.option(
            "--update-hz",
            type=float,
            default=10.0,
            show_default=True,
            help="Server updates per wall second.",
        ),
        click.option(
            "--duration", type=float, default=None, help="Stop after this many wall seconds."
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _scenario(kw: dict[str, Any]) -> ScenarioConfig:
    return ScenarioConfig(
        seed=kw["seed"],
        machines=kw["machines"],
        line=kw["line"],
        speed=kw["speed"],
        drift_at=kw["drift_at"],
        recalibration_at=kw["recalibration_at"],
        extra_tags=kw["extra_tags"],
        fault_interval=None if kw["no_faults"] else 900.0,
        anomaly_interval=None if kw["no_anomalies"] else 180.0,
    )


def _opcua(kw: dict[str, Any]) -> OpcUaServerConfig:
    users = []
    for spec in kw.get("opcua_user") or ():
        name, sep, password = spec.partition(":")
        if not sep or not name or not password:
            raise click.BadParameter(
                f"expected USER:PASSWORD, got {spec!r}", param_hint="--opcua-user"
            )
        users.append(OpcUaUser(username=name, password=password))
    return OpcUaServerConfig(
        host=kw["host"],
        port=kw["opcua_port"],
        security=list(kw.get("opcua_security") or ("None",)),
        cert_dir=kw.get("opcua_cert_dir"),
        users=users,
        allow_anonymous=not kw.get("opcua_no_anonymous", False),
    )


_host = click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address the servers bind."
)
_opcua_opts = [
    click.option(
        "--opcua-port", type=int, default=4840, show_default=True, help="0 = a free port."
    ),
    click.option(
        "--opcua-security",
        type=click.Choice(["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]),
        multiple=True,
        help="Endpoint security (repeatable; default None).",
    ),
    click.option(
        "--opcua-cert-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Server certificate directory.",
    ),
    click.option("--opcua-user", multiple=True, help="USER:PASSWORD (repeatable)."),
    click.option("--opcua-no-anonymous", is_flag=True, help="Refuse anonymous sessions."),
]
_modbus_opts = [
    click.option(
        "--modbus-port", type=int, default=5020, show_default=True, help="0 = a free port."
    ),
    click.option(
        "--modbus-registers",
        type=int,
        default=0,
        show_default=True,
        help="Extra aux holding registers per unit.",
    ),
]
_mqtt_opts = [
    click.option("--mqtt-url", default="mqtt://127.0.0.1:1883", show_default=True),
    click.option("--mqtt-prefix", default="plant", show_default=True, help="Topic prefix."),
]


def _apply(opts: list[Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def _serve(config: SimConfig, duration: float | None) -> None:
    """Run until SIGINT/SIGTERM or ``duration``; print the endpoints; exit 0 on a clean stop."""
    from simulators.factory import FactorySimulator

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sim = FactorySimulator(config)
        async with sim:
            sc = config.scenario
            click.echo(
                f"edgeloop simulator: line {sc.line}, {sc.machines} machines, seed {sc.seed}, "
                f"speed {sc.speed}x, {config.update_hz} Hz"
            )
            for name, where in sim.endpoints().items():
                click.echo(f"  {name:7} {where}")
            click.echo("ready", err=True)
            sys.stdout.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=duration)
            s = sim.stats
            click.echo(
                f"stopping: {s.updates} updates, lag p50 {s.percentile('lag', 50) * 1e3:.2f} ms, "
                f"p99 {s.percentile('lag', 99) * 1e3:.2f} ms, {s.skipped} skipped; "
                f"scenario t={sim.scenario.t if sim.scenario else 0:.1f} s"
            )

    try:
        asyncio.run(main())
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(str(exc)) from exc


def _build(kw: dict[str, Any], opcua: bool, modbus: bool, mqtt: bool) -> SimConfig:
    try:
        return SimConfig(
            scenario=_scenario(kw),
            update_hz=kw["update_hz"],
            truth=kw["truth"],
            opcua=_opcua(kw) if opcua else OpcUaServerConfig(enabled=False),
            modbus=ModbusServerConfig(
                host=kw["host"], port=kw["modbus_port"], registers=kw["modbus_registers"]
            )
            if modbus
            else ModbusServerConfig(enabled=False),
            mqtt=MqttPublisherConfig(url=kw["mqtt_url"], topic_prefix=kw["mqtt_prefix"])
            if mqtt
            else MqttPublisherConfig(enabled=False),
        )
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group()
def sim() -> None:
    """Factory simulator: a seeded production line with drift and late labels, served over
    OPC UA, Modbus TCP and MQTT (see docs/simulator.md)."""


@sim.command()
@_scenario_options
@_host
@_apply(_opcua_opts)
@_apply(_modbus_opts)
@click.option(
    "--mqtt-url", default=None, help="Publish quality results and sensors to this broker."
)
@click.option("--mqtt-prefix", default="plant", show_default=True, help="Topic prefix.")
def factory(**kw: Any) -> None:
    """Run the whole line: OPC UA, Modbus TCP and (with --mqtt-url) MQTT."""
    _serve(_build(kw, True, True, kw["mqtt_url"] is not None), kw["duration"])


@sim.command()
@_scenario_options
@_host
@_apply(_opcua_opts)
def opcua(**kw: Any) -> None:
    """Serve the line over OPC UA only."""
    _serve(_build(kw, True, False, False), kw["duration"])


@sim.command()
@_scenario_options
@_host
@_apply(_modbus_opts)
def modbus(**kw: Any) -> None:
    """Serve the line over Modbus TCP only."""
    _serve(_build(kw, False, True, False), kw["duration"])


@sim.command()
@_scenario_options
@_apply(_mqtt_opts)
def mqtt(**kw: Any) -> None:
    """Publish quality results and wireless sensors over MQTT only."""
    _serve(_build(kw | {"host": "127.0.0.1"}, False, False, True), kw["duration"])


@sim.command()
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--machines", type=int, default=4, show_default=True)
@click.option("--drift-at", type=float, default=None)
@click.option("--recalibration-at", type=float, default=None)
@click.option("--until", type=float, required=True, help="Scenario seconds to step.")
@click.option(
    "--out", type=click.Path(dir_okay=False, allow_dash=True), default="-", show_default=True
)
@click.option("--labels-only", is_flag=True, help="Only the label lines.")
def labels(
    seed: int,
    machines: int,
    drift_at: float | None,
    recalibration_at: float | None,
    until: float,
    out: str,
    labels_only: bool,
) -> None:
    """Step the scenario without servers (fast) and write its ground truth as JSONL."""
    from simulators.scenario import iter_labels

    cfg = ScenarioConfig(
        seed=seed, machines=machines, drift_at=drift_at, recalibration_at=recalibration_at
    )
    t0 = time.perf_counter()
    n = 0
    with click.open_file(out, "w") as f:
        for e in iter_labels(cfg, until):
            if labels_only and e.kind != "label":
                continue
            f.write(e.to_json() + "\n")
            n += 1
    click.echo(
        f"{n} lines for {until:g} scenario seconds in {time.perf_counter() - t0:.2f} s", err=True
    )


@sim.command("register-map")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write here instead of stdout.",
)
def register_map(out: Path | None) -> None:
    """Print the Modbus register map (markdown; docs/modbus-register-map.md is this output)."""
    from simulators.modbus_map import render_markdown

    text = render_markdown()
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
