"""A model that loads (and passes the probe) but raises at run time for some inputs degrades the
agent instead of stopping it: frames go out unscored, counted, the agent says why, and the
model-sync watch treats those frames like NaN and rolls back."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.agent import Agent
from edge.config import EdgeConfig
from edge.frames import PendingFrame
from edge.inference import ModelSlot, load_model
from shared.records import Event, Frame, Reading, now_ns
from tests.unit.edge.modelkit import export_lookup
from tests.waiting import wait_until

T0 = 1_700_000_000_000_000_000


def pending(i: int, t: float) -> PendingFrame:
    return PendingFrame("m1", f"m1-{i}", T0 + i, {"t_mean": t, "u_mean": 1.0}, ())


def test_slot_degrades_a_failing_call_to_unscored_frames(tmp_path: Path) -> None:
    path, mpath = export_lookup(tmp_path, table_size=4)
    failed: list[int] = []
    slot = ModelSlot(on_score_error=failed.append)
    slot.swap(load_model(path, mpath))  # the [2, 2] zero probe passes
    ok = slot.score([pending(0, 1.0), pending(1, 3.0)])
    assert [f.prediction for f in ok] == pytest.approx([0.1, 0.3])
    # one row out of the table's range: onnxruntime raises for the whole call
    bad = slot.score([pending(2, 2.0), pending(3, 100.0), pending(4, 1.0)])
    assert [f.prediction for f in bad] == [None, None, None]
    assert {f.model_version for f in bad} == {1} and all(not f.marks for f in bad)
    assert failed == [3] and slot.score_errors == 1 and slot.score_failed_frames == 3
    assert slot.last_score_error is not None and "lookup v1 failed scoring 3 frames" in (
        slot.last_score_error
    )
    # the next good call scores again; a swap clears the error
    assert slot.score([pending(5, 2.0)])[0].prediction is not None
    slot.swap(load_model(path, mpath))
    assert slot.last_score_error is None


def _config(tmp_path: Path, model: Path, manifest: Path, **extra: object) -> EdgeConfig:
    return EdgeConfig.model_validate(
        {
            "agent_id": "gw-score",
            "state_dir": str(tmp_path / "state"),
            "frames": [
                {
                    "asset": "m1",
                    "trigger": {"tag": "part"},
                    "features": [{"tag": "t", "aggs": ["mean"]}, {"tag": "u", "aggs": ["mean"]}],
                }
            ],
            "rules": [{"name": "hot", "when": "has(r.t) && r.t > 50.0"}],
            "model": {"path": str(model), "manifest": str(manifest)},
            "uplink": {"bootstrap_servers": "127.0.0.1:1", "backoff": {"max": 1.0}},
            "http": {"port": None},
            **extra,
        }
    )


def cycle(agent: Agent, part: int, t: float) -> None:
    """One machine cycle of readings: the part counter changing cuts the previous frame."""
    ts = now_ns()
    agent.ingest(
        "line",
        [Reading("m1", "t", ts, t), Reading("m1", "u", ts, 1.0), Reading("m1", "part", ts, part)],
    )


async def test_agent_keeps_running_and_reports_degraded(tmp_path: Path) -> None:
    path, mpath = export_lookup(tmp_path, table_size=4)
    agent = Agent(_config(tmp_path, path, mpath))
    async with agent:
        for part in range(1, 4):
            cycle(agent, part, 2.0)
            await wait_until(lambda p=part: agent.frames_built >= p - 1, 10, "a frame")
        assert agent.slot.score_errors == 0 and agent.health()["status"] != "stopping"
        failed_before = agent.metrics.score_failed._value.get()
        cycle(agent, 4, 100.0)  # t = 100: out of the model's table, and fires the rule
        cycle(agent, 5, 100.0)
        await wait_until(lambda: agent.slot.score_errors >= 1, 10, "the failing model call")
        ticks = agent.ticks
        cycle(agent, 6, 2.0)  # the loop is alive: more readings are taken and committed
        await wait_until(lambda: agent.ticks > ticks, 10, "another tick")
        health = agent.health()
        assert agent.metrics.score_failed._value.get() - failed_before >= 1
        assert agent.events_emitted >= 1  # rules still fire
    assert any("failed scoring" in r and "Gather" in r for r in health["reasons"]), health
    assert health["score_errors"]["calls"] >= 1
    assert agent.outbox.records > 0  # frames and readings buffered (no Kafka here)


async def test_watch_treats_a_failing_model_like_nan_and_rolls_back(tmp_path: Path) -> None:
    good, good_m = export_lookup(tmp_path, version=1, table_size=1000)
    bad, bad_m = export_lookup(tmp_path, version=2, table_size=4)
    key = tmp_path / "cloud.pub"
    key.write_text("unused: model sync is not started in this test\n")
    cfg = _config(
        tmp_path,
        good,
        good_m,
        models={"public_key": str(key), "name": "lookup", "watch_min_frames": 5},
    )
    agent = Agent(cfg)
    assert agent.model_sync is not None
    agent.model_sync.dir.mkdir(parents=True)  # what ModelSync.start() would do
    await agent.outbox.start()  # drive ticks by hand: no uplink, no manifest consumer
    try:
        await agent.load_model(good, good_m)
        agent.model_sync._activate(load_model(bad, bad_m))  # as after a shadow that passed
        assert agent.slot.current is not None and agent.slot.current.version == 2
        for part in range(1, 12):
            cycle(agent, part, 100.0 if part % 2 else 2.0)  # every tick has a failing row
            await agent._tick()
            if agent.slot.current.version == 1:
                break
        assert agent.slot.current.version == 1, agent.model_sync.status()
        rollback = agent.model_sync.last_rollback
        assert rollback is not None and rollback["from"] == 2 and rollback["to"] == 1
        assert rollback["reason"].startswith("NaN rate")
        # the rollback Event goes out with the next tick; v1 scores the same inputs
        cycle(agent, 20, 100.0)
        cycle(agent, 21, 100.0)
        await agent._tick()
        events = [
            r
            for b in await agent.outbox.claim(after_seq=0, max_batches=1000)
            for r in b.records
            if isinstance(r, Event)
        ]
        assert any(e.rule == "model_rollback" for e in events), events
        frames = [
            r
            for b in await agent.outbox.claim(after_seq=0, max_batches=1000)
            for r in b.records
            if isinstance(r, Frame) and r.model_version == 1
        ]
        assert frames and frames[-1].prediction == pytest.approx(10.0)  # table[100] of the v1 model
    finally:
        await agent.outbox.stop()
