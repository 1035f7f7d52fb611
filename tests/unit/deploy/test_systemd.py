"""deploy/systemd/edgeloop-edge.service passes ``systemd-analyze verify`` and its offline
security assessment. The unit runs /opt/edgeloop/bin/edgeloop, which does not exist on a build
machine: the check runs on a temporary copy whose ExecStart/ExecStartPre point at /bin/true
(verify only requires the command to be executable); every other line is verified as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.unit.deploy.kit import UNIT

SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.path.exists("/usr/bin/systemd-analyze") else None
)
needs_systemd = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not found")


def unit_copy(tmp_path):
    text = UNIT.read_text()
    assert "/opt/edgeloop/bin/edgeloop" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/opt/edgeloop/bin/edgeloop", "/bin/true"))
    return copy


def directives(section: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif line and not line.startswith("#") and current == section:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_runs_the_agent_hardened_as_a_dedicated_user_with_a_state_directory():
    svc = directives("Service")
    assert svc["User"] == ["edgeloop"] and svc["Group"] == ["edgeloop"]
    assert svc["ExecStart"][0].startswith(
        "/opt/edgeloop/bin/edgeloop edge run -c /etc/edgeloop/edge.yaml"
    )
    assert svc["StateDirectory"] == ["edgeloop"]
    assert "EDGELOOP__STATE_DIR=%S/edgeloop" in svc["Environment"]
    assert svc["Restart"] == ["always"]
    assert directives("Unit")["StartLimitIntervalSec"] == ["0"]
    assert svc["NoNewPrivileges"] == ["yes"] and svc["ProtectSystem"] == ["strict"]
    assert svc["CapabilityBoundingSet"] == [""]
    # the stop timeout leaves room for the agent's own flush
    flush = float(re.search(r"--flush-timeout (\d+)", svc["ExecStart"][0]).group(1))
    assert float(svc["TimeoutStopSec"][0]) > flush
    assert directives("Install")["WantedBy"] == ["multi-user.target"]


@needs_systemd
def test_unit_passes_systemd_analyze_verify(tmp_path):
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_copy(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # no warnings (unknown keys, bad values)


@needs_systemd
def test_unit_exposure_is_rated_ok_or_better(tmp_path):
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit_copy(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", out.stdout)
    if m is None and "offline" in out.stderr:
        pytest.skip(f"this systemd-analyze cannot assess offline: {out.stderr.strip()}")
    assert m is not None, out.stdout[-2000:] + out.stderr
    assert float(m.group(1)) <= 2.5, out.stdout
