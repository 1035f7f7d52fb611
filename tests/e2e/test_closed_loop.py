"""The closed loop on real parts: simulator (Modbus + MQTT quality station) -> edge agent ->
Tansu -> cloud (learn, promote, compile, parity, sign) -> models topic -> edge (verify, shadow,
swap). After the scripted material-lot drift the edge's accuracy drops; with promotion on it
recovers to within 3 points of its pre-drift level, with promotion off it stays degraded.

Accuracy is the edge's own: its frames' predictions joined with the labels it derived from the
quality station, read back from Kafka (edgeloop.stack.AccuracyMonitor).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from edgeloop.services import find_mosquitto
from edgeloop.stack import MODEL, LocalStack, StackConfig
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not on PATH")

SEED = 1
DRIFT_AT = 780.0  # scenario seconds; 26 s of wall time at speed 30
PRE = 200  # labelled frames before the drift that define the pre-drift level
AFTER = 400  # labelled frames scored by post-drift versions before measuring
MEASURE = 200  # the recovered (or degraded) level: the last MEASURE of those


def config(promotion: bool) -> StackConfig:
    return StackConfig(
        seed=SEED, speed=30.0, drift_at=DRIFT_AT, min_samples=300, promotion=promotion
    )


async def pre_drift_level(stack: LocalStack) -> tuple[float, int]:
    acc = stack.accuracy
    assert acc is not None
    drift_ns = stack.drift_ns()
    assert drift_ns is not None
    await wait_until(
        lambda: acc.accuracy(until_ns=drift_ns)[1] >= PRE and time.time_ns() > drift_ns,
        60,
        f"{PRE} scored, labelled frames before the drift",
    )
    level, _ = acc.accuracy(until_ns=drift_ns, last=PRE)
    version = [p.version for p in acc.points if p.ts_ns < drift_ns][-1]
    assert level is not None
    return level, version


async def test_edge_accuracy_recovers_after_drift_only_when_the_loop_is_closed() -> None:
    async with LocalStack(config(promotion=True)) as stack:
        acc = stack.accuracy
        pre, v_pre = await pre_drift_level(stack)
        drift_ns = stack.drift_ns()

        def after() -> list:
            return [p for p in acc.points if p.ts_ns >= drift_ns and p.version > v_pre]

        # the drop: the pre-drift model on post-drift parts
        await wait_until(
            lambda: acc.accuracy(since_ns=drift_ns, version=v_pre)[1] >= 40, 40, "post-drift parts"
        )
        dropped, _ = acc.accuracy(since_ns=drift_ns, version=v_pre)
        assert dropped < pre - 0.10, f"the drift did not hurt: {dropped:.3f} vs {pre:.3f}"

        await wait_until(lambda: len(after()) >= AFTER, 60, f"{AFTER} frames of a new version")
        recent = after()[-MEASURE:]
        recovered = sum(p.correct for p in recent) / len(recent)

        # the cloud decided it, compiled, gated, signed and pushed it
        versions = stack.cloud.registry.versions(MODEL)
        shipped = [v for v in versions if v.version > v_pre and v.artifact.get("manifest")]
        assert shipped, [v.as_dict() for v in versions]
        first = shipped[0]
        assert first.reason in ("drift", "margin")
        assert first.artifact["parity"]["passed"] and first.artifact["manifest"]["signature"]
        assert stack.agent.model_sync.swaps >= 2
        print(
            f"\npromotion on: pre-drift {pre:.3f} (v{v_pre}), after drift with v{v_pre} "
            f"{dropped:.3f}, recovered {recovered:.3f} over the last {len(recent)} frames of "
            f"v{sorted({p.version for p in recent})}; series {acc.series(100)}"
        )
        assert recovered >= pre - 0.03, f"recovered {recovered:.3f} < pre-drift {pre:.3f} - 0.03"


async def test_edge_accuracy_stays_degraded_without_promotion() -> None:
    async with LocalStack(config(promotion=False)) as stack:
        acc = stack.accuracy
        pre, v_pre = await pre_drift_level(stack)
        drift_ns = stack.drift_ns()
        await wait_until(
            lambda: acc.accuracy(since_ns=drift_ns)[1] >= AFTER - 100, 60, "post-drift parts"
        )
        degraded, n = acc.accuracy(since_ns=drift_ns, last=MEASURE)
        assert {p.version for p in acc.points} == {v_pre}  # nothing new was shipped
        print(f"\npromotion off: pre-drift {pre:.3f}, after drift {degraded:.3f} over {n} frames")
        assert degraded < pre - 0.10, f"expected a degraded edge, got {degraded:.3f} vs {pre:.3f}"
        await asyncio.sleep(0)
