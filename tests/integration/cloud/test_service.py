"""The cloud service against a real Kafka-protocol broker (Tansu): no Kafka mocks."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer

from cloud.config import (
    ApiConfig,
    CloudConfig,
    DatabaseConfig,
    DriftConfig,
    KafkaConfig,
    ModelConfig,
    PromotionConfig,
)
from cloud.service import CloudService
from shared.wire import Kind
from tests.integration.cloud.stream import EdgeProducer, Stream
from tests.waiting import wait_until

TOKEN = "s3cret-token-for-the-cloud-tests-0001"


def make_config(bootstrap: str, tmp_path: Path, **over) -> CloudConfig:
    uid = uuid.uuid4().hex[:8]
    base = dict(
        environment="production",
        kafka=KafkaConfig(
            bootstrap_servers=bootstrap,
            topic_prefix=f"t{uid}",
            group_id=f"g{uid}",
            session_timeout_s=2,
        ),
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'cloud.db'}"),
        models=[ModelConfig(name="quality", rolling_window=200)],
        promotion=PromotionConfig(min_samples=200, window=200, margin=0.02, cooldown_samples=100),
        api=ApiConfig(token=TOKEN, port=0),
        checkpoint_interval_s=0.3,
        metrics_snapshot_s=0.3,
    )
    base.update(over)
    return CloudConfig(**base)


async def _ensure_topics(bootstrap: str, cfg: CloudConfig) -> None:
    """Create the uplink topics (Tansu auto-creates on first produce) before the group joins."""
    async with EdgeProducer(bootstrap, cfg.kafka.topics(), agent_id="bootstrap") as p:
        await p.heartbeat({})


def learned(svc: CloudService) -> int:
    return svc.learned


async def test_learns_a_late_labelled_stream_then_ignores_replays_and_skips_poison(
    kafka_broker, tmp_path
):
    cfg = make_config(kafka_broker, tmp_path)
    await _ensure_topics(kafka_broker, cfg)
    stream = Stream()
    async with CloudService(cfg) as svc, EdgeProducer(kafka_broker, cfg.kafka.topics()) as edge:
        await edge.heartbeat({"quality": 0}, outbox_depth=17)
        await edge.send_parts(stream.parts(1500))
        await wait_until(lambda: svc.learned >= 1500, 60, "1500 joined samples learned")
        logistic = svc.learners["quality"].candidates["logistic"]
        # prequential: the first samples were predicted by an untrained model ...
        assert logistic.metrics.n == 1500
        # ... and the rolling window shows it converged (3 % label noise)
        assert logistic.metrics.rolling()["accuracy"] >= 0.9
        assert logistic.metrics.overall()["accuracy"] > 0.85
        assert set(logistic.per_asset) == {"press-1", "press-2"}
        assert svc.join.stats.joined == 1500
        # the first champion was promoted by the policy once a candidate had 200 samples; any
        # later change beat the frozen champion by the margin over the window
        promotions = list(reversed(svc.registry.promotions("quality")))
        assert promotions[0]["reason"] == "initial" and promotions[0]["to_version"] == 1
        assert promotions[0]["evidence"]["challenger_samples"] == 200
        for p in promotions[1:]:
            assert p["reason"] == "margin" and p["evidence"]["gain"] >= 0.02
            assert p["evidence"]["champion_samples"] >= 200
        champ = svc.registry.champion("quality")
        assert champ is not None and champ.version == len(promotions)
        assert champ.offsets  # lineage: the offsets it learned up to
        assert champ.features == ["temp", "pressure"]

        # replay every batch byte for byte: nothing changes but the dedupe counter
        before = (svc.learned, logistic.metrics.n, svc.join.stats.frames)
        replayed = await edge.replay()
        await wait_until(
            lambda: sum(svc.stats.dedupe_dropped.values()) >= replayed,
            30,
            "replayed batches dropped",
        )
        assert (svc.learned, logistic.metrics.n, svc.join.stats.frames) == before

        # a poison message is skipped and counted; what follows it is still applied
        await edge.send_raw(cfg.kafka.topics().frames, b"press-1", b"\x00not a batch")
        await edge.send_raw(cfg.kafka.topics().labels, b"press-1", b"EL\x01\x04\xc1")
        await edge.send_parts(stream.parts(100))
        await wait_until(lambda: svc.learned >= 1600, 30, "samples after the poison learned")
        assert sum(svc.stats.poison.values()) == 2
        assert (
            "not an edgeloop batch" in svc.stats.last_poison or "corrupt" in svc.stats.last_poison
        )

        # fleet from heartbeats; the live API over real HTTP
        assert svc.fleet["edge-1"][0].outbox_depth == 17
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.api_port}") as http:
            fleet = (await http.get("/api/fleet")).json()
            assert [a["agent_id"] for a in fleet] == ["bootstrap", "edge-1"]
            assert fleet[1]["outbox_depth"] == 17 and fleet[1]["models"] == {"quality": 0}
            text = (await http.get("/metrics")).text
            assert 'edgeloop_cloud_poison_messages_total{topic="' in text
            assert "edgeloop_cloud_dedupe_dropped_batches_total" in text
            assert 'edgeloop_cloud_prequential{learner="logistic"' in text
            status = (await http.get("/api/status")).json()
            assert status["join"]["joined"] == 1600
            await wait_until(lambda: svc.checkpoints >= 1, 10, "a checkpoint")


async def test_restart_resumes_learning_from_the_checkpoint(kafka_broker, tmp_path):
    cfg = make_config(
        kafka_broker, tmp_path, api=ApiConfig(enabled=False), environment="development"
    )
    await _ensure_topics(kafka_broker, cfg)
    stream = Stream(seed=11)
    async with EdgeProducer(kafka_broker, cfg.kafka.topics()) as edge:
        async with CloudService(cfg) as svc:
            await edge.send_parts(stream.parts(600))
            await wait_until(lambda: svc.learned >= 600, 60, "600 samples learned")
            acc_before = svc.learners["quality"].candidates["logistic"].metrics.overall()
        # stopped: final checkpoint written, offsets committed

        # a crash between checkpoint and commit leaves the committed offsets behind: rewind the
        # group to the start; the restored dedupe state must drop everything already learned
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka_broker,
            group_id=cfg.kafka.group_id,
            enable_auto_commit=False,
            session_timeout_ms=2000,
            heartbeat_interval_ms=600,
        )
        await consumer.start()
        try:
            consumer.subscribe(list(cfg.kafka.topics().uplink()))
            while not consumer.assignment():
                await consumer.getmany(timeout_ms=100)
            committed = {tp: await consumer.committed(tp) for tp in consumer.assignment()}
            assert sum(o or 0 for o in committed.values()) > 0  # the service had committed
            await consumer.commit({tp: 0 for tp in consumer.assignment()})
        finally:
            await consumer.stop()

        async with CloudService(cfg) as svc2:
            logistic = svc2.learners["quality"].candidates["logistic"]
            assert svc2.restored_from is not None
            assert logistic.n_learned == 600  # not from scratch
            assert logistic.metrics.overall() == acc_before
            await edge.send_parts(stream.parts(400))
            await wait_until(lambda: svc2.learned >= 1000, 60, "the next 400 samples learned")
            await wait_until(
                lambda: sum(svc2.stats.dedupe_dropped.values()) >= 1, 10, "re-read batches dropped"
            )
            assert svc2.learned == 1000 and logistic.n_learned == 1000
            assert logistic.metrics.n == 1000
            assert svc2.join.stats.joined == 1000


async def test_drift_at_the_edge_is_detected_and_triggers_a_promotion(kafka_broker, tmp_path):
    cfg = make_config(
        kafka_broker,
        tmp_path,
        environment="development",
        api=ApiConfig(enabled=False),
        # margin 1.0: only a drift can trigger the second promotion
        promotion=PromotionConfig(
            min_samples=200, window=200, margin=1.0, min_samples_after_drift=150
        ),
        drift=DriftConfig(detector="ADWIN", params={"delta": 0.002}),
    )
    await _ensure_topics(kafka_broker, cfg)
    # one asset: the learner sees the drift where the shopfloor had it (samples of different
    # assets reach it in whatever order the consumer fetches their partitions)
    stream = Stream(seed=3, assets=("press-1",))
    promoted = []

    async with CloudService(cfg) as svc, EdgeProducer(kafka_broker, cfg.kafka.topics()) as edge:

        async def hook(entry):
            promoted.append(entry)

        svc.on_promotion.append(hook)
        # the edge runs version 1 (the rule that is right before the drift); after part 800
        # the shopfloor drifts and the edge's predictions go wrong
        parts = stream.parts(800, model_version=1)
        stream.drift()
        parts += stream.parts(700, model_version=1)
        await edge.send_parts(parts)
        await wait_until(lambda: svc.learned >= 1500, 60, "1500 samples learned")
        ml = svc.learners["quality"]
        assert ml.edge_frames > 100  # frames scored by the deployed version 1
        await svc.drain_hooks()

        drifts = svc.registry.drifts("quality")
        assert drifts, "no drift detected"
        assert drifts[-1]["source"] == "edge" and drifts[-1]["version"] == 1
        promotions = svc.registry.promotions("quality")
        reasons = [p["reason"] for p in reversed(promotions)]
        assert reasons[:2] == ["initial", "drift"] and set(reasons[1:]) == {"drift"}
        last = promotions[-2]
        assert last["from_version"] == 1 and last["to_version"] == 2
        assert last["evidence"]["drift"]["source"] == "edge"
        assert last["evidence"]["drift"]["samples_since"] >= 150
        assert drifts[-1]["promotion_id"] == last["id"]
        v2 = svc.registry.version("quality", 2)
        assert v2.parent == 1
        assert svc.registry.version("quality", 1).status == "retired"
        assert [e.version for e in promoted][:2] == [1, 2]
        # the challenger beat the drifted champion over the window when it was promoted ...
        assert last["evidence"]["gain"] > 0
        assert last["evidence"]["champion_source"] == "edge"
        # ... and the candidates went on to learn the new rule
        assert ml.challenger().metrics.rolling()["accuracy"] > 0.85


async def test_one_bad_record_is_quarantined_alone_never_its_whole_batch(kafka_broker, tmp_path):
    """Issue 13: an infinite label (or a timestamp beyond 64 bits) from some producer must cost
    only itself: the rest of its batch is learned, the record becomes a dead-letter event."""
    import msgpack

    from shared.records import DEAD_LETTER_RULE

    cfg = make_config(kafka_broker, tmp_path)
    await _ensure_topics(kafka_broker, cfg)
    stream = Stream()
    parts = stream.parts(400)
    async with CloudService(cfg) as svc, EdgeProducer(kafka_broker, cfg.kafka.topics()) as edge:
        await edge.send_batch(Kind.FRAME, [f for f, _ in parts])  # one frame batch per asset
        learned_before = svc.learned
        # the labels of press-1 as one batch whose record #3 carries an infinite target and
        # record #5 a timestamp beyond 64-bit nanoseconds: hand-made, as no Label would allow it
        labels = [lb for _, lb in parts if lb.asset == "press-1"]
        rows = [[0, lb.key, lb.ts_ns, lb.target] for lb in labels]
        rows[3][3] = float("inf")
        rows[5][2] = 2**63
        body = msgpack.packb(["edge-1", "inc-q", 9000, 0, ["press-1"], rows])
        await edge.send_raw(cfg.kafka.topics().labels, b"press-1", b"EL\x02\x04" + body)
        await wait_until(
            lambda: svc.learned - learned_before >= len(labels) - 2, 30, "the good labels learned"
        )
        await wait_until(lambda: svc.quarantined == 2, 10, "two records quarantined")
        await svc.checkpoint()
        events = [e for e in svc.registry.events(limit=50) if e["rule"] == DEAD_LETTER_RULE]
    assert svc.learned - learned_before == len(labels) - 2
    assert sum(svc.stats.poison.values()) == 0  # the batch itself was fine
    reasons = sorted(e["message"] for e in events)
    assert len(reasons) == 2
    assert "LABEL record #3" in reasons[0] and "finite" in reasons[0]
    assert "LABEL record #5" in reasons[1] and "ts_ns" in reasons[1]
    assert all(e["values"]["origin"] == "cloud" for e in events)
