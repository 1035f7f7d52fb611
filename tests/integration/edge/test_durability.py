"""Nothing the agent accepted is lost: not when Kafka is down for 30 s under load, not when the
agent is SIGKILLed under load and restarted. After dedupe on (agent_id, batch_seq) every batch
arrives exactly once, with no gaps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edge.agent import Agent
from edge.config import EdgeConfig
from tests.integration.edge.kit import Collector, write_config
from tests.waiting import wait_until

ASSETS = [f"m{i}" for i in range(1, 6)]
TAGS = [f"t{i:02d}" for i in range(20)]


def doc(tmp_path: Path, bootstrap: str, agent_id: str, isolation: str = "inline") -> dict:
    return {
        "agent_id": agent_id,
        "state_dir": str(tmp_path / "state"),
        # 5 assets x 21 tags every 20 ms: ~5,000 readings/s
        "connectors": [
            {
                "kind": "synthetic",
                "name": "load",
                "assets": ASSETS,
                "tags": TAGS,
                "interval": 0.02,
                "cycle": 0.5,
                "isolation": isolation,
            }
        ],
        "frames": [
            {
                "asset": a,
                "trigger": {"tag": "part_counter"},
                "features": [{"tag": "t00", "aggs": ["mean", "max"]}],
            }
            for a in ASSETS
        ],
        "rules": [{"name": "high", "when": "r.t00 > 58.0", "clear": "r.t00 < 50.0"}],
        "uplink": {
            "bootstrap_servers": bootstrap,
            "linger_ms": 10,
            "request_timeout_ms": 3000,
            "backoff": {"initial": 0.2, "max": 2.0},
            # no cloud here: the agent's contract with the broker alone (the chaos suite and
            # tests/integration/test_end_to_end_ack.py hold the end-to-end one)
            "delete_after": "broker",
        },
        "http": {"port": None},
        "heartbeat_interval": 1.0,
    }


async def test_kafka_down_30s_under_load_loses_nothing(tmp_path, kafka_broker_factory):
    broker = kafka_broker_factory()
    cfg = EdgeConfig.model_validate(doc(tmp_path, broker.bootstrap, "gw-outage"))
    agent = Agent(cfg)
    col = Collector(broker.bootstrap, "gw-outage")
    await col.start()
    try:
        await agent.start()
        await wait_until(lambda: len(col.readings) > 5000, 30, "readings flowing")
        # Tansu keeps data in memory only: before it goes down, pause the uplink (the agent
        # keeps accepting) and let the consumer read everything the broker acknowledged
        await agent.uplink.stop(flush_timeout=0)
        for _ in range(200):
            if await col.caught_up():
                break
            await asyncio.sleep(0.05)
        await col.stop()
        before = dict(col.batches)
        broker.stop()
        await agent.uplink.start()
        accepted_at_outage = agent.accepted_readings
        await asyncio.sleep(30)  # the outage itself, under load
        assert agent.accepted_readings - accepted_at_outage > 20_000
        assert agent.outbox.records > 20_000 and agent.uplink.last_error is not None
        assert agent.health()["status"] == "degraded"
        broker.start()  # same port, empty
        col = Collector(broker.bootstrap, "gw-outage")
        col.batches.update(before)
        await col.start()
        await wait_until(lambda: agent.outbox.records < 5000, 40, "the backlog to drain")
        await agent.stop(flush_timeout=10)
        assert agent.outbox.records == 0
        last_seq = agent.outbox.next_seq - 1
        await wait_until(lambda: len(col.seqs("gw-outage")) == last_seq, 30, "every batch")
    finally:
        await agent.stop()
        await col.stop()
    col.assert_exactly_once("gw-outage")
    assert len(col.readings) == agent.accepted_readings
    assert not agent.outbox.dropped


def _spawn(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("edgeloop")
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(exe), "edge", "run", "-c", str(cfg)], stdout=out, stderr=subprocess.STDOUT
        )


def _outbox(path: Path) -> tuple[int, int]:
    db = sqlite3.connect(path)
    try:
        (rows,) = db.execute("SELECT COUNT(*) FROM batches").fetchone()
        (nxt,) = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
    finally:
        db.close()
    return rows, nxt


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("isolation", ["inline", "process"])
async def test_agent_sigkilled_under_load_and_restarted_loses_nothing(
    tmp_path, kafka_broker_factory, isolation
):
    broker = kafka_broker_factory()
    cfg = write_config(
        tmp_path / "edge.yaml", doc(tmp_path, broker.bootstrap, "gw-kill", isolation)
    )
    log = tmp_path / "agent.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with Collector(broker.bootstrap, "gw-kill") as col:
            procs.append(_spawn(cfg, log))
            await wait_until(lambda: len(col.readings) > 10_000, 40, "readings from the agent")
            workers = _children(procs[0].pid)
            assert len(workers) == (1 if isolation == "process" else 0)
            os.kill(procs[0].pid, signal.SIGKILL)
            assert procs[0].wait(timeout=10) == -signal.SIGKILL
            # a connector worker notices its agent is gone and exits: no orphan keeps polling
            await wait_until(lambda: not any(map(_alive, workers)), 10, "the worker gone")
            seen = len(col.readings)
            procs.append(_spawn(cfg, log))
            await wait_until(lambda: len(col.readings) > seen + 10_000, 40, "the restarted agent")
            procs[1].send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(procs[1].wait, 30)
            assert code == 0, log.read_text()[-3000:]
            rows, next_seq = _outbox(tmp_path / "state" / "outbox.db")
            assert rows == 0  # graceful stop flushed everything
            await wait_until(
                lambda: len(col.seqs("gw-kill")) == next_seq - 1, 30, "every batch in Kafka"
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    col.assert_exactly_once("gw-kill")
    assert "Traceback" not in log.read_text()
