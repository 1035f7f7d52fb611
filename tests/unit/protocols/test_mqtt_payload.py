"""Topic templates, payload parsers, timestamps and the MQTT config (no network)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub
from pydantic import ValidationError

from protocols.mqtt import MqttConfig, parse_broker_url
from protocols.mqtt_payload import (
    JsonParser,
    NameTemplate,
    NumberParser,
    PayloadError,
    TemplateError,
    TextParser,
    TopicTemplate,
    parse_number,
    parse_timestamp,
    quality_of,
)
from shared.config import ConfigError, parse_config
from shared.records import Quality

RECV = 1_700_000_000_123_456_789

level = st.text(
    alphabet=st.characters(blacklist_characters="/+#\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
)


# --- templates -------------------------------------------------------------------------------


def test_topic_template_derives_filter_and_captures_fields():
    t = TopicTemplate("plant/{line}/{asset}/{tag}")
    assert t.filter == "plant/+/+/+"
    assert t.fields == ("line", "asset", "tag")
    assert t.match("plant/l1/press/temp") == {"line": "l1", "asset": "press", "tag": "temp"}
    assert t.match("plant/l1/press") is None
    assert t.match("plant/l1/press/temp/extra") is None
    assert t.match("other/l1/press/temp") is None
    assert t.match("plant//press/temp") is None  # a placeholder never matches an empty level


def test_topic_template_with_text_around_a_placeholder_and_wildcards():
    t = TopicTemplate("site/line{n}/+/{asset}/#")
    assert t.filter == "site/+/+/+/#"
    assert t.match("site/line7/x/m1") == {"n": "7", "asset": "m1"}
    assert t.match("site/line7/x/m1/a/b") == {"n": "7", "asset": "m1"}
    assert t.match("site/cell7/x/m1") is None


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("a/#/b", "only allowed as the last level"),
        ("a/x+/b", "mixes a wildcard"),
        ("a/{x}/{x}", "appears twice"),
        ("a/{1x}", "is not a name"),
        ("a/{x", "unbalanced"),
        ("", "empty"),
    ],
)
def test_bad_topic_templates_are_refused_with_the_reason(template, message):
    with pytest.raises(TemplateError, match=message):
        TopicTemplate(template)


@given(st.lists(level, min_size=1, max_size=6), st.data())
def test_template_match_inverts_format_and_filter_matches(levels, data):
    captured = data.draw(st.lists(st.booleans(), min_size=len(levels), max_size=len(levels)))
    parts = [
        f"{{f{i}}}" if c else lv.replace("{", "").replace("}", "") or "x"
        for i, (lv, c) in enumerate(zip(levels, captured, strict=True))
    ]
    template = TopicTemplate("/".join(parts))
    fields = {f"f{i}": lv for i, (lv, c) in enumerate(zip(levels, captured, strict=True)) if c}
    topic = template.format(fields)
    assert template.match(topic) == fields
    if not topic.startswith("$"):  # MQTT: wildcards never match a topic beginning with $
        assert topic_matches_sub(template.filter, topic)


def test_name_template_formats_fields_and_literals():
    assert NameTemplate("{line}-{asset}").format({"line": "l1", "asset": "a"}) == "l1-a"
    assert NameTemplate("value").format({}) == "value"
    assert NameTemplate("{tag}").format({"tag": "t"}) == "t"


# --- numbers, text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        (b"42", 42),
        (b" -7 \n", -7),
        (b"21.5", 21.5),
        (b"1e3", 1000.0),
        (b"true", True),
        (b"FALSE", False),
        (b"on", True),
        (b"off", False),
    ],
)
def test_bare_numbers_and_booleans_parse(payload, value):
    got = parse_number(payload)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("payload", [b"", b"  ", b"abc", b"12abc", b"\xff\xfe", b'{"v": 1}'])
def test_non_numbers_are_refused_with_a_preview(payload):
    with pytest.raises(PayloadError, match="number"):
        parse_number(payload)


@given(st.integers(min_value=-(2**63), max_value=2**63) | st.floats(allow_nan=False))
def test_numbers_round_trip_through_their_text(x):
    assert parse_number(repr(x).encode()) == x


def test_number_and_text_parsers_use_receipt_time():
    assert NumberParser().parse(b"3", RECV) == [("", 3, RECV, Quality.GOOD, 0)]
    assert TextParser().parse(b"RUNNING", RECV) == [("", "RUNNING", RECV, Quality.GOOD, 0)]
    with pytest.raises(PayloadError, match="UTF-8"):
        TextParser().parse(b"\xff", RECV)


# --- timestamps ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fmt", "ns"),
    [
        (1_700_000_000, "epoch_s", 1_700_000_000_000_000_000),
        (1_700_000_000.25, "epoch_s", 1_700_000_000_250_000_000),
        (1_700_000_000_123, "epoch_ms", 1_700_000_000_123_000_000),
        (1_700_000_000_123_456, "epoch_us", 1_700_000_000_123_456_000),
        (1_700_000_000_123_456_789, "epoch_ns", 1_700_000_000_123_456_789),
        (1_700_000_000, "auto", 1_700_000_000_000_000_000),
        (1_700_000_000_123, "auto", 1_700_000_000_123_000_000),
        (1_700_000_000_123_456, "auto", 1_700_000_000_123_456_000),
        (1_700_000_000_123_456_789, "auto", 1_700_000_000_123_456_789),
        ("1700000000123", "epoch_ms", 1_700_000_000_123_000_000),
        ("2023-11-14T22:13:20Z", "auto", 1_700_000_000_000_000_000),
        ("2023-11-14T22:13:20.123456789Z", "iso8601", 1_700_000_000_123_456_789),
        ("2023-11-14T23:13:20.5+01:00", "iso8601", 1_700_000_000_500_000_000),
        ("2023-11-14 22:13:20", "auto", 1_700_000_000_000_000_000),  # no offset: UTC
    ],
)
def test_timestamps_in_every_format(raw, fmt, ns):
    assert parse_timestamp(raw, fmt) == ns


@pytest.mark.parametrize(
    ("raw", "fmt"),
    [
        ("yesterday", "auto"),
        (True, "auto"),
        (-5, "epoch_s"),
        (12, "iso8601"),
        ([1], "auto"),
        ("x", "epoch_ms"),
    ],
)
def test_bad_timestamps_are_refused(raw, fmt):
    with pytest.raises(PayloadError, match="timestamp"):
        parse_timestamp(raw, fmt)


@given(
    st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    )
)
def test_iso8601_agrees_with_epoch_microseconds(dt):
    us = int(dt.timestamp()) * 1_000_000 + dt.microsecond
    assert parse_timestamp(dt.isoformat(), "iso8601") == us * 1000
    assert parse_timestamp(us, "epoch_us") == us * 1000


# --- quality ---------------------------------------------------------------------------------


def test_quality_from_small_ints_words_booleans_and_opcua_status_codes():
    assert quality_of(0) == (Quality.GOOD, 0)
    assert quality_of(2) == (Quality.BAD, 2)
    assert quality_of("Uncertain") == (Quality.UNCERTAIN, 0)
    assert quality_of(False) == (Quality.BAD, 0)
    assert quality_of(0x80340000) == (Quality.BAD, 0x80340000)  # BadNodeIdUnknown
    assert quality_of(0x40920000) == (Quality.UNCERTAIN, 0x40920000)
    with pytest.raises(PayloadError, match="quality"):
        quality_of("meh")


# --- JSON --------------------------------------------------------------------------------------


def test_json_value_with_timestamp_and_quality():
    p = JsonParser(value="data.temp", timestamp="ts", timestamp_format="epoch_ms", quality="q")
    doc = {"data": {"temp": 21.5}, "ts": 1_700_000_000_123, "q": "bad"}
    assert p.parse(json.dumps(doc).encode(), RECV) == [
        ("", 21.5, 1_700_000_000_123_000_000, Quality.BAD, 0)
    ]


def test_json_fields_yield_one_sample_per_field_and_skip_missing_ones():
    p = JsonParser(fields={"t": "temp", "p": "pressure", "s": "state"})
    got = p.parse(b'{"temp": 1, "pressure": 2.5}', RECV)
    assert got == [("t", 1, RECV, Quality.GOOD, 0), ("p", 2.5, RECV, Quality.GOOD, 0)]
    with pytest.raises(PayloadError, match="no field found"):
        p.parse(b'{"other": 1}', RECV)


def test_json_expand_takes_scalar_members_except_timestamp_and_quality():
    p = JsonParser(expand="@", timestamp="ts", quality="q")
    got = p.parse(b'{"a": 1, "b": true, "c": "run", "n": {"x": 1}, "ts": 1700000000, "q": 0}', RECV)
    assert [(f, v) for f, v, *_ in got] == [("a", 1), ("b", True), ("c", "run")]
    assert {ts for _, _, ts, _, _ in got} == {1_700_000_000_000_000_000}


@pytest.mark.parametrize(
    ("parser", "payload", "reason"),
    [
        (JsonParser(value="v"), b"not json", "not JSON"),
        (JsonParser(value="v"), b'{"x": 1}', "found nothing"),
        (JsonParser(value="v"), b'{"v": {"a": 1}}', "expected a scalar value, got dict"),
        (JsonParser(value="v", value_type="number"), b'{"v": "high"}', "expected a number"),
        (JsonParser(value="v", timestamp="ts"), b'{"v": 1}', "timestamp"),
        (JsonParser(value="v", timestamp="ts"), b'{"v": 1, "ts": "soon"}', "not ISO-8601"),
        (JsonParser(expand="d"), b'{"d": [1, 2]}', "expected an object"),
    ],
)
def test_malformed_json_is_refused_with_a_reason(parser, payload, reason):
    with pytest.raises(PayloadError, match=reason):
        parser.parse(payload, RECV)


def test_json_timestamp_is_optional_when_not_required():
    p = JsonParser(value="v", timestamp="ts", timestamp_required=False)
    assert p.parse(b'{"v": 1}', RECV)[0][2] == RECV


def test_json_value_type_coerces_strings_and_booleans():
    assert JsonParser(value="v", value_type="number").parse(b'{"v": "2.5"}', RECV)[0][1] == 2.5
    assert JsonParser(value="v", value_type="bool").parse(b'{"v": "on"}', RECV)[0][1] is True
    assert JsonParser(value="v", value_type="string").parse(b'{"v": 3}', RECV)[0][1] == "3"


# --- config ----------------------------------------------------------------------------------


def _cfg(**kw):
    base = {
        "name": "m",
        "url": "mqtt://127.0.0.1:1883",
        "subscriptions": [{"topic": "a/{asset}/{tag}"}],
    }
    base.update(kw)
    return MqttConfig.model_validate(base)


def test_config_defaults_are_safe():
    cfg = _cfg()
    assert cfg.kind == "mqtt" and cfg.protocol == "5" and cfg.persistent_session
    assert cfg.tls.insecure is False
    assert cfg.subscriptions[0].qos == 1
    assert cfg.effective_client_id.startswith("edgeloop-") and cfg.effective_client_id.endswith(
        "-m"
    )


def test_broker_urls():
    assert parse_broker_url("mqtt://h") == ("h", 1883, False)
    assert parse_broker_url("mqtts://h") == ("h", 8883, True)
    assert parse_broker_url("mqtt://h:1999") == ("h", 1999, False)
    for bad in ("http://h", "mqtt://", "mqtt://u:p@h"):
        with pytest.raises(ValueError):
            parse_broker_url(bad)


@pytest.mark.parametrize(
    ("subs", "message"),
    [
        ([{"topic": "a/{asset}", "tag": "{tg}"}], "uses {tg}, which the topic template"),
        ([{"topic": "a/{asset}"}], "uses {tag}"),
        (
            [
                {
                    "topic": "a/{asset}",
                    "payload": {"format": "json", "fields": {"x": "x"}},
                    "tag": "t",
                }
            ],
            "must use {field}",
        ),
        (
            [{"topic": "a/{asset}/{tag}", "payload": {"format": "json"}}],
            "exactly one of value, fields or expand",
        ),
        (
            [{"topic": "a/{asset}/{tag}", "payload": {"format": "json", "value": "a[["}}],
            "invalid JMESPath",
        ),
        ([{"topic": "a/{asset}/{tag}", "qos": 3}], "qos"),
        ([], "at least 1"),
    ],
)
def test_bad_subscriptions_are_refused_naming_the_problem(subs, message):
    with pytest.raises(ValidationError, match=message):
        _cfg(subscriptions=subs)


def test_yaml_errors_name_the_key_path():
    text = """
kind: mqtt
name: m
url: mqtt://h
subscriptions:
  - topic: a/{asset}/{tag}
    payload: {format: json, value: v, timestamp_format: epoch_minutes}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, MqttConfig)
    assert "subscriptions[0].payload" in str(err.value) and "timestamp_format" in str(err.value)


def test_command_topics_refuse_wildcards():
    with pytest.raises(ValidationError, match="wildcards"):
        _cfg(commands={"topic": "a/+/{tag}/set"})
