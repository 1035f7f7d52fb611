"""The cloud service's configuration: ``cloud.yaml`` on :class:`shared.config.ConfigModel`.

Fails closed: the API refuses to start without a bearer token unless ``environment`` is
``development``; every learner pipeline step must name a river estimator. Load with
:func:`load_cloud_config` (errors name file, key path and line); ``EDGELOOP__API__TOKEN=...``
style environment variables override any key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from shared.config import ConfigModel, load_config
from shared.topics import DEFAULT_PREFIX, Topics

__all__ = [
    "ApiConfig",
    "CloudConfig",
    "DatabaseConfig",
    "DeliveryConfig",
    "DriftConfig",
    "JoinConfig",
    "KafkaConfig",
    "KafkaSecurity",
    "LearnerConfig",
    "ModelConfig",
    "PromotionConfig",
    "WebhookConfig",
    "load_cloud_config",
]


class KafkaSecurity(ConfigModel):
    """Passed through to aiokafka as-is (Apache Kafka with TLS and/or SASL)."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaSecurity:
        needs_password = self.sasl_mechanism in {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}
        if (
            self.protocol.startswith("SASL")
            and needs_password
            and (not self.sasl_username or self.sasl_password is None)
        ):
            raise ValueError(
                f"sasl_mechanism {self.sasl_mechanism} needs sasl_username and sasl_password"
            )
        if self.protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"protocol {self.protocol} needs a sasl_mechanism")
        return self


class KafkaConfig(ConfigModel):
    bootstrap_servers: str | list[str] = "127.0.0.1:9092"
    group_id: str = "edgeloop-cloud"
    topic_prefix: str = DEFAULT_PREFIX
    client_id: str = "edgeloop-cloud"
    security: KafkaSecurity = Field(default_factory=KafkaSecurity)
    #: Records fetched per poll; a poll is applied as one unit before offsets advance.
    max_poll_records: int = Field(default=2000, ge=1)
    #: Where a group with no committed offset starts.
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    request_timeout_s: float = Field(default=30.0, gt=0)
    #: Create missing uplink topics at start (needs create rights; off where ops provision).
    create_topics: bool = True
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    #: How often topic metadata is refreshed (topics created later are picked up this fast).
    metadata_max_age_s: float = Field(default=30.0, gt=0)
    #: Group session timeout (heartbeats go every third of it). Tansu holds a group join for
    #: half of it, so short values make start-up faster there.
    session_timeout_s: float = Field(default=10.0, ge=1.0)

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, v: str) -> str:
        Topics(v)
        return v

    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


class DatabaseConfig(ConfigModel):
    #: SQLAlchemy URL: ``sqlite:///cloud.db`` (default) or ``postgresql+psycopg://user@host/db``.
    url: str = "sqlite:///edgeloop-cloud.db"
    echo: bool = False


class JoinConfig(ConfigModel):
    """How long frames wait for their labels (and labels for their frames), in event time."""

    window_s: float = Field(default=600.0, gt=0)
    #: Labels that arrive before their frame wait at most this long.
    label_wait_s: float = Field(default=60.0, gt=0)
    max_pending_frames: int = Field(default=100_000, ge=1)
    max_pending_labels: int = Field(default=20_000, ge=1)
    #: Keys of frames that expired unlabelled are remembered this many at most, to count late labels.
    remember_expired: int = Field(default=50_000, ge=0)


#: A pipeline step: ``"preprocessing.StandardScaler"`` or ``{"linear_model.LogisticRegression": {"l2": 0.01}}``.
Step = str | dict[str, dict[str, Any]]


class LearnerConfig(ConfigModel):
    name: str = Field(min_length=1)
    #: river estimators, relative to the ``river`` package, chained into a pipeline.
    pipeline: list[Step] = Field(min_length=1)

    @field_validator("pipeline")
    @classmethod
    def _steps_resolve(cls, steps: list[Step]) -> list[Step]:
        from cloud.learning import resolve_step

        for i, step in enumerate(steps):
            try:
                resolve_step(step)
            except ValueError as exc:
                raise ValueError(f"pipeline[{i}]: {exc}") from None
        return steps


class DriftConfig(ConfigModel):
    enabled: bool = True
    #: A river.drift detector and its parameters.
    detector: str = "ADWIN"
    params: dict[str, Any] = Field(default_factory=dict)
    #: ``edge``: the edge's own predictions for the deployed version; ``cloud``: the registry's
    #: frozen copy of the champion scored in the cloud; ``auto``: edge when frames carry them.
    source: Literal["auto", "edge", "cloud"] = "auto"

    @field_validator("detector")
    @classmethod
    def _known_detector(cls, v: str) -> str:
        from river import drift

        if not isinstance(getattr(drift, v, None), type):
            raise ValueError(f"river.drift has no detector {v!r} (e.g. ADWIN, PageHinkley, KSWIN)")
        return v


class PromotionConfig(ConfigModel):
    enabled: bool = True
    #: The challenger must beat the champion by this much on the primary metric (accuracy, or
    #: MAE for regression, where lower is better) ...
    margin: float = Field(default=0.02, ge=0)
    #: ... over the last ``window`` labelled samples that both were scored on.
    window: int = Field(default=500, ge=10)
    #: A first champion is promoted once the best candidate has learned this many samples.
    min_samples: int = Field(default=200, ge=1)
    #: After a drift, the challenger is promoted once it has learned this many samples since.
    min_samples_after_drift: int = Field(default=200, ge=1)
    #: Samples between two promotions of the same model (no flapping).
    cooldown_samples: int = Field(default=500, ge=0)


class ModelConfig(ConfigModel):
    name: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    #: fnmatch patterns of the assets whose frames this model learns from.
    assets: list[str] = Field(default_factory=lambda: ["*"])
    task: Literal["classification", "regression"] = "classification"
    #: Candidates learning side by side; empty means the defaults for ``task``.
    learners: list[LearnerConfig] = Field(default_factory=list)
    #: Samples in the rolling prequential metrics.
    rolling_window: int = Field(default=500, ge=10)
    #: Per-asset metrics are kept for at most this many assets (the rest are folded into "*other*").
    max_assets: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _unique_learners(self) -> ModelConfig:
        names = [learner.name for learner in self.learners]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"learner names must be unique, repeated: {sorted(dup)}")
        return self

    def effective_learners(self) -> list[LearnerConfig]:
        if self.learners:
            return list(self.learners)
        if self.task == "classification":
            return [
                LearnerConfig(
                    name="logistic",
                    pipeline=["preprocessing.StandardScaler", "linear_model.LogisticRegression"],
                ),
                LearnerConfig(name="hoeffding_tree", pipeline=["tree.HoeffdingTreeClassifier"]),
            ]
        return [
            LearnerConfig(
                name="linear",
                pipeline=["preprocessing.StandardScaler", "linear_model.LinearRegression"],
            ),
            LearnerConfig(name="hoeffding_tree", pipeline=["tree.HoeffdingTreeRegressor"]),
        ]


class ApiConfig(ConfigModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: Bearer token for every write (promote, roll back). Required outside development, and
    #: there a random value of at least 24 characters, not a placeholder.
    token: SecretStr | None = None

    def token_problem(self) -> str | None:
        """Why ``token`` is unfit outside development (never quoting it), or None."""
        if self.token is None:
            return None
        value = self.token.get_secret_value()
        low = value.strip().lower()
        placeholders = {"change-me", "changeme", "secret", "password", "token", "admin"}
        placeholders |= {"test", "example"}
        if (
            low in placeholders
            or any(part in low for part in ("change-me", "changeme", "change_me", "replace"))
            or len(set(low)) <= 1  # xxxxxxxx..., 00000000...
        ):
            why = "is a placeholder"
        elif len(value) < 24:
            why = "is shorter than 24 characters"
        else:
            return None
        return (
            f"api.token {why}; outside development it must be a random value of at least 24 "
            'characters, e.g. from `python -c "import secrets; print(secrets.token_urlsafe(32))"` '
            "(set api.token or the EDGELOOP__API__TOKEN environment variable; a trial may run "
            "with environment: development)"
        )


class DeliveryConfig(ConfigModel):
    """The closed loop: compile each new champion, gate on parity, sign, publish (docs/delivery.md)."""

    enabled: bool = False
    #: ed25519 private key (PEM, from ``edgeloop keys generate``); the edge pins the public one.
    private_key: Path | None = None
    #: Where compiled and registered artifacts are stored (served at
    #: ``/api/models/{name}/versions/{v}/artifact``).
    artifact_dir: Path = Path("edgeloop-artifacts")
    #: Base URL the edge downloads artifacts from; default ``http://<api.host>:<api port>``.
    public_url: str | None = Field(default=None, pattern=r"^https?://")
    #: The parity gate: river and the ONNX artifact must agree within this on recent frames.
    parity_atol: float = Field(default=1e-5, gt=0)
    #: Recent frames kept per model for the parity gate (and user-model test batches).
    parity_frames: int = Field(default=256, ge=1)
    #: Every champion's manifest is published again this often (Tansu does not compact).
    republish_interval_s: float = Field(default=60.0, gt=0)
    #: A heartbeat showing an old version triggers a republish at most this often per model.
    catchup_interval_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _needs_key(self) -> DeliveryConfig:
        if self.enabled and self.private_key is None:
            raise ValueError(
                "delivery.enabled needs delivery.private_key (create one with "
                "'edgeloop keys generate')"
            )
        return self


class WebhookConfig(ConfigModel):
    url: str = Field(pattern=r"^https?://")
    #: Which notifications go to this URL.
    events: list[Literal["drift", "promotion"]] = Field(
        default_factory=lambda: ["drift"]  # type: ignore[arg-type]
    )
    timeout_s: float = Field(default=5.0, gt=0)
    retries: int = Field(default=3, ge=0, le=10)
    headers: dict[str, str] = Field(default_factory=dict)


class ControlConfig(ConfigModel):
    """What the cloud tells the agents on ``<prefix>.control`` (:mod:`shared.control`)."""

    #: Publish what was applied after every checkpoint; off only where the agents use
    #: ``uplink.delete_after: broker`` (then nothing waits for these messages).
    acks: bool = True
    #: An agent whose heartbeat shows batches the cloud has not confirmed for this long is sent
    #: its acknowledgement state again (at most this often).
    republish_after_s: float = Field(default=30.0, gt=0)
    #: ... and when that did not help for this long while this replica is caught up, the agent
    #: is asked to replay what it holds (a loss no other check saw). 0 turns this off.
    replay_unconfirmed_after_s: float = Field(default=300.0, ge=0)
    #: How often the consumer compares its positions with the brokers' log ends.
    log_check_interval_s: float = Field(default=2.0, gt=0)
    partitions: int = Field(default=1, ge=1)


class CloudConfig(ConfigModel):
    environment: Literal["production", "staging", "development"] = "production"
    #: Names this learner process's checkpoints; processes sharing a DB need distinct names.
    instance: str = Field(default="cloud", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    join: JoinConfig = Field(default_factory=JoinConfig)
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()])
    drift: DriftConfig = Field(default_factory=DriftConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    #: Learner state, join buffer and dedupe state are checkpointed (then offsets committed) at
    #: most this often, and at least every ``checkpoint_records`` records.
    checkpoint_interval_s: float = Field(default=5.0, gt=0)
    checkpoint_records: int = Field(default=20_000, ge=1)
    #: Prequential metrics are snapshotted into the registry this often (metrics over time).
    metrics_snapshot_s: float = Field(default=10.0, gt=0)
    #: Applied batch sequence numbers remembered above each (agent, incarnation, partition)
    #: floor at most. The agents' ``el-low`` header keeps the list to what they may resend;
    #: this bounds memory beyond that (an overflow is counted and logged).
    dedupe_window: int = Field(default=65_536, ge=16)
    #: The end-to-end acknowledgement and lost-log recovery (docs/reliability.md).
    control: ControlConfig = Field(default_factory=lambda: ControlConfig())
    #: Keep one registry row per applied batch (``applied_batches``), written with the
    #: checkpoint that covers it: an audit trail of what was applied (the chaos suite reads it).
    audit_applied: bool = False
    #: While the service runs, the objects that existed when it started (modules, config,
    #: restored learners) are frozen out of the cyclic garbage collector (``gc.freeze``), so
    #: its full passes scan only what the stream allocated since; unfrozen at stop.
    gc_freeze: bool = True

    @model_validator(mode="after")
    def _fail_closed(self) -> CloudConfig:
        if self.api.enabled and self.api.token is None and self.environment != "development":
            raise ValueError(
                "api.token is required outside development (set api.token, the "
                "EDGELOOP__API__TOKEN environment variable, or environment: development)"
            )
        problem = self.api.token_problem()
        if self.api.enabled and problem is not None and self.environment != "development":
            raise ValueError(problem)
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique, repeated: {sorted(dup)}")
        if not self.models:
            raise ValueError("at least one model is needed")
        if self.delivery.enabled and not self.api.enabled:
            raise ValueError("delivery.enabled needs api.enabled: the API serves the artifacts")
        return self


def load_cloud_config(path: str | os.PathLike[str]) -> CloudConfig:
    """Load ``cloud.yaml`` (with ``EDGELOOP__...`` overrides); raises ``ConfigError``."""
    return load_config(path, CloudConfig)
