"""The control topic's messages: acknowledgements and replay requests, and bad input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.control import (
    AppliedPart,
    ControlError,
    decode_control,
    decode_ranges,
    encode_applied,
    encode_ranges,
    encode_replay,
)


@given(st.sets(st.integers(min_value=0, max_value=10_000), max_size=200))
def test_ranges_round_trip_any_set_of_seqs(seqs):
    ordered = sorted(seqs)
    text = encode_ranges(ordered)
    back = [s for lo, hi in decode_ranges(text) for s in range(lo, hi + 1)]
    assert back == ordered


def test_applied_message_round_trips():
    data = encode_applied(
        "gw-1",
        "9f2c",
        [("edgeloop.telemetry", 3, 1041, "1043-1050,1052")],
        instance="cloud-0",
        ts_ns=5,
    )
    msg = decode_control(data)
    assert (msg.type, msg.agent_id, msg.incarnation, msg.ts_ns) == ("applied", "gw-1", "9f2c", 5)
    assert msg.parts == (AppliedPart("edgeloop.telemetry", 3, 1041, ((1043, 1050), (1052, 1052))),)


def test_replay_message_round_trips():
    msg = decode_control(encode_replay("*", "lost log", id="abc", instance="c", ts_ns=7))
    assert (msg.type, msg.agent_id, msg.reason, msg.id) == ("replay", "*", "lost log", "abc")
    assert msg.replay_parts is None  # everything unconfirmed
    msg = decode_control(
        encode_replay("gw", "x", id="d", instance="c", ts_ns=7, parts=[("p.telemetry", 3)])
    )
    assert msg.replay_parts == (("p.telemetry", 3),)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, "tombstone"),
        (b"{nope", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"v": 2, "type": "replay", "agent_id": "*"}', "version"),
        (b'{"v": 1, "type": "reboot", "agent_id": "*"}', "unknown control message type"),
        (
            b'{"v": 1, "type": "applied", "agent_id": "a", "incarnation": "i", "parts": [[1]]}',
            "bad part",
        ),
        (
            b'{"v": 1, "type": "applied", "agent_id": "a", "incarnation": "i", '
            b'"parts": [["t", 0, 1, "9-3"]]}',
            "bad range",
        ),
        (b'{"v": 1, "type": "applied", "agent_id": 5}', "agent_id"),
    ],
)
def test_bad_control_messages_are_clear_errors(data, match):
    with pytest.raises(ControlError, match=match):
        decode_control(data)
