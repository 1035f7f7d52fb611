"""A local stack: the whole closed loop in one process, on free loopback ports.

Tansu (Kafka protocol) + Mosquitto + the factory simulator (Modbus TCP for the machines, MQTT for
the quality station) + the cloud service (ingest, learning, registry, API, delivery) + one edge
agent, with generated configs and a fresh signing key pair in a work directory::

    async with LocalStack(StackConfig(seed=1, speed=30, drift_at=600)) as stack:
        stack.endpoints            # kafka, mqtt, modbus, api
        stack.cloud, stack.agent   # the running CloudService and Agent
        stack.accuracy.rolling()   # the edge's rolling accuracy (predictions joined with labels)

The edge's accuracy is measured from what reached Kafka: the agent's frames (prediction, model
version) joined with the labels the agent derived from the quality station's MQTT messages, by
(asset, part id) — the same join the cloud makes. ``edgeloop demo`` and the e2e tests use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from aiokafka import AIOKafkaConsumer

from shared.manifest import generate_keypair
from shared.records import Frame, Label
from shared.topics import Topics
from shared.wire import WireDecodeError, decode_batch

__all__ = ["AccuracyMonitor", "AccuracyPoint", "LocalStack", "StackConfig"]

log = logging.getLogger(__name__)

MODEL = "quality"
#: per-cycle aggregates the quality mechanism depends on (docs/simulator.md)
FEATURES = (
    ("spindle_temp", "mean"),
    ("vibration_rms", "max"),
    ("spindle_speed", "mean"),
    ("feed_rate", "mean"),
)
_POINTS = [
    {"tag": "spindle_speed", "table": "input", "address": 0, "type": "float32"},
    {"tag": "feed_rate", "table": "input", "address": 2, "type": "float32"},
    {"tag": "spindle_temp", "table": "input", "address": 4, "type": "float32"},
    {"tag": "vibration_rms", "table": "input", "address": 6, "type": "float32"},
    {"tag": "part_counter", "table": "input", "address": 13, "type": "uint32"},
]


@dataclass
class StackConfig:
    """Knobs of a local stack. Times in scenario seconds unless named otherwise."""

    seed: int = 1
    machines: int = 8
    #: scenario seconds per wall second (a 6-12 s machine cycle lasts 6-12/speed s)
    speed: float = 30.0
    drift_at: float | None = None
    #: False: only the first (initial) champion is promoted and shipped; margin and drift
    #: promotions are off afterwards — the baseline that shows what the closed loop buys.
    promotion: bool = True
    #: labelled samples before the first champion; learned after a drift before promoting
    min_samples: int = 150
    min_samples_after_drift: int = 150
    promotion_window: int = 100
    #: margin promotions: the challenger beats the champion by this over the window (large:
    #: an immature challenger right after a drift is not shipped; the drift path is)
    promotion_margin: float = 0.2
    cooldown_samples: int = 150
    #: SGD step of the cloud's StandardScaler | LogisticRegression learner (river's default
    #: 0.01 takes several hundred parts to follow a drift; 0.05 a couple of hundred)
    learning_rate: float = 0.05
    #: simulator updates per wall second and Modbus poll interval (wall seconds)
    update_hz: float = 50.0
    poll_interval: float = 0.04
    #: labelled frames in :meth:`AccuracyMonitor.rolling`
    rolling_window: int = 150
    faults: bool = False
    anomalies: bool = False
    workdir: Path | None = None
    #: "auto": Mosquitto when installed, else the pure-Python amqtt (slow, no persistence)
    mqtt_broker: Literal["auto", "mosquitto", "amqtt"] = "auto"
    topic_prefix: str = "edgeloop"
    log_level: str = "WARNING"
    extra_cloud: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AccuracyPoint:
    ts_ns: int  # the frame's timestamp
    correct: bool
    version: int


class AccuracyMonitor:
    """Edge predictions joined with labels by (asset, key), read from the uplink topics."""

    def __init__(self, bootstrap: str, topics: Topics, agent_id: str, window: int) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.agent_id = agent_id
        self.window = window
        self.points: list[AccuracyPoint] = []
        self.unscored = 0  # labelled frames without a prediction (no model yet)
        self._frames: dict[tuple[str, str], Frame] = {}
        self._labels: dict[tuple[str, str], Label] = {}
        self._seen: set[tuple[str, int]] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self.topics.frames,
            self.topics.labels,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=1000,
            request_timeout_ms=10_000,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="stack-accuracy")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            got = await self._consumer.getmany(timeout_ms=200)
            for msgs in got.values():
                for msg in msgs:
                    if msg.value is None:
                        continue
                    try:
                        batch = decode_batch(msg.value)
                    except WireDecodeError:
                        continue
                    ident = (batch.agent_id, batch.batch_seq)
                    if batch.agent_id != self.agent_id or ident in self._seen:
                        continue
                    self._seen.add(ident)
                    for rec in batch.records:
                        if isinstance(rec, Frame):
                            self._add(rec, None)
                        elif isinstance(rec, Label):
                            self._add(None, rec)

    def _add(self, frame: Frame | None, label: Label | None) -> None:
        if frame is not None:
            key = (frame.asset, frame.key)
            label = self._labels.pop(key, None)
            if label is None:
                self._frames[key] = frame
                if len(self._frames) > 50_000:
                    self._frames.pop(next(iter(self._frames)))
                return
        else:
            assert label is not None
            key = (label.asset, label.key)
            frame = self._frames.pop(key, None)
            if frame is None:
                self._labels[key] = label
                if len(self._labels) > 50_000:
                    self._labels.pop(next(iter(self._labels)))
                return
        if frame.prediction is None or frame.model_version is None:
            self.unscored += 1
            return
        correct = abs(frame.prediction - float(label.target)) < 0.5
        self.points.append(AccuracyPoint(frame.ts_ns, correct, frame.model_version))

    def accuracy(
        self,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        version: int | None = None,
        last: int | None = None,
    ) -> tuple[float | None, int]:
        """Accuracy of the edge's predictions over the selected labelled frames: (acc, n)."""
        pts = [
            p
            for p in self.points
            if (since_ns is None or p.ts_ns >= since_ns)
            and (until_ns is None or p.ts_ns < until_ns)
            and (version is None or p.version == version)
        ]
        if last is not None:
            pts = pts[-last:]
        if not pts:
            return None, 0
        return sum(p.correct for p in pts) / len(pts), len(pts)

    def rolling(self) -> float | None:
        """Accuracy over the last ``window`` labelled frames."""
        return self.accuracy(last=self.window)[0]

    def series(self, step: int = 25) -> list[tuple[int, float, int]]:
        """(frame ts_ns, rolling accuracy, model version) every ``step`` labelled frames."""
        out: list[tuple[int, float, int]] = []
        window: deque[bool] = deque(maxlen=self.window)
        for i, p in enumerate(self.points):
            window.append(p.correct)
            if (i + 1) % step == 0:
                out.append((p.ts_ns, sum(window) / len(window), p.version))
        return out


class LocalStack:
    """Async context manager; ``start``/``stop`` are idempotent. See the module docstring."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self._own_dir = self.config.workdir is None
        self.workdir = self.config.workdir or Path(tempfile.mkdtemp(prefix="edgeloop-stack-"))
        self.kafka: Any = None
        self.mqtt: Any = None
        self.sim: Any = None
        self.cloud: Any = None
        self.agent: Any = None
        self.accuracy: AccuracyMonitor | None = None
        self.topics = Topics(self.config.topic_prefix)
        self.started_at = 0.0
        self._started = False

    # --- accessors ----------------------------------------------------------------------

    @property
    def endpoints(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.kafka is not None:
            out["kafka"] = self.kafka.bootstrap
        if self.mqtt is not None:
            out["mqtt"] = self.mqtt.url
        if self.sim is not None and self.sim.modbus_address is not None:
            host, port = self.sim.modbus_address
            out["modbus"] = f"{host}:{port}"
        if self.cloud is not None and self.cloud.api_port:
            out["api"] = f"http://127.0.0.1:{self.cloud.api_port}"
        return out

    def drift_ns(self) -> int | None:
        """Wall-clock ns of the scripted drift (None when none is configured or not started)."""
        sc = self.sim.scenario if self.sim is not None else None
        if sc is None or self.config.drift_at is None:
            return None
        return int(sc.ts_ns(self.config.drift_at))

    def scenario_time(self) -> float:
        sc = self.sim.scenario if self.sim is not None else None
        return 0.0 if sc is None else float(sc.t)

    def edge_version(self) -> int | None:
        m = self.agent.slot.current if self.agent is not None else None
        return None if m is None else int(m.version)

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.started_at = time.monotonic()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        from cloud.service import CloudService
        from edge.agent import Agent
        from edgeloop.services import AmqttBroker, MosquittoBroker, TansuBroker, mqtt_broker
        from simulators import FactorySimulator

        cfg = self.config
        logging.getLogger("edge").setLevel(cfg.log_level)
        logging.getLogger("cloud").setLevel(cfg.log_level)
        self.kafka = await asyncio.to_thread(TansuBroker().start)
        broker = {
            "auto": mqtt_broker,
            "mosquitto": MosquittoBroker,
            "amqtt": AmqttBroker,
        }[cfg.mqtt_broker]()
        self.mqtt = await asyncio.to_thread(broker.start)
        private, public = generate_keypair()
        keys = self.workdir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        (keys / "signing.key").write_bytes(private)
        (keys / "signing.pub").write_bytes(public)
        self.sim = FactorySimulator(self._sim_config())
        await self.sim.start()
        self.cloud = CloudService(self._cloud_config(keys / "signing.key"))
        self._tune_learner()
        if not cfg.promotion:
            self.cloud.on_promotion.append(self._freeze_after_first)
        await self.cloud.start()
        self.accuracy = AccuracyMonitor(
            self.kafka.bootstrap, self.topics, "stack-edge", cfg.rolling_window
        )
        await self.accuracy.start()
        self.agent = Agent(self._edge_config(keys / "signing.pub"))
        await self.agent.start()

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.stop(flush_timeout=1.0)
        if self.accuracy is not None:
            await self.accuracy.stop()
        if self.cloud is not None:
            with contextlib.suppress(Exception):
                await self.cloud.stop()
        if self.sim is not None:
            with contextlib.suppress(Exception):
                await self.sim.stop()
        for broker in (self.mqtt, self.kafka):
            if broker is not None:
                await asyncio.to_thread(broker.close)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _tune_learner(self) -> None:
        # a learning rate is an optimizer object in river, which cloud.yaml cannot express
        from river import linear_model, optim, preprocessing

        cand = self.cloud.learners[MODEL].candidates["logistic"]
        cand.pipeline = preprocessing.StandardScaler() | linear_model.LogisticRegression(
            optimizer=optim.SGD(self.config.learning_rate)
        )

    async def _freeze_after_first(self, entry: Any) -> None:
        for ml in self.cloud.learners.values():
            ml.promotion = ml.promotion.model_copy(update={"enabled": False})
        log.info("promotion disabled after the initial champion v%d", entry.version)

    # --- generated configs ----------------------------------------------------------------

    def _sim_config(self) -> Any:
        from simulators.config import SimConfig

        cfg = self.config
        return SimConfig.model_validate(
            {
                "scenario": {
                    "seed": cfg.seed,
                    "machines": cfg.machines,
                    "speed": cfg.speed,
                    "drift_at": cfg.drift_at,
                    "fault_interval": 900.0 if cfg.faults else None,
                    "anomaly_interval": 180.0 if cfg.anomalies else None,
                },
                "update_hz": cfg.update_hz,
                "opcua": {"enabled": False},
                "modbus": {"port": 0},
                "mqtt": {
                    "enabled": True,
                    "url": self.mqtt.url,
                    "client_id": f"edgeloop-sim-{id(self)}",
                },
            }
        )

    def _cloud_config(self, private_key: Path) -> Any:
        from cloud.config import CloudConfig

        cfg = self.config
        doc: dict[str, Any] = {
            "environment": "development",
            "kafka": {
                "bootstrap_servers": self.kafka.bootstrap,
                "topic_prefix": cfg.topic_prefix,
                "partitions": 1,
                "session_timeout_s": 2.0,
                "metadata_max_age_s": 2.0,
                "max_poll_records": 500,
            },
            "database": {"url": f"sqlite:///{self.workdir / 'cloud.db'}"},
            "models": [
                {
                    "name": MODEL,
                    "rolling_window": cfg.promotion_window,
                    "learners": [
                        {
                            "name": "logistic",
                            "pipeline": [
                                "preprocessing.StandardScaler",
                                "linear_model.LogisticRegression",
                            ],
                        }
                    ],
                }
            ],
            "join": {"window_s": 120.0, "label_wait_s": 60.0},
            "promotion": {
                "enabled": True,
                "min_samples": cfg.min_samples,
                "min_samples_after_drift": cfg.min_samples_after_drift,
                "window": cfg.promotion_window,
                "margin": cfg.promotion_margin,
                "cooldown_samples": cfg.cooldown_samples,
            },
            "api": {"port": 0},
            "delivery": {
                "enabled": True,
                "private_key": str(private_key),
                "artifact_dir": str(self.workdir / "artifacts"),
                "republish_interval_s": 30.0,
            },
            "checkpoint_interval_s": 2.0,
            "metrics_snapshot_s": 2.0,
        }
        doc.update(cfg.extra_cloud)
        return CloudConfig.model_validate(doc)

    def _edge_config(self, public_key: Path) -> Any:
        from edge.config import edge_config_model

        cfg = self.config
        host, port = self.sim.modbus_address
        assets = [f"m{i + 1}" for i in range(cfg.machines)]
        doc = {
            "agent_id": "stack-edge",
            "state_dir": str(self.workdir / "edge"),
            "heartbeat_interval": 1.0,
            "tick_interval": 0.02,
            "connectors": [
                {
                    "kind": "modbus",
                    "name": "machines",
                    "transport": {"type": "tcp", "host": host, "port": port},
                    "timeout": 2.0,
                    "devices": [
                        {
                            "unit_id": i + 1,
                            "asset": a,
                            "poll_interval": cfg.poll_interval,
                            "points": _POINTS,
                        }
                        for i, a in enumerate(assets)
                    ],
                },
                {
                    "kind": "mqtt",
                    "name": "quality",
                    "url": self.mqtt.url,
                    "client_id": f"stack-edge-quality-{id(self)}",
                    "persistent_session": False,
                    # amqtt speaks MQTT 3.1.1 only
                    "protocol": "3.1.1" if self.mqtt.name == "amqtt" else "5",
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
            ],
            "frames": [
                {
                    "asset": a,
                    "trigger": {"tag": "part_counter"},
                    "features": [{"tag": t, "aggs": [agg]} for t, agg in FEATURES],
                    "stale_after": 30.0,
                }
                for a in assets
            ],
            "labels": [{"connector": "quality", "key_tag": "part_id", "target_tag": "defect"}],
            "uplink": {
                "bootstrap_servers": self.kafka.bootstrap,
                "topic_prefix": cfg.topic_prefix,
                "linger_ms": 5,
            },
            "http": {"port": None},
            "models": {
                "public_key": str(public_key),
                "name": MODEL,
                "shadow_frames": 10,
                "shadow_timeout": 10.0,
                "watch_frames": 100,
            },
        }
        return edge_config_model(["modbus", "mqtt"]).model_validate(doc)
