"""The delivery path end to end on real parts: Tansu, the cloud service and its API, an agent.

Each bad delivery (tampered artifact, foreign signature, wrong inputs, NaN outputs) is refused or
rolled back while the previous model keeps serving; a lower version needs a signed rollback; an
agent that was offline catches up, and a restarted agent keeps its model.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
from river import compose, preprocessing, tree

from cloud.compile import compile_pipeline
from shared.manifest import ModelManifest, load_private_key, sign_manifest
from shared.records import now_ns
from tests.integration.delivery.kit import (
    FEATURES,
    MODEL,
    Rig,
    keypair,
    nan_model,
    trained_pipeline,
)
from tests.waiting import wait_until


async def forge(rig: Rig, version: int, blob: bytes, *, features=FEATURES, served=None, key=None):
    """Register ``version`` with the cloud's real registry/artifact store and publish a manifest
    for ``blob``, signed by the cloud key (or ``key``); the store may hold ``served`` instead."""
    d = rig.delivery
    reg = rig.cloud.registry
    entry = await asyncio.to_thread(
        reg.add_version,
        model=MODEL,
        task="classification",
        learner="forged",
        reason="user",
        pipeline=None,
        metrics={},
        features=list(features),
        steps=[],
        offsets={},
        status="candidate",
    )
    assert entry.version == version
    path = d.artifact_path(MODEL, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(served if served is not None else blob)
    sha = hashlib.sha256(blob).hexdigest()
    await asyncio.to_thread(reg.attach_artifact, MODEL, version, {"sha256": sha})
    manifest = ModelManifest(
        name=MODEL,
        version=version,
        features=tuple(features),
        output="label",
        sha256=sha,
        created=now_ns(),
        artifact_url=d.artifact_url(MODEL, version),
    )
    signed = sign_manifest(manifest, key) if key is not None else d.sign(manifest)
    await d.publish(signed)
    return signed


async def refused(rig: Rig, n: int, within: float = 20) -> dict:
    await wait_until(lambda: len(rig.refusals()) >= n, within, f"refusal #{n}")
    return rig.refusals()[n - 1]


async def test_promotions_are_compiled_signed_pushed_and_swapped_after_shadow(
    tmp_path: Path, kafka_broker: str
) -> None:
    async with Rig(tmp_path, kafka_broker) as rig:
        await rig.promote_river(1)
        await wait_until(lambda: rig.active() == 1, 30, "v1 active on the edge")
        v1 = rig.cloud.registry.version(MODEL, 1)
        assert v1.artifact["parity"]["passed"] and v1.artifact["parity"]["max_abs_diff"] <= 1e-5
        assert v1.artifact["manifest"]["signature"]
        await rig.promote_river(2)
        await wait_until(lambda: rig.active() == 2, 30, "v2 active on the edge")
        sync = rig.agent.model_sync
        swapped = [h for h in sync.history if h["outcome"] == "swapped"]
        assert swapped[-1]["version"] == 2
        shadow = swapped[-1]["shadow"]
        assert shadow["frames"] >= 10 and shadow["nan"] == 0 and shadow["agreement"] is not None
        assert rig.agent.slot.previous.version == 1  # kept for instant rollback
        # frames carry the version; the cloud sees it in the heartbeat
        await wait_until(
            lambda: (
                rig.cloud.fleet.get("gw-1", (None,))[0] is not None
                and rig.cloud.fleet["gw-1"][0].models.get(MODEL) == 2
            ),
            20,
            "heartbeat with v2 in the cloud",
        )

        # a lower version without a signed rollback is refused
        m1 = ModelManifest.from_json(v1.artifact["manifest"])
        await rig.delivery.publish(rig.delivery.sign(replace(m1, created=now_ns())))
        r = await refused(rig, 1)
        assert "not newer" in r["reason"] and rig.active() == 2

        # a signed rollback (API path: service.rollback -> hook) is accepted at once
        entry = await rig.cloud.rollback(MODEL)
        assert entry.version == 1 and entry.rollback
        await rig.cloud.drain_hooks(30)
        assert rig.delivery.current[MODEL].rollback
        await wait_until(lambda: rig.active() == 1, 20, "signed rollback to v1")
        assert rig.agent.slot.previous.version == 2


async def test_bad_deliveries_are_refused_and_the_previous_model_keeps_serving(
    tmp_path: Path, kafka_broker: str
) -> None:
    async with Rig(tmp_path, kafka_broker) as rig:
        await rig.promote_river(1)
        await wait_until(lambda: rig.active() == 1, 30, "v1 active")
        good, _ = trained_pipeline(5)
        blob = compile_pipeline(good, FEATURES, name=MODEL).onnx

        # 1. tampered artifact: the served bytes differ from the signed sha256
        tampered = bytearray(blob)
        tampered[len(tampered) // 2] ^= 0xFF
        await forge(rig, 2, blob, served=bytes(tampered))
        r = await refused(rig, 1)
        assert "sha256" in r["reason"] and "tampered" in r["reason"], r
        assert rig.active() == 1

        # 2. a manifest signed with another key: nothing is downloaded
        other, _ = keypair(tmp_path / "other", "other")
        await forge(rig, 3, blob, key=load_private_key(other.read_bytes()))
        r = await refused(rig, 2)
        assert "signature" in r["reason"], r
        assert rig.active() == 1

        # 3. a model with wrong inputs (three columns for a two-feature manifest)
        wide, _ = trained_pipeline(6)
        wide.learn_one({"x_last": 0.1, "y_last": 0.2, "z_last": 0.3}, True)
        wide_blob = compile_pipeline(wide, [*FEATURES, "z_last"], name=MODEL).onnx
        await forge(rig, 4, wide_blob)
        r = await refused(rig, 3)
        assert "load" in r["reason"] and "expected [batch, 2]" in r["reason"], r
        assert rig.active() == 1

        # 4. a model that outputs NaN is caught in shadow
        await forge(rig, 5, nan_model())
        r = await refused(rig, 4)
        assert "shadow" in r["reason"] and "NaN" in r["reason"], r
        assert rig.active() == 1

        # the previous model served throughout, and the edge reported every refusal
        await wait_until(
            lambda: rig.agent.frames_built > 0 and rig.agent.slot.current.version == 1,
            5,
            "v1 still scoring",
        )
        assert rig.agent.model_sync.status()["last_refusal"]["version"] == 5

        def refused_in_cloud() -> list[int]:
            rows = rig.cloud.registry.events(100)
            return sorted(r["values"]["version"] for r in rows if r["rule"] == "model_refused")

        await wait_until(
            lambda: refused_in_cloud() == [2, 3, 4, 5], 20, "refusal events in the cloud"
        )


async def test_nan_after_the_swap_rolls_back_automatically(
    tmp_path: Path, kafka_broker: str
) -> None:
    async with Rig(tmp_path, kafka_broker, watch_frames=400) as rig:
        await rig.promote_river(1)
        await wait_until(lambda: rig.active() == 1, 30, "v1 active")
        # NaN only for x > 5: clean in shadow, broken once the line changes
        await forge(rig, 2, nan_model(above=5.0))
        await wait_until(lambda: rig.active() == 2, 30, "v2 swapped in after a clean shadow")
        rig.feeder.force_x = 10.0
        await wait_until(lambda: rig.active() == 1, 20, "automatic rollback to v1")
        sync = rig.agent.model_sync
        assert sync.last_rollback["from"] == 2 and "NaN" in sync.last_rollback["reason"]
        assert sync.status()["last_rollback"]["to"] == 1
        # the cloud hears about it: the heartbeat shows v1 and carries the reason
        await wait_until(
            lambda: (
                "gw-1" in rig.cloud.fleet
                and rig.cloud.fleet["gw-1"][0].models.get(MODEL) == 1
                and (rig.cloud.fleet["gw-1"][0].info.get("model_sync") or {}).get("last_rollback")
            ),
            20,
            "heartbeat reporting the rollback",
        )
        # the cloud keeps republishing v2 (still its champion); the edge does not retry it
        rig.feeder.force_x = None
        await asyncio.sleep(0)  # let the feeder see the change
        await wait_until(lambda: rig.cloud.delivery.published >= 4, 20, "a republish of v2")
        assert rig.active() == 1


async def test_offline_agent_catches_up_and_a_restart_keeps_the_model(
    tmp_path: Path, kafka_broker: str
) -> None:
    async with Rig(tmp_path, kafka_broker) as rig:
        await rig.promote_river(1)
        await wait_until(lambda: rig.active() == 1, 30, "v1 active")
        await rig.stop_agent()
        await rig.promote_river(2)  # published while the agent is down
        agent = await rig.start_agent()
        assert agent.slot.current is not None and agent.slot.current.version == 1  # from disk
        await wait_until(lambda: rig.active() == 2, 30, "caught up to v2 on reconnect")
        await rig.stop_agent()
        agent = await rig.start_agent()
        assert agent.slot.current.version == 2 and agent.slot.previous.version == 1


async def test_unsupported_pipeline_cannot_ship_and_nothing_is_published(
    tmp_path: Path, kafka_broker: str
) -> None:
    async with Rig(tmp_path, kafka_broker) as rig:
        await rig.promote_river(1)
        await wait_until(lambda: rig.active() == 1, 30, "v1 active")
        published = rig.delivery.published
        model = compose.Pipeline(
            preprocessing.StandardScaler(), tree.HoeffdingAdaptiveTreeClassifier()
        )
        _, frames = trained_pipeline(9)
        for x in frames:
            model.learn_one(x, x["x_last"] > 0)
        rig.cloud.recent_frames[MODEL].extend(frames)
        await rig.promote_river(0, model=model)
        v2 = rig.cloud.registry.version(MODEL, 2)
        assert v2.status == "cannot_ship" and "not supported" in v2.status_reason
        assert rig.cloud.registry.champion(MODEL).version == 1  # the deployed one again
        assert rig.delivery.current[MODEL].version == 1
        assert rig.active() == 1
        assert rig.delivery.published >= published


@pytest.fixture(autouse=True)
def _quiet_onnxruntime() -> None:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
