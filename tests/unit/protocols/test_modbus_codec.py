"""Modbus value codec and read planner: pure functions, checked against struct and by property."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.modbus_codec import (
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    DecodeError,
    EncodeError,
    Span,
    decode_registers,
    encode_value,
    make_decoder,
    plan_reads,
)

ORDERS = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]


@pytest.mark.parametrize(
    ("byte_order", "word_order", "regs"),
    [
        ("big", "big", [0x3F80, 0x0000]),  # ABCD
        ("big", "little", [0x0000, 0x3F80]),  # CDAB
        ("little", "big", [0x803F, 0x0000]),  # BADC
        ("little", "little", [0x0000, 0x803F]),  # DCBA
    ],
)
def test_float32_one_in_each_documented_order(byte_order, word_order, regs):
    assert decode_registers(regs, "float32", byte_order=byte_order, word_order=word_order) == 1.0
    assert encode_value(1.0, "float32", byte_order=byte_order, word_order=word_order) == regs


def test_int32_cdab_matches_a_plc_layout():
    # 0x12345678 in CDAB: low word first
    assert decode_registers([0x5678, 0x1234], "uint32", word_order="little") == 0x12345678


def test_signed_types_and_int64():
    assert decode_registers([0xFFFF], "int16") == -1
    assert decode_registers([0xFFFF], "uint16") == 65535
    assert decode_registers([0xFFFF, 0xFFFE], "int32") == -2
    regs = encode_value(-(2**40), "int64")
    assert len(regs) == 4 and decode_registers(regs, "int64") == -(2**40)
    assert decode_registers([0xFFFF] * 4, "uint64") == 2**64 - 1


def test_bit_in_register_counts_from_least_significant_bit():
    word = [0b1010_0000_0000_0101]
    assert [decode_registers(word, "bit", bit=i) for i in (0, 1, 2, 13, 15)] == [
        True,
        False,
        True,
        True,
        True,
    ]


def test_string_strips_trailing_nul_and_rejects_invalid_utf8():
    assert decode_registers([0x4142, 0x4300], "string") == "ABC"
    assert decode_registers([0x4241, 0x0043], "string", byte_order="little") == "ABC"
    with pytest.raises(DecodeError, match="not valid utf-8"):
        decode_registers([0xFFFE, 0x4142], "string")


def test_string_encode_pads_and_refuses_overflow():
    assert encode_value("AB", "string", length=2) == [0x4142, 0x0000]
    with pytest.raises(EncodeError, match="does not fit 1 registers"):
        encode_value("ABC", "string", length=1)
    with pytest.raises(EncodeError, match="expected a string"):
        encode_value(5, "string", length=2)


def test_scale_and_offset_are_applied_and_inverted():
    dec = make_decoder("int16", scale=0.1, offset=-40)
    assert dec([650], 0) == pytest.approx(25.0)
    assert encode_value(25.0, "int16", scale=0.1, offset=-40) == [650]
    # unscaled integers stay integers
    assert make_decoder("int16")([0xFFFE], 0) == -2
    assert isinstance(make_decoder("uint32")([0, 7], 0), int)


def test_encode_refuses_wrong_types_out_of_range_and_unrepresentable():
    with pytest.raises(EncodeError, match="expected a number"):
        encode_value("7", "int16")
    with pytest.raises(EncodeError, match="expected a number"):
        encode_value(True, "int16")
    with pytest.raises(EncodeError, match="out of range"):
        encode_value(40000, "int16")
    with pytest.raises(EncodeError, match="out of range"):
        encode_value(-1, "uint16")
    with pytest.raises(EncodeError, match="not an integer"):
        encode_value(12.75, "int16", scale=0.1)
    with pytest.raises(EncodeError, match="out of range for float32"):
        encode_value(1e39, "float32")
    assert encode_value(12.7, "int16", scale=0.1) == [127]  # float noise is not a refusal


_NUMERIC = {
    "int16": st.integers(-(2**15), 2**15 - 1),
    "uint16": st.integers(0, 2**16 - 1),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "uint32": st.integers(0, 2**32 - 1),
    "int64": st.integers(-(2**63), 2**63 - 1),
    "uint64": st.integers(0, 2**64 - 1),
    "float32": st.floats(width=32, allow_nan=False),
    "float64": st.floats(allow_nan=False),
}


@given(
    data=st.data(),
    data_type=st.sampled_from(sorted(_NUMERIC)),
    orders=st.sampled_from(ORDERS),
)
def test_every_numeric_type_round_trips_in_every_order(data, data_type, orders):
    value = data.draw(_NUMERIC[data_type])
    byte_order, word_order = orders
    regs = encode_value(value, data_type, byte_order=byte_order, word_order=word_order)
    assert all(0 <= r <= 0xFFFF for r in regs)
    back = decode_registers(regs, data_type, byte_order=byte_order, word_order=word_order)
    assert back == value
    fast = make_decoder(data_type, byte_order=byte_order, word_order=word_order)
    assert fast([0, *regs], 1) == value


def test_nan_is_a_value_not_an_error():
    (raw,) = struct.unpack(">I", struct.pack(">f", math.nan))
    assert math.isnan(decode_registers([raw >> 16, raw & 0xFFFF], "float32"))


# --- planner ------------------------------------------------------------------------------


def test_planner_merges_nearby_and_splits_far_addresses():
    spans = [Span("a", 0, 1), Span("b", 2, 2), Span("c", 10, 1), Span("d", 100, 4)]
    blocks = plan_reads("holding", spans, max_gap=8)
    assert [(b.address, b.count) for b in blocks] == [(0, 11), (100, 4)]
    blocks = plan_reads("holding", spans, max_gap=0)
    assert [(b.address, b.count) for b in blocks] == [(0, 1), (2, 2), (10, 1), (100, 4)]


def test_planner_respects_the_register_limit():
    spans = [Span(i, i, 1) for i in range(300)]
    blocks = plan_reads("holding", spans, max_gap=0)
    assert [(b.address, b.count) for b in blocks] == [(0, 125), (125, 125), (250, 50)]
    bit_blocks = plan_reads("coil", [Span(i, i, 1) for i in range(4500)], max_gap=0)
    assert [b.count for b in bit_blocks] == [2000, 2000, 500]


def test_planner_refuses_a_span_longer_than_one_request():
    with pytest.raises(ValueError, match="126 registers exceed the 125"):
        plan_reads("holding", [Span("s", 0, 126)], max_gap=0)


spans_strategy = st.lists(
    st.builds(Span, key=st.integers(), address=st.integers(0, 400), width=st.integers(1, 6)),
    min_size=0,
    max_size=60,
)


def _optimal_count(spans, max_gap, max_count):
    """Fewest contiguous groups of the sorted spans satisfying the limits (exhaustive DP)."""
    s = sorted(spans, key=lambda x: (x.address, x.end))
    n = len(s)

    def feasible(group):
        start = group[0].address
        reach = group[0].end
        for x in group[1:]:
            if x.address - reach > max_gap:
                return False
            reach = max(reach, x.end)
        return reach - start <= max_count

    best = [0] + [math.inf] * n
    for j in range(1, n + 1):  # best[j]: fewest groups covering s[:j]
        for i in range(j):
            if best[i] + 1 < best[j] and feasible(s[i:j]):
                best[j] = best[i] + 1
    return best[n]


@settings(max_examples=500, deadline=None)
@given(
    spans=spans_strategy,
    max_gap=st.integers(0, 20),
    max_count=st.sampled_from([6, 8, 16, 40, MAX_REGISTERS_PER_READ]),
)
def test_planner_covers_each_span_once_within_limits_with_fewest_requests(
    spans, max_gap, max_count
):
    blocks = plan_reads("holding", spans, max_gap=max_gap, max_count=max_count)
    members = [m for b in blocks for m in b.members]
    assert sorted(map(id, members)) == sorted(map(id, spans))  # every span exactly once
    for b in blocks:
        assert 1 <= b.count <= max_count
        assert all(b.address <= m.address and m.end <= b.end for m in b.members)
        assert b.address == min(m.address for m in b.members)
        assert b.end == max(m.end for m in b.members)
        # no unrequested hole inside a block is longer than max_gap
        reach = b.address
        for m in sorted(b.members, key=lambda x: x.address):
            assert m.address - reach <= max_gap
            reach = max(reach, m.end)
    assert [b.address for b in blocks] == sorted(b.address for b in blocks)
    assert len(blocks) == _optimal_count(spans, max_gap, max_count)


@given(
    spans=st.lists(
        st.builds(Span, key=st.integers(), address=st.integers(0, 65535), width=st.just(1)),
        max_size=80,
    ),
    max_gap=st.integers(0, 200),
)
def test_bit_planner_never_exceeds_2000_bits(spans, max_gap):
    for b in plan_reads("discrete", spans, max_gap=max_gap):
        assert b.count <= MAX_BITS_PER_READ
