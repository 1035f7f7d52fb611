"""``edgeloop cloud``: run the cloud service."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click

from shared.config import ConfigError

__all__ = ["cloud"]

log = logging.getLogger("cloud")


@click.group()
def cloud() -> None:
    """Run the cloud service (ingest, learning, registry, API)."""


async def run_service(config_path: Path) -> None:
    """Run until SIGINT/SIGTERM, then stop cleanly (final checkpoint, offsets committed)."""
    from cloud.config import load_cloud_config
    from cloud.service import CloudService

    config = load_cloud_config(config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with CloudService(config) as svc:
            where = f"http://{config.api.host}:{svc.api_port}" if svc.api_port else "disabled"
            log.info(
                "edgeloop cloud %r: consuming %s on %s as group %r; API %s",
                config.instance,
                config.kafka.topic_prefix + ".*",
                config.kafka.bootstrap_servers,
                config.kafka.group_id,
                where,
            )
            await stop.wait()
            log.info("stopping: final checkpoint, then offsets are committed")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@cloud.command("run")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="cloud.yaml (see docs/cloud.yaml for every key).",
)
@click.option("--log-level", default="info", show_default=True, help="debug, info, warning, error.")
def run(config_path: Path, log_level: str) -> None:
    """Consume the uplink topics, learn, decide, and serve the API until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(run_service(config_path))
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
