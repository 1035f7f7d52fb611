"""`edgeloop demo` as a user runs it: it comes up, serves the dashboard, and Ctrl-C stops
everything it started (brokers included) with exit status 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from edgeloop.services import find_mosquitto, free_port
from tests.waiting import wait_until_sync

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not on PATH")


def _labels_learned(port: int) -> int:
    status = httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=5).json()
    return int(status.get("learned", 0))


@pytest.mark.parametrize("mqtt", ["auto", "amqtt"])
def test_demo_serves_the_dashboard_and_ctrl_c_leaves_nothing_running(tmp_path, mqtt):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeloop.cli", "demo", "--api-port", str(port), "--mqtt", mqtt],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True
    )
    reader.start()
    children: list[psutil.Process] = []
    try:
        wait_until_sync(lambda: any("dashboard" in ln for ln in lines), 90, "the demo's endpoints")
        url = f"http://127.0.0.1:{port}/dashboard/"
        assert any(url in ln for ln in lines), lines
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and "edgeloop" in page.text.lower()
        wait_until_sync(
            lambda: httpx.get(f"http://127.0.0.1:{port}/api/fleet", timeout=5).json() != [],
            60,
            "the edge agent's first heartbeat in the fleet",
        )
        children = psutil.Process(proc.pid).children(recursive=True)
        names = {c.name() for c in children}
        assert any("tansu" in n for n in names), names
        if mqtt == "amqtt":  # the fallback for machines without Mosquitto
            assert not any("mosquitto" in n for n in names), names
            wait_until_sync(
                lambda: (
                    httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=5).status_code == 200
                    and _labels_learned(port) > 0
                ),
                90,
                "labels from the quality station over amqtt reaching the cloud",
            )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=5)
        proc.stdout.close()
    assert any("stopped cleanly" in ln for ln in lines), "".join(lines[-20:])
    deadline = time.monotonic() + 10
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {[(c.pid, c.name()) for c in alive]}"
