import pytest

from shared.records import Event, Frame, Heartbeat, Label, Quality, Reading, RecordError


def test_reading_coerces_quality_codes():
    assert Reading("m", "t", 1, 1.0, 2).quality is Quality.BAD


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Reading("", "t", 1, 1.0), r"Reading\.asset"),
        (lambda: Reading("m", "t", -1, 1.0), r"Reading\.ts_ns"),
        (lambda: Reading("m", "t", 1.5, 1.0), r"Reading\.ts_ns"),
        (lambda: Reading("m", "t", 1, [1]), r"Reading\.value"),
        (lambda: Reading("m", "t", 1, 1.0, 7), r"Reading\.quality"),
        (lambda: Frame("m", "k", 1, {"a": "x"}), r"Frame\.features\['a'\]"),
        (lambda: Frame("m", "k", 1, {}, prediction="yes"), r"Frame\.prediction"),
        (lambda: Event("r", "m", 1, severity=9), r"Event\.severity"),
        (lambda: Label("m", "k", 1, float("nan")), r"Label\.target"),
        (lambda: Label("m", "k", 1, float("inf")), r"Label\.target: expected a finite"),
        (lambda: Reading("m", "t", 99999999999999999999999, 1.0), r"Reading\.ts_ns.*2262"),
        (lambda: Reading("m", "t", 2**63, 1.0), r"Reading\.ts_ns"),
        (lambda: Reading("m", "t", 1, 1.0, status=2**64), r"Reading\.status"),
        (lambda: Frame("m", "k", 1, {"a": 2**64}), r"Frame\.features\['a'\]"),
        (lambda: Frame("m", "k", 1, {}, model_version=2**70), r"Frame\.model_version"),
        (lambda: Event("r", "m", 2**63, 0), r"Event\.ts_ns"),
        (lambda: Heartbeat("a", 1, models={"m": "1"}), r"Heartbeat\.models"),
    ],
)
def test_invalid_fields_are_named(build, match):
    with pytest.raises(RecordError, match=match):
        build()
