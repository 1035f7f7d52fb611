import contextlib
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.records import Frame, Reading, RecordError
from shared.wire import Batch, Kind, WireDecodeError, decode_batch, encode_batch
from tests import strategies as S

KIND_STRATEGIES = {
    Kind.READING: S.readings,
    Kind.FRAME: S.frames,
    Kind.EVENT: S.events,
    Kind.LABEL: S.labels,
    Kind.HEARTBEAT: S.heartbeats,
}


@st.composite
def batches(draw):
    kind = draw(st.sampled_from(list(Kind)))
    records = draw(st.lists(KIND_STRATEGIES[kind], max_size=20))
    return Batch(
        agent_id=draw(S.names),
        batch_seq=draw(st.integers(min_value=0, max_value=2**63 - 1)),
        kind=kind,
        records=records,
        created_ns=draw(S.ts),
        incarnation=draw(st.text(max_size=16)),
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_codec_round_trips_every_batch(batch):
    decoded = decode_batch(encode_batch(batch))
    assert S.comparable(decoded) == S.comparable(batch)
    assert decoded.kind is batch.kind


def test_empty_batch_round_trips():
    b = Batch("agent-1", 0, Kind.READING, [])
    assert decode_batch(encode_batch(b)) == b


def test_nan_huge_ints_and_unicode_survive():
    rs = [
        Reading("Presse-Ü1", "温度", 1, float("nan")),
        Reading("m", "big", 2, 2**100),
        Reading("m", "neg", 3, -(2**80)),
        Reading("m", "inf", 4, float("-inf")),
        Reading("m", "emoji🔧", 5, "ok"),
    ]
    out = decode_batch(encode_batch(Batch("a", 7, Kind.READING, rs))).records
    assert isinstance(out[0], Reading) and math.isnan(out[0].value)  # type: ignore[arg-type]
    assert out[1].value == 2**100 and out[2].value == -(2**80)
    assert out[3].value == float("-inf")
    assert out[4].tag == "emoji🔧"


def test_string_table_makes_repeated_names_cheap():
    rs = [Reading("machine-01", "spindle_temperature", i, float(i)) for i in range(500)]
    size = len(encode_batch(Batch("a", 1, Kind.READING, rs)))
    assert size < 500 * 20  # ~15 bytes per reading, the names appear once


def test_batch_refuses_mixed_kinds():
    with pytest.raises(RecordError, match=r"records\[1\]"):
        Batch("a", 1, Kind.READING, [Reading("m", "t", 1, 1.0), Frame("m", "k", 1, {})])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "truncated"),
        (b"EL", "truncated"),
        (b"XX\x01\x01\x90", "magic"),
        (b"EL\x09\x01\x90", "schema version 9"),
        (b"EL\x01\x63\x90", "unknown record kind 99"),
        (b"EL\x01\x01", "corrupt READING batch body"),
        (b"EL\x01\x01\xc1", "corrupt"),
        (b"EL\x01\x01\x93\x01\x02\x03", "5-element"),
    ],
)
def test_garbage_is_a_clear_decode_error(data, match):
    with pytest.raises(WireDecodeError, match=match):
        decode_batch(data)


def test_every_truncation_of_a_real_batch_is_a_decode_error():
    rs = [Reading("m", f"t{i}", i, i * 1.5) for i in range(20)]
    data = encode_batch(Batch("agent", 3, Kind.READING, rs))
    for cut in range(len(data)):
        with pytest.raises(WireDecodeError):
            decode_batch(data[:cut])


def test_invalid_record_inside_valid_msgpack_is_a_decode_error():
    import msgpack

    body = msgpack.packb(["a", 1, 0, ["m"], [[0, 0, -5, 1.0, 0, 0]]])
    with pytest.raises(WireDecodeError, match=r"record #0.*ts_ns"):
        decode_batch(b"EL\x01\x01" + body)
    body = msgpack.packb(["a", 1, 0, ["m"], [[0, 9, 1, 1.0, 0, 0]]])
    with pytest.raises(WireDecodeError, match="record #0"):
        decode_batch(b"EL\x01\x01" + body)


@settings(max_examples=500)
@given(st.binary(max_size=200), st.sampled_from([b"EL\x01\x01", b"EL\x02\x02", b"EL\x02\x04"]))
def test_random_bytes_never_crash_the_decoder(data, header):
    with contextlib.suppress(WireDecodeError):
        decode_batch(header + data)


def test_version_1_batches_are_still_read_as_incarnation_empty():
    import msgpack

    body = msgpack.packb(["gw", 7, 5, ["m", "t"], [[0, 1, 9, 1.5, 0, 0]]])
    batch = decode_batch(b"EL\x01\x01" + body)
    assert (batch.agent_id, batch.incarnation, batch.batch_seq) == ("gw", "", 7)
    assert batch.records == [Reading("m", "t", 9, 1.5)]


def test_batch_identity_carries_the_incarnation():
    b = Batch("gw", 3, Kind.READING, [Reading("m", "t", 1, 1.0)], 2, "9f2c")
    data = encode_batch(b)
    assert data[2] == 2  # schema version 2
    assert decode_batch(data).incarnation == "9f2c"


@pytest.mark.parametrize("kind", [Kind.READING, Kind.FRAME, Kind.EVENT, Kind.LABEL])
def test_negative_string_table_indices_are_refused(kind):
    """Python would read t[-1] as the last name: a corrupt batch must not pass as valid."""
    import msgpack

    rows = {
        Kind.READING: [[-1, 0, 9, 1.5, 0, 0]],
        Kind.FRAME: [[0, "k", 9, [[-1, 1.0]], None, None, None, []]],
        Kind.EVENT: [[-2, 0, 9, 0, "", {}]],
        Kind.LABEL: [[-1, "k", 9, 1]],
    }[kind]
    body = msgpack.packb(["gw", "i", 7, 5, ["m", "t"], rows])
    with pytest.raises(WireDecodeError, match="string-table index -"):
        decode_batch(b"EL\x02" + bytes([int(kind)]) + body)


def test_quarantine_leaves_out_only_the_bad_record():
    import msgpack

    rows = [["m", "k1", 9, 1], ["m", "k2", 9, float("inf")], ["m", "k3", 2**63, 1]]
    body = msgpack.packb(["gw", "i", 7, 5, ["m"], [[0, *r[1:]] for r in rows]])
    data = b"EL\x02\x04" + body
    with pytest.raises(WireDecodeError, match="record #1"):
        decode_batch(data)
    batch = decode_batch(data, quarantine=True)
    assert [r.key for r in batch.records] == ["k1"]
    assert [i for i, _ in batch.rejected] == [1, 2]
    assert "finite" in batch.rejected[0][1] and "ts_ns" in batch.rejected[1][1]


def test_a_bad_header_fails_even_in_quarantine():
    import msgpack

    body = msgpack.packb(["", "i", 7, 5, [], []])
    with pytest.raises(WireDecodeError, match="agent_id"):
        decode_batch(b"EL\x02\x01" + body, quarantine=True)
