"""``edgeloop sim factory`` as a process: prints its endpoints, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.waiting import wait_until_sync


def test_sim_factory_prints_endpoints_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    out = tmp_path / "out.txt"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeloop.cli",
                "sim",
                "factory",
                "--seed",
                "1",
                "--speed",
                "20",
                "--opcua-port",
                "0",
                "--modbus-port",
                "0",
                "--drift-at",
                "30",
                "--truth",
                str(truth),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_until_sync(
                lambda: b"ready" in out.read_bytes() or proc.poll() is not None, 30, "ready"
            )
            assert proc.poll() is None, out.read_text()
            wait_until_sync(
                lambda: '"kind":"label"' in truth.read_text(), 30, "a label in the truth file"
            )
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            rc = proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    text = out.read_text()
    assert rc == 0, text
    assert time.monotonic() - t0 < 20
    assert "opc.tcp://127.0.0.1:" in text and "modbus+tcp://127.0.0.1:" in text
    assert "stopping:" in text
    lines = [json.loads(x) for x in truth.read_text().splitlines()]
    assert lines[0]["kind"] == "meta"
