"""The registry: model versions, promotions, drift, checkpoints, dedupe state, fleet — in SQL.

SQLAlchemy 2 on one code path for SQLite (default; WAL) and PostgreSQL (production). Methods are
synchronous and short; the service calls them through ``asyncio.to_thread`` so the event loop
never waits on the database. Each method is one transaction: a promotion writes the new version,
retires the old champion and records the decision with its evidence atomically; a checkpoint
writes learner state, join buffer, dedupe state, fleet and events atomically, and only then does
the service commit Kafka offsets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cloud.dedupe import DedupeKey, SeqWindow
from shared.records import Event, Heartbeat, now_ns

__all__ = [
    "STATUSES",
    "Registry",
    "RegistryError",
    "VersionEntry",
]

STATUSES = ("candidate", "champion", "retired", "cannot_ship")


class RegistryError(LookupError):
    """A model or version does not exist, or a status change is not allowed."""


class _Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ModelVersionRow(_Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(20))
    learner: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), index=True)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    parent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(String(20))
    offsets: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    features: Mapped[list[Any]] = mapped_column(JSON, default=list)
    steps: Mapped[list[Any]] = mapped_column(JSON, default=list)
    pipeline: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    #: what the closed loop attaches (compiled artifact sha256, manifest, parity results)
    artifact: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_ns: Mapped[int] = mapped_column(BigInteger)
    updated_ns: Mapped[int] = mapped_column(BigInteger)


class PromotionRow(_Base):
    __tablename__ = "promotions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(100), index=True)
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int] = mapped_column(Integer)
    learner: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(String(20))
    rollback: Mapped[bool] = mapped_column(Boolean, default=False)
    actor: Mapped[str] = mapped_column(String(100))
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ts_ns: Mapped[int] = mapped_column(BigInteger)


class DriftRow(_Base):
    __tablename__ = "drift_detections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source: Mapped[str] = mapped_column(String(10))
    detector: Mapped[str] = mapped_column(String(50))
    samples: Mapped[int] = mapped_column(Integer)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ts_ns: Mapped[int] = mapped_column(BigInteger)
    promotion_id: Mapped[int | None] = mapped_column(ForeignKey("promotions.id"), nullable=True)


class CheckpointRow(_Base):
    __tablename__ = "checkpoints"
    instance: Mapped[str] = mapped_column(String(100), primary_key=True)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    offsets: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    samples: Mapped[int] = mapped_column(BigInteger, default=0)
    ts_ns: Mapped[int] = mapped_column(BigInteger)


class LegacyDedupeRow(_Base):
    """Dedupe state before batch identities carried an incarnation (read once, to migrate)."""

    __tablename__ = "dedupe"
    agent_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    topic: Mapped[str] = mapped_column(String(250), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    floor: Mapped[int] = mapped_column(BigInteger)
    recent: Mapped[str] = mapped_column(Text)


class DedupeRow(_Base):
    __tablename__ = "dedupe_windows"
    __table_args__ = (Index("ix_dedupe_windows_tp", "topic", "partition"),)
    agent_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    incarnation: Mapped[str] = mapped_column(String(64), primary_key=True)
    topic: Mapped[str] = mapped_column(String(250), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    floor: Mapped[int] = mapped_column(BigInteger)
    recent: Mapped[str] = mapped_column(Text)
    updated_ns: Mapped[int] = mapped_column(BigInteger, default=0)


class LogMarkRow(_Base):
    """The last messages consumed from a partition: offsets and fingerprints (JSON
    ``[[offset, fingerprint], ...]``, oldest first). Whoever owns the partition next reads them
    again and checks the broker still has those very messages there (else its log was lost,
    truncated or replaced, and the cloud asks the agents to replay)."""

    __tablename__ = "log_positions"
    topic: Mapped[str] = mapped_column(String(250), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger)  # the last consumed
    marks: Mapped[list[Any]] = mapped_column(JSON, default=list)
    ts_ns: Mapped[int] = mapped_column(BigInteger)


class AppliedBatchRow(_Base):
    """One row per applied batch, written in the checkpoint that covers it (``audit_applied``):
    the cloud's application history, for the chaos checker and audits."""

    __tablename__ = "applied_batches"
    __table_args__ = (Index("ix_applied_batches_identity", "agent_id", "incarnation", "batch_seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(200))
    incarnation: Mapped[str] = mapped_column(String(64))
    batch_seq: Mapped[int] = mapped_column(BigInteger)
    topic: Mapped[str] = mapped_column(String(250))
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(Integer)
    instance: Mapped[str] = mapped_column(String(100))
    ts_ns: Mapped[int] = mapped_column(BigInteger)


class AgentRow(_Base):
    __tablename__ = "agents"
    agent_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    last_heartbeat_ns: Mapped[int] = mapped_column(BigInteger)
    received_ns: Mapped[int] = mapped_column(BigInteger)
    models: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    outbox_depth: Mapped[int] = mapped_column(BigInteger, default=0)
    outbox_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(50), default="ok")
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class EventRow(_Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_ts", "ts_ns"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(200))
    rule: Mapped[str] = mapped_column(String(200))
    asset: Mapped[str] = mapped_column(String(200), index=True)
    ts_ns: Mapped[int] = mapped_column(BigInteger)
    severity: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class MetricPointRow(_Base):
    __tablename__ = "metric_points"
    __table_args__ = (Index("ix_metric_points_model_ts", "model", "ts_ns"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str] = mapped_column(String(100))  # a learner name, or "champion"/"edge"
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    samples: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ts_ns: Mapped[int] = mapped_column(BigInteger)


@dataclass(frozen=True, slots=True)
class VersionEntry:
    """One model version as the registry holds it (what promotion hooks receive)."""

    model: str
    version: int
    task: str
    learner: str
    status: str
    status_reason: str
    parent: int | None
    reason: str
    offsets: dict[str, int]
    metrics: dict[str, Any]
    features: list[str]
    steps: list[Any]
    artifact: dict[str, Any]
    created_ns: int
    updated_ns: int
    #: True when this entry became champion by rolling back to it
    rollback: bool = False
    pipeline_blob: bytes | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("pipeline_blob")
        d["has_pipeline"] = self.pipeline_blob is not None
        return d


def _entry(row: ModelVersionRow, *, rollback: bool = False, blob: bool = False) -> VersionEntry:
    return VersionEntry(
        model=row.model,
        version=row.version,
        task=row.task,
        learner=row.learner,
        status=row.status,
        status_reason=row.status_reason,
        parent=row.parent,
        reason=row.reason,
        offsets=dict(row.offsets or {}),
        metrics=dict(row.metrics or {}),
        features=list(row.features or []),
        steps=list(row.steps or []),
        artifact=dict(row.artifact or {}),
        created_ns=row.created_ns,
        updated_ns=row.updated_ns,
        rollback=rollback,
        pipeline_blob=row.pipeline if blob else None,
    )


def _row_dict(row: Any, columns: Iterable[str]) -> dict[str, Any]:
    return {c: getattr(row, c) for c in columns}


_PROMOTION_COLS = (
    "id",
    "model",
    "from_version",
    "to_version",
    "learner",
    "reason",
    "rollback",
    "actor",
    "evidence",
    "ts_ns",
)
_DRIFT_COLS = (
    "id",
    "model",
    "version",
    "source",
    "detector",
    "samples",
    "evidence",
    "ts_ns",
    "promotion_id",
)
_AGENT_COLS = (
    "agent_id",
    "last_heartbeat_ns",
    "received_ns",
    "models",
    "outbox_depth",
    "outbox_bytes",
    "status",
    "info",
)
_EVENT_COLS = ("id", "agent_id", "rule", "asset", "ts_ns", "severity", "message", "values")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Registry:
    """All durable cloud state. Thread-safe: each call uses its own session."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        _Base.metadata.create_all(self.engine)
        self._migrate_dedupe()

    def _migrate_dedupe(self) -> None:
        """Dedupe rows of the old layout become incarnation "" (wire version 1 batches), once."""
        with self._session.begin() as s:
            if s.scalar(select(func.count()).select_from(LegacyDedupeRow)) == 0:
                return
            for r in s.scalars(select(LegacyDedupeRow)).all():
                key = (r.agent_id, "", r.topic, r.partition)
                if s.get(DedupeRow, key) is None:
                    s.add(
                        DedupeRow(
                            agent_id=r.agent_id,
                            incarnation="",
                            topic=r.topic,
                            partition=r.partition,
                            floor=r.floor,
                            recent=r.recent,
                            updated_ns=now_ns(),
                        )
                    )
                s.delete(r)

    def close(self) -> None:
        self.engine.dispose()

    # -- versions and promotions --------------------------------------------------------------

    def _champion_row(self, s: Session, model: str) -> ModelVersionRow | None:
        return s.scalars(
            select(ModelVersionRow)
            .where(ModelVersionRow.model == model, ModelVersionRow.status == "champion")
            .order_by(ModelVersionRow.version.desc())
        ).first()

    def add_version(
        self,
        *,
        model: str,
        task: str,
        learner: str,
        reason: str,
        pipeline: bytes | None,
        metrics: Mapping[str, Any],
        features: list[str],
        steps: list[Any],
        offsets: Mapping[str, int],
        evidence: Mapping[str, Any] | None = None,
        status: str = "champion",
        actor: str = "policy",
        parent: int | None = None,
    ) -> VersionEntry:
        """Register a new version; as ``champion`` it retires the current one and the decision
        is recorded with its evidence, all in one transaction."""
        if status not in ("candidate", "champion"):
            raise RegistryError(f"a new version starts as candidate or champion, not {status!r}")
        now = now_ns()
        with self._session.begin() as s:
            current = self._champion_row(s, model)
            last = s.scalar(
                select(func.max(ModelVersionRow.version)).where(ModelVersionRow.model == model)
            )
            row = ModelVersionRow(
                model=model,
                version=(last or 0) + 1,
                task=task,
                learner=learner,
                status=status,
                status_reason="",
                parent=parent if parent is not None else (current.version if current else None),
                reason=reason,
                offsets=dict(offsets),
                metrics=_jsonable(dict(metrics)),
                features=list(features),
                steps=list(steps),
                pipeline=pipeline,
                artifact={},
                created_ns=now,
                updated_ns=now,
            )
            s.add(row)
            if status == "champion":
                if current is not None:
                    current.status = "retired"
                    current.status_reason = f"replaced by version {row.version} ({reason})"
                    current.updated_ns = now
                s.flush()
                s.add(
                    PromotionRow(
                        model=model,
                        from_version=current.version if current else None,
                        to_version=row.version,
                        learner=learner,
                        reason=reason,
                        rollback=False,
                        actor=actor,
                        evidence=_jsonable(dict(evidence or {})),
                        ts_ns=now,
                    )
                )
            s.flush()
            return _entry(row, blob=True)

    def activate(
        self,
        model: str,
        version: int | None = None,
        *,
        reason: str = "rollback",
        actor: str = "api",
        evidence: Mapping[str, Any] | None = None,
    ) -> VersionEntry:
        """Make an existing version champion again (``version=None``: the champion's parent).

        Raises :class:`RegistryError` when there is nothing to roll back to or the version is
        unknown or marked cannot-ship.
        """
        now = now_ns()
        with self._session.begin() as s:
            current = self._champion_row(s, model)
            if version is None:
                if current is None or current.parent is None:
                    raise RegistryError(
                        f"model {model!r}: no champion with a parent to roll back to"
                    )
                version = current.parent
            row = s.scalars(
                select(ModelVersionRow).where(
                    ModelVersionRow.model == model, ModelVersionRow.version == version
                )
            ).first()
            if row is None:
                raise RegistryError(f"model {model!r} has no version {version}")
            if row.status == "cannot_ship":
                raise RegistryError(
                    f"model {model!r} version {version} cannot ship: {row.status_reason}"
                )
            if current is not None and current.version == version:
                raise RegistryError(f"model {model!r} version {version} is already champion")
            rollback = current is not None and version < current.version
            if current is not None:
                current.status = "retired"
                current.status_reason = f"{reason} to version {version}"
                current.updated_ns = now
            row.status = "champion"
            row.status_reason = ""
            row.updated_ns = now
            s.add(
                PromotionRow(
                    model=model,
                    from_version=current.version if current else None,
                    to_version=version,
                    learner=row.learner,
                    reason=reason,
                    rollback=rollback,
                    actor=actor,
                    evidence=_jsonable(dict(evidence or {})),
                    ts_ns=now,
                )
            )
            s.flush()
            return _entry(row, rollback=rollback, blob=True)

    def set_status(self, model: str, version: int, status: str, reason: str = "") -> VersionEntry:
        """Mark a version (e.g. ``cannot_ship`` with the compiler's reason)."""
        if status not in STATUSES:
            raise RegistryError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        with self._session.begin() as s:
            row = s.scalars(
                select(ModelVersionRow).where(
                    ModelVersionRow.model == model, ModelVersionRow.version == version
                )
            ).first()
            if row is None:
                raise RegistryError(f"model {model!r} has no version {version}")
            row.status = status
            row.status_reason = reason
            row.updated_ns = now_ns()
            s.flush()
            return _entry(row)

    def attach_artifact(self, model: str, version: int, artifact: Mapping[str, Any]) -> None:
        """Record what the closed loop produced for a version (merged into ``artifact``)."""
        with self._session.begin() as s:
            row = s.scalars(
                select(ModelVersionRow).where(
                    ModelVersionRow.model == model, ModelVersionRow.version == version
                )
            ).first()
            if row is None:
                raise RegistryError(f"model {model!r} has no version {version}")
            row.artifact = {**(row.artifact or {}), **artifact}
            row.updated_ns = now_ns()

    def champion(self, model: str, *, with_pipeline: bool = False) -> VersionEntry | None:
        with self._session() as s:
            row = self._champion_row(s, model)
            return None if row is None else _entry(row, blob=with_pipeline)

    def version(self, model: str, version: int, *, with_pipeline: bool = False) -> VersionEntry:
        with self._session() as s:
            row = s.scalars(
                select(ModelVersionRow).where(
                    ModelVersionRow.model == model, ModelVersionRow.version == version
                )
            ).first()
            if row is None:
                raise RegistryError(f"model {model!r} has no version {version}")
            return _entry(row, blob=with_pipeline)

    def versions(self, model: str) -> list[VersionEntry]:
        with self._session() as s:
            rows = s.scalars(
                select(ModelVersionRow)
                .where(ModelVersionRow.model == model)
                .order_by(ModelVersionRow.version)
            ).all()
            return [_entry(r) for r in rows]

    def model_names(self) -> list[str]:
        with self._session() as s:
            return list(s.scalars(select(ModelVersionRow.model).distinct()).all())

    def _latest(
        self, table: Any, columns: Iterable[str], model: str, limit: int
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` rows of a per-model log table, newest first."""
        with self._session() as s:
            rows = s.scalars(
                select(table).where(table.model == model).order_by(table.id.desc()).limit(limit)
            ).all()
            return [_row_dict(r, columns) for r in rows]

    def promotions(self, model: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._latest(PromotionRow, _PROMOTION_COLS, model, limit)

    # -- drift ---------------------------------------------------------------------------

    def record_drift(
        self,
        *,
        model: str,
        version: int | None,
        source: str,
        detector: str,
        samples: int,
        evidence: Mapping[str, Any],
        ts_ns: int,
    ) -> int:
        with self._session.begin() as s:
            row = DriftRow(
                model=model,
                version=version,
                source=source,
                detector=detector,
                samples=samples,
                evidence=_jsonable(dict(evidence)),
                ts_ns=ts_ns,
            )
            s.add(row)
            s.flush()
            return row.id

    def link_drift(self, drift_id: int, model: str) -> None:
        """Point a drift detection at the promotion that answered it (the latest one)."""
        with self._session.begin() as s:
            pid = s.scalar(select(func.max(PromotionRow.id)).where(PromotionRow.model == model))
            s.execute(update(DriftRow).where(DriftRow.id == drift_id).values(promotion_id=pid))

    def drifts(self, model: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._latest(DriftRow, _DRIFT_COLS, model, limit)

    # -- checkpoints, dedupe, fleet, events ---------------------------------------------------

    def save_checkpoint(
        self,
        instance: str,
        state: bytes,
        offsets: Mapping[str, int],
        samples: int,
        dedupe: Mapping[DedupeKey, SeqWindow],
        agents: Iterable[tuple[Heartbeat, int]] = (),
        events: Iterable[tuple[str, Event]] = (),
        marks: Mapping[tuple[str, int], Sequence[tuple[int, str]]] | None = None,
        applied: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """Everything consumed so far, in one transaction (then offsets may be committed).

        ``marks``: per (topic, partition) the offsets and fingerprints of the last messages
        consumed (oldest first); ``applied``: audit rows of the batches applied since the last checkpoint."""
        now = now_ns()
        with self._session.begin() as s:
            s.merge(
                CheckpointRow(
                    instance=instance,
                    state=state,
                    offsets=dict(offsets),
                    samples=samples,
                    ts_ns=now,
                )
            )
            for (agent, incarnation, topic, partition), w in dedupe.items():
                s.merge(
                    DedupeRow(
                        agent_id=agent,
                        incarnation=incarnation,
                        topic=topic,
                        partition=partition,
                        floor=w.floor,
                        recent=w.encode(),
                        updated_ns=now,
                    )
                )
            for (topic, partition), seen in (marks or {}).items():
                if seen:
                    s.merge(
                        LogMarkRow(
                            topic=topic,
                            partition=partition,
                            offset=seen[-1][0],
                            marks=[[o, f] for o, f in seen],
                            ts_ns=now,
                        )
                    )
            s.add_all(AppliedBatchRow(**dict(row)) for row in applied)
            for hb, received in agents:
                s.merge(
                    AgentRow(
                        agent_id=hb.agent_id,
                        last_heartbeat_ns=hb.ts_ns,
                        received_ns=received,
                        models=dict(hb.models),
                        outbox_depth=hb.outbox_depth,
                        outbox_bytes=hb.outbox_bytes,
                        status=hb.status,
                        info=dict(hb.info),
                    )
                )
            s.add_all(
                EventRow(
                    agent_id=agent,
                    rule=e.rule,
                    asset=e.asset,
                    ts_ns=e.ts_ns,
                    severity=int(e.severity),
                    message=e.message,
                    values=_jsonable(e.values),
                )
                for agent, e in events
            )

    def load_checkpoint(self, instance: str) -> tuple[bytes, dict[str, int], int] | None:
        with self._session() as s:
            row = s.get(CheckpointRow, instance)
            return None if row is None else (row.state, dict(row.offsets), row.ts_ns)

    def load_dedupe(self, partitions: Iterable[tuple[str, int]]) -> dict[DedupeKey, SeqWindow]:
        wanted = set(partitions)
        if not wanted:
            return {}
        topics = {t for t, _ in wanted}
        with self._session() as s:
            rows = s.scalars(select(DedupeRow).where(DedupeRow.topic.in_(topics))).all()
            return {
                (r.agent_id, r.incarnation, r.topic, r.partition): SeqWindow.decode(
                    r.floor, r.recent
                )
                for r in rows
                if (r.topic, r.partition) in wanted
            }

    def dedupe_of(self, agent_id: str) -> dict[DedupeKey, SeqWindow]:
        """Every dedupe window of one agent (any incarnation, topic, partition)."""
        with self._session() as s:
            rows = s.scalars(select(DedupeRow).where(DedupeRow.agent_id == agent_id)).all()
            return {
                (r.agent_id, r.incarnation, r.topic, r.partition): SeqWindow.decode(
                    r.floor, r.recent
                )
                for r in rows
            }

    def load_marks(
        self, partitions: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], list[tuple[int, str]]]:
        """(topic, partition) -> the (offset, fingerprint) of the last consumed messages."""
        wanted = set(partitions)
        if not wanted:
            return {}
        with self._session() as s:
            rows = s.scalars(
                select(LogMarkRow).where(LogMarkRow.topic.in_({t for t, _ in wanted}))
            ).all()
            return {
                (r.topic, r.partition): [(int(o), str(f)) for o, f in r.marks]
                for r in rows
                if (r.topic, r.partition) in wanted and r.marks
            }

    def forget_marks(self, partitions: Iterable[tuple[str, int]]) -> None:
        """The log these marks describe is gone: forget them (the next checkpoint sets new)."""
        with self._session.begin() as s:
            for topic, partition in partitions:
                row = s.get(LogMarkRow, (topic, partition))
                if row is not None:
                    s.delete(row)

    def applied_batches(self, agent_id: str | None = None) -> list[dict[str, Any]]:
        """The audit rows (``audit_applied``), oldest first."""
        with self._session() as s:
            q = select(AppliedBatchRow).order_by(AppliedBatchRow.id)
            if agent_id is not None:
                q = q.where(AppliedBatchRow.agent_id == agent_id)
            cols = ("agent_id", "incarnation", "batch_seq", "topic", "partition", "offset")
            return [_row_dict(r, (*cols, "records", "instance", "ts_ns")) for r in s.scalars(q)]

    def agents(self) -> list[dict[str, Any]]:
        with self._session() as s:
            rows = s.scalars(select(AgentRow).order_by(AgentRow.agent_id)).all()
            return [_row_dict(r, _AGENT_COLS) for r in rows]

    def events(self, limit: int = 100, asset: str | None = None) -> list[dict[str, Any]]:
        with self._session() as s:
            q = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
            if asset is not None:
                q = q.where(EventRow.asset == asset)
            return [_row_dict(r, _EVENT_COLS) for r in s.scalars(q).all()]

    def add_metric_points(self, points: Iterable[Mapping[str, Any]]) -> None:
        with self._session.begin() as s:
            s.add_all(MetricPointRow(**_jsonable(dict(p))) for p in points)

    def metric_points(
        self,
        model: str,
        *,
        subject: str | None = None,
        since_ns: int = 0,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        with self._session() as s:
            q = (
                select(MetricPointRow)
                .where(MetricPointRow.model == model, MetricPointRow.ts_ns >= since_ns)
                .order_by(MetricPointRow.ts_ns.desc())
                .limit(limit)
            )
            if subject is not None:
                q = q.where(MetricPointRow.subject == subject)
            rows = s.scalars(q).all()
            cols = ("model", "subject", "version", "samples", "metrics", "ts_ns")
            return [_row_dict(r, cols) for r in reversed(rows)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return str(value)
    return value
