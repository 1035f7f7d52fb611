"""``edgeloop config validate FILE``: check a config file without starting anything."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from shared.config import ConfigError, load_config

#: config kind -> "module:Model"
SCHEMAS: dict[str, str] = {
    "edge": "edge.config:EdgeConfig",
    "cloud": "cloud.config:CloudConfig",
    "sim": "simulators.config:SimConfig",
}


def _guess_kind(path: Path) -> str | None:
    stem = path.name.lower()
    for kind in SCHEMAS:
        if kind in stem:
            return kind
    return None


@click.group()
def config() -> None:
    """Validate configuration files."""


@config.command("validate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--kind",
    type=click.Choice(sorted(SCHEMAS)),
    help="Which schema to check against (guessed from the file name when omitted).",
)
def validate(path: Path, kind: str | None) -> None:
    """Check PATH; print every problem with its key path and line, exit 1 when there are any."""
    kind = kind or _guess_kind(path)
    if kind is None:
        raise click.UsageError(
            f"cannot tell what {path.name} configures; pass --kind {'|'.join(sorted(SCHEMAS))}"
        )
    module_name, _, attr = SCHEMAS[kind].partition(":")
    try:
        model = getattr(importlib.import_module(module_name), attr)
    except (ModuleNotFoundError, AttributeError):
        click.echo(f"edgeloop config: the {kind} configuration is not built yet", err=True)
        raise SystemExit(2) from None
    try:
        load_config(path, model)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    click.echo(f"{path}: valid {kind} configuration")
