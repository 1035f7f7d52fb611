"""The whole simulator in-process: one scenario, its servers, the truth file, one update loop.

::

    async with FactorySimulator(SimConfig(...)) as sim:
        sim.opcua_endpoint, sim.modbus_address, sim.scenario.snapshot()

The update loop runs at ``update_hz`` on a fixed wall-clock schedule: at each tick it advances the
scenario to the scenario time of *now* (``(now - start) * speed``), writes what happened to the
truth file, publishes labels and wireless sensors on MQTT, and writes one snapshot into the OPC UA
address space and the Modbus registers. A tick that starts late is measured (``lag``); ticks
missed entirely are skipped and counted, never bunched up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from simulators.config import SimConfig
from simulators.modbus_server import ModbusSimServer, RegisterBank
from simulators.mqtt_publisher import MqttPublisher
from simulators.opcua_server import OpcUaSimServer
from simulators.scenario import Scenario, TruthEvent, wireless

__all__ = ["FactorySimulator", "UpdateStats"]

log = logging.getLogger(__name__)


class UpdateStats:
    """Lag of each update behind its schedule, and how long updates take (seconds)."""

    def __init__(self, keep: int = 100_000) -> None:
        self.lag: collections.deque[float] = collections.deque(maxlen=keep)
        self.duration: collections.deque[float] = collections.deque(maxlen=keep)
        self.updates = 0
        self.skipped = 0

    def percentile(self, which: str, q: float) -> float:
        data = self.lag if which == "lag" else self.duration
        return float(np.percentile(np.fromiter(data, float), q)) if data else float("nan")


class FactorySimulator:
    """Async context manager; ``start``/``stop`` are idempotent. Ports 0 pick free ports."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.scenario: Scenario | None = None
        self.opcua: OpcUaSimServer | None = None
        self.modbus: ModbusSimServer | None = None
        self.bank: RegisterBank | None = None
        self.mqtt: MqttPublisher | None = None
        self.stats = UpdateStats()
        self.events: collections.deque[TruthEvent] = collections.deque(maxlen=100_000)
        self._truth: IO[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_sensor_t = 0.0
        self._started = False

    # ------------------------------------------------------------------ endpoints
    @property
    def opcua_endpoint(self) -> str | None:
        return self.opcua.endpoint if self.opcua else None

    @property
    def modbus_address(self) -> tuple[str, int] | None:
        return self.modbus.address if self.modbus else None

    def endpoints(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.opcua:
            out["opcua"] = self.opcua.endpoint
        if self.modbus:
            host, port = self.modbus.address
            out["modbus"] = f"modbus+tcp://{host}:{port}"
        if self.mqtt:
            out["mqtt"] = (
                f"{self.config.mqtt.url} (topics {self.config.mqtt.topic_prefix}/{self.config.scenario.line}/+/+)"
            )
        if self.config.truth:
            out["truth"] = self.config.truth
        return out

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        cfg = self.config
        sc_cfg = cfg.scenario
        start_ns = sc_cfg.start_ns if sc_cfg.start_ns is not None else time.time_ns()
        self.scenario = sc = Scenario(sc_cfg, start_ns=start_ns)
        try:
            if cfg.truth:
                path = Path(cfg.truth)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._truth = await asyncio.to_thread(path.open, "w", encoding="utf-8")
            if cfg.modbus.enabled:
                self.bank = RegisterBank(sc.assets, cfg.modbus.registers, on_command=self.command)
                self.bank.update(sc.snapshot())
                self.modbus = ModbusSimServer(self.bank, cfg.modbus.host, cfg.modbus.port)
                await self.modbus.start()
            if cfg.opcua.enabled:
                self.opcua = OpcUaSimServer(
                    cfg.opcua, sc_cfg.line, sc.assets, sc_cfg.extra_tags, on_command=self.command
                )
                await self.opcua.start()
                await self.opcua.update(sc.snapshot())
            if cfg.mqtt.enabled:
                self.mqtt = MqttPublisher(cfg.mqtt, sc_cfg.line)
                await self.mqtt.start()
            # scenario time 0 is "now": re-anchor after the (slow) server start-up
            if sc_cfg.start_ns is None:
                sc.start_ns = time.time_ns()
            if self._truth is not None:
                meta = {
                    "kind": "meta",
                    "t": 0.0,
                    "ts_ns": sc.start_ns,
                    "start_ns": sc.start_ns,
                    "assets": sc.assets,
                    "config": cfg.model_dump(mode="json"),
                }
                self._truth.write(json.dumps(meta, sort_keys=True) + "\n")
                self._truth.flush()
            self._task = asyncio.create_task(self._run(), name="sim-update-loop")
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for server in (self.mqtt, self.opcua, self.modbus):
            if server is not None:
                try:
                    await server.stop()
                except Exception:
                    log.exception("stopping %s failed", type(server).__name__)
        if self._truth is not None:
            self._truth.close()
            self._truth = None

    async def __aenter__(self) -> FactorySimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self, duration: float | None = None) -> None:
        """Start, then serve for ``duration`` wall seconds (or until cancelled), then stop."""
        async with self:
            if duration is None:
                await asyncio.Event().wait()
            else:
                await asyncio.sleep(duration)

    # ------------------------------------------------------------------ commands
    def command(self, asset: str, command: str, value: bool) -> None:
        """A write from a protocol client: ``stop_request`` or ``alarm_lamp`` of a machine."""
        sc = self.scenario
        if sc is None:
            return
        if command == "stop_request":
            sc.set_stop_request(asset, value)
        elif command == "alarm_lamp":
            sc.set_alarm_lamp(asset, value)
        else:
            raise KeyError(f"unknown command {command!r}")

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        period = 1.0 / self.config.update_hz
        t0 = time.monotonic()
        k = 0
        while True:
            k += 1
            due = t0 + k * period
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if now - due > period:  # a whole period late: skip the missed ticks, count them
                missed = int((now - due) / period)
                self.stats.skipped += missed
                k += missed
                due = t0 + k * period
            self.stats.lag.append(max(0.0, now - due))
            try:
                await self.update_once()
            except Exception:
                log.exception("simulator update failed")
            self.stats.duration.append(time.monotonic() - now)
            self.stats.updates += 1

    async def update_once(self) -> None:
        """Advance the scenario to now and publish it everywhere."""
        sc = self.scenario
        assert sc is not None
        events = sc.advance_to(sc.scenario_time_at(time.time_ns()))
        self._record(events)
        snap = sc.snapshot()
        if self.mqtt is not None and sc.t >= self._next_sensor_t:
            self._next_sensor_t = sc.t + self.config.mqtt.sensor_period
            for asset, values in wireless(snap, self.config.scenario.seed, sc.ticks).items():
                if not snap.offline[sc.machine_index(asset)]:
                    self.mqtt.publish_wireless(asset, values, snap.ts_ns)
        if self.bank is not None:
            self.bank.update(snap)
        if self.opcua is not None:
            await self.opcua.update(snap)

    def _record(self, events: list[TruthEvent]) -> None:
        if not events:
            return
        self.events.extend(events)
        if self._truth is not None:
            self._truth.write("".join(e.to_json() + "\n" for e in events))
            self._truth.flush()
        if self.mqtt is not None:
            for e in events:
                if e.kind == "label":
                    self.mqtt.publish_label(e)

    def truth_summary(self) -> dict[str, Any]:
        kinds = collections.Counter(e.kind for e in self.events)
        return dict(kinds)
