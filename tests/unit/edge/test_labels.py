"""LabelExtractor: a quality station's readings -> Label records (the edge config's labels:)."""

from __future__ import annotations

import logging

import pytest

from edge.config import LabelConfig
from edge.model_sync import LabelExtractor
from shared.records import Label, Reading


def msg(asset: str, ts: int, **fields: object) -> list[Reading]:
    """One quality message expanded into readings that share asset and timestamp."""
    return [Reading(asset, tag, ts, value) for tag, value in fields.items()]  # type: ignore[arg-type]


def extractor(**kw: object) -> LabelExtractor:
    return LabelExtractor([LabelConfig(connector="quality", **kw)])  # type: ignore[arg-type]


def test_fields_of_one_message_become_one_label() -> None:
    ex = extractor()
    readings = [
        *msg("m1", 100, part_id="m1-17", defect=True, width=3.2),
        *msg("m2", 100, part_id="m2-4", defect=False),  # same ts, other asset: its own label
        *msg("m1", 200, part_id="m1-18", defect=0),
    ]
    assert ex.extract("quality", readings) == [
        Label("m1", "m1-17", 100, True),
        Label("m2", "m2-4", 100, False),
        Label("m1", "m1-18", 200, 0),
    ]
    assert ex.extracted == 3 and ex.skipped == {"missing_key": 0, "missing_target": 0, "invalid": 0}


def test_custom_tags_key_template_and_asset_patterns() -> None:
    ex = extractor(key_tag="serial", target_tag="scrap", key="{asset}/{value}", assets=["press-*"])
    readings = [
        *msg("press-1", 5, serial=881, scrap=1),
        *msg("lathe-1", 5, serial=882, scrap=1),  # not a matching asset: ignored, not counted
        *msg("press-2", 6, part_id="x", defect=True),  # other tags: nothing to do with this spec
    ]
    assert ex.extract("quality", readings) == [Label("press-1", "press-1/881", 5, 1)]
    assert sum(ex.skipped.values()) == 0


def test_other_connectors_are_not_label_sources() -> None:
    ex = extractor()
    assert ex.extract("plc", msg("m1", 1, part_id="m1-1", defect=True)) == []
    assert "plc" not in ex.by_connector and "quality" in ex.by_connector


def test_two_specs_on_one_connector() -> None:
    ex = LabelExtractor(
        [
            LabelConfig(connector="quality", target_tag="defect"),
            LabelConfig(connector="quality", target_tag="rework", key="{value}:rework"),
        ]
    )
    got = ex.extract("quality", msg("m1", 7, part_id="m1-1", defect=False, rework=True))
    assert got == [Label("m1", "m1-1", 7, False), Label("m1", "m1-1:rework", 7, True)]


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        (True, True),
        (False, False),
        (1, 1),
        (0, 0),
        (0.25, 0.25),
        ("true", True),
        (" FALSE ", False),
        ("1", 1),
        ("0", 0),
        ("2.5", 2.5),
        ("-3", -3),
    ],
)
def test_target_types(raw: object, target: object) -> None:
    (label,) = extractor().extract("quality", msg("m1", 1, part_id="m1-1", defect=raw))
    assert label.target == target and type(label.target) is type(target)


@pytest.mark.parametrize("raw", ["scrap", "", "nan", "inf", float("nan"), float("inf"), None])
def test_invalid_targets_are_counted_not_fatal(raw: object) -> None:
    ex = extractor()
    readings = [
        *msg("m1", 1, part_id="m1-1", defect=raw),
        *msg("m1", 2, part_id="m1-2", defect=True),  # the next message still becomes a label
    ]
    assert ex.extract("quality", readings) == [Label("m1", "m1-2", 2, True)]
    assert ex.invalid == 1 and ex.skipped["invalid"] == 1 and ex.extracted == 1


def test_missing_fields_are_counted_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    ex = extractor()
    readings = [
        *msg("m1", 1, part_id="m1-1"),  # no verdict
        *msg("m1", 2, defect=True),  # no part id
        *msg("m1", 3, part_id="", defect=True),  # an empty part id
        *msg("m1", 4, part_id=None, defect=False),
        *msg("m1", 5, part_id="m1-5"),
        *msg("m1", 6, part_id="m1-6", defect=False),
    ]
    with caplog.at_level(logging.WARNING, logger="edge.model_sync"):
        got = ex.extract("quality", readings)
    assert got == [Label("m1", "m1-6", 6, False)]
    assert ex.skipped == {"missing_key": 3, "missing_target": 2, "invalid": 0}
    # logged once per kind with the offending message, then only counted
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2
    assert any("missing_target" in w and "m1-1" in w for w in warned)
    assert any("missing_key" in w and "'part_id'" in w for w in warned)
    ex.extract("quality", msg("m1", 9, part_id="m1-9"))
    assert ex.missing_target == 3 and len(caplog.records) == 2


def test_readings_of_other_tags_only_are_ignored() -> None:
    ex = extractor()
    assert ex.extract("quality", msg("m1", 1, temperature=20.5, width=3.0)) == []
    assert sum(ex.skipped.values()) == 0
