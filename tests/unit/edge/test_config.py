"""Edge config: the sample validates; problems name the key path, the rule and the expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import EdgeConfig, connector_config_models, load_edge_config
from shared.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[3]


def test_sample_config_in_docs_is_valid():
    cfg = load_edge_config(ROOT / "docs" / "edge.yaml")
    assert cfg.agent_id == "line1-gw1"
    assert {c.kind for c in cfg.connectors} >= {"synthetic"}
    assert cfg.rules[0].for_ == 2.0


def test_connector_kinds_come_from_installed_entry_points():
    kinds = {m.model_fields["kind"].default for m in connector_config_models()}
    assert "synthetic" in kinds
    # the connectors issue registers these; each is offered once its module imports
    for kind in ("modbus", "mqtt", "opcua"):
        try:
            __import__(f"protocols.{kind}")
        except ImportError:
            continue
        assert kind in kinds


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, EdgeConfig, source="edge.yaml")
    return [str(p) for p in err.value.problems]


def test_nested_connector_error_names_the_list_path():
    pytest.importorskip("protocols.modbus")
    probs = _problems(
        """\
agent_id: gw1
connectors:
  - {kind: synthetic, name: a}
  - {kind: synthetic, name: b}
  - kind: modbus
    name: plc
    transport: {type: tcp, host: 10.0.0.5}
    devices:
      - asset: m1
        points:
          - {tag: t, address: 0}
          - {tag: u, address: 1, type: flaot}
"""
    )
    assert len(probs) == 1
    assert probs[0].startswith("connectors[2].devices[0].points[1].type (line 12)")
    assert "'flaot'" in probs[0]


def test_unknown_connector_kind_lists_the_offered_kinds():
    (p,) = _problems("agent_id: gw1\nconnectors:\n  - {kind: profibus, name: x}\n")
    assert p.startswith("connectors[0]")
    assert "profibus" in p and "synthetic" in p


def test_rule_that_does_not_compile_is_a_config_error_naming_the_rule():
    (p,) = _problems(
        """\
agent_id: gw1
rules:
  - {name: ok, when: "r.t > 1.0"}
  - name: overheat
    when: "r.temp >"
"""
    )
    assert p.startswith("rules[1].when (line 5)")
    assert "rule 'overheat'" in p and "not valid CEL" in p


def test_rule_clear_condition_is_compiled_too():
    (p,) = _problems('agent_id: gw1\nrules:\n  - {name: r, when: "true", clear: "(("}\n')
    assert p.startswith("rules[0].clear") and "rule 'r'" in p


def test_action_naming_an_unknown_connector_is_refused():
    (p,) = _problems(
        """\
agent_id: gw1
connectors: [{kind: synthetic, name: src}]
rules:
  - name: r
    when: "true"
    actions: [{type: write, connector: plc, tag: lamp, value: true}]
"""
    )
    assert "rule 'r'" in p and "'plc'" in p and "src" in p


def test_frame_trigger_needs_exactly_one_of_period_or_tag():
    (p,) = _problems(
        "agent_id: gw1\nframes:\n  - {asset: m1, trigger: {period: 1, tag: part_counter}}\n"
    )
    assert p.startswith("frames[0].trigger") and "exactly one" in p


def test_unknown_aggregate_names_the_choices():
    (p,) = _problems(
        "agent_id: gw1\nframes:\n  - asset: m1\n    trigger: {period: 1}\n"
        "    features: [{tag: t, aggs: [mean, median]}]\n"
    )
    assert p.startswith("frames[0].features[0].aggs[1]") and "'median'" in p


def test_config_validate_cli_exits_nonzero_with_file_and_key_path(tmp_path):
    bad = tmp_path / "edge.yaml"
    bad.write_text("agent_id: gw1\noutbox: {overflow: drop_everything}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "edgeloop.cli", "config", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert str(bad) in proc.stderr and "outbox.overflow (line 2)" in proc.stderr
    assert "drop_oldest" in proc.stderr


def test_edge_run_refuses_a_bad_config_naming_the_rule(tmp_path):
    bad = tmp_path / "edge.yaml"
    bad.write_text('agent_id: gw1\nrules:\n  - {name: hot, when: "r.t >>"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "edgeloop.cli", "edge", "run", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "rules[0].when (line 3)" in proc.stderr and "rule 'hot'" in proc.stderr


def test_load_edge_config_imports_only_the_plugins_a_file_uses(tmp_path):
    code = (
        "import sys; from edge.config import load_edge_config; "
        f"c = load_edge_config({str(tmp_path / 'edge.yaml')!r}); "
        "print(type(c.connectors[0]).__name__, 'protocols.opcua' in sys.modules)"
    )
    (tmp_path / "edge.yaml").write_text("agent_id: gw1\nconnectors: [{kind: synthetic, name: s}]\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["SyntheticConfig", "False"], out.stderr


def test_config_validate_tells_the_kind_by_the_top_level_keys_when_the_name_does_not(tmp_path):
    from click.testing import CliRunner

    from edgeloop.config_cli import config

    plant = tmp_path / "plant.yaml"
    plant.write_text("agent_id: gw1\nconnectors: []\nuplink: {bootstrap_servers: 'k:9092'}\n")
    got = CliRunner().invoke(config, ["validate", str(plant)])
    assert got.exit_code == 0 and "valid edge configuration" in got.output
    plant.write_text("agent_id: gw1\noutbox: {overflow: drop_everything}\n")
    got = CliRunner().invoke(config, ["validate", str(plant)])
    assert got.exit_code == 1 and "outbox.overflow (line 2)" in got.output
    odd = tmp_path / "settings.yaml"
    odd.write_text("colour: blue\n")
    got = CliRunner().invoke(config, ["validate", str(odd)])
    assert got.exit_code == 2 and "pass --kind" in got.output
