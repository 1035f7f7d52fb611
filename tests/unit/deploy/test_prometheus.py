"""deploy/prometheus with promtool (Debian's prometheus package) when it is installed: the rules
and the scrape config are valid, and the alert unit tests in alerts_test.yml pass (each alert
fires on the condition it names and not before its ``for``)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.unit.deploy.kit import ALERTS, DEPLOY, PROMETHEUS, alert_rules

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)"
)


def promtool(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_every_alert_has_severity_summary_and_a_runbook_section():
    ops = (DEPLOY.parent / "docs" / "operations.md").read_text().lower()
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert f"### {anchor}" in ops, (
            f"{rule['alert']}: docs/operations.md has no '### ' heading for #{anchor}"
        )
    required = {
        "EdgeloopEdgeAgentDown", "EdgeloopEdgeOutboxGrowing", "EdgeloopEdgeUplinkStalled",
        "EdgeloopDriftDetected", "EdgeloopAccuracyBelowThreshold",
    }  # fmt: skip
    assert required <= set(names)


@needs_promtool
def test_alert_rules_are_valid():
    out = promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_scrape_config_is_valid(tmp_path):
    doc = yaml.safe_load(PROMETHEUS.read_text())
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    doc["rule_files"] = [str(tmp_path / "alerts.yml")]  # compose mounts it at /etc/prometheus
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(doc))
    out = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_alert_unit_tests_pass():
    out = promtool("test", "rules", "alerts_test.yml", cwd=ALERTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
