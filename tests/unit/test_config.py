from typing import Annotated, Literal

import pytest
from pydantic import Field

from shared.config import ConfigError, ConfigModel, load_config, parse_config


class Register(ConfigModel):
    tag: str
    address: int = Field(ge=0, le=65535)
    type: Literal["int16", "uint16", "int32", "float32"] = "int16"


class ModbusSection(ConfigModel):
    host: str
    registers: list[Register] = []


class ModbusConnector(ConfigModel):
    kind: Literal["modbus"]
    modbus: ModbusSection


class MqttConnector(ConfigModel):
    kind: Literal["mqtt"]
    url: str


class AgentConfig(ConfigModel):
    agent_id: str
    connectors: list[Annotated[ModbusConnector | MqttConnector, Field(discriminator="kind")]] = []


GOOD = """\
agent_id: gw-1
connectors:
  - kind: mqtt
    url: mqtt://localhost
  - kind: mqtt
    url: mqtt://other
  - kind: modbus
    modbus:
      host: 10.0.0.5
      registers:
        - {tag: a, address: 0}
        - {tag: b, address: 1}
        - {tag: c, address: 2}
        - {tag: d, address: 3}
        - {tag: e, address: 4}
        - tag: f
          address: 5
          type: flaot
"""


def test_valid_config_loads(tmp_path):
    p = tmp_path / "edge.yaml"
    p.write_text(GOOD.replace("flaot", "float32"))
    cfg = load_config(p, AgentConfig)
    assert cfg.connectors[2].modbus.registers[5].type == "float32"  # type: ignore[union-attr]


def test_bad_value_names_file_key_path_line_and_expectation(tmp_path):
    p = tmp_path / "edge.yaml"
    p.write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        load_config(p, AgentConfig)
    msg = str(info.value)
    assert str(p) in msg
    assert "connectors[2].modbus.registers[5].type" in msg
    assert "(line 18)" in msg
    assert "'flaot'" in msg
    assert "'int16', 'uint16', 'int32' or 'float32'" in msg


def test_every_problem_is_reported_at_once():
    text = "connectors:\n  - kind: mqtt\n  - kind: modbus\n    modbus: {host: h, registers: [{tag: x, address: -1}]}\n  - kind: nope\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, AgentConfig, source="x.yaml")
    paths = [p.path for p in info.value.problems]
    assert "agent_id" in paths
    assert "connectors[0].url" in paths
    assert "connectors[1].modbus.registers[0].address" in paths
    assert "connectors[2]" in paths
    assert "required key is missing" in str(info.value)
    assert "greater than or equal to 0" in str(info.value)


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"agnet_id.*unknown key"):
        parse_config("agent_id: a\nagnet_id: b\n", AgentConfig, source="edge.yaml")


def test_duplicate_key_is_an_error_with_both_lines():
    with pytest.raises(
        ConfigError, match=r"(?s)edge.yaml.*line 3.*duplicate key 'agent_id'.*line 1"
    ):
        parse_config("agent_id: a\nconnectors: []\nagent_id: b\n", AgentConfig, source="edge.yaml")


def test_yaml_syntax_error_names_line():
    with pytest.raises(ConfigError, match=r"line 2.*not valid YAML"):
        parse_config("agent_id: a\n  bad: [\n", AgentConfig, source="edge.yaml")


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config("- a\n- b\n", AgentConfig)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "nope.yaml", AgentConfig)


def test_environment_overrides_keys(tmp_path):
    p = tmp_path / "edge.yaml"
    p.write_text("agent_id: from-file\n")
    cfg = load_config(p, AgentConfig, environ={"EDGELOOP__AGENT_ID": "from-env"})
    assert cfg.agent_id == "from-env"
