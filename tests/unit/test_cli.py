import subprocess
import sys

from click.testing import CliRunner

from edgeloop.cli import COMMANDS, cli


def test_help_lists_every_command_group():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("demo", "edge", "cloud", "sim", "models", "config"):
        assert name in result.output


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "edgeloop.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "sim" in out.stdout


def test_unbuilt_group_says_so_and_exits_non_zero():
    from edgeloop import cli as cli_module

    COMMANDS["ghost"] = ("edgeloop.no_such_module:ghost", "A group nobody built.")
    try:
        result = CliRunner().invoke(cli_module.cli, ["ghost", "run"])
    finally:
        del COMMANDS["ghost"]
    assert result.exit_code == 2
    assert "not built yet" in result.output


def test_keys_generate_writes_a_private_and_a_public_key(tmp_path):
    result = CliRunner().invoke(cli, ["keys", "generate", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in (tmp_path / "signing.pub").read_bytes()
    again = CliRunner().invoke(cli, ["keys", "generate", "--out", str(tmp_path)])
    assert again.exit_code != 0 and "--force" in again.output
