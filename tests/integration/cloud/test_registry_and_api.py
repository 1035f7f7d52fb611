"""The registry on SQLite and PostgreSQL; the API's token rules with httpx against the app."""

from __future__ import annotations

import pickle

import httpx
import pytest
from river import linear_model

from cloud.config import ApiConfig
from cloud.dedupe import SeqWindow
from cloud.registry import Registry, RegistryError
from cloud.service import CloudService
from shared.records import Event, Heartbeat
from tests.integration.cloud.stream import EdgeProducer, Stream
from tests.integration.cloud.test_service import TOKEN, _ensure_topics, make_config
from tests.waiting import wait_until


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'r.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    reg = Registry(url)
    if request.param == "postgres":  # the session database is shared: start clean
        from cloud.registry import _Base

        _Base.metadata.drop_all(reg.engine)
        _Base.metadata.create_all(reg.engine)
    yield reg
    reg.close()


def _add(reg, reason="initial"):
    return reg.add_version(
        model="q",
        task="classification",
        learner="logistic",
        reason=reason,
        pipeline=pickle.dumps(linear_model.LogisticRegression()),
        metrics={"overall": {"accuracy": 0.9, "log_loss": float("nan")}},
        features=["a", "b"],
        steps=["linear_model.LogisticRegression"],
        offsets={"t.frames:0": 12},
        evidence={"gain": 0.05},
    )


def test_registry_versions_lineage_rollback_and_checkpoints(registry):
    v1 = _add(registry)
    v2 = _add(registry, "margin")
    assert (v1.version, v2.version, v2.parent) == (1, 2, 1)
    assert registry.version("q", 1).status == "retired"
    assert registry.champion("q").version == 2
    back = registry.activate("q")  # the parent
    assert back.version == 1 and back.rollback and back.pipeline_blob
    assert registry.version("q", 2).status == "retired"
    registry.set_status("q", 2, "cannot_ship", "TreeEnsemble parity 1e-3 > 1e-5")
    with pytest.raises(RegistryError, match="cannot ship"):
        registry.activate("q", 2)
    with pytest.raises(RegistryError, match="no version 9"):
        registry.version("q", 9)
    promos = registry.promotions("q")
    assert [p["reason"] for p in promos] == ["rollback", "margin", "initial"]
    assert promos[1]["evidence"] == {"gain": 0.05}
    assert registry.version("q", 1).offsets == {"t.frames:0": 12}
    registry.save_checkpoint(
        "cloud",
        b"state",
        {"t.frames:0": 40},
        40,
        {("edge-1", "i1", "t.frames", 0): SeqWindow(3, [5, 6, 9])},
        [(Heartbeat("edge-1", 5, {"q": 1}, outbox_depth=3), 6)],
        [("edge-1", Event("overheat", "press-1", 7, 2, "hot", {"t": 99.5}))],
        {("t.frames", 0): [(38, "16:5:0000ffff"), (39, "17:5:0000abcd")]},
        [
            {
                "agent_id": "edge-1",
                "incarnation": "i1",
                "batch_seq": 9,
                "topic": "t.frames",
                "partition": 0,
                "offset": 39,
                "records": 4,
                "instance": "cloud",
                "ts_ns": 8,
            }
        ],
    )
    assert registry.load_checkpoint("cloud")[:2] == (b"state", {"t.frames:0": 40})
    dd = registry.load_dedupe([("t.frames", 0)])
    assert dd[("edge-1", "i1", "t.frames", 0)] == SeqWindow(3, [5, 6, 9])
    assert registry.load_marks([("t.frames", 0), ("t.labels", 0)]) == {
        ("t.frames", 0): [(38, "16:5:0000ffff"), (39, "17:5:0000abcd")]
    }
    registry.forget_marks([("t.frames", 0)])
    assert registry.load_marks([("t.frames", 0)]) == {}
    [row] = registry.applied_batches("edge-1")
    assert (row["incarnation"], row["batch_seq"], row["offset"]) == ("i1", 9, 39)
    assert registry.agents()[0]["outbox_depth"] == 3
    assert registry.events()[0]["values"] == {"t": 99.5}
    drift_id = registry.record_drift(
        model="q", version=1, source="edge", detector="ADWIN", samples=10, evidence={}, ts_ns=1
    )
    registry.link_drift(drift_id, "q")
    assert registry.drifts("q")[0]["promotion_id"] == promos[0]["id"]


async def test_api_reads_are_open_and_writes_need_the_token(kafka_broker, tmp_path):
    cfg = make_config(kafka_broker, tmp_path, api=ApiConfig(token=TOKEN, port=0))
    await _ensure_topics(kafka_broker, cfg)
    async with (
        CloudService(cfg, serve_api=False) as svc,
        EdgeProducer(kafka_broker, cfg.kafka.topics()) as edge,
    ):
        await edge.send_parts(Stream(seed=5).parts(400))
        await wait_until(lambda: svc.learned >= 400, 60, "400 samples learned")
        await wait_until(lambda: svc.registry.champion("quality") is not None, 10, "a champion")
        transport = httpx.ASGITransport(app=svc.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cloud") as http:
            models = (await http.get("/api/models")).json()
            assert models[0]["name"] == "quality" and models[0]["champion"]["version"] >= 1
            versions = (await http.get("/api/models/quality/versions")).json()
            assert versions[0]["parent"] is None and versions[0]["offsets"]
            assert (await http.get("/api/models/nope")).status_code == 404
            assert "/api/models/{name}/promote" in (await http.get("/openapi.json")).json()["paths"]

            url = "/api/models/quality/promote"
            r = await http.post(url, json={"learner": "hoeffding_tree"})
            assert r.status_code == 401
            r = await http.post(url, json={}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 403
            auth = {"Authorization": f"Bearer {TOKEN}"}
            r = await http.post(url, json={"learner": "hoeffding_tree"}, headers=auth)
            assert r.status_code == 201, r.text
            promoted = r.json()
            assert promoted["learner"] == "hoeffding_tree" and promoted["reason"] == "manual"
            assert (await http.post("/api/models/quality/rollback")).status_code == 401
            r = await http.post("/api/models/quality/rollback", headers=auth)
            assert r.status_code == 200 and r.json()["version"] == promoted["version"] - 1
            assert r.json()["rollback"] is True
            assert svc.learners["quality"].champion.version == promoted["version"] - 1
            await svc.snapshot_metrics()
            points = (await http.get("/api/models/quality/metrics?subject=logistic")).json()
            assert points and points[-1]["samples"] >= 400
            assert (await http.get("/readyz")).status_code == 200


def test_dedupe_state_of_an_older_registry_becomes_incarnation_empty(tmp_path):
    """Before batch identities had an incarnation the state was keyed (agent, topic, partition):
    it must keep protecting the batches old agents still resend (wire version 1: incarnation "")."""
    import sqlite3

    from cloud.registry import Registry

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE dedupe (agent_id VARCHAR(200), topic VARCHAR(250), partition INTEGER,
            floor BIGINT, recent TEXT, PRIMARY KEY (agent_id, topic, partition));
        INSERT INTO dedupe VALUES ('edge-1', 't.frames', 2, 10, '12-14');
        """
    )
    db.commit()
    db.close()
    reg = Registry(f"sqlite:///{path}")
    try:
        dd = reg.load_dedupe([("t.frames", 2)])
        assert dd == {("edge-1", "", "t.frames", 2): SeqWindow(10, [12, 13, 14])}
    finally:
        reg.close()
    reg = Registry(f"sqlite:///{path}")  # migrated once: opening again changes nothing
    try:
        assert len(reg.load_dedupe([("t.frames", 2)])) == 1
    finally:
        reg.close()
