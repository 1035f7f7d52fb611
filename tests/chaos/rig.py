"""The processes of one chaos scenario: Tansu, Mosquitto, the simulator, an optional poisoned
device, the cloud service and one edge agent, each a real child process on loopback ports.

:class:`Rig` writes the configs, starts everything in dependency order, offers the faults the
scenarios inject (SIGKILL, SIGSTOP/SIGCONT, a broker restarted empty, a wiped state directory)
and stops every process it started, also when a scenario fails: :meth:`Rig.close` is safe to
call at any point and twice. Children run in sessions of their own, so a process group the rig
started is stopped as a whole (the agent's connector workers included) — never anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

from edgeloop.services import MosquittoBroker, TansuBroker, free_port
from edgeloop.stack import FEATURES  # the simulator's quality mechanism's inputs
from tests.chaos.ledger import WireLedger
from tests.chaos.load import SeqPublisher
from tests.waiting import wait_until, wait_until_async

log = logging.getLogger("chaos")

EDGELOOP = str(Path(sys.executable).with_name("edgeloop"))
AGENT_ID = "chaos-gw"
PREFIX = "chaos"
MACHINES = ["m1", "m2", "m3", "m4"]
#: the numbered MQTT stream the publisher writes and the agent reads (asset, tag of its readings)
SEQ_ASSET, SEQ_TAG = "seq", "n"
_POINTS = [
    {"tag": "spindle_speed", "table": "input", "address": 0, "type": "float32"},
    {"tag": "feed_rate", "table": "input", "address": 2, "type": "float32"},
    {"tag": "spindle_temp", "table": "input", "address": 4, "type": "float32"},
    {"tag": "vibration_rms", "table": "input", "address": 6, "type": "float32"},
    {"tag": "power", "table": "input", "address": 8, "type": "float32"},
    {"tag": "part_counter", "table": "input", "address": 13, "type": "uint32"},
]
#: holding registers 100.. of every machine change on every simulator update (load)
AUX_REGISTERS = 24
SIM_NS = "urn:edgeloop:simulator"
#: seconds before a supervised child that exited on its own is started again (systemd's
#: RestartSec of deploy/systemd/edgeloop-edge.service)
RESTART_SEC = 5.0


@dataclass
class RigOptions:
    """What a scenario changes about the standard rig."""

    #: outbox.max_bytes of the agent (None: the default 256 MiB)
    outbox_max_bytes: int | None = None
    #: run the poisoned device process and read it over OPC UA and Modbus
    device: bool = False
    #: subscribe the agent to the poison MQTT topics
    mqtt_poison: bool = False
    #: numbered QoS 1 messages per second (the source-truth stream)
    seq_rate: float = 200.0
    #: Modbus poll interval of the simulator's machines (s)
    poll_interval: float = 0.1
    #: kafka.partitions of the cloud: the partitions of the topics it creates (Tansu creates a
    #: missing topic with 4 when a producer asks for it)
    partitions: int = 4


class Child:
    """One child process the rig started: argv, log file, and every start, kill and exit."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0
        self.kills = 0
        #: exits the rig did not cause (a crash): (return code, time)
        self.unexpected_exits: list[tuple[int, float]] = []
        self._expected_exit = False
        #: restarted after an exit nobody asked for, as systemd does it for the agent
        #: (deploy/systemd: Restart=always, RestartSec=5); the exit is recorded all the same
        self.supervised = False
        self._restart_at: float | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, stdin: bool = False) -> None:
        """Start the process; nothing to do when it runs (a supervisor restarted it)."""
        if self.alive:
            return
        self._restart_at = None
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log.write(f"\n=== chaos: start #{self.starts + 1} of {self.name} ===\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole, nothing else
        )
        self.starts += 1
        self._expected_exit = False

    def check(self) -> None:
        """Record an exit nobody asked for, and restart a supervised child after
        :data:`RESTART_SEC` (called while the rig watches)."""
        p = self.proc
        if p is not None and not self._expected_exit and p.poll() is not None:
            self.unexpected_exits.append((p.returncode, time.time()))
            self._expected_exit = True  # recorded once
            log.warning("%s exited on its own with %s", self.name, p.returncode)
            if self.supervised:
                self._restart_at = time.monotonic() + RESTART_SEC
        if self._restart_at is not None and time.monotonic() >= self._restart_at:
            self._restart_at = None
            if self.supervised and not self.alive:
                log.warning("%s restarted by the rig's supervisor", self.name)
                self.restarts += 1
                self.start()

    def kill(self) -> None:
        """SIGKILL the process itself (a crash, as its peers see it); nothing to do when it
        is not running (it crashed before)."""
        p = self.proc
        self._restart_at = None
        if p is None or p.poll() is not None:
            return
        self._expected_exit = True
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        self.kills += 1
        self._close_log()

    def send(self, line: str) -> None:
        """One command line on the child's stdin (started with ``stdin=True``)."""
        p = self.proc
        assert p is not None and p.stdin is not None, f"{self.name} takes no commands"
        p.stdin.write(line.encode() + b"\n")
        p.stdin.flush()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL of its process group after ``timeout``; the exit code of the
        process (None when it was not running). Harmless when already stopped."""
        self.supervised = False
        self._restart_at = None
        p = self.proc
        if p is None:
            return None
        self._expected_exit = True
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                os.kill(p.pid, signal.SIGTERM)
            if not _exited(p.pid, timeout):
                log.warning("%s ignored SIGTERM for %.0f s: SIGKILL", self.name, timeout)
            # not reaped yet, so the group id cannot have been reused: this kills only what
            # the child left behind in the session the rig made for it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        if p.stdin is not None:
            with contextlib.suppress(OSError):
                p.stdin.close()
        self._close_log()
        return p.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]


def _exited(pid: int, within: float) -> bool:
    """Wait (without reaping) until ``pid`` is a zombie or gone; False after ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Rig:
    """The processes of one scenario, in ``workdir``."""

    workdir: Path
    options: RigOptions = field(default_factory=RigOptions)
    tansu: TansuBroker | None = None
    mosquitto: MosquittoBroker | None = None
    sim: Child | None = None
    device: Child | None = None
    cloud: Child | None = None
    agent: Child | None = None
    ledger: WireLedger | None = None
    seq: SeqPublisher | None = None
    #: copies of the agent state directories wiped during the run (for the checker)
    wiped: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: moments a scenario wants to refer to later (time.time_ns())
    marks: dict[str, int] = field(default_factory=dict)
    _watch: asyncio.Task[None] | None = None
    #: the worst /healthz status the agent reported while watched, and why
    agent_worst: tuple[str, list[str]] = ("ok", [])

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.state_dir = self.workdir / "agent-state"
        self.cloud_db = self.workdir / "cloud.db"
        self.agent_http = free_port()
        self.cloud_http = free_port()
        self.modbus_port = free_port()
        self.opcua_port = free_port()
        self.device_opcua = free_port()
        self.device_modbus = free_port()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything and wait until readings flow end to end (cloud applied batches of
        the agent, the ledger sees the numbered stream)."""
        t0 = time.monotonic()
        self.tansu = TansuBroker()
        await asyncio.to_thread(self.tansu.start)
        self.mosquitto = MosquittoBroker()
        await asyncio.to_thread(self.mosquitto.start)
        self.sim = Child(
            "sim",
            [
                EDGELOOP,
                "sim",
                "factory",
                "--seed",
                "13",
                "--machines",
                str(len(MACHINES)),
                "--speed",
                "10",
                "--update-hz",
                "10",
                "--no-faults",
                "--no-anomalies",
                "--modbus-port",
                str(self.modbus_port),
                "--modbus-registers",
                str(AUX_REGISTERS),
                "--opcua-port",
                str(self.opcua_port),
                "--mqtt-url",
                self.mosquitto.url,
            ],
            self.logs / "sim.log",
        )
        self.sim.start()
        if self.options.device:
            self.device = Child(
                "device",
                [
                    sys.executable,
                    "-m",
                    "tests.chaos.device",
                    "--opcua-port",
                    str(self.device_opcua),
                    "--modbus-port",
                    str(self.device_modbus),
                ],
                self.logs / "device.log",
            )
            self.device.start(stdin=True)
        self.cloud = Child(
            "cloud",
            [EDGELOOP, "cloud", "run", "-c", str(self._write_cloud_config())],
            self.logs / "cloud.log",
        )
        self.cloud.start()
        self.cloud.supervised = True  # as the cloud's own supervisor would (a Deployment)
        sim = self.sim
        await wait_until(
            lambda: (_port_open(self.modbus_port) and _port_open(self.opcua_port)) or not sim.alive,
            60,
            "the simulator's servers",
            poll=0.2,
        )
        if not sim.alive:
            raise RuntimeError(f"the simulator exited on start:\n{sim.log_tail()}")
        if self.device is not None:
            await wait_until(
                lambda: "ready" in self.device.log_text() if self.device else False,
                60,
                "the poisoned device",
                poll=0.2,
            )
        await wait_until_async(self.cloud_ready, 90, "the cloud ready", poll=0.3)
        self.ledger = WireLedger(
            self.tansu.bootstrap, PREFIX, track_assets={SEQ_ASSET, "p1", "dev"}
        )
        await self.ledger.start()
        self.agent = Child(
            "agent",
            [EDGELOOP, "edge", "run", "-c", str(self._write_agent_config())],
            self.logs / "agent.log",
        )
        self.agent.start()
        self.agent.supervised = True
        self.seq = SeqPublisher(self.mosquitto.url, f"{PREFIX}/{SEQ_ASSET}/{SEQ_TAG}")
        ledger = self.ledger
        await wait_until(
            lambda: self.seq is not None and self.seq.probe(ledger),
            90,
            "the agent subscribed to the numbered stream (a probe reached Kafka)",
            poll=0.5,
        )
        await wait_until(
            lambda: len(self.applied_now()) >= 20, 60, "the cloud applying the agent's batches"
        )
        self.seq.start(self.options.seq_rate)
        self._watch = asyncio.create_task(self._watch_loop(), name="chaos-watch")
        log.info("rig up in %.1f s (workdir %s)", time.monotonic() - t0, self.workdir)

    async def close(self) -> None:
        """Stop every process and client this rig started. Safe to call twice, and on failure."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if self.seq is not None:
            await asyncio.to_thread(self.seq.close)
        for child in (self.agent, self.cloud, self.device, self.sim):
            if child is not None:
                await asyncio.to_thread(child.stop, 10.0)
        if self.ledger is not None:
            await self.ledger.stop()
        for broker in (self.tansu, self.mosquitto):
            if broker is not None:
                if broker.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(broker.pid, signal.SIGCONT)
                await asyncio.to_thread(broker.close)

    async def __aenter__(self) -> Rig:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _watch_loop(self) -> None:
        """Notice processes that die on their own and the agent's worst health while watched."""
        rank = {"ok": 0, "degraded": 1, "stopping": 1, "failing": 2}
        while True:
            for child in (self.agent, self.cloud, self.sim, self.device):
                if child is not None:
                    child.check()
            if self.agent is not None and self.agent.alive:
                doc = await self.agent_health()
                if doc is not None:
                    status = str(doc.get("status"))
                    if rank.get(status, 2) > rank.get(self.agent_worst[0], 0):
                        self.agent_worst = (status, list(doc.get("reasons") or []))
            await asyncio.sleep(0.5)

    # --- configs ----------------------------------------------------------------------------

    def _write_cloud_config(self) -> Path:
        assert self.tansu is not None
        doc: dict[str, Any] = {
            "environment": "development",
            "instance": "chaos-cloud",
            "kafka": {
                "bootstrap_servers": self.tansu.bootstrap,
                "topic_prefix": PREFIX,
                "group_id": "chaos-cloud",
                "session_timeout_s": 2,
                "request_timeout_s": 5,
                "metadata_max_age_s": 1,
                "partitions": self.options.partitions,
            },
            "database": {"url": f"sqlite:///{self.cloud_db}"},
            "api": {"host": "127.0.0.1", "port": self.cloud_http},
            "checkpoint_interval_s": 0.5,
            "metrics_snapshot_s": 60,
            "audit_applied": True,
            # scaled to a test's minutes (production defaults: 2 s, 30 s, 300 s)
            "control": {
                "log_check_interval_s": 1.0,
                "republish_after_s": 5.0,
                "replay_unconfirmed_after_s": 30.0,
            },
        }
        path = self.workdir / "cloud.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def agent_doc(self) -> dict[str, Any]:
        assert self.tansu is not None and self.mosquitto is not None
        o = self.options
        connectors: list[dict[str, Any]] = [
            {
                "kind": "modbus",
                "name": "machines",
                "transport": {"type": "tcp", "host": "127.0.0.1", "port": self.modbus_port},
                "timeout": 2.0,
                "devices": [
                    {
                        "unit_id": i + 1,
                        "asset": a,
                        "poll_interval": o.poll_interval,
                        "points": [
                            *_POINTS,
                            *(
                                {"tag": f"aux_{k:03d}", "address": 100 + k, "type": "uint16"}
                                for k in range(AUX_REGISTERS)
                            ),
                        ],
                    }
                    for i, a in enumerate(MACHINES)
                ],
            },
            {
                "kind": "opcua",
                "name": "cell",
                "endpoint": f"opc.tcp://127.0.0.1:{self.opcua_port}",
                "publishing_interval": 200,
                "sampling_interval": 100,
                "nodes": [
                    {"node": f"nsu={SIM_NS};s=line1.{a}.{t}", "asset": a, "tag": f"ua_{t}"}
                    for a in MACHINES[:2]
                    for t in ("spindle_temp", "power", "state")
                ],
            },
            {
                "kind": "mqtt",
                "name": "quality",
                "url": self.mosquitto.url,
                "client_id": "chaos-gw-quality",
                "persistent_session": True,
                "subscriptions": [
                    {
                        "topic": "plant/{line}/{asset}/quality",
                        "qos": 1,
                        "tag": "{field}",
                        "payload": {
                            "format": "json",
                            "fields": {"part_id": "part_id", "defect": "defect"},
                            "timestamp": "ts_ns",
                            "timestamp_format": "epoch_ns",
                        },
                    }
                ],
            },
            {
                "kind": "mqtt",
                "name": "numbered",
                "url": self.mosquitto.url,
                "client_id": "chaos-gw-numbered",  # fixed: the persistent session survives
                "persistent_session": True,
                "subscriptions": [{"topic": f"{PREFIX}/{{asset}}/{{tag}}", "qos": 1}],
            },
        ]
        if o.mqtt_poison:
            connectors.append(
                {
                    "kind": "mqtt",
                    "name": "poison-mqtt",
                    "url": self.mosquitto.url,
                    "client_id": "chaos-gw-poison",
                    "persistent_session": True,
                    "subscriptions": [
                        {
                            "topic": "poison/{asset}/{tag}",
                            "qos": 1,
                            "payload": {"format": "json", "value": "v", "timestamp": "ts"},
                        }
                    ],
                }
            )
        if o.device:
            from tests.chaos.device import agent_connectors

            connectors += agent_connectors(self.device_opcua, self.device_modbus)
        doc: dict[str, Any] = {
            "agent_id": AGENT_ID,
            "state_dir": str(self.state_dir),
            "heartbeat_interval": 1.0,
            "connectors": connectors,
            "frames": [
                {
                    "asset": a,
                    "trigger": {"tag": "part_counter"},
                    "features": [{"tag": t, "aggs": [agg]} for t, agg in FEATURES],
                    "stale_after": 30.0,
                }
                for a in MACHINES
            ],
            "labels": [{"connector": "quality", "key_tag": "part_id", "target_tag": "defect"}],
            "rules": [
                {
                    "name": "spindle_warm",
                    "assets": ["m*"],
                    "when": "has(r.spindle_temp) && r.spindle_temp > 40.0",
                    "clear": "r.spindle_temp < 39.0",
                    "message": "{asset}: spindle at {spindle_temp:.1f} degC",
                }
            ],
            "uplink": {
                "bootstrap_servers": self.tansu.bootstrap,
                "topic_prefix": PREFIX,
                "linger_ms": 10,
                "request_timeout_ms": 3000,
                "backoff": {"initial": 0.2, "max": 2.0},
            },
            "http": {"host": "127.0.0.1", "port": self.agent_http},
            "log": {"level": "INFO"},
        }
        if o.outbox_max_bytes is not None:
            doc["outbox"] = {"max_bytes": o.outbox_max_bytes, "overflow": "drop_oldest"}
        return doc

    def _write_agent_config(self) -> Path:
        path = self.workdir / "edge.yaml"
        path.write_text(yaml.safe_dump(self.agent_doc(), sort_keys=False))
        return path

    # --- observing --------------------------------------------------------------------------

    async def _get(self, port: int, path: str) -> httpx.Response | None:
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                return await client.get(f"http://127.0.0.1:{port}{path}")
        except httpx.HTTPError:
            return None

    async def cloud_ready(self) -> bool:
        r = await self._get(self.cloud_http, "/readyz")
        return r is not None and r.status_code == 200

    async def cloud_health(self) -> Any:
        r = await self._get(self.cloud_http, "/healthz")
        if r is None:
            return None
        try:
            return r.json()
        except json.JSONDecodeError:
            return r.text

    async def agent_health(self) -> dict[str, Any] | None:
        r = await self._get(self.agent_http, "/healthz")
        if r is None:
            return None
        try:
            doc = r.json()
        except json.JSONDecodeError:
            return None
        return doc if isinstance(doc, dict) else None

    async def agent_metric(self, name: str) -> float | None:
        """Sum of every sample of one metric on the agent's /metrics (None: not reachable)."""
        r = await self._get(self.agent_http, "/metrics")
        if r is None or r.status_code != 200:
            return None
        total = 0.0
        for line in r.text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def applied_now(self) -> set[tuple[str, str, int]]:
        """The cloud's applied_batches rows for the agent so far (read while it runs)."""
        if not self.cloud_db.exists():
            return set()
        try:
            db = sqlite3.connect(f"file:{self.cloud_db}?mode=ro", uri=True, timeout=5)
            try:
                rows = db.execute(
                    "SELECT agent_id, incarnation, batch_seq FROM applied_batches"
                ).fetchall()
            finally:
                db.close()
        except sqlite3.Error:
            return set()
        return {(a, i, int(s)) for a, i, s in rows}

    def outbox_path(self) -> Path:
        return self.state_dir / "outbox.db"

    def outbox_query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read of the agent's outbox file (WAL: never blocks the agent's writes)."""
        db = sqlite3.connect(self.outbox_path(), timeout=5)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def outbox_next_seq(self) -> int:
        rows = self.outbox_query("SELECT value FROM meta WHERE key = 'next_seq'")
        return int(rows[0][0]) if rows else 1

    # --- faults -----------------------------------------------------------------------------

    async def kill_agent(self) -> None:
        assert self.agent is not None
        await asyncio.to_thread(self.agent.kill)

    def start_agent(self) -> None:
        assert self.agent is not None
        self.agent.start()

    async def kill_cloud(self) -> None:
        assert self.cloud is not None
        await asyncio.to_thread(self.cloud.kill)

    async def start_cloud(self) -> None:
        assert self.cloud is not None
        self.cloud.start()
        await wait_until_async(self.cloud_ready, 90, "the restarted cloud ready", poll=0.3)

    async def stop_broker(self) -> None:
        assert self.tansu is not None
        await asyncio.to_thread(self.tansu.stop)

    async def start_broker_empty(self) -> None:
        """Tansu again on the same port: memory-only, so with an empty log. The ledger starts
        over on the new log (its history is kept)."""
        assert self.tansu is not None and self.ledger is not None
        await asyncio.to_thread(self.tansu.start)
        await self.ledger.reconnect(new_log=True)

    def pause_broker(self) -> None:
        assert self.tansu is not None and self.tansu.pid is not None
        os.kill(self.tansu.pid, signal.SIGSTOP)

    async def resume_broker(self) -> None:
        assert self.tansu is not None and self.tansu.pid is not None and self.ledger is not None
        os.kill(self.tansu.pid, signal.SIGCONT)
        await self.ledger.reconnect(new_log=False)

    async def wipe_agent_state(self) -> Path:
        """SIGKILL the agent, keep a copy of its state directory for the checker, delete it."""
        await self.kill_agent()
        aside = self.workdir / f"wiped-state-{len(self.wiped) + 1}"
        shutil.copytree(self.state_dir, aside)  # outbox.db with its -wal: what the disk held
        shutil.rmtree(self.state_dir)
        self.wiped.append(aside)
        return aside

    # --- waiting on the system ----------------------------------------------------------------

    async def wait_agent_delivering(self, batches: int, within: float = 60.0) -> None:
        """Until the cloud applied ``batches`` more batches of the running agent's life."""
        before = len(self.applied_now())
        await wait_until(
            lambda: len(self.applied_now()) >= before + batches,
            within,
            f"{batches} more batches applied",
            poll=0.2,
        )

    def step(self, what: str) -> None:
        log.info("%s", what)
        self.notes.append(f"{time.strftime('%H:%M:%S')} {what}")
