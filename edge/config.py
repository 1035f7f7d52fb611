"""The edge agent's configuration: one YAML file, validated before anything starts.

``edgeloop config validate edge.yaml`` and ``edgeloop edge run -c edge.yaml`` both load it with
:func:`load_edge_config`; every problem names the file, the key path (``connectors[2].registers[5]
.type``, ``rules[1].when``), the line and what was expected.

Connectors form a list discriminated by ``kind``. The kinds on offer are the built-in
``synthetic`` source plus every connector registered in the ``edgeloop.connectors`` entry-point
group whose module imports; a kind whose module is missing is simply not offered.
"""

from __future__ import annotations

import logging
import os
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import cel
from pydantic import Field, create_model, field_validator, model_validator

from edge.synthetic import SyntheticConfig
from protocols.base import ConnectorConfig, available_connectors
from shared.config import ConfigModel, load_config, load_yaml
from shared.records import Severity
from shared.topics import DEFAULT_PREFIX

__all__ = [
    "AGGREGATES",
    "EdgeConfigBase",
    "FrameConfig",
    "HttpConfig",
    "LabelConfig",
    "ModelConfig",
    "ModelSyncConfig",
    "OutboxConfig",
    "RuleConfig",
    "UplinkConfig",
    "connector_config_models",
    "edge_config_model",
    "load_edge_config",
]

log = logging.getLogger(__name__)

Aggregate = Literal["last", "mean", "min", "max", "std", "delta"]
AGGREGATES: tuple[str, ...] = typing.get_args(Aggregate)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def connector_config_models(kinds: Iterable[str] | None = None) -> list[type[ConnectorConfig]]:
    """Config models of the connector kinds this installation can run (built-ins first).

    ``kinds`` limits which plugin modules are imported (all when None): an agent that only
    speaks Modbus does not pay for importing the OPC UA stack.
    """
    wanted = None if kinds is None else set(kinds)
    models: list[type[ConnectorConfig]] = [SyntheticConfig]
    seen = {"synthetic"}
    for name, ep in sorted(available_connectors().items()):
        if name in seen or (wanted is not None and name not in wanted):
            continue
        try:
            cls = ep.load()
            model = cls.config_model
        except Exception as exc:  # noqa: BLE001 - a missing/broken plugin only removes its kind
            log.debug("connector kind %r unavailable: %s", name, exc)
            continue
        ann = model.model_fields["kind"].annotation
        if typing.get_origin(ann) is not Literal or name not in typing.get_args(ann):
            log.warning(
                "connector kind %r: its config model %s does not declare kind: Literal[%r]; skipped",
                name,
                model.__name__,
                name,
            )
            continue
        seen.add(name)
        models.append(model)
    return models


def _connector_union(models: list[type[ConnectorConfig]]) -> Any:
    if len(models) == 1:
        return models[0]
    return Annotated[typing.Union[tuple(models)], Field(discriminator="kind")]  # noqa: UP007


# --- frames ---------------------------------------------------------------------------------


class TriggerConfig(ConfigModel):
    """When a frame is cut: every ``period`` seconds, or whenever ``tag`` changes value."""

    period: float | None = Field(None, gt=0, description="seconds between frames")
    tag: str | None = Field(None, min_length=1, description="cut a frame when this tag changes")

    @model_validator(mode="after")
    def _exactly_one(self) -> TriggerConfig:
        if (self.period is None) == (self.tag is None):
            raise ValueError("set exactly one of 'period' (seconds) or 'tag' (e.g. a part counter)")
        return self


class FeatureConfig(ConfigModel):
    tag: str = Field(..., min_length=1)
    aggs: list[Aggregate] = Field(default_factory=lambda: ["last"], min_length=1)  # type: ignore[arg-type]


class FrameConfig(ConfigModel):
    """A frame per asset: features ``<tag>_<agg>`` aggregated over the window since the last frame.

    ``features`` empty means: take the model's feature list from its manifest (names must read
    ``<tag>_<agg>``). ``on_stale`` says what happens when an input is stale (no reading within
    ``stale_after`` seconds) or of bad quality: ``skip`` the frame, ``impute_last`` good value, or
    ``mark`` it (features computed from what there is, NaN when nothing, named in ``marks``).
    """

    asset: str = Field(..., min_length=1)
    trigger: TriggerConfig
    features: list[FeatureConfig] = Field(default_factory=list)
    stale_after: float = Field(10.0, gt=0)
    on_stale: Literal["skip", "impute_last", "mark"] = "mark"
    key: str | None = Field(
        None,
        description="frame key template over {asset}, {value} (trigger tag) and {ts_ms}; default "
        "'{asset}-{value}' for a tag trigger (the simulator's part id), '{asset}-{ts_ms}' else",
    )

    @field_validator("key")
    @classmethod
    def _key_formats(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                v.format(asset="a", value=1, ts_ms=0)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"key template {v!r} does not format ({exc}); use {{asset}}, {{value}}, "
                    "{ts_ms}"
                ) from None
        return v

    def key_template(self) -> str:
        if self.key is not None:
            return self.key
        return "{asset}-{value}" if self.trigger.tag is not None else "{asset}-{ts_ms}"


# --- model ------------------------------------------------------------------------------------


class ModelConfig(ConfigModel):
    """The ONNX model scored on the gateway; its manifest names the features in input order."""

    path: Path
    manifest: Path | None = Field(
        None, description="manifest JSON; default: the model path with .manifest.json"
    )
    intra_op_threads: int = Field(1, ge=1, le=64)
    max_batch: int = Field(1024, ge=1)

    def manifest_path(self) -> Path:
        return self.manifest or self.path.with_suffix(".manifest.json")


class LabelConfig(ConfigModel):
    """Labels from readings: one message of a quality station gives (asset, key, target).

    Readings of ``key_tag`` and ``target_tag`` of the same asset with the same timestamp (one
    MQTT message expanded into fields, say) from ``connector`` become one ``Label``: its key is
    ``key`` formatted over ``{asset}`` and ``{value}`` (the key tag's value), its target the
    target tag's value (bool or number). The readings themselves still go up as telemetry.
    """

    connector: str = Field(..., min_length=1)
    assets: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns")
    key_tag: str = Field("part_id", min_length=1)
    target_tag: str = Field("defect", min_length=1)
    key: str = Field("{value}", description="label key template over {asset} and {value}")

    @field_validator("key")
    @classmethod
    def _key_formats(cls, v: str) -> str:
        try:
            v.format(asset="a", value="a-1")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"key template {v!r} does not format ({exc}); use {{asset}} and {{value}}"
            ) from None
        return v


class SyncBackoff(ConfigModel):
    initial: float = Field(0.2, gt=0)
    max: float = Field(5.0, gt=0)


class ModelSyncConfig(ConfigModel):
    """Model delivery: signed manifests from ``<prefix>.models``, artifacts over HTTP.

    Nothing is loaded before the manifest's ed25519 signature verifies against ``public_key``
    and the downloaded bytes match its sha256. A candidate runs in shadow on live frames before
    it is swapped in, and is watched (NaN rate, error rate against labels seen on the edge)
    after the swap; see docs/delivery.md.
    """

    public_key: Path = Field(..., description="the cloud's ed25519 public key (PEM), pinned")
    name: str = Field("default", min_length=1, description="the model name this agent runs")
    bootstrap_servers: str | list[str] | None = Field(
        None, description="default: uplink.bootstrap_servers"
    )
    topic_prefix: str | None = Field(None, description="default: uplink.topic_prefix")
    download_timeout: float = Field(10.0, gt=0, description="seconds per artifact request")
    download_attempts: int = Field(5, ge=1, le=100)
    backoff: SyncBackoff = Field(default_factory=SyncBackoff)
    max_artifact_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    shadow_frames: int = Field(20, ge=0, description="frames scored in shadow before the swap")
    shadow_timeout: float = Field(
        60.0, gt=0, description="seconds; then the checks are judged on the frames seen"
    )
    max_nan_rate: float = Field(0.0, ge=0, le=1, description="shadow: NaN outputs allowed")
    max_latency_ms: float = Field(250.0, gt=0, description="shadow: p99 of one batched call")
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="shadow: required agreement with the champion (reported)"
    )
    watch_frames: int = Field(200, ge=0, description="frames watched after a swap")
    watch_min_frames: int = Field(10, ge=1)
    watch_max_nan_rate: float = Field(0.05, ge=0, le=1)
    watch_error_margin: float | None = Field(
        0.1,
        ge=0,
        le=1,
        description="roll back when the new model's error rate against edge labels exceeds the "
        "previous model's (its last watch_labels labelled frames) by more than this plus two "
        "standard errors; null: off",
    )
    watch_max_error_rate: float | None = Field(
        None, ge=0, le=1, description="roll back past this absolute error rate (null: off)"
    )
    watch_labels: int = Field(
        100, ge=1, description="labelled frames judged after a swap (and kept as the baseline)"
    )
    watch_min_labels: int = Field(30, ge=1)


# --- rules ------------------------------------------------------------------------------------


class EventAction(ConfigModel):
    type: Literal["event"]


class WriteAction(ConfigModel):
    type: Literal["write"]
    connector: str = Field(..., min_length=1)
    tag: str = Field(
        ..., min_length=1, description="template over the event, e.g. '{asset}/alarm_lamp'"
    )
    value: bool | int | float | str
    on_clear: bool | int | float | str | None = Field(
        None, description="value written when the rule clears (e.g. reset the alarm coil)"
    )


class MqttAction(ConfigModel):
    type: Literal["mqtt"]
    topic: str = Field(..., min_length=1)
    payload: str = Field(
        "", description="str.format template over the event ({rule}, {asset}, {message}, values)"
    )
    connector: str | None = Field(None, description="an MQTT connector with a publish() method")
    url: str | None = Field(
        None, description="or a broker of its own: mqtt://host[:1883] or mqtts://host[:8883]"
    )
    username: str | None = Field(None, description="for the broker at url")
    password: str | None = None
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    timeout: float = Field(
        5.0, gt=0, description="seconds for connecting (TCP and CONNACK) and for the broker's ack"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"{url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise ValueError(f"{url!r}: bad port") from None
        if parts.username or parts.password:
            raise ValueError(f"{url!r}: put credentials in username/password, not in the URL")
        return url

    @model_validator(mode="after")
    def _target(self) -> MqttAction:
        if (self.connector is None) == (self.url is None):
            raise ValueError("set exactly one of 'connector' (an MQTT connector) or 'url'")
        if self.connector is not None and (self.username or self.password):
            raise ValueError("username/password are for 'url'; the connector has its own")
        return self


class WebhookAction(ConfigModel):
    type: Literal["webhook"]
    url: str = Field(..., pattern=r"^https?://")
    method: Literal["POST", "PUT"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, le=20)
    backoff: float = Field(0.5, gt=0)


Action = Annotated[
    EventAction | WriteAction | MqttAction | WebhookAction, Field(discriminator="type")
]


def _compile_cel(expr: str, rule: str, key: str) -> Any:
    try:
        return cel.compile(expr)
    except Exception as exc:  # noqa: BLE001 - the CEL binding raises ValueError/RuntimeError
        first = str(exc).splitlines()
        detail = " ".join(s.strip() for s in first[:4])
        raise ValueError(f"rule {rule!r}: '{key}' is not valid CEL: {detail}") from None


class RuleConfig(ConfigModel):
    """A CEL condition per asset, evaluated every tick and on every frame.

    Variables: ``asset`` (string), ``r`` (tag -> last value), ``age`` (tag -> seconds since the
    last reading), ``f`` (feature -> value of the asset's latest frame), ``prediction`` and
    ``score`` (of the latest frame; -1.0 when none), ``has_frame`` (bool).
    """

    name: str = Field(..., pattern=_NAME.pattern)
    assets: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns")
    when: str = Field(..., min_length=1)
    clear: str | None = Field(
        None, description="hysteresis: once fired, stay active until this holds"
    )
    for_: float = Field(0.0, ge=0, alias="for", description="must hold this many seconds")
    cooldown: float = Field(0.0, ge=0, description="seconds before the rule may fire again")
    severity: Literal["info", "warning", "critical"] = "warning"
    message: str = ""
    emit_event: bool = True
    actions: list[Action] = Field(default_factory=list)

    model_config = {"populate_by_name": True}

    @field_validator("when", "clear")
    @classmethod
    def _compiles(cls, v: str | None, info: Any) -> str | None:
        if v is not None:
            _compile_cel(v, info.data.get("name", "?"), info.field_name)
        return v

    @property
    def severity_level(self) -> Severity:
        return Severity[self.severity.upper()]


# --- outbox / uplink / http -------------------------------------------------------------------


class OutboxConfig(ConfigModel):
    """SQLite WAL outbox. ``synchronous: normal`` survives a process crash (SIGKILL): a committed
    transaction is in the WAL file in the OS cache. ``full`` also survives power loss (fsync per
    commit) at a cost in throughput."""

    path: Path | None = Field(None, description="default: <state_dir>/outbox.db")
    max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024)
    overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    synchronous: Literal["normal", "full"] = "normal"


class UplinkBackoff(ConfigModel):
    initial: float = Field(0.2, gt=0)
    max: float = Field(10.0, gt=0)


class UplinkConfig(ConfigModel):
    """Kafka producer settings; TLS/SASL are handed to aiokafka as they are."""

    bootstrap_servers: str | list[str] = "127.0.0.1:9092"
    topic_prefix: str = DEFAULT_PREFIX
    batch_size: int = Field(500, ge=1, le=100_000, description="records per wire batch")
    max_in_flight: int = Field(32, ge=1, le=1024, description="batches awaiting acks")
    linger_ms: int = Field(20, ge=0, le=60_000)
    request_timeout_ms: int = Field(5000, ge=500)
    compression: Literal["none", "gzip"] = "none"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    backoff: UplinkBackoff = Field(default_factory=UplinkBackoff)
    delete_after: Literal["applied", "broker"] = Field(
        "applied",
        description="applied: keep a sent batch until the cloud says it applied it (the "
        "end-to-end acknowledgement on <prefix>.control; survives a broker that loses its log); "
        "broker: delete once the broker acked (for consumers that are not the edgeloop cloud)",
    )


class HttpConfig(ConfigModel):
    host: str = "127.0.0.1"
    port: int | None = Field(9108, ge=0, le=65535, description="0: any free port; null: off")


class LogConfig(ConfigModel):
    json_: bool = Field(False, alias="json")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    model_config = {"populate_by_name": True}


class EdgeConfigBase(ConfigModel):
    """Every section of the edge config; ``connectors`` is narrowed by :func:`edge_config_model`
    to a list discriminated by ``kind`` over the installed connectors' config models."""

    agent_id: str = Field(..., pattern=_NAME.pattern)
    state_dir: Path = Path("./edge-state")
    connectors: list[Any] = Field(default_factory=list)
    frames: list[FrameConfig] = Field(default_factory=list)
    model: ModelConfig | None = None
    models: ModelSyncConfig | None = None
    labels: list[LabelConfig] = Field(default_factory=list)
    rules: list[RuleConfig] = Field(default_factory=list)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    uplink: UplinkConfig = Field(default_factory=UplinkConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    heartbeat_interval: float = Field(10.0, gt=0)
    tick_interval: float = Field(0.05, gt=0, le=5, description="seconds per processing tick")
    queue_size: int = Field(200_000, ge=100, description="readings buffered before the outbox")

    @model_validator(mode="after")
    def _cross_refs(self) -> EdgeConfigBase:
        names = [c.name for c in self.connectors]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"connector names must be unique; repeated: {dupes}")
        rules = [r.name for r in self.rules]
        rdupes = sorted({n for n in rules if rules.count(n) > 1})
        if rdupes:
            raise ValueError(f"rule names must be unique; repeated: {rdupes}")
        assets = [f.asset for f in self.frames]
        fdupes = sorted({a for a in assets if assets.count(a) > 1})
        if fdupes:
            raise ValueError(f"one frame definition per asset; repeated: {fdupes}")
        for i, lab in enumerate(self.labels):
            if lab.connector not in names:
                raise ValueError(
                    f"labels[{i}]: connector {lab.connector!r} is not configured "
                    f"(have: {names or 'none'})"
                )
        for rule in self.rules:
            for act in rule.actions:
                target = getattr(act, "connector", None)
                if target is not None and target not in names:
                    raise ValueError(
                        f"rule {rule.name!r}: action {act.type!r} names connector {target!r}, "
                        f"which is not configured (have: {names or 'none'})"
                    )
        return self

    def outbox_path(self) -> Path:
        return self.outbox.path or self.state_dir / "outbox.db"


_MODELS: dict[frozenset[str] | None, type[EdgeConfigBase]] = {}


def edge_config_model(kinds: Iterable[str] | None = None) -> type[EdgeConfigBase]:
    """The edge config model offering the connector ``kinds`` (all installed ones when None)."""
    key = None if kinds is None else frozenset(kinds)
    model = _MODELS.get(key)
    if model is None:
        union = _connector_union(connector_config_models(key))
        model = _MODELS[key] = create_model(
            "EdgeConfig",
            __base__=EdgeConfigBase,
            __module__=__name__,
            connectors=(list[union], Field(default_factory=list)),  # type: ignore[valid-type]
        )
    return model


def __getattr__(name: str) -> Any:
    # ``EdgeConfig`` (every installed connector kind) is built on first use: building it imports
    # every connector plugin, which ``edgeloop edge run`` avoids (see load_edge_config)
    if name == "EdgeConfig":
        return edge_config_model(None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _kinds_in(path: str | os.PathLike[str]) -> set[str] | None:
    """The connector kinds a config file names, or None when that cannot be told cheaply."""
    try:
        doc = load_yaml(Path(path).read_text(encoding="utf-8"))
        entries = doc.get("connectors") or []
        kinds = {e["kind"] for e in entries}
    except Exception:  # noqa: BLE001 - the full model will report whatever is wrong
        return None
    installed = {"synthetic", *available_connectors()}
    if not all(isinstance(k, str) and k in installed for k in kinds):
        return None  # an unknown kind: validate against all, so the error lists every choice
    return kinds


def load_edge_config(path: str | os.PathLike[str]) -> EdgeConfigBase:
    """Load and validate an edge config file; raises :class:`shared.config.ConfigError`.

    Only the connector plugins the file uses are imported.
    """
    return load_config(path, edge_config_model(_kinds_in(path)))
