"""The issue's acceptance run: `edgeloop demo --duration 120 --report r.json` exits 0 with zero
lost readings, the drift detected, a model pushed after the first, and the edge's final accuracy
within 3 points of its pre-drift level — all read from the report the demo writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeloop.services import find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not on PATH")


@pytest.mark.timeout(300)
def test_headless_demo_report_shows_the_loop_closed(tmp_path):
    report = tmp_path / "r.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeloop.cli",
            "demo",
            "--duration",
            "120",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert report.exists(), run.stderr[-3000:]
    r = json.loads(report.read_text())
    summary = {k: r[k] for k in ("checks", "readings", "push_latencies_s")}
    summary["accuracy"] = {k: v for k, v in r["accuracy"].items() if k != "series"}
    print(json.dumps(summary, indent=1))
    assert r["readings"]["accepted_by_edge"] > 50_000
    assert r["readings"]["lost"] == 0 and r["readings"]["duplicates_applied"] == 0
    assert r["drift_detections"], "no drift detected"
    shipped = [m for m in r["models"] if m["shipped"] and m["active_on_edge_at_ns"]]
    assert len(shipped) >= 2, r["models"]
    assert r["accuracy"]["min_after_drift"] < r["accuracy"]["pre_drift"]
    assert r["accuracy"]["final"] >= r["accuracy"]["pre_drift"] - 0.03, summary
    assert all(r["checks"].values()) and r["ok"]
    assert run.returncode == 0, run.stderr[-3000:]
