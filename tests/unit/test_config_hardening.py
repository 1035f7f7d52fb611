"""Config loading never prints a secret, and a hostile YAML document is refused quickly.

Secrets: the value of a ``SecretStr`` field (found from the model) or of a key named like a
secret shows as ``<redacted>`` whatever its type, in file values, environment overrides, whole
sections a validator refused, and URLs with credentials. YAML: aliases are bounded by what they
expand to (the "billion laughs"), nesting by depth; both are one clear line naming the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError, field_validator, model_validator

from cloud.config import CloudConfig
from edge.config import EdgeConfig
from shared.config import (
    MAX_ALIAS_NODES,
    MAX_DEPTH,
    REDACTED,
    ConfigError,
    ConfigModel,
    load_config,
    load_yaml,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
# long enough to be a production api.token: the only problem is the one a test makes
SECRET = "hunter2-do-not-print-0123456789"
DEV = "environment: development\n"


def _error(text: str, model=CloudConfig, **kw) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(text, model, source="conf.yaml", **kw)
    return str(err.value)


# --- secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        f"[{SECRET}, 2]",
        f"{{{SECRET}: b}}",
        f"{{a: {SECRET}}}",
        "[1, 2]",
        "{a: b}",
        "98765432123",
        "true",
    ],
)
@pytest.mark.parametrize(
    ("where", "yaml"),
    [
        ("api.token", DEV + "api:\n  token: {v}\n"),
        (
            "kafka.security.sasl_password",
            DEV + "kafka:\n  security:\n    sasl_username: u\n    sasl_password: {v}\n",
        ),
        (
            "webhooks[0].headers.Authorization",
            DEV + "webhooks:\n  - url: http://h/\n    headers:\n      Authorization: {v}\n",
        ),
    ],
)
def test_a_cloud_secret_of_the_wrong_type_is_redacted(where, yaml, value):
    text = _error(yaml.format(v=value))
    assert where in text and REDACTED in text, text
    for fragment in (SECRET, "98765432123", "'a'", "'b'", "[1, 2]"):
        assert fragment not in text, text


@pytest.mark.parametrize("value", [f"[{SECRET}]", f"{{x: {SECRET}}}", "424242424242"])
@pytest.mark.parametrize(
    ("where", "connector"),
    [
        ("connectors[0].password", "{kind: mqtt, name: m, url: 'mqtt://h', password: {v}}"),
        (
            "connectors[0].tls.key_password",
            "{kind: mqtt, name: m, url: 'mqtts://h', tls: {key_password: {v}}}",
        ),
        # a plain ``str`` field, secret by its name
        (
            "connectors[0].password",
            "{kind: opcua, name: o, endpoint: 'opc.tcp://h:4840', nodes: [{node: 'ns=2;i=1'}],"
            " password: {v}}",
        ),
    ],
)
def test_an_edge_secret_of_the_wrong_type_is_redacted(where, connector, value):
    kind = connector.split("kind: ")[1].split(",")[0]
    pytest.importorskip(f"protocols.{kind}")
    text = _error(
        "agent_id: gw\nconnectors:\n  - " + connector.replace("{v}", value) + "\n", EdgeConfig
    )
    assert where in text and REDACTED in text, text
    assert SECRET not in text and "424242424242" not in text, text


def test_a_secret_is_found_by_its_declared_type_whatever_its_name():
    class Vault(ConfigModel):
        seal: SecretStr

    class Outer(ConfigModel):
        vaults: list[Vault] = []
        shelves: dict[str, Vault] = {}

    text = _error(
        f"vaults:\n  - seal: [{SECRET}]\nshelves:\n  a: {{seal: {{k: {SECRET}}}}}\n", Outer
    )
    assert "vaults[0].seal" in text and "shelves.a.seal" in text, text
    assert text.count(REDACTED) == 2 and SECRET not in text, text


def test_a_validator_that_echoes_a_secret_is_redacted_and_the_message_stays_readable():
    class Lock(ConfigModel):
        pin: SecretStr
        code: SecretStr | None = None

        @field_validator("pin")
        @classmethod
        def _digits(cls, v: SecretStr) -> SecretStr:
            if not v.get_secret_value().isdigit():
                raise ValueError(f"pin {v.get_secret_value()!r} is not a pin of digits")
            return v

        @model_validator(mode="after")
        def _differ(self) -> Lock:
            if self.code is not None and self.code == self.pin:
                raise ValueError(f"code equals pin: {self.code.get_secret_value()}-everywhere")
            return self

    text = _error("pin: pin\n", Lock)  # a short secret that is also a word of the message
    assert "pin (line 1): got <redacted>; pin <redacted> is not a pin of digits" in text, text
    text = _error("pin: '123456789'\ncode: '123456789'\n", Lock)
    assert "code equals pin: <redacted>-everywhere" in text and "123456789" not in text, text


def test_a_refused_section_does_not_print_the_secrets_in_it():
    # a model validator refuses the whole document: the document holds the token
    text = _error(
        f"environment: production\napi:\n  token: {SECRET}\nmodels: [{{name: q}}, {{name: q}}]\n"
    )
    assert "model names must be unique" in text and SECRET not in text, text


def test_an_unknown_key_does_not_print_its_value():
    text = _error(DEV + f"api:\n  tokn: {SECRET}\n")  # a misspelled token
    assert "api.tokn" in text and "unknown key" in text and SECRET not in text, text


def test_credentials_in_a_url_are_redacted_from_values_and_messages():
    text = _error(DEV + f"database:\n  url: [postgresql://cloud:{SECRET}@db/edgeloop]\n")
    assert "database.url" in text and f"cloud:{REDACTED}@db" in text and SECRET not in text, text
    pytest.importorskip("protocols.mqtt")
    # the MQTT validator echoes the URL it refuses
    text = _error(
        f"agent_id: gw\nconnectors:\n  - {{kind: mqtt, name: m, url: 'mqtt://u:{SECRET}@h'}}\n",
        EdgeConfig,
    )
    assert "put credentials in username/password" in text and SECRET not in text, text


def test_environment_overrides_of_secrets_are_taken_as_text_and_never_printed(tmp_path):
    path = tmp_path / "cloud.yaml"
    path.write_text("environment: staging\n")
    # a secret that YAML would read as a number, a list or a mapping stays the text it is
    for raw in (
        "123456789012345678901234567",
        "[not, a, list, of, 24, characters]",
        "{a: b, c: d, e: f, g: h}",
    ):
        cfg = load_config(path, CloudConfig, environ={"EDGELOOP__API__TOKEN": raw})
        assert cfg.api.token is not None and cfg.api.token.get_secret_value() == raw
    # a whole section from the environment with a secret of the wrong type in it
    text = _env_error(path, {"EDGELOOP__API": f"{{token: [{SECRET}]}}"})
    assert "api.token" in text and "EDGELOOP__API" in text and REDACTED in text, text
    assert SECRET not in text, text
    text = _env_error(path, {"EDGELOOP__KAFKA__SECURITY": f"{{sasl_password: {{a: {SECRET}}}}}"})
    assert "kafka.security.sasl_password" in text and SECRET not in text, text
    # an override that is not YAML names the variable, not the value
    text = _env_error(path, {"EDGELOOP__WEBHOOKS": f"[{{url: http://h/, headers: {SECRET}"})
    assert "EDGELOOP__WEBHOOKS" in text and "not valid YAML" in text and SECRET not in text, text


def _env_error(path: Path, environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, CloudConfig, environ=environ)
    return str(err.value)


def test_a_config_built_in_code_keeps_secrets_out_of_pydantic_errors():
    with pytest.raises(ValidationError) as err:
        CloudConfig(environment="development", api={"token": [SECRET]})
    assert "api.token" in str(err.value) and SECRET not in str(err.value)
    cfg = CloudConfig(environment="development")
    with pytest.raises(ValidationError) as err:
        cfg.api.token = {"k": SECRET}  # type: ignore[assignment]
    assert SECRET not in str(err.value)


def test_values_that_are_not_secrets_are_still_shown():
    text = _error(DEV + "kafka:\n  partitions: [7, 8]\n")
    assert "kafka.partitions" in text and "[7, 8]" in text, text


# --- hostile YAML ---------------------------------------------------------------------------


def _billion_laughs() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_quickly_with_one_line_naming_the_file(tmp_path):
    """Run in a child process capped at 1 GiB of address space: before the bound, this document
    (a billion strings when expanded) ran until memory or the timeout ran out."""
    path = tmp_path / "cloud.yaml"
    path.write_text(_billion_laughs())
    child = (
        "import json, resource, sys, time\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from cloud.config import load_cloud_config\n"
        "from shared.config import ConfigError\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    load_cloud_config(sys.argv[1])\n"
        "    out = 'loaded'\n"
        "except ConfigError as exc:\n"
        "    out = str(exc)\n"
        "print(json.dumps([out, time.perf_counter() - t]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", child, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    message, seconds = json.loads(proc.stdout)
    assert seconds < 1.0, seconds
    head, problem = message.splitlines()
    assert head == f"{path}: 1 problem"
    assert f"too many YAML aliases: they expand to over {MAX_ALIAS_NODES} nodes" in problem
    assert "(line " in problem  # where the first alias past the bound is


def test_aliases_within_the_bound_still_work():
    doc = load_yaml(
        "base: &base {timeout_s: 3.0, retries: 2}\n"
        "hooks:\n  - {<<: *base, url: 'http://a/'}\n  - {<<: *base, url: 'http://b/'}\n"
        "list: &l [1, 2, 3]\nagain: [*l, *l]\n"
    )
    assert doc["hooks"][1] == {"timeout_s": 3.0, "retries": 2, "url": "http://b/"}
    assert doc["again"] == [[1, 2, 3], [1, 2, 3]]
    cfg = parse_config(
        DEV + "webhooks:\n  - &hook {url: 'http://h/', retries: 2}\n  - *hook\n", CloudConfig
    )
    assert [w.retries for w in cfg.webhooks] == [2, 2]


def test_an_alias_inside_its_own_anchor_is_refused():
    text = _error("a: &a [1, *a]\n")
    assert "the alias *a stands for a node that contains it" in text, text


@pytest.mark.parametrize(
    "doc",
    [
        "[" * 10_000 + "]" * 10_000,
        "{" * 10_000,
        "models:\n  - name: " + "[" * 10_000,
        "".join(" " * i + "k:\n" for i in range(200)),  # block mappings, 200 deep
        "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n",
    ],
    ids=["flow-sequences", "flow-mappings", "under-a-key", "block-mappings", "via-an-alias"],
)
def test_deep_nesting_is_a_clear_error_not_a_recursion_error(tmp_path, doc):
    path = tmp_path / "edge.yaml"
    path.write_text(doc)
    t = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path, CloudConfig)
    assert time.perf_counter() - t < 2.0
    head, problem = str(err.value).splitlines()
    assert head == f"{path}: 1 problem"
    assert f"nested deeper than {MAX_DEPTH} levels" in problem, problem
    assert err.value.__cause__ is None


def test_nesting_up_to_the_bound_is_read():
    depth = MAX_DEPTH - 1  # collections; the innermost scalar is the last level
    assert load_yaml("[" * depth + "1" + "]" * depth) is not None
