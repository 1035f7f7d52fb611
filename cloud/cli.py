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


async def run_service(config_path: Path) -> int:
    """Run until SIGINT/SIGTERM (0), then stop cleanly (final checkpoint, offsets committed);
    or until a core task dies (1: the service is failing; its supervisor restarts it)."""
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
            waits = {
                asyncio.create_task(stop.wait(), name="cloud-run:signal"),
                asyncio.create_task(svc.failed.wait(), name="cloud-run:failure"),
            }
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
            if svc.failure is not None:
                log.critical("stopping: %s", svc.failure)
                return 1
            log.info("stopping: final checkpoint, then offsets are committed")
            return 0
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
        code = asyncio.run(run_service(config_path))
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    if code:
        raise SystemExit(code)
