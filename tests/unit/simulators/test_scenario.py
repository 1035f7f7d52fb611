"""The pure scenario: determinism, parts and labels, drift, faults, anomalies, commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from simulators.config import FaultSpec, ScenarioConfig
from simulators.scenario import MachineState, Scenario, TagStatus, iter_labels


def labels(cfg: ScenarioConfig, until: float) -> list[dict]:
    return [e.data | {"t": e.t} for e in iter_labels(cfg, until) if e.kind == "label"]


def test_same_seed_gives_the_same_first_100_labels() -> None:
    cfg = ScenarioConfig(seed=7)
    a = labels(cfg, 400)[:100]
    b = labels(ScenarioConfig(seed=7), 400)[:100]
    assert len(a) == 100
    assert a == b
    c = labels(ScenarioConfig(seed=8), 400)[:100]
    assert [x["deviation_um"] for x in a] != [x["deviation_um"] for x in c]


def test_stepping_granularity_does_not_change_the_scenario() -> None:
    cfg = ScenarioConfig(seed=3)
    one = Scenario(cfg)
    big = one.advance_to(120.0)
    other = Scenario(cfg)
    small = []
    for i in range(1, 1201):
        small += other.advance_to(i * 0.1)
    assert [e.to_json() for e in big] == [e.to_json() for e in small]
    assert np.array_equal(one.snapshot().floats, other.snapshot().floats)


def test_part_ids_join_labels_and_the_counter_tag() -> None:
    sc = Scenario(ScenarioConfig(seed=1, machines=2, fault_interval=None, anomaly_interval=None))
    parts: dict[str, dict] = {}
    got: list[dict] = []
    while len(got) < 10:
        for e in sc.advance_to(sc.t + 1.0):
            if e.kind == "part":
                parts[e.data["part_id"]] = e.data
                snap = sc.snapshot()
                m = snap.assets.index(e.data["asset"])
                # the tag shows the latest finished part of that machine
                assert snap.part_ids[m] == f"{e.data['asset']}-{snap.ints[1, m]}"
            if e.kind == "label":
                got.append(e.data)
    for lab in got:
        assert lab["part_id"] == f"{lab['asset']}-{lab['part_counter']}"
        assert lab["part_id"] in parts
        delay = lab["finished_t"]
        assert lab["deviation_um"] >= 30.0 if lab["defect"] else lab["deviation_um"] <= 30.0
        assert delay >= 0
    # labels come 3-6 scenario seconds after the part
    first = [e for e in iter_labels(ScenarioConfig(seed=1), 60) if e.kind == "label"]
    assert all(3.0 - 1e-6 <= e.t - e.data["finished_t"] <= 6.0 + 0.1 for e in first)


def test_timestamps_follow_speed_and_start() -> None:
    cfg = ScenarioConfig(seed=1, speed=10.0, start_ns=1_000_000_000_000)
    sc = Scenario(cfg)
    sc.advance_to(50.0)
    assert sc.snapshot().ts_ns == 1_000_000_000_000 + 5_000_000_000


def test_scripted_fault_takes_a_machine_offline_then_back() -> None:
    cfg = ScenarioConfig(
        seed=1,
        fault_interval=None,
        anomaly_interval=None,
        faults=[FaultSpec(asset="m2", at=20.0, duration=8.0)],
    )
    sc = Scenario(cfg)
    events = sc.advance_to(25.0)
    assert any(e.kind == "fault" and e.data["asset"] == "m2" for e in events)
    snap = sc.snapshot()
    assert snap.tag_status("m2", "spindle_speed") is TagStatus.OFFLINE
    assert snap.value("m2", "state") == MachineState.FAULT
    assert snap.tag_status("m1", "spindle_speed") is TagStatus.GOOD
    counter = snap.value("m2", "part_counter")
    events = sc.advance_to(60.0)
    assert any(e.kind == "fault_cleared" and e.data["asset"] == "m2" for e in events)
    assert sc.snapshot().value("m2", "part_counter") > counter


def test_stop_request_idles_the_machine_until_cleared() -> None:
    sc = Scenario(ScenarioConfig(seed=2, fault_interval=None, anomaly_interval=None))
    sc.advance_to(30.0)
    sc.set_stop_request("m1", True)
    sc.advance_to(31.0)
    snap = sc.snapshot()
    assert snap.value("m1", "state") == MachineState.IDLE
    counter = snap.value("m1", "part_counter")
    sc.advance_to(90.0)
    snap = sc.snapshot()
    assert snap.value("m1", "part_counter") == counter
    assert snap.value("m1", "spindle_speed") < 1.0
    assert snap.value("m2", "part_counter") > 3
    events = sc.advance_to(90.1)
    sc.set_stop_request("m1", False)
    events = sc.advance_to(130.0)
    assert any(e.kind == "part" and e.data["asset"] == "m1" for e in events)


def test_recalibration_offsets_one_tag_only() -> None:
    base = ScenarioConfig(seed=4, fault_interval=None, anomaly_interval=None)
    cal = base.model_copy(update={"recalibration_at": 10.0, "recalibration_offset": 5.0})
    a, b = Scenario(base), Scenario(cal)
    a.advance_to(40.0)
    b.advance_to(40.0)
    diff = b.snapshot().floats - a.snapshot().floats
    assert diff[2, 1] == pytest.approx(5.0)  # spindle_temp of m2
    diff[2, 1] = 0.0
    assert np.allclose(diff, 0.0)


def test_anomalies_are_injected_and_recorded() -> None:
    cfg = ScenarioConfig(seed=5, anomaly_interval=20.0, fault_interval=None)
    sc = Scenario(cfg)
    seen: set[str] = set()
    dropout_seen = False
    while sc.t < 600 and not (seen >= {"stuck", "spike", "dropout"} and dropout_seen):
        for e in sc.advance_to(sc.t + 0.5):
            if e.kind == "anomaly":
                seen.add(e.data["anomaly"])
        snap = sc.snapshot()
        if (snap.status == TagStatus.SENSOR_FAILURE).any():
            dropout_seen = True
    assert seen == {"stuck", "spike", "dropout"}
    assert dropout_seen


def test_truth_events_are_json_lines() -> None:
    for e in iter_labels(ScenarioConfig(seed=1, drift_at=30.0), 60.0):
        row = json.loads(e.to_json())
        assert row["kind"] == e.kind and isinstance(row["ts_ns"], int)
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in row.values())


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValidationError, match="unknown machine 'm9'"):
        ScenarioConfig(machines=2, faults=[FaultSpec(asset="m9", at=1, duration=1)])
    with pytest.raises(ValidationError, match="min <= max"):
        ScenarioConfig(label_delay=(5.0, 1.0))
