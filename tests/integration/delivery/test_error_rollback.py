"""A valid but wrong model is rolled back by the edge on its own, from its own labels.

v2 is a real promotion (river pipeline -> compiled -> parity -> signed -> published) of a
pipeline trained on flipped labels: right inputs, no NaN, a clean shadow. Only the labels the
edge derives from the quality station show it is wrong; the edge compares v2's error rate with
v1's over its last labelled frames, rolls back to v1, reports why (Event on the events topic,
metric, heartbeat), and keeps refusing v2 while the cloud republishes it. A good v3 afterwards
passes the same watch.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from tests.integration.delivery.kit import MODEL, Rig
from tests.waiting import wait_until


def _rollbacks(reason: str) -> float:
    v = REGISTRY.get_sample_value(
        "edgeloop_edge_model_rollbacks_total", {"agent": "gw-1", "reason": reason}
    )
    return v or 0.0


async def test_a_wrong_model_is_rolled_back_on_its_error_rate_and_not_readopted(
    tmp_path: Path, kafka_broker: str
) -> None:
    before = _rollbacks("error")
    async with Rig(tmp_path, kafka_broker, labelled=True, watch_frames=60) as rig:
        sync = rig.agent.model_sync
        await rig.promote_river(1)
        await wait_until(lambda: rig.active() == 1, 30, "v1 active")
        # v1's outcomes on the edge: the baseline a successor is compared with
        await wait_until(lambda: sync.outcomes.last(1)[0] >= 60, 30, "60 labelled v1 frames")
        n1, wrong1 = sync.outcomes.last(1)
        assert wrong1 / n1 < 0.2, f"v1 should be good: {wrong1}/{n1} wrong"

        await rig.promote_river(2, flip=True)  # trained on inverted labels; ships fine
        await wait_until(lambda: sync.last_rollback is not None, 30, "automatic rollback")
        assert rig.active() == 1
        assert rig.agent.slot.previous is not None and rig.agent.slot.previous.version == 2
        rb = sync.last_rollback
        assert rb["from"] == 2 and rb["to"] == 1
        assert "error rate" in rb["reason"] and "v1's" in rb["reason"], rb["reason"]
        # it really was swapped in after a clean shadow: NaN-free, right inputs, only wrong
        swapped = [h for h in sync.history if h["outcome"] == "swapped" and h["version"] == 2]
        assert swapped and swapped[0]["shadow"]["nan"] == 0 and swapped[0]["shadow"]["errors"] == 0
        watch = sync.last_watch
        assert watch["outcome"] == "rolled_back" and watch["version"] == 2
        assert watch["labelled"] >= 30 and watch["error_rate"] > 0.8
        assert watch["baseline_version"] == 1 and watch["baseline_error_rate"] < 0.2
        assert _rollbacks("error") == before + 1
        status = sync.status()
        assert status["last_rollback"]["from"] == 2 and status["active"] == 1
        assert status["labels"]["extracted"] > 0 and status["labels"]["invalid"] == 0

        # the cloud hears it twice: the Event over the events topic, the heartbeat's status
        def rollback_event() -> dict | None:
            for e in rig.cloud.registry.events(asset="gw-1"):
                if e["rule"] == "model_rollback":
                    return e
            return None

        await wait_until(lambda: rollback_event() is not None, 20, "model_rollback event stored")
        event = rollback_event()
        assert "v2 rolled back to v1" in event["message"] and "error rate" in event["message"]
        await wait_until(
            lambda: (
                "gw-1" in rig.cloud.fleet
                and rig.cloud.fleet["gw-1"][0].models.get(MODEL) == 1
                and "error rate"
                in (
                    ((rig.cloud.fleet["gw-1"][0].info.get("model_sync") or {}).get("last_rollback"))
                    or {}
                ).get("reason", "")
            ),
            20,
            "heartbeat reporting v1 and the rollback's reason",
        )

        # v2 is still the cloud's champion and is published again; the edge does not retry it
        published = rig.delivery.published
        await wait_until(lambda: rig.delivery.published >= published + 2, 20, "republishes of v2")
        assert rig.delivery.current[MODEL].version == 2
        assert rig.active() == 1
        assert [h["version"] for h in sync.history if h["outcome"] == "swapped"].count(2) == 1

        # a good successor passes the same watch against the same baseline
        await rig.promote_river(3)
        await wait_until(lambda: rig.active() == 3, 30, "v3 swapped in")
        await wait_until(lambda: sync.last_watch["version"] == 3, 30, "v3's watch finished")
        assert sync.last_watch["outcome"] == "passed", sync.last_watch
        assert sync.last_watch["baseline_version"] == 1
        assert sync.last_watch["labelled"] >= 100  # watch_labels
        assert rig.active() == 3 and _rollbacks("error") == before + 1
