"""How every scenario runs: start the rig under load, inject the fault, settle, check.

Settling is part of the check, not a formality. After the fault, the load stops (the numbered
stream waits for its last acknowledgements, the simulator and the device are stopped) and the
run waits, with deadlines, for

1. every acknowledged MQTT number to be on the wire (the agent took everything Mosquitto owed),
2. the agent's outbox to hold no batch numbered before that moment — the cloud confirmed all of
   them on the control topic (the end-to-end acknowledgement works, or the row says it did not),
3. the agent to stop cleanly on SIGTERM, and the cloud to apply every batch the agent numbered
   (minus what the overflow policy dropped and a wipe destroyed),
4. the ledger to have read every partition to its end, and the cloud to stop cleanly,

and only then reads the outbox files and the cloud's audit rows. A deadline that passes is a
problem in the row (and whatever is missing shows up as lost); it never hangs the suite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.checker import History, OutboxFile, Row, check, read_applied, read_events
from tests.chaos.rig import AGENT_ID, RESTART_SEC, SEQ_ASSET, SEQ_TAG, Rig, RigOptions
from tests.waiting import wait_until, wait_until_async

log = logging.getLogger("chaos")

#: (rig, quick, rng) -> a short description of the faults injected
Faults = Callable[[Rig, bool, random.Random], Awaitable[str]]
#: extra checks after settling: (rig, history, row) -> problems found
Expect = Callable[[Rig, History, Row], Awaitable[list[str]]]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    faults: Faults
    options: RigOptions = field(default_factory=RigOptions)
    expect: Expect | None = None
    #: part of the quick subset that runs in ``make test``
    quick: bool = False


_RELEASED = re.compile(r"outbox full: released (\d+) batches")
_REPLAY = re.compile(r"replay \((?P<why>.*)\): (?P<n>\d+) sent batches queued to be sent again")


async def run_scenario(
    scn: Scenario, *, quick: bool, root: Path | None = None, seed: int = 13, keep: bool = False
) -> Row:
    """Run one scenario from scratch and check it; the work directory is removed unless
    ``keep`` or the row failed (its logs are the evidence)."""
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{scn.name}-", dir=root))
    row = Row(scn.name)
    rng = random.Random(f"{seed}:{scn.name}")
    rig = Rig(workdir, scn.options)
    try:
        async with rig:
            row.faults = await scn.faults(rig, quick, rng)
            rig.step("settling")
            await _settle(rig, row, quick)
            history = _history(rig)
            check(history, row)
            _logs(rig, row)
            if scn.expect is not None:
                row.problems += await scn.expect(rig, history, row)
    except Exception as exc:
        log.exception("scenario %s failed", scn.name)
        row.problems.append(f"the scenario could not run to its end: {type(exc).__name__}: {exc}")
    finally:
        await rig.close()
        for child in (rig.agent, rig.cloud, rig.sim, rig.device):
            if child is not None and child.unexpected_exits:
                exits = ", ".join(
                    f"code {code} at {time.strftime('%H:%M:%S', time.localtime(at))}"
                    for code, at in child.unexpected_exits
                )
                again = f" (restarted {child.restarts}x after {RESTART_SEC:g} s)"
                row.problems.append(
                    f"{child.name} exited on its own: {exits}" + (again if child.restarts else "")
                )
    row.duration_s = round(time.monotonic() - t0, 1)
    row.notes.append(f"work directory {workdir}")
    (workdir / "row.json").write_text(json.dumps(row.to_json(), indent=2, default=str))
    if row.ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return row


async def _settle(rig: Rig, row: Row, quick: bool) -> None:
    patience = 60.0 if quick else 120.0  # the deadlines of settling (s)
    assert rig.seq is not None and rig.agent is not None and rig.cloud is not None
    assert rig.ledger is not None
    ledger = rig.ledger
    await asyncio.to_thread(rig.seq.stop)
    for child in (rig.sim, rig.device):
        if child is not None:
            await asyncio.to_thread(child.stop, 10.0)
    # numbers the wiped disk held unsent can never arrive; those in dropped batches neither,
    # but which they were is not known: with drops, the wait is short (the checker judges)
    wiped = [OutboxFile.read(p / "outbox.db", AGENT_ID, wiped=True) for p in rig.wiped]
    unreachable = {v for ob in wiped for v in ob.unsent_values(SEQ_ASSET, SEQ_TAG)}
    acked = rig.seq.acked() - unreachable
    drops = rig.outbox_query("SELECT COUNT(*) FROM dropped")[0][0]

    def on_wire() -> bool:
        return not acked - set(ledger.tracked_values(set(ledger.seen), SEQ_ASSET, SEQ_TAG))

    try:
        await wait_until(
            on_wire,
            15.0 if drops else patience,
            "every acknowledged MQTT number on the wire",
            poll=0.5,
        )
    except AssertionError as exc:
        row.notes.append(str(exc))
    target = rig.outbox_next_seq()
    try:
        await wait_until(
            lambda: not rig.outbox_query("SELECT 1 FROM batches WHERE seq < ? LIMIT 1", (target,)),
            patience,
            f"the cloud to confirm every batch numbered below {target} (the outbox to drain)",
            poll=0.5,
        )
    except AssertionError as exc:
        (left,) = rig.outbox_query("SELECT COUNT(*) FROM batches WHERE seq < ?", (target,))[0]
        row.problems.append(f"{exc}: {left} batches still held")
        seen = await _evidence(rig, "settled")
        agent = seen.get("agent") or {}
        cloud = seen.get("cloud") or {}
        row.notes.append(
            f"the agent's control link said {agent.get('control')}; the cloud said "
            f"{cloud.get('status') if isinstance(cloud, dict) else cloud}: "
            f"{(cloud.get('reasons') if isinstance(cloud, dict) else None)}"
        )
    else:
        await _evidence(rig, "settled")
    ticks = await rig.agent_metric("edgeloop_edge_tick_errors_total")
    if ticks:
        row.problems.append(f"edgeloop_edge_tick_errors_total is {ticks:g}")
    elif ticks is None:
        row.problems.append("the agent's /metrics did not answer at the end")
    worst, why = rig.agent_worst
    if worst == "failing":
        row.problems.append(f"the agent's /healthz said failing: {why}")
    code = await asyncio.to_thread(rig.agent.stop, 30.0)
    if code != 0:
        row.problems.append(f"the agent exited with {code} on SIGTERM")

    def missing() -> int:
        h = _history(rig)
        probe = Row("settle")
        check(h, probe)
        return probe.lost

    try:
        await wait_until(
            lambda: missing() == 0, patience / 2, "the cloud to apply every batch", poll=1.0
        )
    except AssertionError as exc:
        row.notes.append(str(exc))
    try:
        await wait_until_async(ledger.caught_up, 30, "the ledger at the end of every partition")
    except AssertionError as exc:
        row.problems.append(str(exc))
    code = await asyncio.to_thread(rig.cloud.stop, 30.0)
    if code != 0:
        row.problems.append(f"the cloud exited with {code} on SIGTERM")


async def _evidence(rig: Rig, when: str) -> dict[str, Any]:
    """Keep both tiers' own view (/healthz) next to the logs: what they believed at ``when``."""
    doc = {
        "agent": await rig.agent_health(),
        "cloud": await rig.cloud_health(),
    }
    path = rig.workdir / f"health-{when}.json"
    await asyncio.to_thread(path.write_text, json.dumps(doc, indent=2, default=str))
    return doc


def _history(rig: Rig) -> History:
    assert rig.ledger is not None and rig.seq is not None
    outboxes = [OutboxFile.read(p / "outbox.db", AGENT_ID, wiped=True) for p in rig.wiped]
    outboxes.append(OutboxFile.read(rig.outbox_path(), AGENT_ID))
    return History(
        agent_id=AGENT_ID,
        outboxes=outboxes,
        applied=read_applied(rig.cloud_db),
        ledger=rig.ledger,
        acked=rig.seq.acked(),
        seq_asset=SEQ_ASSET,
        seq_tag=SEQ_TAG,
    )


def _logs(rig: Rig, row: Row) -> None:
    assert rig.agent is not None and rig.cloud is not None
    agent_log = rig.agent.log_text()
    cloud_log = rig.cloud.log_text()
    replays = [m for m in _REPLAY.finditer(agent_log)]
    row.replays = len(replays)
    if replays:
        row.notes.append(
            "agent replays: "
            + "; ".join(f"{m['why']} ({m['n']} batches)" for m in replays[:10])
            + (" ..." if len(replays) > 10 else "")
        )
    logged = sum(int(n) for n in _RELEASED.findall(agent_log))
    if logged:
        row.notes.append(f"the agent logged {logged} batches released to make room")
    row.log_losses = len(re.findall(r"Kafka log of \S+ lost", cloud_log))
    row.dead_letters = len(read_events(rig.cloud_db, AGENT_ID))
    for name, text in (("agent", agent_log), ("cloud", cloud_log)):
        lines = text.splitlines()
        at = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
        asyncua = sum(1 for i in at if i and "asyncua" in lines[i - 1])
        if at:
            row.notes.append(
                f"{len(at)} tracebacks in the {name} log ({asyncua} logged by asyncua)"
            )
        crit = len(re.findall(r" CRITICAL ", text))
        if crit:
            row.problems.append(f"{crit} CRITICAL lines in the {name} log")
    if rig.ledger is not None and rig.ledger.log_resets:
        row.notes.append(f"the ledger found {rig.ledger.log_resets} partition logs replaced")
    row.notes += rig.notes


async def under_load(rig: Rig, seconds: float) -> None:
    """Let the load run for ``seconds`` (the length of a phase, not synchronisation)."""
    await asyncio.sleep(seconds)
