"""The agent end to end against a real Kafka-protocol broker (Tansu): readings, scored frames,
rule events, write-backs, health and metrics; and a broken model that leaves it degraded."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from edge.agent import Agent
from edge.config import EdgeConfig
from edge.inference import ModelLoadError
from tests.integration.edge.kit import Collector
from tests.unit.edge.modelkit import FEATURES, export
from tests.waiting import wait_until


def config(tmp_path, bootstrap, model=None, **extra):
    doc = {
        "agent_id": "gw-test",
        "state_dir": str(tmp_path / "state"),
        "connectors": [
            {
                "kind": "synthetic",
                "name": "src",
                "assets": ["m1", "m2"],
                "tags": ["spindle_temp", "vibration_rms", "power"],
                "interval": 0.02,
                "cycle": 0.3,
                "offset": 5.0,
                "amplitude": 3.0,
                "writable": ["alarm_lamp"],
            }
        ],
        "frames": [
            {"asset": a, "trigger": {"tag": "part_counter"}, "features": []} for a in ("m1", "m2")
        ],
        "rules": [
            {
                "name": "scored",
                "when": "has_frame && prediction >= 0.0",
                "message": "{asset} scored {prediction}",
                "actions": [
                    {"type": "write", "connector": "src", "tag": "alarm_lamp", "value": True}
                ],
            },
            {"name": "warm", "when": "r.spindle_temp > 6.0", "clear": "r.spindle_temp < 4.0"},
        ],
        "uplink": {
            "bootstrap_servers": bootstrap,
            "linger_ms": 5,
            "delete_after": "broker",  # no cloud here to confirm batches
        },
        "http": {"port": 0},
        "heartbeat_interval": 0.5,
    }
    if model is not None:
        doc["model"] = model
    doc.update(extra)
    return EdgeConfig.model_validate(doc)


async def test_readings_scored_frames_and_events_reach_kafka(tmp_path, kafka_broker_factory):
    broker = kafka_broker_factory()
    path, mpath, sk = export(tmp_path)
    cfg = config(tmp_path, broker.bootstrap, model={"path": str(path), "manifest": str(mpath)})
    async with Collector(broker.bootstrap, "gw-test") as col, Agent(cfg) as agent:
        await wait_until(
            lambda: len(col.frames) >= 6 and len(col.events) >= 2 and len(col.readings) > 200,
            30,
            "readings, frames and events in Kafka",
        )
        async with httpx.AsyncClient() as http:
            base = f"http://127.0.0.1:{agent.http.port}"
            health = (await http.get(f"{base}/healthz", timeout=5)).json()
            metrics = (await http.get(f"{base}/metrics", timeout=5)).text
        written = list(agent.connectors["src"].written)
    assert health["status"] == "ok", health
    assert health["model"]["version"] == 1 and health["model"]["features"] == list(FEATURES)
    for name in (
        'edgeloop_edge_readings_total{agent="gw-test",connector="src"}',
        'edgeloop_edge_inference_seconds_count{agent="gw-test"}',
        'edgeloop_edge_rule_firings_total{agent="gw-test",rule="scored",transition="fire"}',
        'edgeloop_edge_uplink_batches_total{agent="gw-test",kind="reading"}',
        'edgeloop_edge_outbox_depth{agent="gw-test"}',
        'edgeloop_edge_outbox_oldest_age_seconds{agent="gw-test"}',
    ):
        assert name in metrics, name
    # frames carry the model's predictions: the same as scikit-learn on the same features
    frames = col.frames
    x = np.array([[f.features[n] for n in FEATURES] for f in frames])
    assert [f.prediction for f in frames] == [float(v) for v in sk.predict(x)]
    assert all(f.model_version == 1 and f.score is not None for f in frames)
    assert {f.key.split("-")[0] for f in frames} <= {"m1", "m2"}
    events = col.events
    assert {e.rule for e in events} >= {"scored"}
    assert all(e.message.startswith(e.asset) for e in events if e.rule == "scored")
    assert ("alarm_lamp", True) in written
    heartbeats = [
        r for b in col.batches.values() for r in b.records if type(r).__name__ == "Heartbeat"
    ]
    assert heartbeats and heartbeats[-1].models == {"quality": 1}
    col.assert_exactly_once("gw-test")


@pytest.mark.parametrize("breakage", ["corrupt", "wrong_inputs"])
async def test_broken_model_leaves_the_agent_running_rules_and_degraded(
    tmp_path, kafka_broker, breakage
):
    if breakage == "corrupt":
        path, mpath, _ = export(tmp_path)
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2 : len(blob) // 2 + 64] = b"\xff" * 64
        path.write_bytes(bytes(blob))
        expect = "does not match the manifest"
    else:
        path, mpath, _ = export(tmp_path, n_inputs=7)
        expect = "expected [batch, 7]"
    # explicit features: frames are still built (unscored) while the model is unusable
    feats = [{"tag": "spindle_temp", "aggs": ["mean"]}, {"tag": "power", "aggs": ["mean"]}]
    cfg = config(
        tmp_path,
        kafka_broker,
        model={"path": str(path), "manifest": str(mpath)},
        agent_id=f"gw-{breakage.replace('_', '-')}",
        frames=[
            {"asset": a, "trigger": {"tag": "part_counter"}, "features": feats}
            for a in ("m1", "m2")
        ],
    )
    async with Agent(cfg) as agent:
        await wait_until(
            lambda: agent.events_emitted >= 2 and agent.frames_built >= 2,
            20,
            "rules firing and frames built without a model",
        )
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{agent.http.port}/healthz", timeout=5)
            metrics = (
                await http.get(f"http://127.0.0.1:{agent.http.port}/metrics", timeout=5)
            ).text
        await wait_until(lambda: agent.uplink.acked_batches > 0, 20, "the uplink working")
    health = r.json()
    assert r.status_code == 200 and health["status"] == "degraded"
    assert any(expect in reason for reason in health["reasons"]), health["reasons"]
    assert health["model"] is None and expect in health["model_error"]
    assert f'edgeloop_edge_degraded{{agent="{cfg.agent_id}"}} 1.0' in metrics
    assert f'edgeloop_edge_model_load_errors_total{{agent="{cfg.agent_id}"}} 1.0' in metrics


async def test_model_swap_and_rollback_while_running(tmp_path, kafka_broker):
    d1, d2 = tmp_path / "v1", tmp_path / "v2"
    d1.mkdir()
    d2.mkdir()
    p1, m1, _ = export(d1, version=1)
    p2, m2, _ = export(d2, version=2, seed=7)
    cfg = config(
        tmp_path, kafka_broker, model={"path": str(p1), "manifest": str(m1)}, agent_id="gw-swap"
    )
    async with Agent(cfg) as agent:
        versions = lambda: {f.model_version for f in agent._last_frame.values()}  # noqa: E731
        await wait_until(lambda: versions() == {1}, 20, "frames scored by v1")
        old = await agent.load_model(p2, m2)
        assert old is not None and agent.slot.previous.version == 1
        await wait_until(lambda: versions() == {2}, 20, "frames scored by v2")
        assert agent.health()["model"]["version"] == 2
        agent.rollback_model()
        await wait_until(lambda: versions() == {1}, 20, "frames scored by v1 again")
        with pytest.raises(ModelLoadError, match="sha256"):
            p2.write_bytes(b"\0" + p2.read_bytes()[1:])
            await agent.load_model(p2, m2)
        assert agent.slot.current.version == 1  # a refused model changes nothing
