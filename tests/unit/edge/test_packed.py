"""Readings encoded as wire rows in a connector worker (edge.packed) and sealed by the outbox:
the batches decode to exactly the readings the connector produced, byte for byte what the
outbox's own encoder makes, within the batch size, per (asset, source)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.outbox import Outbox, encode_readings
from edge.packed import PackedReadings, RowPacker, seal_packed
from shared.records import Quality, Reading
from shared.wire import Kind, decode_batch

NOW = 1_790_000_000_000_000_000


def packed(readings: list[Reading], source=("c", 1), packer: RowPacker | None = None):
    """What the agent builds from one worker message (tables accumulate like the proxy's)."""
    packer = packer or RowPacker()
    packer.add(readings)
    news, frags = packer.take()
    tables = getattr(packer, "_test_tables", {})
    for asset, added in news.items():
        tables[asset] = (*tables.get(asset, ()), *added)
    packer._test_tables = tables  # type: ignore[attr-defined]
    return [PackedReadings(a, source, tables[a], n, rows) for a, _, n, rows in frags]


def poll(asset: str, n: int, ts: int = NOW) -> list[Reading]:
    return [Reading(asset, f"aux_{i:03d}", ts, float(i)) for i in range(n)]


def test_one_poll_seals_to_the_same_bytes_as_the_outbox_encoder():
    rs = poll("m1", 100)
    [p] = packed(rs)
    assert p.n == 100 and p.asset == "m1"
    assert seal_packed("gw", "i1", 7, NOW, [p]) == encode_readings("gw", "i1", 7, NOW, rs)
    assert p.readings() == rs


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),  # beyond 64 bits: the codec's extension
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
readings = st.builds(
    Reading,
    asset=st.sampled_from(["m1", "m2", "press 3", "aux_000"]),  # an asset may equal a tag
    tag=st.sampled_from(["t", "aux_000", "spindle_temp", "m1", "ü"]),
    ts_ns=st.integers(min_value=0, max_value=2**63 - 1),
    value=values,
    quality=st.sampled_from(list(Quality)),
    status=st.integers(min_value=0, max_value=2**31),
)


def _same(a: list[Reading], b: list[Reading]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if (x.asset, x.tag, x.ts_ns, x.quality, x.status) != (
            y.asset,
            y.tag,
            y.ts_ns,
            y.quality,
            y.status,
        ):
            return False
        if isinstance(x.value, float) and math.isnan(x.value):
            if not (isinstance(y.value, float) and math.isnan(y.value)):
                return False
        elif x.value != y.value or type(x.value) is not type(y.value):
            return False
    return True


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(readings, max_size=30), min_size=1, max_size=4))
def test_any_readings_in_several_messages_come_back_per_asset_in_order(messages):
    packer = RowPacker(max_rows=7)
    frags: list[PackedReadings] = []
    for msg in messages:  # tables grow message by message; earlier rows stay valid
        frags += packed(msg, packer=packer)
    assert all(p.n <= 7 for p in frags)
    for asset in {r.asset for m in messages for r in m}:
        mine = [p for p in frags if p.asset == asset]
        got = decode_batch(seal_packed("gw", "i1", 1, NOW, mine)).records
        want = [r for m in messages for r in m if r.asset == asset]
        assert _same(list(got), want)  # type: ignore[arg-type]


def test_the_outbox_batches_packed_rows_per_asset_and_source_within_the_batch_size(tmp_path):
    import asyncio

    async def main() -> None:
        async with Outbox(tmp_path / "o.db", agent_id="gw", batch_size=250) as ob:
            w1, w2 = RowPacker(100), RowPacker(100)
            a = packed(poll("m1", 100) + poll("m2", 100), ("line1", 1), w1)
            b = packed(poll("m1", 100, NOW + 1), ("line1", 1), w1)
            c = packed(poll("m1", 100, NOW + 2), ("line1", 2), w2)  # a restarted worker
            plain = [Reading("m1", "x", NOW, 1.0)]
            stored = await ob.append([*plain, *a, *b, *c])
            assert stored == 401
            batches = await ob.claim(after_seq=0, max_batches=100)
            by = [(x.asset, x.n) for x in batches]
            # plain readings, then m1 of worker 1 (200 of 250: a 100-row fragment never splits),
            # m2, then m1 of worker 2: never mixed with worker 1's table
            assert by == [("m1", 1), ("m1", 200), ("m2", 100), ("m1", 100)]
            assert all(x.kind is Kind.READING for x in batches)
            assert [x.seq for x in batches] == [1, 2, 3, 4]
            m1 = batches[1].records
            assert m1 == poll("m1", 100) + poll("m1", 100, NOW + 1)
            assert batches[3].records == poll("m1", 100, NOW + 2)
            assert ob.records == 401

    asyncio.run(main())


def test_a_fragment_larger_than_the_batch_size_is_split_by_the_packer():
    packer = RowPacker(max_rows=40)
    frags = packed(poll("m1", 100), packer=packer)
    assert [p.n for p in frags] == [40, 40, 20]
    assert [r for p in frags for r in p.readings()] == poll("m1", 100)


def test_a_value_that_cannot_be_encoded_is_dropped_and_counted_not_fatal():
    bad = Reading("m1", "t", NOW, 1.0)
    object.__setattr__(bad, "value", object())  # what a broken connector might hand over
    good = poll("m1", 3)
    packer = RowPacker()
    [p] = packed([good[0], bad, *good[1:]], packer=packer)
    assert packer.refused == 1
    assert p.n == 3 and p.readings() == good


def _columns_of(batches: list[list[Reading]]):
    """Each poll as ReadingColumns over one PointSet per distinct (assets, tags) layout."""
    from protocols.base import PointSet, ReadingColumns

    sets: dict[tuple[tuple[str, ...], tuple[str, ...]], PointSet] = {}
    out = []
    for rs in batches:
        key = (tuple(r.asset for r in rs), tuple(r.tag for r in rs))
        names = sets.setdefault(key, PointSet(*key))
        out.append(ReadingColumns(names, rs[0].ts_ns, [r.value for r in rs]))
    return out


def test_columns_pack_to_the_same_rows_as_the_readings_they_stand_for():
    polls = [poll("m1", 96, NOW + i) for i in range(3)] + [poll("m2", 4, NOW), poll("m1", 5)]
    mixed = [Reading("m1", "a", NOW, 1), Reading("m2", "b", NOW, 2.5)]  # two assets, one block
    by_columns, by_readings = RowPacker(), RowPacker()
    cols = _columns_of([*polls, mixed])
    by_columns.add_columns(cols[:2])
    by_columns.add_columns(cols[2:])
    for rs in [*polls, mixed]:
        by_readings.add(rs)
    assert by_columns.pending == by_readings.pending == 3 * 96 + 4 + 5 + 2
    assert by_columns.take() == by_readings.take()
    # a layout seen again reuses its indexes; the tables still grow only with new tags
    by_columns.add_columns(_columns_of([poll("m1", 97)]))
    news, frags = by_columns.take()
    assert news == {"m1": ["aux_096"]} and [(a, n) for a, _, n, _ in frags] == [("m1", 97)]


def test_columns_come_back_as_equal_readings():
    from protocols.base import PointSet, ReadingColumns

    names = PointSet(["m1", "m1"], ["a", "b"])
    cols = ReadingColumns(names, NOW, [1.5, True])
    assert len(cols) == 2 and names.asset == "m1"
    assert cols.readings() == [Reading("m1", "a", NOW, 1.5), Reading("m1", "b", NOW, True)]
    assert PointSet(["m1", "m2"], ["a", "a"]).asset is None
    with pytest.raises(ValueError, match="2 assets for 1 tags"):
        PointSet(["m1", "m1"], ["a"])
