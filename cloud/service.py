"""The cloud service: one process, one lifecycle — Kafka ingest, learners, registry, API.

Data flow per poll: ``getmany`` -> decode (a poison message is logged, counted, skipped) ->
dedupe by (agent_id, batch_seq) per partition -> apply (frames and labels into the join, joined
pairs into every matching model's learners; heartbeats into the fleet; events queued for the
registry; telemetry counted) -> drift detections and promotion decisions are recorded as they
happen. Durability: every ``checkpoint_interval_s`` (or ``checkpoint_records`` records), the
learners, the join buffer, the dedupe state, the fleet and queued events are written to the
registry in one transaction, and only then are the consumed offsets committed to Kafka. After a
crash the group resumes from the committed offsets, which are never ahead of the checkpoint; the
batches between them are dropped by the restored dedupe state, so nothing is learned twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import pickle
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from cloud.config import CloudConfig, KafkaConfig
from cloud.dedupe import SeqTracker
from cloud.drift import DriftDetection, WebhookNotifier
from cloud.instruments import CloudMetrics
from cloud.join import JoinBuffer
from cloud.learning import ModelLearner, PromotionDecision
from cloud.registry import Registry, VersionEntry
from shared.records import Event, Frame, Heartbeat, Label, now_ns
from shared.wire import Batch, Kind, WireDecodeError, decode_batch

__all__ = ["CloudService", "PromotionHook", "kafka_client_options"]

log = logging.getLogger(__name__)

#: Called with every new champion (policy, manual promotion or rollback), in order, one at a time.
PromotionHook = Callable[[VersionEntry], Awaitable[None]]

_CHECKPOINT_FORMAT = 1


def kafka_client_options(cfg: KafkaConfig) -> dict[str, Any]:
    """aiokafka keyword arguments for bootstrap and security (TLS / SASL pass-through)."""
    sec = cfg.security
    opts: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": sec.protocol,
        "request_timeout_ms": int(cfg.request_timeout_s * 1000),
    }
    if sec.protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        ctx = create_ssl_context(
            cafile=str(sec.ca_file) if sec.ca_file else None,
            certfile=str(sec.cert_file) if sec.cert_file else None,
            keyfile=str(sec.key_file) if sec.key_file else None,
        )
        ctx.check_hostname = sec.check_hostname
        opts["ssl_context"] = ctx
    if sec.sasl_mechanism is not None:
        opts["sasl_mechanism"] = sec.sasl_mechanism
        if sec.sasl_username is not None:
            opts["sasl_plain_username"] = sec.sasl_username
        if sec.sasl_password is not None:
            opts["sasl_plain_password"] = sec.sasl_password.get_secret_value()
    return opts


_frozen_by = 0  # services in this process holding the gc freeze


def _gc_freeze() -> None:
    global _frozen_by
    _frozen_by += 1
    gc.freeze()


def _gc_unfreeze() -> None:
    global _frozen_by
    _frozen_by -= 1
    if _frozen_by == 0:
        gc.unfreeze()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: CloudService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.service._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.service._on_assigned(assigned)


class IngestStats:
    """Plain counters on the hot path (Prometheus counters are fed per poll, not per record)."""

    def __init__(self) -> None:
        self.batches: dict[str, int] = {}
        self.records: dict[str, int] = {}
        self.dedupe_dropped: dict[str, int] = {}
        self.poison: dict[str, int] = {}
        self.last_poison: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": dict(self.batches),
            "records": dict(self.records),
            "dedupe_dropped": dict(self.dedupe_dropped),
            "poison": dict(self.poison),
            "last_poison": self.last_poison,
        }


class CloudService:
    """Ingest, learn, decide, record, serve. ``async with CloudService(cfg) as svc: ...``.

    ``start``/``stop`` are idempotent; ``stop`` writes a final checkpoint and commits offsets.
    Extension points: append to :attr:`on_promotion` (the closed loop compiles, signs and
    publishes from there) and pass ``routers`` (FastAPI ``APIRouter``) to extend the API.
    """

    def __init__(
        self,
        config: CloudConfig,
        *,
        serve_api: bool | None = None,
        routers: list[Any] | None = None,
    ) -> None:
        self.config = config
        self.topics = config.kafka.topics()
        self.metrics = CloudMetrics()
        self.stats = IngestStats()
        self.learners: dict[str, ModelLearner] = {
            m.name: ModelLearner(m, config.drift, config.promotion) for m in config.models
        }
        self.join = JoinBuffer(config.join)
        self.seqs = SeqTracker(config.dedupe_window)
        self.fleet: dict[str, tuple[Heartbeat, int]] = {}
        #: model version changes seen in heartbeats (the edge swapped models), newest last
        self.model_swaps: deque[dict[str, Any]] = deque(maxlen=1000)
        self.notifier = WebhookNotifier(config.webhooks)
        self.on_promotion: list[PromotionHook] = []
        self.hook_failures = 0
        self.started_ns = 0
        self.checkpoints = 0
        self.restored_from: dict[str, Any] | None = None
        self._serve_api = config.api.enabled if serve_api is None else serve_api
        self._routers = list(routers or [])
        #: recent frames' features per model: the parity gate's test set (cloud/delivery.py)
        self.recent_frames: dict[str, deque[dict[str, float]]] = {
            m.name: deque(maxlen=config.delivery.parity_frames) for m in config.models
        }
        self.delivery: Any = None
        if config.delivery.enabled:
            from cloud.delivery import ModelDelivery

            self.delivery = ModelDelivery(self, config.delivery)
            self.delivery.load_key()  # a missing or wrong key fails here, before anything runs
            self._routers.append(self.delivery.router())
            self.on_promotion.append(self.delivery.on_promotion)
        self._registry: Registry | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._positions: dict[TopicPartition, int] = {}
        self._agents_dirty: set[str] = set()
        self._events: list[tuple[str, Event]] = []
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._by_asset: dict[str, list[ModelLearner]] = {}
        self._hooks: asyncio.Queue[VersionEntry] = asyncio.Queue()
        self._models_lock = asyncio.Lock()
        self._checkpoint_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._state = "new"  # new -> started -> stopped
        self._server: Any = None
        self.app: Any = None
        self.api_port: int | None = None
        self.learned = 0
        self._gc_frozen = False

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("the cloud service is not started")
        return self._registry

    @property
    def running(self) -> bool:
        return self._state == "started"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._state != "new":
            return
        self._state = "started"
        self.started_ns = now_ns()
        try:
            self._registry = await asyncio.to_thread(
                Registry, self.config.database.url, echo=self.config.database.echo
            )
            await self._restore()
            from cloud.api import create_app

            self.app = create_app(self, routers=self._routers)
            kc = self.config.kafka
            if kc.create_topics:
                await self._create_topics()
            self._consumer = AIOKafkaConsumer(
                **kafka_client_options(kc),
                group_id=kc.group_id,
                enable_auto_commit=False,
                auto_offset_reset=kc.auto_offset_reset,
                max_poll_records=kc.max_poll_records,
                session_timeout_ms=int(kc.session_timeout_s * 1000),
                heartbeat_interval_ms=int(kc.session_timeout_s * 1000 / 3),
                metadata_max_age_ms=int(kc.metadata_max_age_s * 1000),
            )
            await self._consumer.start()
            if self.config.gc_freeze and not self._gc_frozen:
                # everything loaded so far lives as long as the service: out of the collector's
                # way, so full collections scan only what the stream allocates (unfrozen at stop)
                _gc_freeze()
                self._gc_frozen = True
            self._consumer.subscribe(list(self.topics.uplink()), listener=_Rebalance(self))
            self._tasks.append(asyncio.create_task(self._ingest(), name="cloud-ingest"))
            self._tasks.append(asyncio.create_task(self._snapshots(), name="cloud-snapshots"))
            self._tasks.append(asyncio.create_task(self._run_hooks(), name="cloud-hooks"))
            if self._serve_api:
                await self._start_api()
            if self.delivery is not None:
                await self.delivery.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop consuming, write a final checkpoint, commit, close everything. Idempotent."""
        if self._state != "started":
            self._state = "stopped"
            return
        self._state = "stopping"
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        ingest = self._tasks[0] if self._tasks else None
        if ingest is not None:
            # the loop notices _stopping within one poll; cancel only if it does not
            done, _ = await asyncio.wait({ingest}, timeout=10)
            if not done:
                ingest.cancel()
        if self.delivery is not None:
            await self.delivery.stop()
        for task in self._tasks[1:]:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._api_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._api_task, timeout=10)
            self._api_task = None
        if self._consumer is not None and self._registry is not None:
            try:
                await self.checkpoint()
            except Exception:
                log.exception("final checkpoint failed; the group resumes from the last one")
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        await self.notifier.aclose()
        if self._registry is not None:
            await asyncio.to_thread(self._registry.close)
        if self._gc_frozen:
            self._gc_frozen = False
            _gc_unfreeze()
        self._state = "stopped"

    _api_task: asyncio.Task[None] | None = None

    async def _create_topics(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        kc = self.config.kafka
        admin = AIOKafkaAdminClient(**kafka_client_options(kc))
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in self.topics.uplink() if t not in existing]
            if missing:
                await admin.create_topics(
                    [NewTopic(t, kc.partitions, kc.replication_factor) for t in missing]
                )
                log.info("created topics %s", ", ".join(missing))
        except KafkaError as exc:
            log.warning("could not create the uplink topics (%s); expecting them to exist", exc)
        finally:
            await admin.close()

    async def _start_api(self) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            # the process owns SIGINT/SIGTERM (cloud.cli); uvicorn must not take them over
            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                yield

        api = self.config.api
        server = _Server(
            uvicorn.Config(
                self.app,
                host=api.host,
                port=api.port,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        self._server = server
        self._api_task = asyncio.create_task(server.serve(), name="cloud-api")
        deadline = time.monotonic() + 15
        while not server.started:
            if self._api_task.done():
                exc = self._api_task.exception()
                raise RuntimeError(f"the API could not listen on {api.host}:{api.port}: {exc}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {api.host}:{api.port} within 15 s")
            await asyncio.sleep(0.02)
        sock = server.servers[0].sockets[0]
        self.api_port = int(sock.getsockname()[1])
        log.info("cloud API on http://%s:%s", api.host, self.api_port)

    # -- restore ---------------------------------------------------------------------------

    async def _restore(self) -> None:
        reg = self.registry
        ck = await asyncio.to_thread(reg.load_checkpoint, self.config.instance)
        if ck is not None:
            blob, offsets, ts_ns = ck
            state = pickle.loads(blob)  # noqa: S301 - written by this service into its own DB
            if state.get("format") != _CHECKPOINT_FORMAT:
                raise RuntimeError(
                    f"checkpoint of instance {self.config.instance!r} has format "
                    f"{state.get('format')!r}; this build reads {_CHECKPOINT_FORMAT}"
                )
            for name, learner in state["learners"].items():
                if name in self.learners:
                    self.learners[name] = self._reconfigure(learner)
            self.join = state["join"]
            self.join.reconfigure(self.config.join)
            self.stats = state["stats"]
            self.learned = state.get("learned", 0)
            self.restored_from = {"offsets": offsets, "ts_ns": ts_ns}
            log.info(
                "resumed instance %r from its checkpoint (%d samples learned)",
                self.config.instance,
                self.learned,
            )
        for name, learner in self.learners.items():
            champ = await asyncio.to_thread(reg.champion, name, with_pipeline=True)
            if champ is None:
                learner.champion = None
            elif learner.champion is None or learner.champion.version != champ.version:
                learner.install_champion(champ.version, champ.learner, champ.pipeline_blob)
        for row in await asyncio.to_thread(reg.agents):
            hb = Heartbeat(
                row["agent_id"],
                row["last_heartbeat_ns"],
                row["models"],
                row["outbox_depth"],
                row["outbox_bytes"],
                row["status"],
                row["info"],
            )
            self.fleet[hb.agent_id] = (hb, row["received_ns"])

    def _reconfigure(self, learner: ModelLearner) -> ModelLearner:
        """A checkpointed learner under today's config: new candidates join, removed ones go."""
        fresh = self.learners[learner.name]
        learner.config = fresh.config
        learner.drift_config = self.config.drift
        learner.promotion = self.config.promotion
        learner.promotion_pending = False
        learner.candidates = {
            name: learner.candidates.get(name, cand) for name, cand in fresh.candidates.items()
        }
        return learner

    # -- ingest ----------------------------------------------------------------------------

    async def _ingest(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                polled = await consumer.getmany(
                    timeout_ms=200, max_records=self.config.kafka.max_poll_records
                )
            except KafkaError as exc:
                log.warning("Kafka poll failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.1
            for tp, messages in polled.items():
                for msg in messages:
                    notices = self._apply(msg.topic, msg.partition, msg.value)
                    self._positions[tp] = msg.offset + 1
                    if notices:
                        await self._handle(notices)
                self._since_checkpoint += len(messages)
            if polled:
                await asyncio.sleep(0)  # let the API answer between polls
            if self._since_checkpoint and (
                self._since_checkpoint >= self.config.checkpoint_records
                or time.monotonic() - self._last_checkpoint >= self.config.checkpoint_interval_s
            ):
                await self.checkpoint()

    def _apply(self, topic: str, partition: int, value: bytes | None) -> list[Any]:
        """Apply one Kafka message; returns drift detections and promotion decisions."""
        stats = self.stats
        if value is None:
            return self._poison(topic, partition, "empty message value (tombstone)")
        try:
            batch = decode_batch(value)
        except WireDecodeError as exc:
            return self._poison(topic, partition, str(exc))
        stats.batches[topic] = stats.batches.get(topic, 0) + 1
        self.metrics.ingest_batches.labels(topic).inc()
        key = (batch.agent_id, topic, partition)
        if self.seqs.seen(key, batch.batch_seq):
            stats.dedupe_dropped[topic] = stats.dedupe_dropped.get(topic, 0) + 1
            self.metrics.dedupe_drops.labels(topic).inc()
            return []
        notices: list[Any] = []
        try:
            self._apply_batch(batch, notices)
        except Exception as exc:
            # part of it may be applied: marked as seen all the same, so never applied twice
            self.seqs.mark(key, batch.batch_seq)
            log.exception("applying batch %s#%d failed", batch.agent_id, batch.batch_seq)
            self._poison(topic, partition, f"batch {batch.agent_id}#{batch.batch_seq}: {exc!r}")
            return notices
        self.seqs.mark(key, batch.batch_seq)
        n = len(batch.records)
        stats.records[topic] = stats.records.get(topic, 0) + n
        self.metrics.ingest_records.labels(topic).inc(n)
        return notices

    def _poison(self, topic: str, partition: int, why: str) -> list[Any]:
        self.stats.poison[topic] = self.stats.poison.get(topic, 0) + 1
        self.stats.last_poison = f"{topic}[{partition}]: {why}"
        self.metrics.poison.labels(topic).inc()
        log.warning("skipping an undecodable message on %s[%d]: %s", topic, partition, why)
        return []

    def _apply_batch(self, batch: Batch, notices: list[Any]) -> None:
        kind = batch.kind
        if kind is Kind.FRAME:
            add_frame = self.join.add_frame
            pairs = [p for p in map(add_frame, batch.records) if p is not None]  # type: ignore[arg-type]
            if pairs:
                self._learn(pairs, notices)
        elif kind is Kind.LABEL:
            add_label = self.join.add_label
            pairs = [p for p in map(add_label, batch.records) if p is not None]  # type: ignore[arg-type]
            if pairs:
                self._learn(pairs, notices)
        elif kind is Kind.HEARTBEAT:
            received = now_ns()
            for rec in batch.records:
                assert isinstance(rec, Heartbeat)
                old = self.fleet.get(rec.agent_id)
                if old is None or rec.ts_ns >= old[0].ts_ns:
                    if old is not None and old[0].models != rec.models:
                        for model, version in rec.models.items():
                            before = old[0].models.get(model)
                            if before != version:
                                self.model_swaps.append(
                                    {
                                        "agent_id": rec.agent_id,
                                        "model": model,
                                        "from_version": before,
                                        "to_version": version,
                                        "ts_ns": rec.ts_ns,
                                        "received_ns": received,
                                    }
                                )
                    self.fleet[rec.agent_id] = (rec, received)
                    self._agents_dirty.add(rec.agent_id)
        elif kind is Kind.EVENT:
            for rec in batch.records:
                assert isinstance(rec, Event)
                self._events.append((batch.agent_id, rec))
        # readings: counted; the cloud keeps no telemetry store of its own

    def _learners_of(self, asset: str) -> list[ModelLearner]:
        learners = self._by_asset.get(asset)
        if learners is None:
            learners = [m for m in self.learners.values() if m.matches(asset)]
            if len(self._by_asset) < 100_000:
                self._by_asset[asset] = learners
        return learners

    def _learn(self, pairs: list[tuple[Frame, Label]], notices: list[Any]) -> None:
        """Learn the pairs one batch completed, in order, with every model matching their asset.

        Every sample is predicted then learned by every candidate, in order; drift detections
        come at their own sample; the promotion policy runs once per batch and model, after it
        (on the same windowed figures it would read after the batch's last sample)."""
        first = pairs[0][0].asset
        if all(f.asset == first for f, _ in pairs):
            runs = [(learner, pairs) for learner in self._learners_of(first)]
        else:
            runs = []
            for learner in self.learners.values():
                mine = [p for p in pairs if learner in self._learners_of(p[0].asset)]
                if mine:
                    runs.append((learner, mine))
        for learner, mine in runs:
            frames = [f for f, _ in mine]
            self.recent_frames[learner.name].extend([f.features for f in frames])
            notices.extend(learner.learn_many(frames, [lb.target for _, lb in mine]))
            decision = learner.evaluate_promotion()
            if decision is not None:
                learner.promotion_pending = True
                notices.append(decision)
        self.learned += len(pairs)

    async def _handle(self, notices: list[Any]) -> None:
        for notice in notices:
            if isinstance(notice, DriftDetection):
                try:
                    await self._record_drift(notice)
                except Exception:
                    log.exception("recording the drift of %s failed", notice.model)
            elif isinstance(notice, PromotionDecision):
                try:
                    await self.apply_decision(notice, actor="policy")
                except Exception:
                    self.learners[notice.model].promotion_pending = False
                    log.exception("recording the promotion of %s failed", notice.model)

    async def _record_drift(self, det: DriftDetection) -> None:
        self.metrics.drift_detections.labels(det.model, det.source).inc()
        drift_id = await asyncio.to_thread(
            self.registry.record_drift,
            model=det.model,
            version=det.version,
            source=det.source,
            detector=det.detector,
            samples=det.samples,
            evidence=det.evidence,
            ts_ns=det.ts_ns,
        )
        learner = self.learners[det.model]
        learner.drift_record_id = drift_id
        log.warning(
            "drift on model %s version %s (%s errors, %s)",
            det.model,
            det.version,
            det.source,
            det.detector,
        )
        self.notifier.notify(
            "drift",
            {
                "id": drift_id,
                "model": det.model,
                "version": det.version,
                "source": det.source,
                "detector": det.detector,
                "samples": det.samples,
                "ts_ns": det.ts_ns,
                "evidence": det.evidence,
            },
        )

    def offsets(self) -> dict[str, int]:
        """Next offset per ``topic:partition`` consumed so far (what a version learned up to)."""
        return {f"{tp.topic}:{tp.partition}": off for tp, off in sorted(self._positions.items())}

    # -- promotion ----------------------------------------------------------------------------

    async def apply_decision(self, decision: PromotionDecision, *, actor: str) -> VersionEntry:
        """Register a new champion from a policy (or manual) decision and install it."""
        learner = self.learners[decision.model]
        async with self._models_lock:
            entry = await asyncio.to_thread(
                self.registry.add_version,
                model=decision.model,
                task=learner.task,
                learner=decision.learner,
                reason=decision.reason,
                pipeline=decision.pipeline_blob,
                metrics=decision.metrics,
                features=decision.features,
                steps=decision.steps,
                offsets=self.offsets(),
                evidence=decision.evidence,
                actor=actor,
            )
            drift_id = learner.drift_record_id
            if decision.reason == "drift" and drift_id is not None:
                await asyncio.to_thread(self.registry.link_drift, drift_id, decision.model)
            learner.drift_record_id = None
            learner.install_champion(entry.version, entry.learner, decision.pipeline_blob)
        self._announce(entry, decision.reason)
        return entry

    async def promote(
        self,
        model: str,
        *,
        learner: str | None = None,
        version: int | None = None,
        actor: str = "api",
    ) -> VersionEntry:
        """Manual promotion: an existing ``version``, or a snapshot of ``learner`` (default:
        the current challenger). Raises ``KeyError`` / ``RegistryError`` / ``ValueError``."""
        ml = self._learner(model)
        if version is not None:
            async with self._models_lock:
                entry = await asyncio.to_thread(
                    self.registry.activate, model, version, reason="manual", actor=actor
                )
                ml.install_champion(entry.version, entry.learner, entry.pipeline_blob)
            self._announce(entry, "manual")
            return entry
        if learner is None:
            chal = ml.challenger()
            if chal is None:
                raise ValueError(f"model {model!r} has no candidate with samples yet")
            learner = chal.name
        return await self.apply_decision(ml.snapshot(learner), actor=actor)

    async def rollback(
        self, model: str, *, version: int | None = None, actor: str = "api"
    ) -> VersionEntry:
        """Make the champion's parent (or ``version``) champion again."""
        ml = self._learner(model)
        async with self._models_lock:
            entry = await asyncio.to_thread(
                self.registry.activate, model, version, reason="rollback", actor=actor
            )
            ml.install_champion(entry.version, entry.learner, entry.pipeline_blob)
        self._announce(entry, "rollback")
        return entry

    def _learner(self, model: str) -> ModelLearner:
        ml = self.learners.get(model)
        if ml is None:
            raise KeyError(f"no model {model!r}; configured: {sorted(self.learners)}")
        return ml

    def _announce(self, entry: VersionEntry, reason: str) -> None:
        self.metrics.promotions.labels(entry.model, reason).inc()
        log.info("model %s version %d is champion (%s)", entry.model, entry.version, reason)
        self.notifier.notify("promotion", {"reason": reason, **entry.as_dict()})
        self._hooks.put_nowait(entry)

    async def _run_hooks(self) -> None:
        while True:
            entry = await self._hooks.get()
            for hook in list(self.on_promotion):
                try:
                    await hook(entry)
                except Exception:
                    self.hook_failures += 1
                    log.exception(
                        "promotion hook %r failed for %s v%d", hook, entry.model, entry.version
                    )
            self._hooks.task_done()

    async def drain_hooks(self, within: float = 30.0) -> None:
        """Wait until every announced promotion went through every hook."""
        await asyncio.wait_for(self._hooks.join(), within)

    # -- checkpoints ---------------------------------------------------------------------------

    async def checkpoint(self) -> bool:
        """Write the checkpoint, then commit the offsets it covers. False when it failed."""
        async with self._checkpoint_lock:
            return await self._checkpoint()

    async def _checkpoint(self) -> bool:
        state = pickle.dumps(
            {
                "format": _CHECKPOINT_FORMAT,
                "learners": self.learners,
                "join": self.join,
                "stats": self.stats,
                "learned": self.learned,
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        positions = dict(self._positions)
        offsets = {f"{tp.topic}:{tp.partition}": off for tp, off in positions.items()}
        dirty = self.seqs.take_dirty()
        agents = [self.fleet[a] for a in self._agents_dirty if a in self.fleet]
        events, self._events = self._events, []
        agents_dirty, self._agents_dirty = self._agents_dirty, set()
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        try:
            await asyncio.to_thread(
                self.registry.save_checkpoint,
                self.config.instance,
                state,
                offsets,
                self.learned,
                dirty,
                agents,
                events,
            )
        except Exception:
            self.seqs.restore_dirty(dirty)
            self._events = events + self._events
            self._agents_dirty |= agents_dirty
            self._since_checkpoint = 1
            self.metrics.checkpoint_failures.inc()
            log.exception("checkpoint failed; offsets stay uncommitted until one succeeds")
            return False
        self.checkpoints += 1
        self.metrics.checkpoints.inc()
        consumer = self._consumer
        if consumer is not None and positions:
            assigned = consumer.assignment()
            commit = {tp: off for tp, off in positions.items() if tp in assigned}
            if commit:
                try:
                    await consumer.commit(commit)
                except (CommitFailedError, KafkaError) as exc:
                    # the checkpoint holds the dedupe state, so re-reading is harmless
                    log.warning("offset commit failed (%s); the next checkpoint retries", exc)
        return True

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if self._registry is not None and self._positions:
            await self.checkpoint()
        for tp in revoked:
            self.seqs.forget_partition(tp.topic, tp.partition)
            self._positions.pop(tp, None)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        loaded = await asyncio.to_thread(
            self.registry.load_dedupe, [(tp.topic, tp.partition) for tp in assigned]
        )
        for key, window in loaded.items():
            self.seqs.load(key, window)
        log.info("assigned %d partitions (%d dedupe records loaded)", len(assigned), len(loaded))

    # -- metrics over time ---------------------------------------------------------------

    async def _snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_snapshot_s)
            try:
                await self.snapshot_metrics()
            except Exception:
                log.exception("writing metric snapshots failed")

    async def snapshot_metrics(self) -> None:
        """Write each model's current prequential figures as points of its time series."""
        ts = now_ns()
        points: list[dict[str, Any]] = []
        for ml in self.learners.values():
            for cand in ml.candidates.values():
                if cand.metrics.n:
                    points.append(
                        {
                            "model": ml.name,
                            "subject": cand.name,
                            "version": None,
                            "samples": cand.n_learned,
                            "metrics": cand.report(assets=False),
                            "ts_ns": ts,
                        }
                    )
            champ = ml.champion
            if champ is not None:
                for subject, scored in (("champion", champ), ("edge", champ.edge)):
                    if scored.metrics.n:
                        points.append(
                            {
                                "model": ml.name,
                                "subject": subject,
                                "version": champ.version,
                                "samples": scored.metrics.n,
                                "metrics": scored.report(assets=False),
                                "ts_ns": ts,
                            }
                        )
        if points:
            await asyncio.to_thread(self.registry.add_metric_points, points)

    def ingest_lag(self) -> dict[tuple[str, int], int]:
        consumer = self._consumer
        if consumer is None:
            return {}
        out: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is None:
                continue
            pos = self._positions.get(tp)
            out[(tp.topic, tp.partition)] = max(0, hw - (pos if pos is not None else 0))
        return out
