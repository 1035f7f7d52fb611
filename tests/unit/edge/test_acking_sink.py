"""The connector contract's durability hook (protocols.base): an acking sink reports when readings
are durable; a plain sink or stream() counts as durable on delivery; the agent reports after its
outbox commit, and refuses (False) what its bounded queue cannot take."""

from __future__ import annotations

from collections.abc import Sequence

from edge.agent import Agent
from edge.config import EdgeConfig
from protocols.base import Connector, ConnectorConfig, DurableCallback
from shared.records import Reading, Value, now_ns


class Probe(Connector[ConnectorConfig]):
    kind = "probe"

    async def _run(self) -> None:  # pragma: no cover - never started
        raise NotImplementedError

    async def write(self, tag: str, value: Value) -> None:  # pragma: no cover
        raise NotImplementedError


def batch(n: int = 2) -> list[Reading]:
    return [Reading("m1", f"t{i}", now_ns(), float(i)) for i in range(n)]


def test_plain_sink_is_durable_on_return_and_acking_sink_decides() -> None:
    conn = Probe(ConnectorConfig(kind="probe", name="p"))
    got: list[Sequence[Reading]] = []
    verdicts: list[bool] = []
    conn.set_sink(got.append)  # a plain sink: unchanged behaviour
    conn._emit(batch(), verdicts.append)
    assert len(got) == 1 and verdicts == [True]
    conn._emit(batch())  # no callback at all: a connector with nothing to ack
    assert len(got) == 2

    held: list[DurableCallback] = []

    def acking(readings: Sequence[Reading], on_durable: DurableCallback) -> None:
        got.append(readings)
        held.append(on_durable)

    conn.set_sink(acking, acking=True)
    conn._emit(batch(), verdicts.append)
    assert verdicts == [True]  # not yet: the sink decides when
    held[0](True)
    assert verdicts == [True, True]
    conn._emit(batch())  # a connector without acks still works with an acking sink
    assert len(got) == 4 and len(held) == 2


async def test_agent_reports_durable_after_the_commit_and_refuses_overflow(tmp_path) -> None:
    cfg = EdgeConfig.model_validate(
        {
            "agent_id": "gw-ack",
            "state_dir": str(tmp_path / "s"),
            "queue_size": 100,
            "uplink": {"bootstrap_servers": "127.0.0.1:1"},
            "http": {"port": None},
        }
    )
    agent = Agent(cfg)
    sink = agent._make_sink("p")
    verdicts: list[tuple[str, bool]] = []
    await agent.outbox.start()
    try:
        sink(batch(60), lambda ok: verdicts.append(("a", ok)))
        sink(batch(60), lambda ok: verdicts.append(("b", ok)))  # 120 > queue_size: refused
        assert verdicts == [("b", False)]
        assert agent.outbox.records == 0
        await agent._tick()
        assert agent.outbox.records == 60  # committed ...
        assert verdicts == [("b", False), ("a", True)]  # ... and only then acknowledged
    finally:
        await agent.outbox.stop()
