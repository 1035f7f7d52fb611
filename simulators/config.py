"""Configuration of the factory simulator: the scenario and the servers that expose it.

``SimConfig`` is what ``edgeloop config validate --kind sim`` checks and what
:class:`simulators.factory.FactorySimulator` runs. Times marked *scenario seconds* are on the
scenario's own clock, which runs ``speed`` times faster than the wall clock.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from shared.config import ConfigModel

__all__ = [
    "FaultSpec",
    "ModbusServerConfig",
    "MqttPublisherConfig",
    "OpcUaServerConfig",
    "OpcUaUser",
    "ScenarioConfig",
    "SimConfig",
]

SecurityMode = Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")

#: 2024-01-01T00:00:00Z: the epoch of a scenario stepped without servers (no wall clock).
DEFAULT_START_NS = 1_704_067_200 * 1_000_000_000


class FaultSpec(ConfigModel):
    """A scripted device outage: machine ``asset`` is offline from ``at`` for ``duration``."""

    asset: str
    at: float = Field(ge=0, description="scenario seconds")
    duration: float = Field(gt=0, description="scenario seconds")


class ScenarioConfig(ConfigModel):
    """The production line: a pure function of these values and the scenario time."""

    seed: int = Field(default=1, ge=0)
    line: str = "line1"
    machines: int = Field(default=4, ge=1, le=1000)
    extra_tags: int = Field(default=0, ge=0, le=10_000, description="aux_NNN tags per machine")
    tick: float = Field(default=0.1, gt=0, le=5, description="scenario seconds per physics step")
    speed: float = Field(
        default=1.0, gt=0, le=10_000, description="scenario seconds per wall second"
    )
    start_ns: int | None = Field(
        default=None,
        ge=0,
        description="wall-clock ns at scenario time 0; None = now when served, 2024-01-01 when stepped",
    )
    drift_at: float | None = Field(
        default=None,
        ge=0,
        description="scenario seconds: a new material lot changes the defect mechanism",
    )
    recalibration_at: float | None = Field(
        default=None, ge=0, description="scenario seconds: one sensor gets a calibration offset"
    )
    recalibration_asset: str | None = Field(
        default=None,
        description="machine whose sensor is recalibrated (default: the second, or the first)",
    )
    recalibration_tag: Literal[
        "spindle_temp", "vibration_rms", "spindle_speed", "feed_rate", "power"
    ] = "spindle_temp"
    recalibration_offset: float = 4.0
    label_delay: tuple[float, float] = Field(
        default=(3.0, 6.0), description="scenario seconds from part finished to quality result"
    )
    fault_interval: float | None = Field(
        default=900.0,
        gt=0,
        description="mean scenario seconds between random outages per machine; None = off",
    )
    fault_duration: tuple[float, float] = (5.0, 20.0)
    faults: list[FaultSpec] = Field(default_factory=list, description="scripted outages")
    anomaly_interval: float | None = Field(
        default=180.0,
        gt=0,
        description="mean scenario seconds between sensor anomalies per machine; None = off",
    )

    @field_validator("line")
    @classmethod
    def _line_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("expected a letter then up to 62 letters, digits, '_' or '-'")
        return v

    @field_validator("label_delay", "fault_duration")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if lo < 0 or hi < lo:
            raise ValueError(f"expected [min, max] with 0 <= min <= max, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _assets_exist(self) -> ScenarioConfig:
        names = {machine_name(i) for i in range(self.machines)}
        for f in self.faults:
            if f.asset not in names:
                raise ValueError(
                    f"faults: unknown machine {f.asset!r}; machines are m1..m{self.machines}"
                )
        if self.recalibration_asset is not None and self.recalibration_asset not in names:
            raise ValueError(
                f"recalibration_asset: unknown machine {self.recalibration_asset!r}; "
                f"machines are m1..m{self.machines}"
            )
        return self


def machine_name(index: int) -> str:
    """The asset name of machine ``index`` (0-based): ``m1``, ``m2``, ..."""
    return f"m{index + 1}"


class OpcUaUser(ConfigModel):
    username: str
    password: str = Field(min_length=1)


class OpcUaServerConfig(ConfigModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=4840, ge=0, le=65535, description="0 = a free port")
    namespace: str = "urn:edgeloop:simulator"
    security: list[SecurityMode] = Field(default_factory=lambda: list[SecurityMode](["None"]))
    cert_dir: str | None = Field(
        default=None, description="where the server certificate and key live (generated if absent)"
    )
    users: list[OpcUaUser] = Field(
        default_factory=list, description="username/password users; empty = anonymous allowed"
    )
    allow_anonymous: bool = True


class ModbusServerConfig(ConfigModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=5020, ge=0, le=65535, description="0 = a free port")
    registers: int = Field(
        default=0, ge=0, le=60_000, description="extra aux holding registers per unit (benchmarks)"
    )


class MqttPublisherConfig(ConfigModel):
    enabled: bool = True
    url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = "plant"
    client_id: str = "edgeloop-sim"
    sensor_period: float = Field(
        default=5.0, gt=0, description="scenario seconds between wireless sensor reports"
    )
    qos: int = Field(default=1, ge=0, le=2)

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, v: str) -> str:
        if not (v.startswith("mqtt://") or v.startswith("mqtts://")):
            raise ValueError("expected mqtt://host:port or mqtts://host:port")
        return v


class SimConfig(ConfigModel):
    """The whole simulator: a scenario served over OPC UA, Modbus TCP and MQTT."""

    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    update_hz: float = Field(
        default=10.0, gt=0, le=1000, description="server updates per wall second"
    )
    truth: str | None = Field(default=None, description="ground-truth JSONL path")
    opcua: OpcUaServerConfig = Field(default_factory=OpcUaServerConfig)
    modbus: ModbusServerConfig = Field(default_factory=ModbusServerConfig)
    mqtt: MqttPublisherConfig = Field(default_factory=lambda: MqttPublisherConfig(enabled=False))
