"""The ``edgeloop`` command line.

Command groups live next to the code they drive and are imported only when used, so
``edgeloop --help`` stays fast and one tier's missing extras never break another's commands:

=========  ==========================  ===========================================
group      module                      what it does
=========  ==========================  ===========================================
demo       edgeloop.demo:demo          the whole loop on one machine
edge       edge.cli:edge               run the gateway agent
cloud      cloud.cli:cloud             run the cloud service
sim        simulators.cli:sim          factory simulator over OPC UA, Modbus, MQTT
models     cloud.models_cli:models     list / show / promote / roll back / register
discover   protocols.discover:discover what a device or broker offers
config     edgeloop.config_cli:config  validate configuration files
keys       edgeloop.keys_cli:keys      model-signing keys
=========  ==========================  ===========================================

A group whose module is not built yet says so and exits with status 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

__all__ = ["COMMANDS", "main"]

#: name -> ("module:attribute", one-line help shown in ``edgeloop --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("edgeloop.demo:demo", "Run the whole loop on this machine on embedded defaults."),
    "edge": ("edge.cli:edge", "Run and inspect the edge agent on a gateway."),
    "cloud": ("cloud.cli:cloud", "Run the cloud service (ingest, learning, registry, API)."),
    "sim": ("simulators.cli:sim", "Factory simulator served over OPC UA, Modbus TCP and MQTT."),
    "models": ("cloud.models_cli:models", "List, show, promote, roll back and register models."),
    "discover": (
        "protocols.discover:discover",
        "Report what an OPC UA, Modbus or MQTT source offers.",
    ),
    "config": ("edgeloop.config_cli:config", "Validate edge, cloud and simulator config files."),
    "keys": ("edgeloop.keys_cli:keys", "Generate the ed25519 keys that sign models."),
}


def _not_built(name: str, target: str, reason: str) -> click.Command:
    @click.command(
        name=name,
        help=f"(not built yet) {COMMANDS[name][1]}",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    @click.pass_context
    def placeholder(ctx: click.Context) -> None:
        click.echo(f"edgeloop {name}: not built yet ({target}: {reason})", err=True)
        ctx.exit(2)

    return placeholder


class LazyGroup(click.Group):
    """Resolves subcommands from :data:`COMMANDS` on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        target = entry[0]
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                return _not_built(cmd_name, target, "module missing")
            raise
        cmd: Any = getattr(module, attr, None)
        if not isinstance(cmd, click.Command):
            return _not_built(cmd_name, target, "no command defined")
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeloop")
def cli() -> None:
    """edgeloop: edge-to-cloud streaming runtime for factories.

    Edge agents read OPC UA, Modbus and MQTT, score ONNX models and fire rules on the gateway,
    and stream to Kafka, where online river models learn and are pushed back to the edge.
    """


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="edgeloop")


if __name__ == "__main__":
    main()
