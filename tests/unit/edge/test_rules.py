"""Rules: CEL conditions with for / cooldown / hysteresis, and their actions."""

from __future__ import annotations

import asyncio
import json

from edge.config import RuleConfig
from edge.rules import ActionRunner, RuleEngine
from edge.synthetic import SyntheticConfig, SyntheticConnector
from tests.waiting import wait_until

TS = 1_700_000_000_000_000_000


def rule(**kw):
    base = {"name": "hot", "when": "r.temp > 80.0"}
    base.update(kw)
    return RuleConfig.model_validate(base)


def ctx(temp, **extra):
    return {
        "asset": "m1",
        "r": {"temp": temp},
        "age": {},
        "f": {},
        "has_frame": False,
        "prediction": -1.0,
        "score": -1.0,
        **extra,
    }


def fired(firings):
    return [("clear" if f.cleared else "fire") for f in firings]


def test_fires_once_when_the_condition_starts_holding_and_clears_when_it_stops():
    eng = RuleEngine([rule(message="{asset} at {temp}")])
    assert fired(eng.evaluate("m1", ctx(70.0), 0.0, TS)) == []
    (f,) = eng.evaluate("m1", ctx(85.0), 1.0, TS)
    assert not f.cleared and f.event is not None
    assert f.event.rule == "hot" and f.event.asset == "m1" and f.event.message == "m1 at 85.0"
    assert f.event.values == {"temp": 85.0}
    assert fired(eng.evaluate("m1", ctx(90.0), 2.0, TS)) == []  # still active: no refire
    assert fired(eng.evaluate("m1", ctx(70.0), 3.0, TS)) == ["clear"]


def test_for_requires_the_condition_to_hold_that_long():
    eng = RuleEngine([rule(**{"for": 2.0})])
    assert fired(eng.evaluate("m1", ctx(85.0), 0.0, TS)) == []
    assert fired(eng.evaluate("m1", ctx(85.0), 1.5, TS)) == []
    assert fired(eng.evaluate("m1", ctx(70.0), 1.8, TS)) == []  # dipped: the timer restarts
    assert fired(eng.evaluate("m1", ctx(85.0), 2.0, TS)) == []
    assert fired(eng.evaluate("m1", ctx(85.0), 3.9, TS)) == []
    assert fired(eng.evaluate("m1", ctx(85.0), 4.0, TS)) == ["fire"]
    assert eng.watched_assets() == {"m1"}


def test_cooldown_suppresses_refiring():
    eng = RuleEngine([rule(cooldown=10.0)])
    assert fired(eng.evaluate("m1", ctx(85.0), 0.0, TS)) == ["fire"]
    assert fired(eng.evaluate("m1", ctx(70.0), 1.0, TS)) == ["clear"]
    assert fired(eng.evaluate("m1", ctx(85.0), 2.0, TS)) == []
    assert fired(eng.evaluate("m1", ctx(85.0), 10.5, TS)) == ["fire"]


def test_hysteresis_stays_active_until_the_clear_condition_holds():
    eng = RuleEngine([rule(clear="r.temp < 75.0")])
    assert fired(eng.evaluate("m1", ctx(85.0), 0.0, TS)) == ["fire"]
    assert fired(eng.evaluate("m1", ctx(78.0), 1.0, TS)) == []  # below 80, above 75: active
    assert fired(eng.evaluate("m1", ctx(81.0), 2.0, TS)) == []
    assert fired(eng.evaluate("m1", ctx(74.0), 3.0, TS)) == ["clear"]


def test_rules_see_predictions_and_frame_features_and_match_assets():
    eng = RuleEngine(
        [
            rule(
                name="defect",
                when="has_frame && score > 0.8 && f.temp_mean > 1.0",
                assets=["press-*"],
            )
        ]
    )
    c = ctx(1.0, has_frame=True, score=0.9, f={"temp_mean": 2.0})
    assert eng.evaluate("m1", c, 0.0, TS) == []  # not a press
    (f,) = eng.evaluate("press-1", c, 0.0, TS)
    assert f.event.values == {"f_temp_mean": 2.0, "score": 0.9, "prediction": -1.0}


def test_evaluation_errors_count_as_false_and_are_counted():
    seen = []
    eng = RuleEngine([rule(when="r.pressure > 1.0")], on_error=seen.append)
    assert eng.evaluate("m1", ctx(85.0), 0.0, TS) == []
    assert seen == ["hot"] and eng.errors == {"hot": 1} and "pressure" in eng.last_error["hot"]
    guarded = RuleEngine([rule(when="has(r.pressure) && r.pressure > 1.0")])
    assert guarded.evaluate("m1", ctx(85.0), 0.0, TS) == [] and guarded.errors == {}


async def test_write_action_writes_on_fire_and_on_clear():
    conn = SyntheticConnector(SyntheticConfig(name="plc", writable=["lamp"]))
    results = []
    eng = RuleEngine(
        [
            rule(
                actions=[
                    {
                        "type": "write",
                        "connector": "plc",
                        "tag": "lamp",
                        "value": True,
                        "on_clear": False,
                    }
                ]
            )
        ]
    )
    async with ActionRunner({"plc": conn}, on_result=lambda *a: results.append(a)) as runner:
        for f in eng.evaluate("m1", ctx(85.0), 0.0, TS):
            runner.dispatch(f)
        await wait_until(lambda: len(conn.written) == 1, 5, "the alarm write")
        for f in eng.evaluate("m1", ctx(20.0), 1.0, TS):
            runner.dispatch(f)
        await wait_until(lambda: len(conn.written) == 2, 5, "the clearing write")
    assert conn.written == [("lamp", True), ("lamp", False)]
    assert results == [("hot", "write", True), ("hot", "write", True)]


async def test_failed_write_is_reported_not_raised():
    conn = SyntheticConnector(SyntheticConfig(name="plc", writable=[]))
    results = []
    eng = RuleEngine(
        [rule(actions=[{"type": "write", "connector": "plc", "tag": "lamp", "value": True}])]
    )
    async with ActionRunner({"plc": conn}, on_result=lambda *a: results.append(a)) as runner:
        for f in eng.evaluate("m1", ctx(85.0), 0.0, TS):
            runner.dispatch(f)
        await wait_until(lambda: results, 5, "the write outcome")
    assert results == [("hot", "write", False)]


class _Hook:
    """A real HTTP server on a free port: answers 503 to the first ``fail`` requests, then 200."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.bodies: list[dict] = []
        self.server: asyncio.Server | None = None

    async def _handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        body = await reader.readexactly(length)
        self.bodies.append(json.loads(body))
        status = b"503 Busy" if len(self.bodies) <= self.fail else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


async def test_webhook_retries_then_delivers_the_event():
    results = []
    hook = _Hook(fail=2)
    async with hook as url:
        eng = RuleEngine(
            [
                rule(
                    severity="critical",
                    actions=[
                        {"type": "webhook", "url": url, "retries": 3, "backoff": 0.05, "timeout": 2}
                    ],
                )
            ]
        )
        async with ActionRunner({}, on_result=lambda *a: results.append(a)) as runner:
            for f in eng.evaluate("m1", ctx(85.0), 0.0, TS):
                runner.dispatch(f)
            await wait_until(lambda: results, 10, "the webhook outcome")
    assert results == [("hot", "webhook", True)]
    assert len(hook.bodies) == 3  # two 503s, then delivered
    body = hook.bodies[-1]
    assert body["rule"] == "hot" and body["asset"] == "m1" and body["severity"] == "critical"
    assert body["temp"] == 85.0 and body["cleared"] is False


async def test_webhook_gives_up_after_its_retries():
    results = []
    async with _Hook(fail=100) as url:
        eng = RuleEngine(
            [
                rule(
                    actions=[
                        {"type": "webhook", "url": url, "retries": 1, "backoff": 0.05, "timeout": 2}
                    ]
                )
            ]
        )
        async with ActionRunner({}, on_result=lambda *a: results.append(a)) as runner:
            for f in eng.evaluate("m1", ctx(85.0), 0.0, TS):
                runner.dispatch(f)
            await wait_until(lambda: results, 10, "the webhook outcome")
    assert results == [("hot", "webhook", False)]


def test_context_projection_keeps_only_what_the_rules_can_read():
    from edge.rules import projection

    p = projection(["has(r.temp) && r.temp > age.temp", "has_frame && f.temp_mean > 3.0"])
    assert p == {"r": {"temp"}, "age": {"temp"}, "f": {"temp_mean"}}
    # any other use of a map needs all of it: index, size(), macros
    assert projection(['r["temp"] > 1.0'])["r"] is None
    assert projection(["size(f) > 0 && r.temp > 1.0"]) == {"r": {"temp"}, "f": None, "age": set()}
    assert projection(["r.exists(k, k == 'temp')"])["r"] is None
    assert projection(["r .temp > 1.0"])["r"] is None  # unusual spacing: be safe


async def test_projected_context_gives_the_same_verdicts(tmp_path):
    from edge.agent import Agent
    from edge.config import EdgeConfig
    from shared.records import Reading, now_ns

    cfg = EdgeConfig.model_validate(
        {
            "agent_id": "gw-proj",
            "state_dir": str(tmp_path / "s"),
            "rules": [
                {"name": "hot", "when": "has(r.temp) && r.temp > 80.0 && age.temp < 60.0"},
                {"name": "any", "when": "size(r) > 2"},  # needs the whole map
            ],
            "uplink": {"bootstrap_servers": "127.0.0.1:1"},
            "http": {"port": None},
        }
    )
    agent = Agent(cfg)
    assert agent.rules.needs["r"] is None  # "size(r)" forces the full map for r
    await agent.outbox.start()
    try:
        ts = now_ns()
        agent.ingest("x", [Reading("m1", t, ts, 90.0) for t in ("temp", "a", "b")])
        await agent._tick()
        assert sorted(e.rule for e in await _events(agent)) == ["any", "hot"]
    finally:
        await agent.outbox.stop()


async def _events(agent):
    from shared.records import Event

    return [
        r
        for b in await agent.outbox.claim(after_seq=0, max_batches=100)
        for r in b.records
        if isinstance(r, Event)
    ]
