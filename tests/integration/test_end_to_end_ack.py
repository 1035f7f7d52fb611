"""Nothing lost end to end: a real agent, a real cloud and a real (memory-only) Tansu broker.

A broker acknowledgement is not the end of the line. These tests lose the broker's log under
load and wipe a gateway's state directory, then hold what the cloud applied (its audit rows,
written in the checkpoint that covers them) against every batch the agent numbered.
"""

from __future__ import annotations

import shutil
import sqlite3
import uuid
from collections import Counter
from pathlib import Path

import pytest

from cloud.config import ApiConfig, CloudConfig, ControlConfig, DatabaseConfig, KafkaConfig
from cloud.service import NEW_INCARNATION_RULE, CloudService
from edge.agent import Agent
from edge.config import EdgeConfig
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def cloud_config(bootstrap: str, tmp_path: Path, prefix: str) -> CloudConfig:
    return CloudConfig(
        environment="development",
        kafka=KafkaConfig(
            bootstrap_servers=bootstrap,
            topic_prefix=prefix,
            group_id=f"g-{prefix}",
            session_timeout_s=2,
            request_timeout_s=5,
            metadata_max_age_s=1,
        ),
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'cloud.db'}"),
        api=ApiConfig(enabled=False),
        checkpoint_interval_s=0.3,
        metrics_snapshot_s=60,
        audit_applied=True,
        control=ControlConfig(log_check_interval_s=0.5, republish_after_s=2),
    )


def agent_config(bootstrap: str, state: Path, prefix: str, agent_id: str = "gw-e2e") -> EdgeConfig:
    return EdgeConfig.model_validate(
        {
            "agent_id": agent_id,
            "state_dir": str(state),
            # 2 assets x 11 tags every 20 ms: ~1,100 readings/s in ~100 batches/s
            "connectors": [
                {
                    "kind": "synthetic",
                    "name": "load",
                    "assets": ["m1", "m2"],
                    "tags": [f"t{i}" for i in range(10)],
                    "interval": 0.02,
                    "cycle": 0.5,
                }
            ],
            "uplink": {
                "bootstrap_servers": bootstrap,
                "topic_prefix": prefix,
                "linger_ms": 5,
                "request_timeout_ms": 2000,
                "batch_size": 50,
                "backoff": {"initial": 0.1, "max": 1.0},
            },
            "http": {"port": None},
            "heartbeat_interval": 1.0,
        }
    )


def applied(svc: CloudService, agent: str) -> Counter[tuple[str, int]]:
    return Counter((r["incarnation"], r["batch_seq"]) for r in svc.registry.applied_batches(agent))


async def test_broker_that_loses_its_log_loses_nothing_end_to_end(tmp_path, kafka_broker_factory):
    """Defect 1 of issue 13: the broker stops under load and comes back empty. The cloud must
    notice its committed positions point past the new log, start over from what the broker has,
    and get the agent to resend what the broker lost; the agent must still hold it."""
    broker = kafka_broker_factory()
    prefix = f"e2e{uuid.uuid4().hex[:6]}"
    async with CloudService(cloud_config(broker.bootstrap, tmp_path, prefix)) as svc:
        agent = Agent(agent_config(broker.bootstrap, tmp_path / "state", prefix))
        try:
            await agent.start()
            inc = agent.outbox.incarnation
            await wait_until(lambda: len(applied(svc, "gw-e2e")) >= 100, 60, "100 batches applied")
            # batches the broker acked but the cloud had not read yet are in flight right now:
            # the broker dies with them (memory-only: a restart forgets even acked records)
            broker.stop()
            during = agent.accepted_readings
            await wait_until(
                lambda: agent.accepted_readings > during + 3000, 30, "the agent working on"
            )
            broker.start()  # same port, empty
            await wait_until(
                lambda: svc.log_losses or agent.outbox.requeued, 60, "the lost log noticed"
            )
            await agent.connectors["load"].stop()  # no new readings: a fixed target
            target = agent.outbox.next_seq
            try:
                await wait_until(
                    lambda: all((inc, s) in applied(svc, "gw-e2e") for s in range(1, target)),
                    90,
                    "every batch the agent numbered applied in the cloud",
                )
            except AssertionError:
                got = applied(svc, "gw-e2e")
                missing = [s for s in range(1, target) if (inc, s) not in got]
                consumer = svc._consumer
                db = sqlite3.connect(tmp_path / "state" / "outbox.db")
                held = db.execute(
                    "SELECT seq, kind, part, off, sent, sends FROM batches ORDER BY seq LIMIT 30"
                ).fetchall()
                db.close()
                windows = {
                    k: (w.floor, w.encode()[-200:])
                    for k in svc.seqs.keys_of("gw-e2e")
                    if (w := svc.seqs.get(k)) is not None
                }
                raise AssertionError(
                    f"missing {len(missing)} of {target - 1}: {missing[:20]}...; "
                    f"cloud {svc.health()} positions {svc.offsets()} "
                    f"assigned {sorted(consumer.assignment()) if consumer else None}; "
                    f"agent {agent.health()}; outbox {held}; dedupe {windows}"
                ) from None
            # the cloud noticed, counted and answered it too (the agent may have been faster)
            await wait_until(lambda: svc.log_losses, 30, "the cloud to notice the lost log")
        finally:
            await agent.stop(flush_timeout=2)
    got = applied(svc, "gw-e2e")
    twice = {k: n for k, n in got.items() if n > 1}
    assert not twice, f"applied more than once: {sorted(twice)[:10]}"
    assert not agent.outbox.dropped
    # it took the end-to-end acknowledgement: the broker had lost batches it acknowledged
    assert agent.outbox.requeued > 0
    assert svc.replays_requested > 0
    assert agent.tick_errors == 0 and agent.failure is None and svc.failure is None


async def test_gateway_that_lost_its_state_is_a_new_incarnation_not_a_replay(
    tmp_path, kafka_broker_factory
):
    """Defect 3 of issue 13: same agent_id, state directory wiped. The new outbox numbers from 1
    again; the cloud must apply those batches (a new incarnation), not drop them as duplicates."""
    broker = kafka_broker_factory()
    prefix = f"inc{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    async with CloudService(cloud_config(broker.bootstrap, tmp_path, prefix)) as svc:
        async with Agent(agent_config(broker.bootstrap, state, prefix, "gw-wiped")) as agent:
            first = agent.outbox.incarnation
            await wait_until(
                lambda: len(applied(svc, "gw-wiped")) >= 200, 60, "200 batches of the first life"
            )
        shutil.rmtree(state)  # a new SD card
        agent = Agent(agent_config(broker.bootstrap, state, prefix, "gw-wiped"))
        try:
            await agent.start()
            second = agent.outbox.incarnation
            assert second != first
            await wait_until(
                lambda: agent.outbox.next_seq > 60, 30, "the second life numbering batches"
            )
            await agent.connectors["load"].stop()
            target = agent.outbox.next_seq
            await wait_until(
                lambda: all((second, s) in applied(svc, "gw-wiped") for s in range(1, target)),
                60,
                "every batch of the new incarnation applied",
            )
            await wait_until(
                lambda: any(
                    e["rule"] == NEW_INCARNATION_RULE for e in svc.registry.events(asset="gw-wiped")
                ),
                10,
                "the new incarnation recorded",
            )
            await wait_until(
                lambda: svc.fleet["gw-wiped"][0].info["outbox"]["incarnation"] == second,
                10,
                "the fleet showing the new incarnation",
            )
        finally:
            await agent.stop(flush_timeout=2)
    got = applied(svc, "gw-wiped")
    assert max(n for n in got.values()) == 1
    assert {s for (i, s) in got if i == second} >= set(range(1, target))
    event = next(
        e for e in svc.registry.events(asset="gw-wiped") if e["rule"] == NEW_INCARNATION_RULE
    )
    assert event["values"] == {"incarnation": second, "previous": first}


async def test_cloud_restart_and_agent_restart_confirm_what_was_applied(
    tmp_path, kafka_broker_factory
):
    """The acknowledgement survives restarts on both sides: batches applied while the agent was
    down are confirmed when it comes back (it resumes the control topic where it stopped),
    and a restarted cloud confirms from its checkpoint."""
    broker = kafka_broker_factory()
    prefix = f"rst{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    cfg = cloud_config(broker.bootstrap, tmp_path, prefix)
    async with CloudService(cfg) as svc:
        async with Agent(agent_config(broker.bootstrap, state, prefix, "gw-rst")) as agent:
            await wait_until(lambda: len(applied(svc, "gw-rst")) >= 50, 60, "50 applied")
        last = agent.outbox.next_seq - 1  # the stop sent its last batches: unconfirmed yet
        await wait_until(
            lambda: len(applied(svc, "gw-rst")) >= last, 30, "all applied while the agent is down"
        )
    assert agent.outbox.batches > 0  # confirmations it has not read yet
    async with CloudService(cfg) as svc:
        agent = Agent(agent_config(broker.bootstrap, state, prefix, "gw-rst"))
        try:
            await agent.start()
            await wait_until(
                lambda: agent.outbox.low_seq is None or agent.outbox.low_seq > last,
                30,
                "the batches of the first run confirmed after the restart",
            )
        finally:
            await agent.stop(flush_timeout=2)
    assert max(applied(svc, "gw-rst").values()) == 1
