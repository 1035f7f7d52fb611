"""``edgeloop demo``: the whole closed loop on one machine, on embedded defaults.

Starts the Tansu Kafka-protocol broker, an MQTT broker (Mosquitto when installed, else amqtt),
the factory simulator with a scripted drift, the cloud service with its dashboard, and one edge
agent (``edgeloop.stack.LocalStack``), then shows a live status until Ctrl-C — or, with
``--duration``, runs headless for that long and writes a JSON report (``--report``) that says
what reached the cloud, what was lost or duplicated, how the edge's accuracy moved around the
drift, and which models were pushed and how fast. With ``--report`` the exit status is 1 when
the run missed a promise (a lost reading, no drift detected, no model pushed, or no recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from edgeloop.services import port_is_free

__all__ = ["DemoSnapshot", "demo", "run_demo"]

DEFAULT_API_PORT = 8080
PRE_DRIFT_FRAMES = 200  # labelled frames before the drift that define the pre-drift level
FINAL_FRAMES = 150  # labelled frames at the end that define the final level
RECOVERY_POINTS = 0.03  # final accuracy must be within this of the pre-drift level


class DemoSnapshot:
    """What the live status shows, read from the running stack (cheap; called twice a second)."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self._last: tuple[float, int] | None = None
        self.readings_per_s = 0.0

    def read(self) -> dict[str, Any]:
        from edgeloop.stack import MODEL

        st = self.stack
        agent, cloud, acc = st.agent, st.cloud, st.accuracy
        now = time.monotonic()
        accepted = int(agent.accepted_readings)
        if self._last is not None and now > self._last[0]:
            self.readings_per_s = (accepted - self._last[1]) / (now - self._last[0])
        self._last = (now, accepted)
        champion = cloud.registry.champion(MODEL)
        learner = cloud.learners.get(MODEL)
        challenger = learner.challenger() if learner is not None else None
        drifts = cloud.registry.drifts(MODEL)
        return {
            "scenario_s": st.scenario_time(),
            "drift_at": st.config.drift_at,
            "readings_per_s": self.readings_per_s,
            "readings_accepted": accepted,
            "readings_received": int(cloud.stats.records.get(st.topics.telemetry, 0)),
            "frames_built": int(agent.frames_built),
            "frames_scored": len(acc.points) if acc is not None else 0,
            "outbox_depth": int(agent.outbox.records),
            "edge_accuracy": acc.rolling() if acc is not None else None,
            "edge_version": st.edge_version(),
            "champion": None if champion is None else champion.version,
            "challenger": None if challenger is None else challenger.name,
            "drift_detections": len(drifts),
            "model_swaps": int(agent.model_sync.swaps) if agent.model_sync is not None else 0,
            "dashboard": st.endpoints.get("api", "") + "/dashboard/",
        }


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f} %"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _render(s: dict[str, Any]) -> Any:
    from rich.panel import Panel
    from rich.table import Table

    drift = s["drift_at"]
    phase = (
        "no drift scripted"
        if drift is None
        else (f"drift at {drift:.0f} s" if s["scenario_s"] < drift else "after the drift")
    )
    t = Table.grid(padding=(0, 2))
    t.add_column(justify="right", style="bold")
    t.add_column()
    rows = [
        ("scenario time", f"{s['scenario_s']:.0f} s ({phase})"),
        ("readings/s", _fmt(s["readings_per_s"])),
        (
            "readings accepted / in cloud",
            f"{_fmt(s['readings_accepted'])} / {_fmt(s['readings_received'])}",
        ),
        (
            "frames built / scored+labelled",
            f"{_fmt(s['frames_built'])} / {_fmt(s['frames_scored'])}",
        ),
        ("outbox depth", _fmt(s["outbox_depth"])),
        ("edge rolling accuracy", _fmt(s["edge_accuracy"], pct=True)),
        ("edge model", f"v{s['edge_version']}" if s["edge_version"] else "none yet"),
        ("champion / best challenger", f"{_fmt(s['champion'])} / {_fmt(s['challenger'])}"),
        ("drift detections", _fmt(s["drift_detections"])),
        ("model swaps on the edge", _fmt(s["model_swaps"])),
        ("dashboard", s["dashboard"]),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return Panel(t, title="edgeloop demo — Ctrl-C stops everything", border_style="cyan")


async def _final_flush(stack: Any, within: float = 20.0) -> dict[str, int]:
    """Stop the agent (it flushes its outbox), then wait for the cloud to have every reading."""
    agent, cloud = stack.agent, stack.cloud
    await agent.stop(flush_timeout=min(within, 10.0))
    accepted = int(agent.accepted_readings)
    unsent = int(agent.outbox.records)
    deadline = time.monotonic() + within
    telemetry = stack.topics.telemetry
    while time.monotonic() < deadline:
        if int(cloud.stats.records.get(telemetry, 0)) >= accepted:
            break
        await asyncio.sleep(0.1)
    received = int(cloud.stats.records.get(telemetry, 0))
    return {
        "accepted_by_edge": accepted,
        "received_by_cloud": received,
        "left_in_edge_outbox_rows": unsent,
        # accepted but never received: what is still in the outbox (on disk, sent on the next
        # start) counts here too, so a clean run shows 0 with an empty outbox
        "lost": max(accepted - received, 0),
        "duplicates_delivered_and_dropped": int(cloud.stats.dedupe_dropped.get(telemetry, 0)),
        "duplicates_applied": max(received - accepted, 0),
    }


def build_report(stack: Any, readings: dict[str, int], started: float) -> dict[str, Any]:
    """The JSON summary of a run (see the module docstring)."""
    from edgeloop.stack import MODEL

    acc = stack.accuracy
    cloud = stack.cloud
    drift_ns = stack.drift_ns()
    pre = acc.accuracy(until_ns=drift_ns, last=PRE_DRIFT_FRAMES) if drift_ns else (None, 0)
    series = acc.series(step=25)
    after = [a for ts, a, _ in series if drift_ns is not None and ts >= drift_ns]
    final = acc.accuracy(last=FINAL_FRAMES)
    promotions = sorted(cloud.registry.promotions(MODEL), key=lambda p: p["ts_ns"])
    history = list(stack.agent.model_sync.history) if stack.agent.model_sync is not None else []
    activated = {
        h["version"]: h["ts_ns"]
        for h in history
        if h.get("outcome") in ("swapped", "rolled_back") and "version" in h
    }
    versions = {v.version: v for v in cloud.registry.versions(MODEL)}
    models = []
    latencies = []
    for p in promotions:
        v = p["to_version"]
        entry = versions.get(v)
        active_ns = activated.get(v)
        latency = None if active_ns is None else (active_ns - p["ts_ns"]) / 1e9
        if latency is not None and latency >= 0:
            latencies.append(latency)
        models.append(
            {
                "version": v,
                "from_version": p["from_version"],
                "reason": p["reason"],
                "promoted_at_ns": p["ts_ns"],
                "status": None if entry is None else entry.status,
                "shipped": bool(entry and entry.artifact.get("manifest")),
                "active_on_edge_at_ns": active_ns,
                "push_latency_s": latency,
            }
        )
    drifts = [
        {
            "ts_ns": d["ts_ns"],
            "source": d["source"],
            "detector": d["detector"],
            "version": d["version"],
        }
        for d in sorted(cloud.registry.drifts(MODEL), key=lambda d: d["ts_ns"])
    ]
    pushed = [m for m in models if m["shipped"] and m["active_on_edge_at_ns"] is not None]
    pre_acc, final_acc = pre[0], final[0]
    checks = {
        "zero_lost_readings": readings["lost"] == 0 and readings["duplicates_applied"] == 0,
        "drift_detected": bool(drifts),
        "model_pushed_after_first": len(pushed) >= 2,
        "recovered_within_3_points": (
            pre_acc is not None and final_acc is not None and final_acc >= pre_acc - RECOVERY_POINTS
        ),
    }
    return {
        "duration_s": round(time.monotonic() - started, 1),
        "config": {
            "seed": stack.config.seed,
            "machines": stack.config.machines,
            "speed": stack.config.speed,
            "drift_at_scenario_s": stack.config.drift_at,
            "promotion": stack.config.promotion,
        },
        "drift_wall_ns": drift_ns,
        "readings": readings,
        "frames": {"built": int(stack.agent.frames_built), "scored_and_labelled": len(acc.points)},
        "accuracy": {
            "pre_drift": pre_acc,
            "pre_drift_frames": pre[1],
            "min_after_drift": min(after) if after else None,
            "final": final_acc,
            "final_frames": final[1],
            "series": [{"ts_ns": ts, "rolling": a, "version": v} for ts, a, v in series],
        },
        "models": models,
        "push_latencies_s": latencies,
        "drift_detections": drifts,
        "checks": checks,
        "ok": all(checks.values()),
    }


async def run_demo(
    *,
    duration: float | None,
    report: Path | None,
    live: bool,
    seed: int,
    speed: float,
    drift_at: float,
    machines: int,
    api_port: int | None,
    promotion: bool,
    mqtt: str = "auto",
) -> dict[str, Any] | None:
    from rich.console import Console
    from rich.live import Live

    from edgeloop.stack import LocalStack, StackConfig

    console = Console(stderr=True)
    port = api_port
    if port is None:
        port = DEFAULT_API_PORT if port_is_free(DEFAULT_API_PORT) else 0
    cfg = StackConfig(
        seed=seed,
        machines=machines,
        speed=speed,
        drift_at=drift_at,
        promotion=promotion,
        mqtt_broker=mqtt,  # type: ignore[arg-type]
        # a wider promotion window than the e2e test's: a challenger has to prove itself over
        # 200 parts, which leaves ADWIN (a little more sensitive than river's default) the
        # samples it needs to see the drift in the deployed model's error stream first
        promotion_window=200,
        # a first champion learned on 300 parts (not 150): a weak one loses little to the drift,
        # so its error stream barely moves and a margin promotion answers before ADWIN can
        min_samples=300,
        extra_cloud={"api": {"port": port}, "drift": {"params": {"delta": 0.05}}},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    result: dict[str, Any] | None = None
    console.print(
        "[bold]edgeloop demo[/]: starting Kafka (Tansu), MQTT, simulator, cloud and edge…"
    )
    try:
        async with LocalStack(cfg) as stack:
            snap = DemoSnapshot(stack)
            ends = None if duration is None else started + duration
            for name, url in stack.endpoints.items():
                console.print(f"  {name:<6} {url}")
            console.print(f"  dashboard {stack.endpoints.get('api', '')}/dashboard/\n")

            async def wait_tick(seconds: float) -> None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=seconds)

            def done() -> bool:
                return stop.is_set() or (ends is not None and time.monotonic() >= ends)

            if live:
                with Live(_render(snap.read()), console=console, refresh_per_second=4) as view:
                    while not done():
                        await wait_tick(0.5)
                        view.update(_render(snap.read()))
            else:
                last_print = 0.0
                while not done():
                    await wait_tick(0.5)
                    s = snap.read()
                    if time.monotonic() - last_print >= 10:
                        last_print = time.monotonic()
                        console.print(
                            f"t={s['scenario_s']:.0f}s readings/s={s['readings_per_s']:.0f} "
                            f"outbox={s['outbox_depth']} edge_acc={_fmt(s['edge_accuracy'], True)} "
                            f"edge=v{s['edge_version']} champion=v{s['champion']} "
                            f"drifts={s['drift_detections']} swaps={s['model_swaps']}"
                        )
            if report is not None:
                console.print("flushing the edge outbox and waiting for the cloud…")
                readings = await _final_flush(stack)
                result = build_report(stack, readings, started)
                await asyncio.to_thread(report.write_text, json.dumps(result, indent=2))
                console.print(f"report written to {report}: checks {result['checks']}")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    console.print("edgeloop demo: stopped cleanly.")
    return result


@click.command()
@click.option("--duration", type=float, help="Run headless for this many seconds, then stop.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a JSON summary at the end (exit 1 when a check fails).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--speed", type=float, default=30.0, show_default=True, help="Scenario seconds per wall second."
)
@click.option(
    "--drift-at",
    type=float,
    default=780.0,
    show_default=True,
    help="Scripted drift, scenario seconds.",
)
@click.option("--machines", type=int, default=8, show_default=True)
@click.option(
    "--api-port",
    type=int,
    help=f"Cloud API/dashboard port (default {DEFAULT_API_PORT}, or a free one).",
)
@click.option(
    "--no-promotion", is_flag=True, help="Keep the first model: shows what the loop buys."
)
@click.option(
    "--mqtt",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="MQTT broker: Mosquitto when installed, else the pure-Python amqtt.",
)
def demo(
    duration: float | None,
    report: Path | None,
    seed: int,
    speed: float,
    drift_at: float,
    machines: int,
    api_port: int | None,
    no_promotion: bool,
    mqtt: str,
) -> None:
    """Run the whole loop on this machine on embedded defaults.

    Tansu (Kafka protocol), an MQTT broker, the factory simulator with a scripted drift, the
    cloud service with its dashboard and an edge agent, on free loopback ports.
    """
    if report is not None and duration is None:
        raise click.UsageError("--report needs --duration (the report is written at the end)")
    live = duration is None and sys.stderr.isatty()
    result = asyncio.run(
        run_demo(
            duration=duration,
            report=report,
            live=live,
            seed=seed,
            speed=speed,
            drift_at=drift_at,
            machines=machines,
            api_port=api_port,
            promotion=not no_promotion,
            mqtt=mqtt,
        )
    )
    if result is not None and not result["ok"]:
        failed = [k for k, v in result["checks"].items() if not v]
        click.echo(f"edgeloop demo: checks failed: {', '.join(failed)}", err=True)
        raise SystemExit(1)
