"""``edgeloop keys generate``: the ed25519 pair the cloud signs models with."""

from __future__ import annotations

import os
from pathlib import Path

import click

from shared.manifest import generate_keypair


@click.group()
def keys() -> None:
    """Model-signing keys."""


@keys.command("generate")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory for signing.key (private, mode 0600) and signing.pub (pin this on the edge).",
)
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def generate(out_dir: Path, force: bool) -> None:
    """Write a new ed25519 key pair."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / "signing.key", out_dir / "signing.pub"
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise click.ClickException(f"{p} exists; pass --force to overwrite it")
    private, public = generate_keypair()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path.write_bytes(public)
    click.echo(f"private key: {private_path} (keep it on the cloud only)")
    click.echo(f"public key:  {public_path} (pin it in every edge config: models.public_key)")
