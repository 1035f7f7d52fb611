"""``edgeloop config validate FILE``: check a config file without starting anything."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, cast

import click
import yaml

from shared.config import ConfigError, load_config, load_yaml

#: config kind -> "module:Model"
SCHEMAS: dict[str, str] = {
    "edge": "edge.config:EdgeConfig",
    "cloud": "cloud.config:CloudConfig",
    "sim": "simulators.config:SimConfig",
}


def _model(kind: str) -> type[Any] | None:
    module_name, _, attr = SCHEMAS[kind].partition(":")
    try:
        return cast(type[Any], getattr(importlib.import_module(module_name), attr))
    except (ModuleNotFoundError, AttributeError):
        return None


def _guess_kind(path: Path) -> str | None:
    """The kind the file name says (``edge.yaml``, ``plant-edge.yml``), else the one whose
    top-level keys the file uses most (``agent_id`` and ``connectors``: edge), if only one."""
    stem = path.name.lower()
    for kind in SCHEMAS:
        if kind in stem:
            return kind
    try:
        doc = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # the full load that follows says what is wrong, with file and line
    if not isinstance(doc, dict):
        return None
    scores: dict[str, int] = {}
    for kind in SCHEMAS:
        model = _model(kind)
        if model is not None:
            scores[kind] = len(set(doc) & set(model.model_fields))
    best = max(scores.values(), default=0)
    winners = [k for k, n in scores.items() if n == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


@click.group()
def config() -> None:
    """Validate configuration files."""


@config.command("validate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--kind",
    type=click.Choice(sorted(SCHEMAS)),
    help="Which schema to check against (guessed from the file name, else from its top-level keys).",
)
def validate(path: Path, kind: str | None) -> None:
    """Check PATH; print every problem with its key path and line, exit 1 when there are any."""
    kind = kind or _guess_kind(path)
    if kind is None:
        raise click.UsageError(
            f"cannot tell what {path.name} configures (neither its name nor its top-level keys "
            f"say); pass --kind {'|'.join(sorted(SCHEMAS))}"
        )
    model = _model(kind)
    if model is None:
        click.echo(f"edgeloop config: the {kind} configuration is not built yet", err=True)
        raise SystemExit(2) from None
    try:
        load_config(path, model)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    click.echo(f"{path}: valid {kind} configuration")
