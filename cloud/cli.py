"""``edgeloop cloud``: run the cloud service."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from shared.config import ConfigError
from shared.supervision import wait_for_stop

__all__ = ["cloud"]

log = logging.getLogger("cloud")


@click.group()
def cloud() -> None:
    """Run the cloud service (ingest, learning, registry, API)."""


async def run_service(config_path: Path) -> int:
    """Run until SIGINT/SIGTERM (0), then stop cleanly (final checkpoint, offsets committed);
    or until a core task dies (1: the service is failing; its supervisor restarts it)."""
    from cloud.config import load_cloud_config
    from cloud.service import CloudService

    config = load_cloud_config(config_path)
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
        if await wait_for_stop(svc.failed):
            log.critical("stopping: %s", svc.failure)
            return 1
        log.info("stopping: final checkpoint, then offsets are committed")
        return 0


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
        code = asyncio.run(run_service(config_path))
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    if code:
        raise SystemExit(code)
