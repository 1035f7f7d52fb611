"""api.token outside development: a random value of at least 24 characters, never a placeholder;
the refusal names the key and what is expected, and never prints the token."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from cloud.config import CloudConfig
from shared.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[3]

REFUSED = [
    "change-me",
    "CHANGE-ME",
    "changeme",
    "ChangeMe",
    "secret",
    "Password",
    "token",
    "admin",
    "test",
    "EXAMPLE",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "please-change-me-before-going-live-0001",
    "CHANGEME_TO_A_LONG_RANDOM_STRING_0000",
    "replace-with-the-output-of-openssl-rand",
    "s3cret-token",  # short
    "Zk3q9-Lm2Vx7",
    "a" * 12 + "b" * 11,  # 23 characters
]


def _refusal(path: Path, environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, CloudConfig, environ=environ)
    return str(err.value)


@pytest.mark.parametrize("environment", ["production", "staging"])
@pytest.mark.parametrize("token", REFUSED)
def test_a_placeholder_or_short_token_is_refused_outside_development(tmp_path, environment, token):
    in_file = tmp_path / "cloud.yaml"
    in_file.write_text(f"environment: {environment}\napi:\n  token: '{token}'\n")
    from_env = tmp_path / "env.yaml"
    from_env.write_text(f"environment: {environment}\n")
    for text in (
        _refusal(in_file, {}),
        _refusal(from_env, {"EDGELOOP__API__TOKEN": token}),
    ):
        assert "api.token" in text, text
        assert "at least 24 characters" in text, text
        assert "secrets.token_urlsafe(32)" in text, text
        # never printed (short placeholders are words the message itself uses: not quoted)
        assert f"'{token}'" not in text and f'"{token}"' not in text, text
        assert len(token) < 8 or token not in text, text


@pytest.mark.parametrize("token", REFUSED)
def test_development_takes_any_token(token):
    cfg = CloudConfig(environment="development", api={"token": token})
    assert cfg.api.token is not None and cfg.api.token.get_secret_value() == token


@pytest.mark.parametrize(
    "token",
    [
        secrets.token_urlsafe(32),
        secrets.token_hex(24),  # openssl rand -hex 24, as docs/operations.md says
        "s3cret-token-for-the-cloud-tests-0001",
    ],
)
def test_a_random_token_of_24_characters_or_more_is_taken(tmp_path, token):
    path = tmp_path / "cloud.yaml"
    path.write_text("environment: production\n")
    cfg = load_config(path, CloudConfig, environ={"EDGELOOP__API__TOKEN": token})
    assert cfg.api.token is not None and cfg.api.token.get_secret_value() == token


def test_a_disabled_api_is_not_checked():
    assert CloudConfig(api={"enabled": False, "token": "change-me"}).api.enabled is False


def test_the_shipped_configs_still_validate_with_the_secrets_they_document():
    # compose: config/cloud.yaml with EDGELOOP__API__TOKEN from `openssl rand -hex 24`
    compose = ROOT / "deploy" / "compose" / "config" / "cloud.yaml"
    cfg = load_config(
        compose,
        CloudConfig,
        environ={
            "EDGELOOP__API__TOKEN": secrets.token_hex(24),
            "EDGELOOP__DATABASE__URL": "postgresql+psycopg://edgeloop:pw@postgres/edgeloop",
        },
    )
    assert cfg.environment == "production"
    # the sample in the docs, with the token from the environment as its header says
    sample = ROOT / "docs" / "cloud.yaml"
    token = secrets.token_urlsafe(32)
    cfg = load_config(sample, CloudConfig, environ={"EDGELOOP__API__TOKEN": token})
    assert cfg.api.token is not None and cfg.api.token.get_secret_value() == token
