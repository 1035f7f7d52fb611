"""cloud.yaml fails closed and says where: file, key path, what was expected."""

from __future__ import annotations

import pytest

from cloud.config import CloudConfig, load_cloud_config
from shared.config import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "cloud.yaml"
    path.write_text(text)
    return path


def test_no_token_outside_development_names_the_key(tmp_path):
    path = write(tmp_path, "environment: production\nkafka:\n  bootstrap_servers: k:9092\n")
    with pytest.raises(ConfigError) as err:
        load_cloud_config(path)
    text = str(err.value)
    assert str(path) in text and "api.token" in text and "EDGELOOP__API__TOKEN" in text


def test_development_may_run_without_a_token_and_the_environment_can_supply_one(
    tmp_path, monkeypatch
):
    assert load_cloud_config(write(tmp_path, "environment: development\n")).api.token is None
    token = "from-env-0123456789abcdefghij"  # outside development: 24 characters at least
    monkeypatch.setenv("EDGELOOP__API__TOKEN", token)
    cfg = load_cloud_config(write(tmp_path, "environment: staging\n"))
    assert cfg.api.token is not None and cfg.api.token.get_secret_value() == token
    assert token not in repr(cfg)  # a secret is never printed


def test_a_disabled_api_needs_no_token():
    assert CloudConfig(api={"enabled": False}).api.token is None


@pytest.mark.parametrize(
    ("yaml", "where", "what"),
    [
        (
            "models:\n  - name: q\n    learners:\n      - name: a\n        pipeline: [os.system]\n",
            "models[0].learners[0].pipeline",
            "river has no module 'os'",
        ),
        (
            "models:\n  - name: q\n    learners:\n"
            "      - name: a\n        pipeline: [linear_model.NoSuchModel]\n",
            "models[0].learners[0].pipeline",
            "has no class 'NoSuchModel'",
        ),
        ("drift:\n  detector: Nope\n", "drift.detector", "river.drift has no detector 'Nope'"),
        ("promotion:\n  window: 3\n", "promotion.window", "greater than or equal to 10"),
        (
            "models:\n  - name: q\n  - name: q\n",
            "",
            "model names must be unique, repeated: ['q']",
        ),
        ("webhooks:\n  - url: ftp://x\n", "webhooks[0].url", "pattern"),
        (
            "kafka:\n  security:\n    protocol: SASL_SSL\n    sasl_mechanism: PLAIN\n",
            "kafka.security",
            "needs sasl_username and sasl_password",
        ),
    ],
)
def test_bad_keys_are_named_with_what_was_expected(tmp_path, yaml, where, what):
    path = write(tmp_path, "environment: development\n" + yaml)
    with pytest.raises(ConfigError) as err:
        load_cloud_config(path)
    text = str(err.value)
    assert str(path) in text and where in text and what in text, text
