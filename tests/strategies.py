"""Hypothesis strategies for the records, shared by the codec tests and later suites."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

from shared.records import Event, Frame, Heartbeat, Label, Quality, Reading, Severity

names = st.text(min_size=1, max_size=40)
ts = st.integers(min_value=0, max_value=2**63 - 1)
huge_ints = st.integers(min_value=-(2**200), max_value=2**200)
floats = st.floats(allow_nan=True, allow_infinity=True)
values = st.one_of(st.none(), st.booleans(), huge_ints, floats, st.text(max_size=50))
finite = st.floats(allow_nan=True, allow_infinity=True, width=64)

readings = st.builds(
    Reading,
    asset=names,
    tag=names,
    ts_ns=ts,
    value=values,
    quality=st.sampled_from(list(Quality)),
    status=st.integers(min_value=-(2**63), max_value=2**64 - 1),
)
frames = st.builds(
    Frame,
    asset=names,
    key=names,
    ts_ns=ts,
    features=st.dictionaries(names, finite, max_size=12),
    prediction=st.one_of(st.none(), finite),
    model_version=st.one_of(st.none(), st.integers(min_value=0, max_value=2**31)),
    score=st.one_of(st.none(), finite),
    marks=st.lists(names, max_size=3).map(tuple),
)
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), huge_ints, floats, st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
events = st.builds(
    Event,
    rule=names,
    asset=names,
    ts_ns=ts,
    severity=st.sampled_from(list(Severity)),
    message=st.text(max_size=80),
    values=st.dictionaries(st.text(max_size=10), json_like, max_size=5),
)
labels = st.builds(
    Label,
    asset=names,
    key=names,
    ts_ns=ts,
    target=st.one_of(st.booleans(), huge_ints, st.floats(allow_nan=False, allow_infinity=False)),
)
heartbeats = st.builds(
    Heartbeat,
    agent_id=names,
    ts_ns=ts,
    models=st.dictionaries(names, st.integers(min_value=0, max_value=2**40), max_size=3),
    outbox_depth=st.integers(min_value=0, max_value=2**40),
    outbox_bytes=st.integers(min_value=0, max_value=2**40),
    status=st.text(max_size=10),
    info=st.dictionaries(st.text(max_size=10), json_like, max_size=3),
)


def comparable(obj: Any) -> Any:
    """A structure equal to another iff the records are equal, treating NaN as equal to NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return ("nan",)
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [comparable(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return (
            type(obj).__name__,
            {f: comparable(getattr(obj, f)) for f in obj.__dataclass_fields__},
        )
    return obj
