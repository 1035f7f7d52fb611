"""``edgeloop discover URL``: report what an OPC UA server, Modbus device or MQTT broker offers."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from urllib.parse import urlsplit

import click
import yaml

from protocols.discovery import DiscoverOptions, DiscoveryReport, render_report

SCHEMES = {
    "opc.tcp": "opcua",
    "opcua": "opcua",
    "modbus": "modbus",
    "modbus+tcp": "modbus",
    "mqtt": "mqtt",
}


def _parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise click.BadParameter(f"expected N or N-M, got {text!r}") from None
    if a > b or a < 0:
        raise click.BadParameter(f"expected N-M with 0 <= N <= M, got {text!r}")
    return a, b


async def run_discovery(url: str, options: DiscoverOptions) -> DiscoveryReport:
    scheme = urlsplit(url).scheme
    proto = SCHEMES.get(scheme)
    if proto is None:
        raise click.BadParameter(
            f"unknown scheme {scheme!r} in {url!r}; expected one of {', '.join(sorted(SCHEMES))}"
        )
    try:
        module = importlib.import_module(f"protocols.{proto}_discovery")
    except ModuleNotFoundError:
        raise click.ClickException(f"discovery for {proto} is not built yet") from None
    report: DiscoveryReport = await module.discover(url, options)
    return report


@click.command()
@click.argument("url")
@click.option(
    "--seconds", type=float, default=10.0, show_default=True, help="How long to observe values."
)
@click.option("--units", default="1", show_default=True, help="Modbus unit ids: N or N-M.")
@click.option(
    "--range", "addr_range", default="0-999", show_default=True, help="Modbus addresses: N-M."
)
@click.option(
    "--timeout", type=float, default=5.0, show_default=True, help="Per-request timeout (s)."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a starter connector config (YAML) the agent accepts.",
)
def discover(
    url: str, seconds: float, units: str, addr_range: str, timeout: float, out: Path | None
) -> None:
    """Report the nodes, registers or topics at URL, their types, rates, ranges and bad share.

    URL is opc.tcp://host:port, modbus://host:port or mqtt://host:port.
    """
    lo, hi = _parse_range(units)
    options = DiscoverOptions(
        seconds=seconds,
        units=tuple(range(lo, hi + 1)),
        address_range=_parse_range(addr_range),
        timeout=timeout,
    )
    report = asyncio.run(run_discovery(url, options))
    click.echo(render_report(report))
    if out is not None:
        out.write_text(yaml.safe_dump({"connectors": [report.starter_config]}, sort_keys=False))
        click.echo(f"starter config written to {out}")
