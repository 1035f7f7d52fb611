"""The cloud service: one process, one lifecycle — Kafka ingest, learners, registry, API.

Data flow per poll: ``getmany`` -> decode (a poison message is logged, counted, skipped; a bad
record inside a good batch is quarantined alone as a dead-letter event) -> dedupe by
(agent_id, incarnation, batch_seq) per partition -> apply (frames and labels into the join, joined
pairs into every matching model's learners; heartbeats into the fleet; events queued for the
registry; telemetry counted) -> drift detections and promotion decisions are recorded as they
happen. Durability: every ``checkpoint_interval_s`` (or ``checkpoint_records`` records), the
learners, the join buffer, the dedupe state, the fleet, queued events and the last message seen
per partition (its offset and fingerprint) are written to the registry in one transaction, and
only then are the consumed offsets committed to Kafka and what was applied published to the
agents on ``<prefix>.control`` (the end-to-end acknowledgement: an agent deletes a batch only
then). After a crash the group resumes from the committed offsets, which are never ahead of the
checkpoint; the batches between them are dropped by the restored dedupe state, so nothing is
learned twice.

Lost log (docs/reliability.md): a committed offset beyond the log end or before its start, a
message at the last consumed offset that is not the one consumed there (a re-created topic, a
broker that came back empty and was refilled), or a log end that falls below the position while
reading all mean records the broker acknowledged are gone. The service then resumes from what the
broker still has, counts it (``edgeloop_cloud_log_lost_total``), logs it at ERROR and asks every
agent to replay what it holds unconfirmed; dedupe drops what had been applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import pickle
import time
import uuid
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from cloud.config import CloudConfig, KafkaConfig
from cloud.dedupe import DedupeKey, SeqTracker
from cloud.drift import DriftDetection, WebhookNotifier
from cloud.instruments import CloudMetrics
from cloud.join import JoinBuffer
from cloud.learning import ModelLearner, PromotionDecision
from cloud.registry import Registry, VersionEntry
from shared.control import BROADCAST, encode_applied, encode_replay
from shared.logcheck import LogEndWatch, log_ends
from shared.records import Event, Frame, Heartbeat, Label, Severity, dead_letter_event, now_ns
from shared.supervision import Supervisor, cancel_requested, close_quietly
from shared.wire import Batch, Kind, WireDecodeError, decode_batch

__all__ = ["CloudService", "PromotionHook", "kafka_client_options"]

log = logging.getLogger(__name__)

#: Called with every new champion (policy, manual promotion or rollback), in order, one at a time.
PromotionHook = Callable[[VersionEntry], Awaitable[None]]

_CHECKPOINT_FORMAT = 1
#: how many of the last consumed messages per partition are kept to recognise the log later
MARKS_KEPT = 64
#: the header carrying the lowest batch_seq the sending agent still held (edge/uplink.py)
LOW_HEADER = "el-low"
#: the event rule under which a new agent incarnation is recorded
NEW_INCARNATION_RULE = "edgeloop.new_incarnation"


def _unlearnable(frame: Frame) -> bool:
    """A sample no learner may see: an infinite feature (NaN means missing and is fine)."""
    return any(map(math.isinf, frame.features.values()))


def _fingerprint(msg: Any) -> str:
    """What identifies one Kafka message at its offset (for the lost-log check)."""
    value = msg.value or b""
    return f"{msg.timestamp}:{len(value)}:{zlib.crc32(value):08x}"


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
        #: per partition: offsets and fingerprints of the last messages consumed (checkpointed)
        self._marks: dict[TopicPartition, deque[tuple[int, str]]] = {}
        #: partitions resumed a little before their committed offset, to read the last consumed
        #: messages again and check they are still those: fingerprints by offset, last offset
        self._verify: dict[TopicPartition, tuple[dict[int, str], int]] = {}
        self._applied_log: list[dict[str, Any]] = []  # audit rows until the next checkpoint
        #: recent lost-log detections (newest last), for /healthz and the API
        self.log_losses: deque[dict[str, Any]] = deque(maxlen=50)
        #: per agent: its newest incarnation and the newest batch creation time seen from it
        self.incarnations: dict[str, tuple[str, int]] = {}
        self.quarantined = 0
        self._control_producer: AIOKafkaProducer | None = None
        self._acks_pending: dict[tuple[str, str], dict[tuple[str, int], tuple[int, str]]] = {}
        #: (agent or *, reason, cause, parts or None for everything)
        self._replays_pending: list[tuple[str, str, str, list[tuple[str, int]] | None]] = []
        self._control_wake = asyncio.Event()
        self._republished: dict[str, float] = {}
        self._replayed: dict[str, float] = {}
        self.acks_published = 0
        self.replays_requested = 0
        self.control_error: str | None = None
        #: a core task that dies makes the service failing (its process exits non-zero)
        self.supervisor = Supervisor(
            "cloud service",
            log,
            stopping=lambda: self._state != "started",
            on_fail=lambda: self.metrics.failed.set(1),
        )
        self._agents_dirty: set[str] = set()
        self._events: list[tuple[str, Event]] = []
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._by_asset: dict[str, list[ModelLearner]] = {}
        self._hooks: asyncio.Queue[VersionEntry] = asyncio.Queue()
        self._models_lock = asyncio.Lock()
        self._checkpoint_lock = asyncio.Lock()
        self._rebalance_lock = asyncio.Lock()
        self._ends_watch = LogEndWatch()
        #: per partition: bumped by every seek (a poll fetched before one is stale)
        self._seek_gen: dict[TopicPartition, int] = {}
        #: per partition: the offset the next message must have (None: not known)
        self._expected: dict[TopicPartition, int] = {}
        #: partitions resumed at a committed offset beyond the log end the broker gave
        self._parked: dict[TopicPartition, str] = {}
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
            self._control_producer = AIOKafkaProducer(
                **{**kafka_client_options(kc), "client_id": f"{kc.client_id}-control"},
                acks="all",
                enable_idempotence=False,
                linger_ms=5,
            )
            await self._control_producer.start()
            self._consumer = AIOKafkaConsumer(
                **kafka_client_options(kc),
                group_id=kc.group_id,
                enable_auto_commit=False,
                # aiokafka may place a partition (committed offset, else this) while the
                # assignment hook is still deciding; the hook's own seek wins, and a poll
                # fetched before a seek is dropped (_process). A reset aiokafka does on its own
                # later (out of range) shows as a jump in the offsets consumed: counted and
                # answered with a replay (_process)
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
            self._tasks.append(asyncio.create_task(self._control_loop(), name="cloud-control"))
            if self._serve_api:
                await self._start_api()
            if self.delivery is not None:
                await self.delivery.start()
            self.supervisor.watch([*self._tasks, self._api_task])
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
        if self._control_producer is not None:
            await close_quietly(self._publish_control)  # the final acks
            await close_quietly(self._control_producer.stop)
            self._control_producer = None
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
            async with asyncio.timeout(kc.request_timeout_s + 5):
                await admin.start()
                existing = set(await admin.list_topics())
                wanted = {t: kc.partitions for t in self.topics.uplink()}
                wanted[self.topics.control] = self.config.control.partitions
                missing = [t for t in wanted if t not in existing]
                if missing:
                    await admin.create_topics(
                        [NewTopic(t, wanted[t], kc.replication_factor) for t in missing]
                    )
                    log.info("created topics %s", ", ".join(missing))
        except (KafkaError, OSError, TimeoutError) as exc:
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
            self.incarnations = dict(state.get("incarnations", {}))
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
        check_every = self.config.control.log_check_interval_s
        next_check = time.monotonic() + check_every
        while not self._stopping.is_set():
            gens = dict(self._seek_gen)  # a seek after this makes the poll stale
            try:
                polled = await consumer.getmany(
                    timeout_ms=200, max_records=self.config.kafka.max_poll_records
                )
            except asyncio.CancelledError:
                if cancel_requested():
                    raise
                log.warning("Kafka poll cancelled inside aiokafka; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            except KafkaError as exc:
                log.warning("Kafka poll failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.1
            # a rebalance waits until this poll is applied (and checkpointed when due): its
            # hooks forget and reload per-partition state, which must not change under the loop
            async with self._rebalance_lock:
                await self._process(consumer, polled, gens)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + check_every
                    await self._check_log_ends()
                if self._since_checkpoint and (
                    self._since_checkpoint >= self.config.checkpoint_records
                    or time.monotonic() - self._last_checkpoint >= self.config.checkpoint_interval_s
                ):
                    await self.checkpoint()
            if polled:
                await asyncio.sleep(0)  # let the API answer between polls

    async def _process(
        self, consumer: AIOKafkaConsumer, polled: dict[Any, list[Any]], gens: dict[Any, int]
    ) -> None:
        """Apply one poll, partition by partition, in offset order."""
        assigned = consumer.assignment()
        skipped: dict[TopicPartition, tuple[int, int]] = {}
        for tp, messages in polled.items():
            if tp not in assigned:
                continue  # revoked while the poll was in flight: its new owner reads it
            if self._seek_gen.get(tp, 0) != gens.get(tp, 0):
                continue  # fetched before a seek: it is read again from where the seek says
            expected = self._expected.get(tp)
            if expected is not None and messages and messages[0].offset != expected:
                skipped[tp] = (expected, messages[0].offset)
            if tp in self._verify and messages:
                kept = await self._verified(tp, messages)
                if kept is None:
                    continue  # the log was lost: this partition starts over
                messages = kept
            for msg in messages:
                notices = self._apply(msg.topic, msg.partition, msg.value, msg.headers, msg.offset)
                self._positions[tp] = msg.offset + 1
                if notices:
                    await self._handle(notices)
            if messages:
                self._expected[tp] = messages[-1].offset + 1
                seen = self._marks.get(tp)
                if seen is None:
                    seen = self._marks[tp] = deque(maxlen=MARKS_KEPT)
                seen.extend((m.offset, _fingerprint(m)) for m in messages[-MARKS_KEPT:])
            self._since_checkpoint += len(messages)
        if skipped:
            self._skipped(skipped)

    def _skipped(self, jumps: dict[TopicPartition, tuple[int, int]]) -> None:
        """The broker handed out other offsets than the next ones: records were skipped (a
        reset after an out-of-range position, retention, a fetch answered from a later record
        batch) or read again. What the agents still hold is asked for again; dedupe drops
        what had been applied."""
        now = now_ns()
        for tp, (expected, got) in jumps.items():
            detail = f"expected offset {expected}, the broker gave {got}"
            self.metrics.log_lost.labels(tp.topic, "offset_jump").inc()
            self.log_losses.append(
                {
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "cause": "offset_jump",
                    "detail": detail,
                    "ts_ns": now,
                    "resumed_at": got,
                }
            )
            log.error(
                "Kafka partition %s[%d]: %s; asking the agents to send again what they hold "
                "unconfirmed for it",
                tp.topic,
                tp.partition,
                detail,
            )
        self._request_replay(
            BROADCAST,
            "offsets jumped on " + ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(jumps)),
            "log_lost",
            [(tp.topic, tp.partition) for tp in sorted(jumps)],
        )

    def _seek(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, *, expect: bool
    ) -> None:
        """Move ``tp`` to ``offset``: polls fetched before are dropped; with ``expect`` the next
        message must be at that very offset (else records were skipped)."""
        consumer.seek(tp, offset)
        self._seek_gen[tp] = self._seek_gen.get(tp, 0) + 1
        if expect:
            self._expected[tp] = offset
        else:
            self._expected.pop(tp, None)

    def _apply(
        self,
        topic: str,
        partition: int,
        value: bytes | None,
        headers: Any = (),
        offset: int = -1,
    ) -> list[Any]:
        """Apply one Kafka message; returns drift detections and promotion decisions."""
        stats = self.stats
        if value is None:
            return self._poison(topic, partition, "empty message value (tombstone)")
        try:
            batch = decode_batch(value, quarantine=True)
        except WireDecodeError as exc:
            return self._poison(topic, partition, str(exc))
        stats.batches[topic] = stats.batches.get(topic, 0) + 1
        self.metrics.ingest_batches.labels(topic).inc()
        agent, inc, seq = batch.agent_id, batch.incarnation, batch.batch_seq
        key: DedupeKey = (agent, inc, topic, partition)
        for k, v in headers or ():
            if k == LOW_HEADER:
                try:
                    low = int(v)
                except (TypeError, ValueError):
                    break
                if 0 < low <= seq:
                    self.seqs.raise_floor(key, low - 1)
                break
        self._track_incarnation(agent, inc, batch.created_ns)
        if self.seqs.seen(key, seq):
            stats.dedupe_dropped[topic] = stats.dedupe_dropped.get(topic, 0) + 1
            self.metrics.dedupe_drops.labels(topic).inc()
            self.seqs.duplicate(key)
            return []
        for _index, reason in batch.rejected:
            self._quarantine(topic, agent, "decode", f"batch {agent}#{seq}: {reason}")
        notices: list[Any] = []
        try:
            self._apply_batch(batch, notices)
        except Exception as exc:
            # part of it may be applied: marked as seen all the same, so never applied twice
            self._mark(key, batch, topic, partition, offset)
            log.exception("applying batch %s#%d failed", agent, seq)
            self._poison(topic, partition, f"batch {agent}#{seq}: {exc!r}")
            return notices
        self._mark(key, batch, topic, partition, offset)
        n = len(batch.records)
        stats.records[topic] = stats.records.get(topic, 0) + n
        self.metrics.ingest_records.labels(topic).inc(n)
        return notices

    def _mark(self, key: DedupeKey, batch: Batch, topic: str, partition: int, offset: int) -> None:
        if self.seqs.mark(key, batch.batch_seq):
            self.metrics.dedupe_overflow.inc()
            if self.seqs.overflows == 1 or self.seqs.overflows % 1000 == 0:
                log.error(
                    "dedupe window of %s full (dedupe_window %d): it forgot applied batches; a "
                    "resend below its floor would be taken for a duplicate. Raise dedupe_window "
                    "or update the agent (its el-low header keeps the window short)",
                    key,
                    self.seqs.window,
                )
        if self.config.audit_applied:
            self._applied_log.append(
                {
                    "agent_id": batch.agent_id,
                    "incarnation": batch.incarnation,
                    "batch_seq": batch.batch_seq,
                    "topic": topic,
                    "partition": partition,
                    "offset": offset,
                    "records": len(batch.records),
                    "instance": self.config.instance,
                    "ts_ns": now_ns(),
                }
            )

    def _track_incarnation(self, agent: str, incarnation: str, created_ns: int) -> None:
        known = self.incarnations.get(agent)
        if known is None:
            self.incarnations[agent] = (incarnation, created_ns)
            return
        if created_ns <= known[1]:
            return
        self.incarnations[agent] = (incarnation, created_ns)
        if known[0] == incarnation:
            return
        self.metrics.incarnations.inc()
        log.warning(
            "agent %s has a new incarnation %s (was %s): its outbox was created anew — a "
            "reinstall or a lost state directory. Its batches are numbered from 1 again and "
            "applied as new; anything the old outbox still held unsent is gone",
            agent,
            incarnation or "(none)",
            known[0] or "(none)",
        )
        self._events.append(
            (
                agent,
                Event(
                    NEW_INCARNATION_RULE,
                    agent,
                    created_ns,
                    Severity.WARNING,
                    f"agent {agent} started a new incarnation (its outbox was created anew)",
                    {"incarnation": incarnation, "previous": known[0]},
                ),
            )
        )

    def _quarantine(
        self, topic: str, agent: str, stage: str, reason: str, payload: str | None = None
    ) -> None:
        """Set one record aside as a dead-letter event (stored with the next checkpoint)."""
        self.quarantined += 1
        self.metrics.quarantined.labels(topic, stage).inc()
        if self.quarantined <= 10 or self.quarantined % 1000 == 0:
            log.warning("quarantined a record from %s (%s, %s): %s", agent, topic, stage, reason)
        self._events.append(
            (
                agent,
                dead_letter_event(
                    origin="cloud", source=f"{topic} ({stage})", reason=reason, payload=payload
                ),
            )
        )

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
                    self._check_unconfirmed(rec)
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
            if any(_unlearnable(f) for f, _ in mine):
                kept = []
                for f, lb in mine:
                    if _unlearnable(f):
                        self._quarantine(
                            self.topics.frames,
                            f.asset,
                            "learn",
                            f"model {learner.name}: frame {f.asset}/{f.key} has an infinite "
                            "feature value; its sample is not learned",
                            repr(f),
                        )
                    else:
                        kept.append((f, lb))
                mine = kept
                if not mine:
                    continue
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
                "incarnations": self.incarnations,
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        positions = dict(self._positions)
        offsets = {f"{tp.topic}:{tp.partition}": off for tp, off in positions.items()}
        marks = {(tp.topic, tp.partition): list(m) for tp, m in self._marks.items()}
        dirty = self.seqs.take_dirty()
        acks = self.seqs.take_ack_dirty() if self.config.control.acks else {}
        applied, self._applied_log = self._applied_log, []
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
                marks,
                applied,
            )
        except Exception:
            self.seqs.restore_dirty(dirty)
            self.seqs.restore_ack_dirty(set(acks))
            self._applied_log = applied + self._applied_log
            self._events = events + self._events
            self._agents_dirty |= agents_dirty
            self._since_checkpoint = 1
            self.metrics.checkpoint_failures.inc()
            log.exception("checkpoint failed; offsets stay uncommitted until one succeeds")
            return False
        self.checkpoints += 1
        self.metrics.checkpoints.inc()
        if acks:  # applied durably now: the agents may forget these batches
            self._queue_acks(acks)
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
        async with self._rebalance_lock:
            if self._registry is not None and self._positions:
                await self.checkpoint()
            for tp in revoked:
                self.seqs.forget_partition(tp.topic, tp.partition)
                self._positions.pop(tp, None)
                self._marks.pop(tp, None)
                self._verify.pop(tp, None)
                self._expected.pop(tp, None)
            self._ends_watch.forget(revoked)
            for tp in revoked:
                self._parked.pop(tp, None)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._rebalance_lock:
            await self._assign(assigned)

    async def _assign(self, assigned: set[TopicPartition]) -> None:
        """Load the partitions' dedupe state and set every position, checking the log first."""
        keys = [(tp.topic, tp.partition) for tp in assigned]
        loaded = await asyncio.to_thread(self.registry.load_dedupe, keys)
        for key, window in loaded.items():
            self.seqs.load(key, window)
        marks = await asyncio.to_thread(self.registry.load_marks, keys)
        consumer = self._consumer
        lost: dict[TopicPartition, tuple[str, str]] = {}
        if consumer is not None and assigned:
            tps = sorted(assigned)
            within = self.config.kafka.request_timeout_s + 5
            async with asyncio.timeout(within):
                starts = await consumer.beginning_offsets(tps)
                ends = await log_ends(consumer, tps)
            for tp in tps:
                async with asyncio.timeout(within):
                    committed = await consumer.committed(tp)
                history = marks.get((tp.topic, tp.partition))
                last = history[-1][0] if history else None
                if committed is None and last is not None:
                    committed = last + 1  # the group's offsets are gone; the registry knows
                begin, end = starts[tp], ends[tp]
                log.debug(
                    "assigned %s: committed %s, log %d..%d, last consumed %s",
                    tp,
                    committed,
                    begin,
                    end,
                    last,
                )
                if committed is None:
                    self._seek_fresh(consumer, tp, begin, end)
                    continue
                if committed > end:
                    # most likely a lost log, but a broker may answer ListOffsets with a stale
                    # end: the partition is parked at its position and the log-end watch
                    # decides on its next two checks (a healthy log lets it move on)
                    self._parked[tp] = "beyond_end"
                if committed < begin:
                    lost[tp] = (
                        "before_start",
                        f"committed offset {committed} is before the log start {begin} "
                        "(retention removed records never consumed)",
                    )
                elif history and last is not None and last == committed - 1 and last >= begin:
                    # read the last consumed messages again: are they the same? (from the
                    # oldest kept: a broker may answer a fetch from the next record batch)
                    self._seek(consumer, tp, max(begin, history[0][0]), expect=False)
                    self._verify[tp] = (dict(history), last)
                    self._positions[tp] = committed
                else:
                    self._seek(consumer, tp, committed, expect=True)
                    self._positions[tp] = committed
        log.info("assigned %d partitions (%d dedupe records loaded)", len(assigned), len(loaded))
        if lost:
            await self._log_lost(lost)
        if self._parked:
            await self._check_log_ends()  # the first of the two sightings, now

    def _seek_fresh(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, begin: int, end: int
    ) -> None:
        """A partition this group never consumed: start where ``auto_offset_reset`` says."""
        at = begin if self.config.kafka.auto_offset_reset == "earliest" else end
        self._seek(consumer, tp, at, expect=False)
        self._positions[tp] = at

    async def _verified(self, tp: TopicPartition, messages: list[Any]) -> list[Any] | None:
        """The partition was resumed before its committed offset: the messages it reads again
        up to the last one consumed must be the ones consumed there. Returns the messages
        after them (to apply), or None when the log turned out to be another one."""
        expected, last = self._verify[tp]
        fresh: list[Any] = []
        for msg in messages:
            if msg.offset > last:
                fresh.append(msg)
                continue
            fp = expected.get(msg.offset)
            if fp is not None and fp != _fingerprint(msg):
                await self._log_lost(
                    {
                        tp: (
                            "replaced",
                            f"the message at offset {msg.offset} is not the one consumed there "
                            "(the topic was re-created or the broker came back with another log)",
                        )
                    }
                )
                return None
        if messages[-1].offset >= last:
            del self._verify[tp]  # read past the last consumed message: checked
        return fresh

    async def _check_log_ends(self) -> None:
        """A log end below what was already consumed (or below the position a partition was
        resumed at), twice at the same position: the broker lost acknowledged records. The end
        is the larger of a ListOffsets answer and the last fetch response's high watermark
        (:mod:`shared.logcheck`)."""
        consumer = self._consumer
        if consumer is None:
            return
        tps = [tp for tp in consumer.assignment() if tp in self._positions]
        if not tps:
            return
        within = self.config.kafka.request_timeout_s + 5
        try:
            async with asyncio.timeout(within):
                ends = await log_ends(consumer, tps, tries=1)
        except (KafkaError, TimeoutError) as exc:
            log.debug("log end check skipped: %s", exc)
            return
        short = self._ends_watch.check({tp: self._positions[tp] for tp in tps}, ends)
        for tp in tps:
            if tp not in short and ends.get(tp, -1) >= self._positions[tp]:
                self._parked.pop(tp, None)  # the log reaches the position: it was a stale answer
        if short:
            await self._log_lost(
                {
                    tp: (
                        self._parked.pop(tp, "end_moved_back"),
                        f"the log ends at {ends[tp]}, before offset {self._positions[tp]}",
                    )
                    for tp in short
                }
            )

    async def _log_lost(self, lost: dict[TopicPartition, tuple[str, str]]) -> None:
        """Resume each partition from what the broker still has; ask the agents to replay."""
        consumer = self._consumer
        if consumer is None or not lost:
            return
        within = self.config.kafka.request_timeout_s + 5
        async with asyncio.timeout(within):
            starts = await consumer.beginning_offsets(list(lost))
        now = now_ns()
        self._ends_watch.forget(lost)
        for tp in lost:
            self._parked.pop(tp, None)
        for tp, (cause, detail) in lost.items():
            begin = starts[tp]
            self._seek(consumer, tp, begin, expect=False)
            self._positions[tp] = begin
            self._marks.pop(tp, None)
            self._verify.pop(tp, None)
            self.metrics.log_lost.labels(tp.topic, cause).inc()
            self.log_losses.append(
                {
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "cause": cause,
                    "detail": detail,
                    "ts_ns": now,
                    "resumed_at": begin,
                }
            )
            log.error(
                "Kafka log of %s[%d] lost: %s. Resuming from offset %d (what the broker still "
                "has) and asking every agent to replay what it holds unconfirmed; the batches "
                "the agents no longer hold are gone. Check the broker: restarts without "
                "persistent storage, retention shorter than the cloud's downtime, topics "
                "deleted and re-created",
                tp.topic,
                tp.partition,
                detail,
                begin,
            )
        await asyncio.to_thread(
            self.registry.forget_marks, [(tp.topic, tp.partition) for tp in lost]
        )
        if self.config.kafka.create_topics:
            await self._create_topics()  # a broker that lost its log may have lost topics too
        causes = sorted({cause for cause, _ in lost.values()})
        where = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(lost))
        self._request_replay(
            BROADCAST,
            f"lost log ({', '.join(causes)}) on {where}",
            "log_lost",
            [(tp.topic, tp.partition) for tp in sorted(lost)],
        )

    # -- the control topic: acknowledgements and replay requests -----------------------------

    def _queue_acks(self, acks: dict[DedupeKey, tuple[int, str]]) -> None:
        for (agent, inc, topic, partition), state in acks.items():
            self._acks_pending.setdefault((agent, inc), {})[(topic, partition)] = state
        self._control_wake.set()

    def _request_replay(
        self, agent: str, reason: str, cause: str, parts: list[tuple[str, int]] | None = None
    ) -> None:
        """Ask ``agent`` (or every agent) to send again what it holds unconfirmed: what it had
        sent to ``parts`` (topic, partition), or everything."""
        self._replays_pending.append((agent, reason, cause, parts))
        self._control_wake.set()

    def _check_unconfirmed(self, hb: Heartbeat) -> None:
        """The safety net: an agent that reports batches the cloud never confirmed is told
        again what was applied; if that does not help while this replica is caught up, it is
        asked to replay (whatever lost them went unnoticed by every other check)."""
        out = hb.info.get("outbox") if isinstance(hb.info, dict) else None
        if not isinstance(out, dict):
            return
        unacked, age = out.get("unacked"), out.get("unacked_age_s")
        cc = self.config.control
        if not isinstance(unacked, int) or not isinstance(age, int | float) or unacked <= 0:
            return
        if age < cc.republish_after_s:
            return
        now = time.monotonic()
        agent = hb.agent_id
        if now - self._republished.get(agent, -math.inf) >= cc.republish_after_s:
            self._republished[agent] = now
            state = {}
            for key in self.seqs.keys_of(agent):
                w = self.seqs.get(key)
                if w is not None:
                    state[key] = (w.floor, w.encode())
            if state:
                self._queue_acks(state)
            return
        if (
            cc.replay_unconfirmed_after_s
            and age >= cc.replay_unconfirmed_after_s
            and now - self._replayed.get(agent, -math.inf) >= cc.replay_unconfirmed_after_s
            and not any(self.ingest_lag().values())
        ):
            self._replayed[agent] = now
            self._request_replay(
                agent,
                f"{unacked} batches unconfirmed for {age:.0f} s while the cloud is caught up",
                "unconfirmed",
            )

    async def _control_loop(self) -> None:
        backoff = 0.2
        while True:
            await self._control_wake.wait()
            self._control_wake.clear()
            try:
                await self._publish_control()
            except asyncio.CancelledError as exc:
                if cancel_requested():
                    raise
                self._control_failed(exc)  # aiokafka cancelled one of its futures
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._control_wake.set()
                continue
            except (KafkaError, OSError, TimeoutError) as exc:
                self._control_failed(exc)
                log.warning("control topic: %s; retrying in %.1fs", self.control_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._control_wake.set()
                continue
            backoff = 0.2
            self.control_error = None

    def _control_failed(self, exc: BaseException) -> None:
        self.metrics.control_errors.inc()
        self.control_error = f"{type(exc).__name__}: {exc}"

    async def _publish_control(self) -> None:
        """Send the pending acknowledgements and replay requests (kept for a retry on failure)."""
        producer = self._control_producer
        if producer is None:
            return
        acks, self._acks_pending = self._acks_pending, {}
        replays, self._replays_pending = self._replays_pending, []
        topic = self.topics.control
        now = now_ns()
        try:
            futures = []
            for (agent, inc), state in acks.items():
                body = encode_applied(
                    agent,
                    inc,
                    [(t, p, floor, ranges) for (t, p), (floor, ranges) in sorted(state.items())],
                    instance=self.config.instance,
                    ts_ns=now,
                )
                futures.append(await producer.send(topic, body, key=agent.encode()))
            for agent, reason, _cause, lost in replays:
                body = encode_replay(
                    agent,
                    reason,
                    id=uuid.uuid4().hex,
                    instance=self.config.instance,
                    ts_ns=now,
                    parts=lost,
                )
                futures.append(await producer.send(topic, body, key=agent.encode()))
            if futures:
                within = self.config.kafka.request_timeout_s + 5
                async with asyncio.timeout(within):
                    results = await asyncio.gather(*futures, return_exceptions=True)
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    raise failed[0]
        except BaseException:
            for key, state in acks.items():  # newer state queued meanwhile wins
                pending = self._acks_pending.setdefault(key, {})
                for k, v in state.items():
                    pending.setdefault(k, v)
            self._replays_pending = replays + self._replays_pending
            raise
        self.acks_published += len(acks)
        self.metrics.acks_published.inc(len(acks))
        for agent, reason, cause, _parts in replays:
            self.replays_requested += 1
            self.metrics.replay_requests.labels(cause).inc()
            log.warning(
                "asked %s to replay: %s", "every agent" if agent == BROADCAST else agent, reason
            )

    # -- supervision and health ----------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the service is failing (a core task died), or None."""
        return self.supervisor.failure

    @property
    def failed(self) -> asyncio.Event:
        return self.supervisor.failed

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` answers: ok | degraded | failing, and why."""
        reasons: list[str] = []
        if self.failure is not None:
            reasons.append(self.failure)
        recent = now_ns() - 600 * 10**9
        lost = [e for e in self.log_losses if e["ts_ns"] >= recent]
        if lost:
            reasons.append(
                f"Kafka log lost on {len(lost)} partition(s) in the last 10 min "
                f"(latest: {lost[-1]['topic']}[{lost[-1]['partition']}]: {lost[-1]['detail']}); "
                "agents were asked to replay"
            )
        if self.control_error is not None:
            reasons.append(f"control topic: {self.control_error}")
        if self.seqs.overflows:
            reasons.append(f"dedupe window overflowed {self.seqs.overflows} times")
        status = "failing" if self.failure else ("degraded" if reasons else "ok")
        if self._state not in ("started",) and not self.failure:
            status = "stopping" if self._state == "stopping" else status
        return {
            "status": status,
            "reasons": reasons,
            "log_losses": list(self.log_losses)[-10:],
            "acks_published": self.acks_published,
            "replays_requested": self.replays_requested,
            "quarantined": self.quarantined,
            "dedupe_overflows": self.seqs.overflows,
        }

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
