"""A real cloud (Kafka ingest, registry, API, delivery) and a real edge agent on one Tansu.

The edge is fed by a test-owned task through ``Agent.ingest`` (a period-triggered frame of two
features for one asset), so shadow and watch windows see frames the test controls. Promotions
go through the cloud's own path (``apply_decision`` -> hook -> compile -> parity -> sign ->
publish); bad deliveries are forged with the cloud's real store, signer and producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper
from river import compose, linear_model, preprocessing

from cloud.config import (
    ApiConfig,
    CloudConfig,
    DatabaseConfig,
    DeliveryConfig,
    DriftConfig,
    KafkaConfig,
    ModelConfig,
    PromotionConfig,
)
from cloud.learning import PromotionDecision
from cloud.service import CloudService
from edge.agent import Agent
from edge.config import edge_config_model
from shared.manifest import generate_keypair
from shared.records import Reading, now_ns

MODEL = "quality"
FEATURES = ["x_last", "y_last"]


def keypair(directory: Path, stem: str = "signing") -> tuple[Path, Path]:
    private, public = generate_keypair()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.key").write_bytes(private)
    (directory / f"{stem}.pub").write_bytes(public)
    return directory / f"{stem}.key", directory / f"{stem}.pub"


def trained_pipeline(seed: int, n: int = 300, flip: bool = False) -> tuple[Any, list[dict]]:
    """A river StandardScaler | LogisticRegression fit on ``x + y > 0`` (or its opposite)."""
    rng = random.Random(seed)
    model = compose.Pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression())
    frames = []
    for _ in range(n):
        x = {"x_last": rng.uniform(-1, 1), "y_last": rng.uniform(-1, 1)}
        y = (x["x_last"] + x["y_last"] > 0) != flip
        model.learn_one(x, y)
        frames.append(x)
    return model, frames


def nan_model(features: int = 2, *, above: float | None = None) -> bytes:
    """A contract-shaped classifier that outputs NaN (always, or when feature 0 > ``above``)."""
    x = helper.make_tensor_value_info("features", TensorProto.DOUBLE, ["N", features])
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["nan"],
            value=helper.make_tensor("c", TensorProto.DOUBLE, [], [float("nan")]),
        ),
        helper.make_node(
            "Constant", [], ["half"], value=helper.make_tensor("h", TensorProto.DOUBLE, [], [0.5])
        ),
        helper.make_node(
            "Constant", [], ["idx"], value=helper.make_tensor("i", TensorProto.INT64, [1], [0])
        ),
        helper.make_node("Gather", ["features", "idx"], ["col0"], axis=1),
        helper.make_node("Squeeze", ["col0", "axes1"], ["x0"]),
        helper.make_node(
            "Constant", [], ["axes1"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])
        ),
    ]
    if above is None:
        nodes.append(helper.make_node("Add", ["x0", "nan"], ["probability"]))
    else:
        nodes += [
            helper.make_node(
                "Constant",
                [],
                ["thr"],
                value=helper.make_tensor("t", TensorProto.DOUBLE, [], [above]),
            ),
            helper.make_node("Greater", ["x0", "thr"], ["bad"]),
            helper.make_node("Mul", ["x0", "half"], ["x0h"]),
            helper.make_node("Sigmoid", ["x0h"], ["p"]),
            helper.make_node("Where", ["bad", "nan", "p"], ["probability"]),
        ]
    nodes += [
        helper.make_node("Round", ["probability"], ["label"]),
    ]
    # constants first (topological order)
    nodes.sort(key=lambda n: n.op_type != "Constant")
    outs = [
        helper.make_tensor_value_info("label", TensorProto.DOUBLE, ["N"]),
        helper.make_tensor_value_info("probability", TensorProto.DOUBLE, ["N"]),
    ]
    graph = helper.make_graph(nodes, "nan_model", [x], outs)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m.SerializeToString()


class Feeder:
    """Offers one asset's readings to the agent every 20 ms; ``x`` can be forced.

    ``labelled``: each cycle is also a part (``part_counter``), and the quality station's
    verdict on the previous part (``part_id``, ``defect`` = ``x + y > 0``) arrives on the
    ``quality`` connector one cycle later, as one MQTT message expanded into fields would.
    """

    def __init__(self, agent: Agent, seed: int = 3, *, labelled: bool = False) -> None:
        self.agent = agent
        self.rng = random.Random(seed)
        self.force_x: float | None = None
        self.labelled = labelled
        self.parts = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        verdict: list[Reading] = []
        while True:
            ts = now_ns()
            x = self.force_x if self.force_x is not None else self.rng.uniform(-1, 1)
            y = self.rng.uniform(-1, 1)
            readings = [Reading("a1", "x", ts, x), Reading("a1", "y", ts, y)]
            if self.labelled:
                self.parts += 1
                # the counter moving cuts the frame of part n (x, y above): key "a1-<n>"
                readings.append(Reading("a1", "part_counter", ts, self.parts))
            self.agent.ingest("feed", readings)
            if verdict:
                self.agent.ingest("quality", verdict)
            if self.labelled:
                qts = ts + 1
                verdict = [
                    Reading("a1", "part_id", qts, f"a1-{self.parts}"),
                    Reading("a1", "defect", qts, x + y > 0),
                ]
            await asyncio.sleep(0.02)


def cloud_config(tmp: Path, bootstrap: str, prefix: str, key: Path) -> CloudConfig:
    return CloudConfig(
        environment="development",
        instance=f"cloud-{prefix}",
        kafka=KafkaConfig(
            bootstrap_servers=bootstrap,
            topic_prefix=prefix,
            group_id=f"g-{prefix}",
            partitions=1,
            session_timeout_s=2.0,
            metadata_max_age_s=1.0,
        ),
        database=DatabaseConfig(url=f"sqlite:///{tmp / 'cloud.db'}"),
        models=[ModelConfig(name=MODEL)],
        drift=DriftConfig(enabled=False),
        promotion=PromotionConfig(enabled=False),
        api=ApiConfig(port=0),
        delivery=DeliveryConfig(
            enabled=True,
            private_key=key,
            artifact_dir=tmp / "artifacts",
            republish_interval_s=5.0,
            catchup_interval_s=0.5,
        ),
        checkpoint_interval_s=1.0,
    )


def edge_config(
    tmp: Path, bootstrap: str, prefix: str, pub: Path, *, labelled: bool = False, **sync: Any
) -> Any:
    """Period-triggered frames; ``labelled``: one frame per part plus labels from ``quality``."""
    trigger: dict[str, Any] = {"tag": "part_counter"} if labelled else {"period": 0.05}
    doc = {
        "agent_id": "gw-1",
        "state_dir": str(tmp / "edge"),
        "heartbeat_interval": 0.3,
        "frames": [
            {
                "asset": "a1",
                "trigger": trigger,
                "features": [{"tag": "x", "aggs": ["last"]}, {"tag": "y", "aggs": ["last"]}],
            }
        ],
        # the quality station's messages are offered by the feeder through Agent.ingest; the
        # connector entry names the source (an idle synthetic one: labels need a configured one)
        "connectors": (
            [
                {
                    "name": "quality",
                    "kind": "synthetic",
                    "assets": ["station"],
                    "interval": 3600,
                    "counter_tag": None,
                }
            ]
            if labelled
            else []
        ),
        "labels": [{"connector": "quality"}] if labelled else [],
        "uplink": {"bootstrap_servers": bootstrap, "topic_prefix": prefix, "linger_ms": 5},
        "http": {"port": None},
        "models": {
            "public_key": str(pub),
            "name": MODEL,
            "shadow_frames": 10,
            "shadow_timeout": 15,
            "watch_frames": 40,
            "watch_min_frames": 5,
            "download_attempts": 3,
            "backoff": {"initial": 0.05, "max": 0.2},
            **sync,
        },
    }
    return edge_config_model([]).model_validate(doc)


class Rig:
    """Cloud + agent + feeder. ``async with Rig(tmp, bootstrap) as rig: ...``."""

    def __init__(self, tmp: Path, bootstrap: str, *, labelled: bool = False, **sync: Any) -> None:
        self.tmp = tmp
        self.labelled = labelled
        self.bootstrap = bootstrap
        self.prefix = f"dl-{uuid.uuid4().hex[:8]}"
        self.key, self.pub = keypair(tmp / "keys")
        self.sync = sync
        self.cloud = CloudService(cloud_config(tmp, bootstrap, self.prefix, self.key))
        self.agent: Agent | None = None
        self.feeder: Feeder | None = None

    async def __aenter__(self) -> Rig:
        await self.cloud.start()
        try:
            await self.start_agent()
        except BaseException:
            await self.cloud.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_agent()
        await self.cloud.stop()

    async def start_agent(self) -> Agent:
        self.agent = Agent(
            edge_config(
                self.tmp, self.bootstrap, self.prefix, self.pub, labelled=self.labelled, **self.sync
            )
        )
        await self.agent.start()
        self.feeder = Feeder(self.agent, labelled=self.labelled)
        self.feeder.start()
        return self.agent

    async def stop_agent(self) -> None:
        if self.feeder is not None:
            await self.feeder.stop()
            self.feeder = None
        if self.agent is not None:
            await self.agent.stop(flush_timeout=1.0)
            self.agent = None

    @property
    def delivery(self) -> Any:
        return self.cloud.delivery

    def active(self) -> int | None:
        assert self.agent is not None
        m = self.agent.slot.current
        return None if m is None else m.version

    async def promote_river(self, seed: int, *, flip: bool = False, model: Any = None) -> Any:
        """Register a trained river pipeline as champion through the service's own path."""
        frames: list[dict] = []
        if model is None:
            model, frames = trained_pipeline(seed, flip=flip)
        self.cloud.recent_frames[MODEL].extend(frames)
        decision = PromotionDecision(
            model=MODEL,
            learner="logistic",
            reason="manual",
            evidence={"test": True},
            pipeline_blob=pickle.dumps(model),
            metrics={"accuracy": 0.9},
            features=list(FEATURES),
            steps=["preprocessing.StandardScaler", "linear_model.LogisticRegression"],
        )
        entry = await self.cloud.apply_decision(decision, actor="test")
        await self.cloud.drain_hooks(30)
        return entry

    def refusals(self) -> list[dict]:
        assert self.agent is not None and self.agent.model_sync is not None
        return [h for h in self.agent.model_sync.history if h["outcome"] == "refused"]


def onnx_rows(blob: bytes, rows: np.ndarray) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(
        None, {"features": rows}
    )
