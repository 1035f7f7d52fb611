"""``edgeloop edge``: run and inspect the gateway agent.

``edgeloop edge run -c edge.yaml`` runs until SIGINT or SIGTERM, then stops the connectors,
commits what they had delivered, and gives the uplink ``--flush-timeout`` seconds to send what
the outbox holds (the rest stays in the outbox for the next start).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from edge.config import EdgeConfigBase, load_edge_config
from edge.logs import JsonFormatter, setup_logging
from shared.config import ConfigError
from shared.supervision import wait_for_stop

__all__ = ["JsonFormatter", "edge", "setup_logging"]


async def run_agent(config: EdgeConfigBase, flush_timeout: float) -> int:
    """Run until SIGINT/SIGTERM (exit code 0) or until a core task dies (1: the agent is
    failing; systemd's ``Restart=on-failure`` brings it back)."""
    from edge.agent import Agent

    agent = Agent(config)
    log = logging.getLogger("edge")
    try:
        await agent.start()
        if agent.http is not None:
            log.info("health and metrics on http://%s:%d", config.http.host, agent.http.port)
        if await wait_for_stop(agent.failed):
            log.critical("stopping: %s", agent.failure)
        else:
            log.info("signal received; stopping")
    finally:
        await agent.stop(flush_timeout=flush_timeout)
    return 1 if agent.failure is not None else 0


@click.group()
def edge() -> None:
    """Run and inspect the edge agent on a gateway."""


@edge.command("run")
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="edge.yaml (see docs/edge.yaml)",
)
@click.option("--log-json/--no-log-json", default=None, help="JSON log lines (overrides log.json)")
@click.option(
    "--flush-timeout",
    default=5.0,
    show_default=True,
    help="seconds to keep sending the outbox on shutdown",
)
def run(config_path: Path, log_json: bool | None, flush_timeout: float) -> None:
    """Run the agent until SIGINT/SIGTERM."""
    try:
        config = load_edge_config(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    setup_logging(config.log.level, config.log.json_ if log_json is None else log_json)
    code = asyncio.run(run_agent(config, flush_timeout))
    if code:
        raise SystemExit(code)


@edge.command("outbox")
@click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path)
)
def outbox_cmd(config_path: Path) -> None:
    """Show what the outbox holds (safe while the agent runs: WAL readers do not block it)."""
    import sqlite3

    try:
        config = load_edge_config(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    path = config.outbox_path()
    if not path.exists():
        click.echo(f"{path}: no outbox yet")
        return
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cols = {row[1] for row in db.execute("PRAGMA table_info(batches)")}
        sent = "sent" if "sent" in cols else "0"
        rows = db.execute(
            f"SELECT kind, COUNT(*), SUM(n), SUM(LENGTH(payload)), SUM({sent}), MIN(seq) "  # noqa: S608
            "FROM batches GROUP BY kind ORDER BY kind"
        ).fetchall()
        seq = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        has_identity = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='identity'"
        ).fetchone()
        inc = (
            db.execute("SELECT value FROM identity WHERE key='incarnation'").fetchone()
            if has_identity
            else None
        )
    finally:
        db.close()
    from shared.wire import Kind

    click.echo(
        f"{path}  incarnation {inc[0] if inc else '(none yet)'}  "
        f"next batch_seq {seq[0] if seq else 1}"
    )
    click.echo(
        f"  {'kind':<10} {'batches':>8} {'records':>10} {'bytes':>12} {'to send':>8} "
        f"{'unconfirmed':>11} {'oldest seq':>10}"
    )
    for kind, batches, n, nbytes, unconfirmed, oldest in rows:
        click.echo(
            f"  {Kind(kind).name.lower():<10} {batches:>8} {n or 0:>10} {nbytes or 0:>12} "
            f"{batches - (unconfirmed or 0):>8} {unconfirmed or 0:>11} {oldest:>10}"
        )
    if not rows:
        click.echo("  (empty: everything was confirmed by the cloud)")
