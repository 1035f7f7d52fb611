"""A seeded, deterministic production line: machines, tool wear, a quality station, drift, faults.

The scenario is a pure function of its :class:`~simulators.config.ScenarioConfig` (the seed above
all) and of the scenario time: it advances in fixed steps of ``tick`` scenario seconds, never in
wall-clock time, so stepping it in a test and serving it over OPC UA at ``speed`` 100 produce the
same parts, the same labels and the same events. The only outside inputs are commands (a stop
request, the alarm lamp), and those are recorded in the ground truth.

Two clocks, kept apart:

* **scenario time** ``t`` (float seconds since the scenario began) - every duration in the config;
* **timestamps** ``ts_ns`` (int ns since the epoch) on everything published:
  ``ts_ns = start_ns + t / speed * 1e9``, i.e. wall-clock time when served live.

Per machine the line exposes the tags in :data:`TAGS` (see docs/simulator.md). A machine loads a
blank, runs one cycle (a part), and when the cycle ends ``part_counter`` becomes ``n`` and
``part_id`` becomes ``"<asset>-<n>"``. A few scenario seconds later the quality station reports
that part's defect flag and measured deviation: a :class:`TruthEvent` of kind ``label``.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from simulators.config import DEFAULT_START_NS, ScenarioConfig, machine_name

__all__ = [
    "FLOAT_TAGS",
    "TAGS",
    "MachineState",
    "Scenario",
    "Snapshot",
    "TagSpec",
    "TagStatus",
    "TruthEvent",
    "aux_tag_names",
    "iter_labels",
    "wireless",
]


class MachineState(IntEnum):
    IDLE = 0
    RUNNING = 1
    FAULT = 2


class TagStatus(IntEnum):
    """Quality of one published value; servers map it to their protocol's status."""

    GOOD = 0
    SENSOR_FAILURE = 1  # a dropout: the sensor gives no value (OPC UA BadSensorFailure)
    OFFLINE = 2  # the whole machine is unreachable (OPC UA BadNoCommunication)


@dataclass(frozen=True, slots=True)
class TagSpec:
    name: str
    kind: str  # "float" | "int" | "bool" | "str"
    unit: str
    description: str
    writable: bool = False


#: The analog signals, in the row order of :attr:`Snapshot.floats`.
FLOAT_TAGS: tuple[TagSpec, ...] = (
    TagSpec("spindle_speed", "float", "rpm", "spindle speed"),
    TagSpec("feed_rate", "float", "mm/min", "feed rate"),
    TagSpec("spindle_temp", "float", "degC", "spindle bearing temperature"),
    TagSpec("vibration_rms", "float", "mm/s", "spindle vibration velocity RMS"),
    TagSpec("power", "float", "kW", "active power drawn by the machine"),
    TagSpec("energy", "float", "kWh", "cumulative active energy"),
)
INT_TAGS: tuple[TagSpec, ...] = (
    TagSpec("state", "int", "", "0 idle, 1 running, 2 fault"),
    TagSpec("part_counter", "int", "", "parts finished since start; changes when a cycle ends"),
    TagSpec("tool_changes", "int", "", "tool changes since start"),
)
OTHER_TAGS: tuple[TagSpec, ...] = (
    TagSpec("part_id", "str", "", "id of the last finished part: '<asset>-<part_counter>'"),
    TagSpec("alarm_lamp", "bool", "", "alarm lamp on the machine (writable)", writable=True),
    TagSpec(
        "stop_request",
        "bool",
        "",
        "true stops the machine (idle) until cleared (writable)",
        writable=True,
    ),
)
TAGS: tuple[TagSpec, ...] = FLOAT_TAGS + INT_TAGS + OTHER_TAGS

_F = {spec.name: i for i, spec in enumerate(FLOAT_TAGS)}
SPEED, FEED, TEMP, VIB, POWER, ENERGY = (
    _F["spindle_speed"],
    _F["feed_rate"],
    _F["spindle_temp"],
    _F["vibration_rms"],
    _F["power"],
    _F["energy"],
)
_SENSOR_TAGS = ("spindle_speed", "feed_rate", "spindle_temp", "vibration_rms", "power")

#: Per-cycle aggregates in a label's ``features`` (what an edge computes over a cycle's window).
FEATURES = (
    "temp_mean",
    "vib_max",
    "vib_mean",
    "speed_mean",
    "feed_mean",
    "power_mean",
    "cycle_time",
)


def aux_tag_names(n: int) -> list[str]:
    return [f"aux_{i:03d}" for i in range(n)]


@dataclass(frozen=True, slots=True)
class TruthEvent:
    """One line of the ground truth: a label, a drift, an injected fault or anomaly, a command."""

    kind: str
    t: float
    ts_ns: int
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"kind": self.kind, "t": round(self.t, 6), "ts_ns": self.ts_ns, **self.data},
            separators=(",", ":"),
            sort_keys=True,
        )


@dataclass(slots=True)
class Snapshot:
    """What the line's sensors show at one instant (measured values, not the hidden truth)."""

    t: float
    ts_ns: int
    assets: list[str]
    floats: np.ndarray  # (len(FLOAT_TAGS), machines) float64
    ints: np.ndarray  # (len(INT_TAGS), machines) int64
    part_ids: list[str]
    alarm_lamp: list[bool]
    stop_request: list[bool]
    status: np.ndarray  # (len(FLOAT_TAGS), machines) int8 TagStatus per sensor tag
    offline: np.ndarray  # (machines,) bool
    aux: np.ndarray  # (extra_tags, machines) float64

    def value(self, asset: str, tag: str) -> Any:
        m = self.assets.index(asset)
        if tag in _F:
            return float(self.floats[_F[tag], m])
        for i, spec in enumerate(INT_TAGS):
            if spec.name == tag:
                return int(self.ints[i, m])
        if tag == "part_id":
            return self.part_ids[m]
        if tag == "alarm_lamp":
            return self.alarm_lamp[m]
        if tag == "stop_request":
            return self.stop_request[m]
        if tag.startswith("aux_"):
            return float(self.aux[int(tag[4:]), m])
        raise KeyError(f"unknown tag {tag!r}")

    def tag_status(self, asset: str, tag: str) -> TagStatus:
        m = self.assets.index(asset)
        if self.offline[m]:
            return TagStatus.OFFLINE
        if tag in _F:
            return TagStatus(int(self.status[_F[tag], m]))
        return TagStatus.GOOD


# The defect mechanism. Aggregates are standardised with fixed constants (roughly the line's
# means and spreads), then a latent score mixes main effects, an interaction and hidden tool wear;
# Gaussian noise keeps a logistic model on the aggregates well short of 100 %.
_Z = {"temp": (50.3, 5.3), "vib": (4.85, 0.87), "sf": (1.19, 0.51)}
_LOT_WEIGHTS = (
    # lot A (before drift_at): hot spindle, vibration and aggressive cutting cause defects
    {"bias": -0.4, "temp": 1.7, "vib": 1.3, "sf": 0.9, "temp_x_vib": 0.6, "wear": 1.2},
    # lot B (after drift_at): a brittle material; a cold spindle chips it, vibration matters less
    {"bias": -0.3, "temp": -1.9, "vib": 0.4, "sf": 1.4, "temp_x_vib": -0.5, "wear": 1.2},
)
_NOISE = 0.75
_TOLERANCE_UM = 30.0
_UM_LOG_PER_UNIT = 0.35  # deviation = 30 um * exp(0.35 * latent): positive, > 30 um iff defective

_EPS = 1e-9


class Scenario:
    """The line. Step it with :meth:`advance_to`; read it with :meth:`snapshot`.

    Not thread-safe; one owner (the simulator's update loop, or a test) drives it.
    """

    def __init__(self, config: ScenarioConfig | None = None, start_ns: int | None = None) -> None:
        self.config = cfg = config or ScenarioConfig()
        self.start_ns = start_ns if start_ns is not None else (cfg.start_ns or DEFAULT_START_NS)
        n = self.n = cfg.machines
        self.assets = [machine_name(i) for i in range(n)]
        self._index = {a: i for i, a in enumerate(self.assets)}
        self.ticks = 0
        self.t = 0.0

        root = np.random.SeedSequence(cfg.seed)
        phys_seq, aux_seq, *per_machine = root.spawn(1 + 1 + 3 * n)
        self._phys = np.random.default_rng(phys_seq)
        self._aux_seed = int(aux_seq.generate_state(1)[0])
        self._cycle_rng = [np.random.default_rng(s) for s in per_machine[0:n]]
        self._quality_rng = [np.random.default_rng(s) for s in per_machine[n : 2 * n]]
        self._event_rng = [np.random.default_rng(s) for s in per_machine[2 * n : 3 * n]]

        # machine-specific constants (a fleet is never identical)
        cr = np.random.default_rng(root.spawn(1)[0])
        self._cooling = cr.uniform(0.8, 1.2, n)  # how well each spindle sheds heat
        self._vib_base = cr.uniform(0.35, 0.65, n)
        self._idle_kw = cr.uniform(0.8, 1.4, n)

        # true physical state
        self.state = np.full(n, MachineState.IDLE, dtype=np.int64)
        self.speed = np.zeros(n)
        self.feed = np.zeros(n)
        self.temp = np.full(n, 24.0) + cr.uniform(-1, 1, n)
        self.vib = self._vib_base.copy()
        self.power = self._idle_kw.copy()
        self.energy = np.zeros(n)
        self.wear = cr.uniform(0.0, 0.4, n)  # tools are part-used at the start
        self._wear_limit = np.array([self._cycle_rng[i].uniform(0.8, 1.0) for i in range(n)])
        self.part_counter = np.zeros(n, dtype=np.int64)
        self.tool_changes = np.zeros(n, dtype=np.int64)
        self.lot = 0

        # cycle bookkeeping
        self._in_cycle = np.zeros(n, dtype=bool)
        self._remaining = np.array([self._cycle_rng[i].uniform(0.2, 2.0) for i in range(n)])
        self._set_speed = np.zeros(n)
        self._set_feed = np.zeros(n)
        self._cycle_len = np.zeros(n)
        self._acc_n = np.zeros(n)
        self._m_counts = np.zeros((len(FLOAT_TAGS), n))
        self._acc: dict[str, np.ndarray] = {}
        self._reset_acc(np.ones(n, dtype=bool))

        # commands
        self.stop_request = [False] * n
        self.alarm_lamp = [False] * n

        # measured view
        self._offset = np.zeros((len(FLOAT_TAGS), n))
        self._stuck = np.zeros((len(FLOAT_TAGS), n), dtype=bool)
        self._stuck_value = np.zeros((len(FLOAT_TAGS), n))
        self._spike = np.ones((len(FLOAT_TAGS), n))
        self._dropout = np.zeros((len(FLOAT_TAGS), n), dtype=bool)
        self._offline = np.zeros(n, dtype=bool)
        self._shown = np.zeros((len(FLOAT_TAGS), n))

        # scheduled happenings: (t, seq, kind, payload)
        self._seq = 0
        self._agenda: list[tuple[float, int, str, dict[str, Any]]] = []
        self._pending_labels: list[tuple[float, int, dict[str, Any]]] = []
        self._emitted: list[TruthEvent] = []
        if cfg.drift_at is not None:
            self._schedule(cfg.drift_at, "drift", {"what": "material_lot", "lot": 1})
        if cfg.recalibration_at is not None:
            asset = cfg.recalibration_asset or self.assets[min(1, n - 1)]
            self._schedule(
                cfg.recalibration_at,
                "recalibration",
                {"asset": asset, "tag": cfg.recalibration_tag, "offset": cfg.recalibration_offset},
            )
        for f in cfg.faults:
            self._schedule(
                f.at, "fault_start", {"asset": f.asset, "duration": f.duration, "scripted": True}
            )
        self._next_fault = np.full(n, math.inf)
        self._next_anomaly = np.full(n, math.inf)
        for i in range(n):
            if cfg.fault_interval is not None:
                self._next_fault[i] = self._event_rng[i].exponential(cfg.fault_interval)
            if cfg.anomaly_interval is not None:
                self._next_anomaly[i] = self._event_rng[i].exponential(cfg.anomaly_interval)

    # ------------------------------------------------------------------ time
    def ts_ns(self, t: float) -> int:
        """The published timestamp of scenario time ``t``."""
        return self.start_ns + round(t / self.config.speed * 1e9)

    def scenario_time_at(self, wall_ns: int) -> float:
        """The scenario time that wall-clock ``wall_ns`` corresponds to when served live."""
        return max(0.0, (wall_ns - self.start_ns) / 1e9 * self.config.speed)

    # ------------------------------------------------------------------ commands
    def machine_index(self, asset: str) -> int:
        try:
            return self._index[asset]
        except KeyError:
            raise KeyError(
                f"unknown machine {asset!r}; machines are {', '.join(self.assets)}"
            ) from None

    def set_stop_request(self, asset: str, on: bool) -> None:
        """A stop request aborts the running cycle (the part is scrapped, never counted) and
        keeps the machine idle until the request is cleared."""
        m = self.machine_index(asset)
        if self.stop_request[m] == bool(on):
            return
        self.stop_request[m] = bool(on)
        self._emit("command", {"asset": asset, "command": "stop_request", "value": bool(on)})
        if on and self._in_cycle[m]:
            self._in_cycle[m] = False
            self._emit("cycle_aborted", {"asset": asset, "reason": "stop_request"})
        if not on:
            self._remaining[m] = self._cycle_rng[m].uniform(1.0, 3.0)

    def set_alarm_lamp(self, asset: str, on: bool) -> None:
        m = self.machine_index(asset)
        if self.alarm_lamp[m] != bool(on):
            self.alarm_lamp[m] = bool(on)
            self._emit("command", {"asset": asset, "command": "alarm_lamp", "value": bool(on)})

    def is_offline(self, asset: str) -> bool:
        return bool(self._offline[self.machine_index(asset)])

    # ------------------------------------------------------------------ stepping
    def advance_to(self, t: float) -> list[TruthEvent]:
        """Step until scenario time ``t`` (whole ticks; never backwards) and return what happened
        (labels, drift, faults, anomalies, commands), in time order."""
        target = math.floor(t / self.config.tick + 1e-9)
        while self.ticks < target:
            self._step()
        out, self._emitted = self._emitted, []
        return out

    def step(self, n: int = 1) -> list[TruthEvent]:
        for _ in range(n):
            self._step()
        out, self._emitted = self._emitted, []
        return out

    def _schedule(self, t: float, kind: str, payload: dict[str, Any]) -> None:
        self._seq += 1
        heapq.heappush(self._agenda, (t, self._seq, kind, payload))

    def _emit(self, kind: str, data: dict[str, Any], t: float | None = None) -> None:
        t = self.t if t is None else t
        self._emitted.append(TruthEvent(kind, t, self.ts_ns(t), data))

    def _reset_acc(self, mask: np.ndarray) -> None:
        for name in ("temp", "vib_max", "vib", "speed", "feed", "power"):
            arr = self._acc.setdefault(name, np.zeros(self.n))
            arr[mask] = 0.0
        for name in ("m_temp", "m_vib_max", "m_vib", "m_speed", "m_feed", "m_power", "m_n"):
            arr = self._acc.setdefault(name, np.zeros(self.n))
            arr[mask] = 0.0
        self._acc_n[mask] = 0.0
        self._m_counts[:, mask] = 0.0

    def _step(self) -> None:
        cfg = self.config
        dt = cfg.tick
        self.ticks += 1
        self.t = t = self.ticks * dt
        self._run_agenda(t)
        self._random_happenings(t)

        # cycle logic per machine (cheap: a few machines, scalar work)
        for m in range(self.n):
            if self._offline[m]:
                self.state[m] = MachineState.FAULT
                continue
            if self.stop_request[m]:
                self.state[m] = MachineState.IDLE
                continue
            self._remaining[m] -= dt
            if self._in_cycle[m]:
                self.state[m] = MachineState.RUNNING
                if self._remaining[m] <= 0:
                    self._finish_part(m)
            else:
                self.state[m] = MachineState.IDLE
                if self._remaining[m] <= 0:
                    self._start_cycle(m)

        running = self.state == MachineState.RUNNING
        noise = self._phys.standard_normal((6, self.n))
        # spindle and axes follow their set points quickly (first order, ~0.5 s)
        k = min(1.0, dt / 0.5)
        target_speed = np.where(running, self._set_speed, 0.0)
        target_feed = np.where(running, self._set_feed, 0.0)
        self.speed += k * (target_speed - self.speed)
        self.feed += k * (target_feed - self.feed)
        speed = np.maximum(0.0, self.speed * (1 + 0.004 * noise[0]))
        feed = np.maximum(0.0, self.feed * (1 + 0.006 * noise[1]))
        load = (speed / 4000.0) * (feed / 300.0)
        self.power = self._idle_kw + 3.2 * load * (1 + 0.35 * self.wear) + 0.05 * noise[2]
        # spindle heats with cutting power and cools towards the hall temperature (tau ~ 40 s)
        hall = 22.0 + 2.0 * math.sin(2 * math.pi * t / 3600.0)
        heat_target = (
            hall + 9.0 * (self.power - self._idle_kw) / self._cooling + 6.0 * speed / 6000.0
        )
        self.temp += min(1.0, dt / 40.0) * (heat_target - self.temp) + 0.02 * noise[3]
        self.vib = (
            self._vib_base
            + np.where(running, 0.55 * speed / 1000.0 + 0.9 * feed / 300.0, 0.0)
            + np.where(running, 2.4 * self.wear**2, 0.0)
            + np.abs(0.18 * noise[4])
        )
        self.energy += self.power * dt / 3600.0

        # per-cycle aggregates of the truth and of what the sensors show
        measured = self._measure(speed, feed)
        if running.any():
            a = self._acc
            a["temp"][running] += self.temp[running]
            a["vib"][running] += self.vib[running]
            a["vib_max"][running] = np.maximum(a["vib_max"][running], self.vib[running])
            a["speed"][running] += speed[running]
            a["feed"][running] += feed[running]
            a["power"][running] += self.power[running]
            self._acc_n[running] += 1
            ok = running & ~self._dropout[TEMP]
            a["m_temp"][ok] += measured[TEMP][ok]
            a["m_n"][running] += 1
            vib_ok = running & ~self._dropout[VIB]
            a["m_vib"][vib_ok] += measured[VIB][vib_ok]
            a["m_vib_max"][vib_ok] = np.maximum(a["m_vib_max"][vib_ok], measured[VIB][vib_ok])
            for key, row in (("m_speed", SPEED), ("m_feed", FEED), ("m_power", POWER)):
                ok = running & ~self._dropout[row]
                a[key][ok] += measured[row][ok]
            self._m_counts[:, running] += ~self._dropout[:, running]

        while self._pending_labels and self._pending_labels[0][0] <= t + _EPS:
            due, _, payload = heapq.heappop(self._pending_labels)
            self._emit("label", payload, due)

    def _measure(self, speed: np.ndarray, feed: np.ndarray) -> np.ndarray:
        true = np.stack([speed, feed, self.temp, self.vib, self.power, self.energy])
        shown = true * self._spike + self._offset
        held = self._stuck
        if held.any():
            shown = np.where(held, self._stuck_value, shown)
        self._shown = shown
        return shown

    def _start_cycle(self, m: int) -> None:
        r = self._cycle_rng[m]
        self._in_cycle[m] = True
        self._set_speed[m] = r.uniform(2500.0, 6000.0)
        self._set_feed[m] = r.uniform(120.0, 480.0)
        self._cycle_len[m] = self._remaining[m] = r.uniform(6.0, 12.0)
        mask = np.zeros(self.n, dtype=bool)
        mask[m] = True
        self._reset_acc(mask)

    def _finish_part(self, m: int) -> None:
        a, n = self._acc, max(self._acc_n[m], 1.0)
        temp_mean = a["temp"][m] / n
        vib_max = a["vib_max"][m]
        speed_mean = a["speed"][m] / n
        feed_mean = a["feed"][m] / n
        wear = float(self.wear[m])
        w = _LOT_WEIGHTS[self.lot]
        zt = (temp_mean - _Z["temp"][0]) / _Z["temp"][1]
        zv = (vib_max - _Z["vib"][0]) / _Z["vib"][1]
        zs = (speed_mean * feed_mean / 1e6 - _Z["sf"][0]) / _Z["sf"][1]
        q = self._quality_rng[m]
        latent = (
            w["bias"]
            + w["temp"] * zt
            + w["vib"] * zv
            + w["sf"] * zs
            + w["temp_x_vib"] * zt * zv
            + w["wear"] * (wear - 0.5)
            + _NOISE * q.standard_normal()
        )
        deviation = _TOLERANCE_UM * math.exp(_UM_LOG_PER_UNIT * latent)
        delay = q.uniform(*self.config.label_delay)

        counts = self._m_counts[:, m]

        def mean(key: str, row: int) -> float | None:
            c = counts[row]
            return float(a[key][m] / c) if c > 0 else None

        features = {
            "temp_mean": mean("m_temp", TEMP),
            "vib_max": float(a["m_vib_max"][m]) if counts[VIB] > 0 else None,
            "vib_mean": mean("m_vib", VIB),
            "speed_mean": mean("m_speed", SPEED),
            "feed_mean": mean("m_feed", FEED),
            "power_mean": mean("m_power", POWER),
            "cycle_time": float(self._cycle_len[m]),
        }
        self.part_counter[m] += 1
        asset = self.assets[m]
        counter = int(self.part_counter[m])
        part_id = f"{asset}-{counter}"
        self._emit(
            "part",
            {
                "asset": asset,
                "part_id": part_id,
                "part_counter": counter,
                "cycle_start_t": round(self.t - self._cycle_len[m], 6),
            },
        )
        payload = {
            "asset": asset,
            "part_id": part_id,
            "part_counter": counter,
            "defect": bool(latent > 0),
            "deviation_um": round(float(deviation), 3),
            "finished_t": round(self.t, 6),
            "finished_ts_ns": self.ts_ns(self.t),
            "lot": self.lot,
            "tool_wear": round(wear, 5),
            "features": {k: (None if v is None else round(v, 6)) for k, v in features.items()},
            "true_features": {
                "temp_mean": round(float(temp_mean), 6),
                "vib_max": round(float(vib_max), 6),
                "speed_mean": round(float(speed_mean), 6),
                "feed_mean": round(float(feed_mean), 6),
            },
        }
        self._seq += 1
        heapq.heappush(self._pending_labels, (self.t + delay, self._seq, payload))

        # tool wear grows with the material removed; a worn tool is changed before the next part
        self.wear[m] += (
            0.0035 * (speed_mean / 4000.0) * (feed_mean / 300.0) * self._cycle_len[m] / 9.0
        )
        r = self._cycle_rng[m]
        if self.wear[m] >= self._wear_limit[m]:
            self._emit("tool_change", {"asset": asset, "wear": round(float(self.wear[m]), 5)})
            self.wear[m] = 0.0
            self.tool_changes[m] += 1
            self._wear_limit[m] = r.uniform(0.8, 1.0)
            self._remaining[m] = r.uniform(20.0, 40.0)  # the change takes a while
        else:
            self._remaining[m] = r.uniform(1.0, 3.0)  # unload/load
        self._in_cycle[m] = False

    # ------------------------------------------------------------------ happenings
    def _run_agenda(self, t: float) -> None:
        while self._agenda and self._agenda[0][0] <= t + _EPS:
            at, _, kind, p = heapq.heappop(self._agenda)
            if kind == "drift":
                self.lot = int(p["lot"])
                self._emit("drift", p, at)
            elif kind == "recalibration":
                m = self.machine_index(p["asset"])
                self._offset[_F[p["tag"]], m] += p["offset"]
                self._emit("recalibration", p, at)
            elif kind == "fault_start":
                m = self.machine_index(p["asset"])
                if not self._offline[m]:
                    self._offline[m] = True
                    if self._in_cycle[m]:
                        self._in_cycle[m] = False
                        self._emit("cycle_aborted", {"asset": p["asset"], "reason": "fault"}, at)
                    self._emit(
                        "fault",
                        {"asset": p["asset"], "until_t": round(at + p["duration"], 6), **p},
                        at,
                    )
                    self._schedule(at + p["duration"], "fault_end", {"asset": p["asset"]})
            elif kind == "fault_end":
                m = self.machine_index(p["asset"])
                self._offline[m] = False
                self._remaining[m] = self._cycle_rng[m].uniform(1.0, 3.0)
                self._emit("fault_cleared", p, at)
            elif kind == "anomaly_start":
                m = self.machine_index(p["asset"])
                row = _F[p["tag"]]
                if p["anomaly"] == "stuck":
                    self._stuck[row, m] = True
                    self._stuck_value[row, m] = self._shown[row, m]
                elif p["anomaly"] == "spike":
                    self._spike[row, m] = p["factor"]
                else:
                    self._dropout[row, m] = True
                self._emit("anomaly", p, at)
                self._schedule(at + p["duration"], "anomaly_end", p)
            elif kind == "anomaly_end":
                m = self.machine_index(p["asset"])
                row = _F[p["tag"]]
                self._stuck[row, m] = False
                self._spike[row, m] = 1.0
                self._dropout[row, m] = False
                self._emit(
                    "anomaly_cleared",
                    {"asset": p["asset"], "tag": p["tag"], "anomaly": p["anomaly"]},
                    at,
                )

    def _random_happenings(self, t: float) -> None:
        cfg = self.config
        for m in range(self.n):
            r = self._event_rng[m]
            if self._next_fault[m] <= t and cfg.fault_interval is not None:
                at = float(self._next_fault[m])
                duration = float(r.uniform(*cfg.fault_duration))
                self._schedule(
                    at,
                    "fault_start",
                    {"asset": self.assets[m], "duration": round(duration, 3), "scripted": False},
                )
                self._next_fault[m] = at + duration + r.exponential(cfg.fault_interval)
            if self._next_anomaly[m] <= t and cfg.anomaly_interval is not None:
                at = float(self._next_anomaly[m])
                kind = ("stuck", "spike", "dropout")[int(r.integers(0, 3))]
                tag = _SENSOR_TAGS[int(r.integers(0, len(_SENSOR_TAGS)))]
                p: dict[str, Any] = {"asset": self.assets[m], "anomaly": kind, "tag": tag}
                if kind == "stuck":
                    p["duration"] = round(float(r.uniform(10.0, 30.0)), 3)
                elif kind == "spike":
                    p["duration"] = round(float(r.uniform(1.0, 2.0)), 3)
                    p["factor"] = round(float(r.uniform(3.0, 6.0)), 3)
                else:
                    p["duration"] = round(float(r.uniform(3.0, 10.0)), 3)
                self._schedule(at, "anomaly_start", p)
                self._next_anomaly[m] = at + p["duration"] + r.exponential(cfg.anomaly_interval)
        if self._agenda and self._agenda[0][0] <= t + _EPS:
            self._run_agenda(t)

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> Snapshot:
        """The sensors' view now: measured values with offsets and anomalies, and their status."""
        if self.ticks == 0:
            self._measure(self.speed, self.feed)
        status = np.where(self._dropout, TagStatus.SENSOR_FAILURE, TagStatus.GOOD).astype(np.int8)
        return Snapshot(
            t=self.t,
            ts_ns=self.ts_ns(self.t),
            assets=self.assets,
            floats=self._shown.copy(),
            ints=np.stack([self.state, self.part_counter, self.tool_changes]).astype(np.int64),
            part_ids=[
                f"{a}-{int(c)}" if c > 0 else ""
                for a, c in zip(self.assets, self.part_counter, strict=True)
            ],
            alarm_lamp=list(self.alarm_lamp),
            stop_request=list(self.stop_request),
            status=status,
            offline=self._offline.copy(),
            aux=self._aux_values(),
        )

    def _aux_values(self) -> np.ndarray:
        k = self.config.extra_tags
        if k == 0:
            return np.zeros((0, self.n))
        rng = np.random.default_rng([self._aux_seed, self.ticks])
        idx = np.arange(k)[:, None]
        mach = np.arange(self.n)[None, :]
        period = 30.0 + (idx * 7 + mach * 3) % 90
        base = 50.0 + 10.0 * np.sin(2 * math.pi * self.t / period + idx * 0.37 + mach)
        return np.asarray(base + rng.standard_normal((k, self.n)) * 0.5, dtype=np.float64)


def wireless(snapshot: Snapshot, seed: int, ticks: int) -> dict[str, dict[str, float]]:
    """The wireless sensors of each machine at a snapshot (not used by the physics, so they never
    disturb the scenario's random streams): ambient air and coolant."""
    rng = np.random.default_rng([seed, 7919, ticks])
    n = len(snapshot.assets)
    noise = rng.standard_normal((4, n))
    t = snapshot.t
    hall = 22.0 + 2.0 * math.sin(2 * math.pi * t / 3600.0)
    out: dict[str, dict[str, float]] = {}
    for m, asset in enumerate(snapshot.assets):
        spindle = float(snapshot.floats[TEMP, m])
        out[asset] = {
            "ambient.temperature_c": round(hall + 0.6 + 0.1 * noise[0, m], 3),
            "ambient.humidity_pct": round(
                45.0 + 5.0 * math.sin(2 * math.pi * t / 5400.0 + m) + 0.3 * noise[1, m], 3
            ),
            "coolant.temperature_c": round(hall + 0.35 * (spindle - hall) + 0.1 * noise[2, m], 3),
            "coolant.concentration_pct": round(
                6.5 - 0.5 * ((t / 7200.0) % 1.0) + 0.05 * noise[3, m], 3
            ),
            "battery_pct": round(max(5.0, 100.0 - t / 3600.0 * 0.5 - m), 2),
            "rssi_dbm": float(-55 - 3 * m - int(abs(noise[0, m]) * 2)),
        }
    return out


def iter_labels(config: ScenarioConfig, until_t: float | None = None) -> Iterator[TruthEvent]:
    """Every truth event of a scenario stepped without servers (fast), until ``until_t`` or forever."""
    sc = Scenario(config)
    chunk = 100
    while until_t is None or sc.t < until_t:
        stop = sc.t + chunk * config.tick
        if until_t is not None:
            stop = min(stop, until_t)
        yield from sc.advance_to(stop + _EPS)
