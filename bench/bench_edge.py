"""Edge agent: simulator -> agent -> Kafka readings/s with inference and rules on, next to the raw
ceilings measured in the same run, and the agent's memory with 1,000 tags.

Set-up: the factory simulator serves 10 machines over Modbus TCP (a subprocess), each with 4 core
tags (spindle_temp, vibration_rms, power, part_counter) and 96 aux holding registers: 1,000
tags. The agent runs as a subprocess (``edgeloop edge run``) polling them back to back, cuts a
frame per machine cycle scored by a scikit-learn model exported with skl2onnx, evaluates CEL rules
for every asset each tick, and ships everything through the SQLite outbox to Tansu. Throughput is
what the broker acknowledged (the agent's ``edgeloop_edge_uplink_records_total``) per second.

Raw ceilings, same run, same machine:
* the Modbus connector alone against the same simulator, readings to a counting sink, and again
  delivering its good blocks as columns (what it does in the agent's connector worker), measured
  ROUNDS times each inside the agent's run while the worker is paused (SIGSTOP), between the
  end-to-end windows: this machine's speed drifts from one second to the next, and raw and
  end-to-end windows seconds apart see the same drift;
* aiokafka producing pre-encoded 500-reading wire batches with acks=all;
* onnxruntime ``session.run`` on a tick-sized batch (vs the agent's ``ModelSlot.score``);
* SQLite ``executemany`` in WAL mode (vs ``Outbox.append`` + claim + ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from bench.common import Result
from edgeloop.services import TansuBroker, free_port

MACHINES = 10
AUX = 96  # + 4 core tags = 100 tags per machine, 1,000 in all
WINDOW = 4.0  # seconds of steady state measured per end-to-end window
RAW_WINDOW = 2.5  # seconds of the raw connector loop per window (after 1 s of warm-up)
ROUNDS = 7  # raw / end-to-end pairs


def _points() -> list[dict[str, Any]]:
    pts: list[dict[str, Any]] = [
        {"tag": "spindle_temp", "table": "input", "address": 4, "type": "float32"},
        {"tag": "vibration_rms", "table": "input", "address": 6, "type": "float32"},
        {"tag": "power", "table": "input", "address": 8, "type": "float32"},
        {"tag": "part_counter", "table": "input", "address": 13, "type": "uint32"},
    ]
    pts += [
        {"tag": f"aux_{i:03d}", "table": "holding", "address": 100 + i, "type": "int16"}
        for i in range(AUX)
    ]
    return pts


def modbus_config(port: int, name: str = "line1") -> dict[str, Any]:
    return {
        "kind": "modbus",
        "name": name,
        "transport": {"type": "tcp", "host": "127.0.0.1", "port": port},
        "timeout": 2.0,
        "devices": [
            {"unit_id": i + 1, "asset": f"m{i + 1}", "poll_interval": 0.0, "points": _points()}
            for i in range(MACHINES)
        ],
    }


def _export_model(tmp: Path) -> tuple[Path, Path, Any]:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from shared.manifest import ModelManifest, sha256_hex

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) * [5, 1, 2] + [40, 3, 8]
    y = (x[:, 0] + x[:, 1] > 43).astype(int)
    sk = LogisticRegression().fit(x, y)
    blob = to_onnx(
        sk, x[:1].astype(np.float32), options={id(sk): {"zipmap": False}}, target_opset=17
    ).SerializeToString()
    path = tmp / "quality.onnx"
    path.write_bytes(blob)
    feats = ("spindle_temp_mean", "vibration_rms_max", "power_mean")
    man = ModelManifest("quality", 1, feats, "label", sha256_hex(blob), time.time_ns())
    mpath = tmp / "quality.manifest.json"
    mpath.write_bytes(man.to_json())
    return path, mpath, sk


async def _raw_connector(port: int, seconds: float, columns: bool = False) -> float:
    """The Modbus connector alone, its readings counted; ``columns``: good blocks as columns."""
    from protocols.base import load_connector_class

    cls = load_connector_class("modbus")
    conn = cls(cls.config_model.model_validate(modbus_config(port, "raw")))
    count = [0]
    started = asyncio.Event()

    def sink(batch: Any) -> None:
        count[0] += len(batch)
        started.set()

    def column_sink(batch: Any) -> None:
        for cols in batch:
            count[0] += len(cols)
        started.set()

    conn.set_sink(sink)
    if columns:
        conn.set_column_sink(column_sink)
    async with conn:
        await asyncio.wait_for(started.wait(), 20)
        await asyncio.sleep(1.0)  # warm-up: the measured window starts now
        n0, t0 = count[0], time.perf_counter()
        await asyncio.sleep(seconds)
        return (count[0] - n0) / (time.perf_counter() - t0)


async def _raw_kafka(bootstrap: str, seconds: float) -> float:
    from aiokafka import AIOKafkaProducer

    from shared.records import Reading
    from shared.wire import Batch, Kind, encode_batch

    now = time.time_ns()
    blobs = [
        encode_batch(
            Batch(
                "raw",
                s,
                Kind.READING,
                [
                    Reading(f"m{s % 10}", f"aux_{i % 100:03d}", now + i, float(i))
                    for i in range(500)
                ],
            )
        )
        for s in range(20)
    ]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=False,
        linger_ms=5,
        max_batch_size=1024 * 1024,
    )
    await producer.start()
    try:
        sent, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            futs = [
                await producer.send("bench.raw", value=b, key=f"m{i % 10}".encode())
                for i, b in enumerate(blobs)
            ]
            await asyncio.gather(*futs)
            sent += len(blobs) * 500
        return sent / (time.perf_counter() - t0)
    finally:
        await producer.stop()


def _rate(fn: Any, seconds: float = 1.0) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0)


def _inference(model: Path, manifest: Path) -> tuple[float, float]:
    """(agent ModelSlot.score frames/s, raw session.run frames/s) on a 10-frame tick."""
    import onnxruntime as ort

    from edge.frames import PendingFrame
    from edge.inference import ModelSlot, load_model

    slot = ModelSlot()
    slot.swap(load_model(model, manifest))
    feats = slot.current.features if slot.current else ()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, len(feats))) * [5, 1, 2] + [40, 3, 8]
    frames = [
        PendingFrame(f"m{i}", f"m{i}-1", 1, dict(zip(feats, map(float, row), strict=True)), ())
        for i, row in enumerate(x)
    ]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    xf = x.astype(np.float32)

    def raw() -> int:
        sess.run(None, {name: xf})
        return 10

    def agent() -> int:
        slot.score(frames)
        return 10

    return _rate(agent), _rate(raw)


async def _outbox(tmp: Path) -> tuple[float, float]:
    """(Outbox append+claim+ack readings/s, raw sqlite executemany readings/s).

    Ours seals and encodes wire batches (the codec's cost) besides storing them; the raw
    ceiling stores the same number of rows as bare inserts, which is what SQLite alone can do.
    """
    from edge.outbox import Outbox
    from shared.records import Reading

    now = time.time_ns()
    recs = [Reading(f"m{i % 10}", f"aux_{i % 100:03d}", now + i, float(i)) for i in range(1000)]
    async with Outbox(tmp / "bench-outbox.db", agent_id="bench", batch_size=500) as ob:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.5:
            await ob.append(recs)
            batches = await ob.claim(after_seq=0, max_batches=32)
            await ob.ack([b.seq for b in batches])
            n += len(recs)
        ours = n / (time.perf_counter() - t0)
    db = sqlite3.connect(tmp / "raw.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INT, a TEXT, p BLOB, c INT)")
    rows = [(1, r.asset, b"x" * 24, now) for r in recs]

    def raw() -> int:
        db.execute("BEGIN")
        db.executemany("INSERT INTO t (k, a, p, c) VALUES (?, ?, ?, ?)", rows)
        db.execute("COMMIT")
        db.execute("DELETE FROM t")
        return len(rows)

    try:
        return ours, _rate(raw, 1.5)
    finally:
        db.close()


def _say(msg: str) -> None:
    print(f"   {msg}", file=sys.stderr, flush=True)


def _spawn(argv: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    if log is None:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out)


def _rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


async def _agent_round(
    tmp: Path,
    exe: str,
    sim_port: int,
    bootstrap: str,
    model: Path,
    manifest: Path,
    isolation: str,
    raw_rounds: list[tuple[float, float]] | None = None,
) -> list[dict[str, float]]:
    """Start the agent, measure WINDOW seconds of steady state, stop it; its figures.

    With ``raw_rounds`` (``isolation: process`` only) it measures ROUNDS windows, and before
    each one pauses the connector worker (SIGSTOP: nothing polls the simulator, the agent only
    drains what it holds) to run the raw connector loop against the same simulator, readings and
    columns, appending the pair: raw and end-to-end windows are seconds apart, not a whole agent
    start-up, so the machine's drift hits both alike.
    """
    http_port = free_port()
    state = tmp / f"state-{isolation}-{time.monotonic_ns()}"
    cfg = {
        "agent_id": f"bench-{isolation}",
        "state_dir": str(state),
        "connectors": [dict(modbus_config(sim_port), isolation=isolation)],
        "frames": [
            {"asset": f"m{i + 1}", "trigger": {"tag": "part_counter"}} for i in range(MACHINES)
        ],
        "model": {"path": str(model), "manifest": str(manifest)},
        "rules": [
            {"name": "hot", "when": "has(r.spindle_temp) && r.spindle_temp > 45.0",
             "clear": "r.spindle_temp < 40.0", "for": 1.0},
            {"name": "defect", "when": "has_frame && score > 0.9", "cooldown": 5},
            {"name": "aux", "when": "has(r.aux_000) && r.aux_000 > 30000"},
        ],
        # no cloud in this bench to confirm batches: measured up to the broker's ack, as before
        # the end-to-end acknowledgement (marking a batch sent costs what deleting it did)
        "uplink": {"bootstrap_servers": bootstrap, "delete_after": "broker"},
        "http": {"port": http_port},
        "log": {"level": "INFO"},
    }  # fmt: skip
    cfg_path = tmp / f"edge-{isolation}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = tmp / f"agent-{isolation}.log"
    agent = _spawn([exe, "edge", "run", "-c", str(cfg_path)], log)
    url = f"http://127.0.0.1:{http_port}/metrics"
    name = f'edgeloop_edge_uplink_records_total{{agent="bench-{isolation}",kind="reading"}}'
    conn_name = 'edgeloop_connector_readings_total{connector="line1",kind="modbus"}'
    worker: int | None = None
    results: list[dict[str, float]] = []
    try:
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 40
            while True:
                try:
                    if _metric((await http.get(url, timeout=2)).text, name) > 0:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise RuntimeError(f"agent produced nothing:\n{log.read_text()[-2000:]}")
                await asyncio.sleep(0.3)
            await asyncio.sleep(2.0)  # warm-up
            for k in range(ROUNDS if raw_rounds is not None else 1):
                if raw_rounds is not None:
                    [worker] = _children(agent.pid)
                    os.kill(worker, signal.SIGSTOP)
                    try:
                        await asyncio.sleep(0.5)  # the agent ships what it holds
                        first = k % 2 == 1  # alternate which raw mode runs first
                        a = await _raw_connector(sim_port, RAW_WINDOW, columns=first)
                        b = await _raw_connector(sim_port, RAW_WINDOW, columns=not first)
                    finally:
                        os.kill(worker, signal.SIGCONT)
                    raw_rounds.append((b, a) if first else (a, b))
                    await asyncio.sleep(1.5)  # back to steady state
                text0, t0 = (await http.get(url, timeout=5)).text, time.perf_counter()
                await asyncio.sleep(WINDOW)
                text1, t1 = (await http.get(url, timeout=5)).text, time.perf_counter()
                results.append(
                    {
                        "e2e": (_metric(text1, name) - _metric(text0, name)) / (t1 - t0),
                        "connector": (_metric(text1, conn_name) - _metric(text0, conn_name))
                        / (t1 - t0),
                        "frames": _metric(text1, "edgeloop_edge_frames_total"),
                        "scored": _metric(text1, "edgeloop_edge_scored_frames_total"),
                        "infer_n": _metric(text1, "edgeloop_edge_inference_seconds_count"),
                        "infer_s": _metric(text1, "edgeloop_edge_inference_seconds_sum"),
                        "depth": _metric(
                            text1, f'edgeloop_edge_outbox_depth{{agent="bench-{isolation}"}}'
                        ),
                        "dropped": _metric(text1, "edgeloop_edge_queue_dropped_total"),
                    }
                )
                if raw_rounds is not None:
                    r, c = raw_rounds[-1]
                    _say(
                        f"round {k + 1}: raw connector loop {r:,.0f} readings/s (columns to the "
                        f"sink {c:,.0f}/s); end to end {results[-1]['e2e']:,.0f}/s "
                        f"(connector inside {results[-1]['connector']:,.0f}/s)"
                    )
        pids = [agent.pid, *_children(agent.pid)]
        mems = [_rss_mb(p) for p in pids]
        for got in results:
            got["processes"] = float(len(pids))
            got["rss"] = sum(m[0] for m in mems)
            got["hwm"] = sum(m[1] for m in mems)
        agent.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(agent.wait, 60)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"agent did not stop:\n{log.read_text()[-3000:]}") from None
        if agent.returncode != 0:
            raise RuntimeError(f"agent exited with {agent.returncode}:\n{log.read_text()[-3000:]}")
        return results
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


async def _run(tmp: Path) -> list[Result]:
    exe = str(Path(sys.executable).with_name("edgeloop"))
    sim_port = free_port()
    sim = _spawn(
        [exe, "sim", "modbus", "--machines", str(MACHINES), "--modbus-registers", str(AUX),
         "--extra-tags", "8", "--speed", "10", "--no-faults", "--modbus-port", str(sim_port)]
    )  # fmt: skip
    try:
        with TansuBroker() as broker:
            model, manifest, _ = _export_model(tmp)
            deadline = time.monotonic() + 30
            while True:  # wait for the simulator's port
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", sim_port)
                    w.close()
                    await w.wait_closed()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the simulator did not start") from None
                    await asyncio.sleep(0.2)
            # This machine's speed drifts by +-25 % from one second to the next (a shared VM):
            # raw and end-to-end windows alternate inside one agent run, ROUNDS times.
            pairs: list[tuple[float, float]] = []
            proc = await _agent_round(
                tmp, exe, sim_port, broker.bootstrap, model, manifest, "process", pairs
            )
            raws = [r for r, _ in pairs]
            raw_cols = [c for _, c in pairs]
            [inline] = await _agent_round(
                tmp, exe, sim_port, broker.bootstrap, model, manifest, "inline"
            )
            _say(
                f"end to end, isolation inline: {inline['e2e']:,.0f} readings/s "
                f"(peak RSS {inline['hwm']:.1f} MB); process: peak RSS {proc[-1]['hwm']:.1f} MB "
                f"in {proc[-1]['processes']:.0f} processes"
            )
            raw_kafka = await _raw_kafka(broker.bootstrap, 3.0)
        ours_inf, raw_inf = _inference(model, manifest)
        ours_ob, raw_ob = await _outbox(tmp)
    finally:
        if sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
            try:
                sim.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait(timeout=10)

    raw_conn = _median(raws)
    e2e = _median([r["e2e"] for r in proc])
    last = proc[-1]
    slowest_name, slowest = min(
        [("raw modbus connector loop", raw_conn), ("raw aiokafka produce", raw_kafka)],
        key=lambda kv: kv[1],
    )
    ratios = [p["e2e"] / r for r, p in zip(raws, proc, strict=True)]
    col_ratios = [p["e2e"] / r for r, p in zip(raw_cols, proc, strict=True)]
    print(
        "   edge: rounds (raw, e2e, ratio): "
        + ", ".join(
            f"({r:,.0f}, {p['e2e']:,.0f}, {p['e2e'] / r:.2f}x)"
            for r, p in zip(raws, proc, strict=True)
        )
        + f"; median of the round ratios {_median(ratios):.2f}x"
        + f"; last round: {last['frames']:.0f} frames ({last['scored']:.0f} scored) in "
        f"{last['infer_n']:.0f} model calls, mean "
        f"{1e3 * last['infer_s'] / max(last['infer_n'], 1):.3f} ms/call; outbox depth at end "
        f"{last['depth']:.0f}; dropped at ingest: {last['dropped']:.0f}",
        file=sys.stderr,
    )
    return [
        Result(
            "edge",
            "sim->agent->kafka readings/s (1,000 tags, model+rules, isolation: process)",
            e2e,
            "rec/s",
            f"slowest raw stage: {slowest_name}",
            slowest,
            ">= 0.8x",
        ),
        Result(
            "edge",
            "same, isolation: inline (connector on the agent's loop)",
            inline["e2e"],
            "rec/s",
            f"slowest raw stage: {slowest_name}",
            slowest,
        ),
        Result(
            "edge",
            f"end to end / raw, median of {ROUNDS} interleaved rounds (process): "
            + " ".join(f"{x:.2f}" for x in ratios),
            _median(ratios),
            "x",
            "",
            None,
            ">= 0.8x",
        ),
        Result(
            "edge",
            "end to end / raw loop delivering columns (the worker's mode), per round: "
            + " ".join(f"{x:.2f}" for x in col_ratios),
            _median(col_ratios),
            "x",
        ),
        Result("edge", f"raw modbus connector loop (median of {ROUNDS})", raw_conn, "rec/s"),
        Result(
            "edge",
            f"raw modbus connector loop, columns to the sink (median of {ROUNDS})",
            _median(raw_cols),
            "rec/s",
        ),
        Result("edge", "raw aiokafka produce (500-reading batches)", raw_kafka, "rec/s"),
        Result(
            "edge",
            "ModelSlot.score, 10-frame tick",
            ours_inf,
            "frames/s",
            "raw onnxruntime session.run",
            raw_inf,
        ),
        Result(
            "edge",
            "Outbox append+claim+ack",
            ours_ob,
            "rec/s",
            "raw sqlite executemany (WAL)",
            raw_ob,
        ),
        Result(
            "edge",
            "agent + connector worker RSS, 1,000 tags (sum of peaks)",
            max(r["hwm"] for r in proc),
            "MB",
            "inline agent (one process)",
            inline["hwm"],
            "< 200 MB",
            higher_is_better=False,
        ),
    ]


def run() -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        return asyncio.run(asyncio.wait_for(_run(Path(tmp)), 300))


if __name__ == "__main__":
    from bench.common import format_table

    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    print(format_table(run()))
