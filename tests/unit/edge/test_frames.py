"""Asset state and frames: triggers, window aggregates, stale/bad input policies."""

from __future__ import annotations

import math
import statistics

import pytest

from edge.config import FrameConfig
from edge.frames import FrameBuilder, parse_feature_name
from shared.records import Quality, Reading

T0 = 1_700_000_000_000_000_000


def spec(**kw):
    base = {
        "asset": "m1",
        "trigger": {"tag": "part_counter"},
        "features": [{"tag": "temp", "aggs": ["last", "mean", "min", "max", "std", "delta"]}],
    }
    base.update(kw)
    return FrameConfig.model_validate(base)


def r(tag, value, i=0, quality=Quality.GOOD, asset="m1"):
    return Reading(asset, tag, T0 + i, value, quality)


def test_part_counter_change_cuts_one_frame_per_cycle_with_window_aggregates():
    fb = FrameBuilder([spec()])
    assert fb.observe([r("part_counter", 4)], now=0.0) == []  # first value: no cycle yet
    temps = [50.0, 52.0, 57.0, 51.0]
    fb.observe([r("temp", v, i) for i, v in enumerate(temps)], now=1.0)
    (frame,) = fb.observe([r("part_counter", 5, 9)], now=2.0)
    assert frame.asset == "m1" and frame.key == "m1-5" and frame.marks == ()
    f = frame.features
    assert f["temp_last"] == 51.0 and f["temp_min"] == 50.0 and f["temp_max"] == 57.0
    assert f["temp_mean"] == pytest.approx(statistics.fmean(temps))
    assert f["temp_std"] == pytest.approx(statistics.pstdev(temps))
    assert f["temp_delta"] == 1.0  # last - first for the first frame
    # the next cycle's delta is against the previous frame's last value
    fb.observe([r("temp", 55.0, 10), r("temp", 54.0, 11)], now=3.0)
    (frame2,) = fb.observe([r("part_counter", 6, 12)], now=4.0)
    assert frame2.features["temp_delta"] == 3.0 and frame2.features["temp_mean"] == 54.5
    assert frame2.key == "m1-6"


def test_unchanged_trigger_value_cuts_nothing():
    fb = FrameBuilder([spec()])
    fb.observe([r("part_counter", 1), r("temp", 1.0)], now=0.0)
    assert fb.observe([r("part_counter", 1, 1)], now=1.0) == []


def test_period_trigger_keeps_cadence():
    fb = FrameBuilder([spec(trigger={"period": 1.0}, key="{asset}@{ts_ms}")])
    fb.observe([r("temp", 10.0)], now=0.0)
    assert fb.due(now=0.0) == []  # arms the timer
    assert fb.due(now=0.5) == []
    (frame,) = fb.due(now=1.01)
    assert frame.features["temp_mean"] == 10.0 and frame.key.startswith("m1@")
    assert fb.due(now=1.5) == []
    assert len(fb.due(now=2.02)) == 1


def test_tag_without_new_values_but_fresh_uses_its_last_value_unmarked():
    fb = FrameBuilder([spec()])
    fb.observe([r("part_counter", 1), r("temp", 40.0)], now=0.0)
    fb.observe([r("part_counter", 2)], now=1.0)
    (frame,) = fb.observe([r("part_counter", 3)], now=2.0)  # no temp in this cycle
    assert frame.marks == ()
    assert frame.features["temp_mean"] == 40.0 and frame.features["temp_std"] == 0.0


@pytest.mark.parametrize("policy", ["skip", "impute_last", "mark"])
def test_stale_input_policy(policy):
    fb = FrameBuilder([spec(stale_after=5.0, on_stale=policy)])
    fb.observe([r("part_counter", 1), r("temp", 40.0)], now=0.0)
    fb.observe([r("part_counter", 2)], now=1.0)
    frames = fb.observe([r("part_counter", 3)], now=30.0)  # temp last seen 30 s ago
    if policy == "skip":
        assert frames == [] and fb.skipped == 1
        return
    (frame,) = frames
    assert set(frame.marks) == {f"temp_{a}" for a in ("last", "mean", "min", "max", "std", "delta")}
    assert frame.features["temp_last"] == 40.0  # last good value either way


def test_bad_quality_is_excluded_and_marked():
    fb = FrameBuilder([spec(on_stale="mark")])
    fb.observe([r("part_counter", 1)], now=0.0)
    fb.observe([r("temp", 50.0, 1), r("temp", None, 2, Quality.BAD)], now=0.5)
    (frame,) = fb.observe([r("part_counter", 2, 3)], now=1.0)
    assert frame.features["temp_mean"] == 50.0  # the bad value does not count
    assert "temp_mean" in frame.marks


def test_mark_with_no_value_ever_gives_nan():
    fb = FrameBuilder([spec(on_stale="mark")])
    fb.observe([r("part_counter", 1)], now=0.0)
    (frame,) = fb.observe([r("part_counter", 2)], now=1.0)
    assert math.isnan(frame.features["temp_mean"]) and "temp_mean" in frame.marks


def test_assets_without_features_take_the_model_feature_list():
    fb = FrameBuilder([spec(features=[])])
    fb.use_model_features(["temp_max", "vib_rms_mean"])
    fb.observe([r("part_counter", 1), r("temp", 3.0), r("vib_rms", 2.0)], now=0.0)
    (frame,) = fb.observe([r("part_counter", 2)], now=1.0)
    assert list(frame.features) == ["temp_max", "vib_rms_mean"]


def test_feature_names_parse_as_tag_and_aggregate():
    assert parse_feature_name("vibration_rms_max") == ("vibration_rms", "max")
    with pytest.raises(ValueError, match="<tag>_<agg>"):
        parse_feature_name("vibration_p95")
