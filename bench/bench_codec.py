"""Wire codec: readings/s through encode_batch and decode_batch vs raw msgpack on the same data."""

from __future__ import annotations

import msgpack

from bench.common import Result, rate
from shared.records import Reading
from shared.wire import Batch, Kind, decode_batch, encode_batch

N = 500


def run() -> list[Result]:
    readings = [
        Reading(
            f"machine-{i % 10:02d}", f"tag-{i % 100:03d}", 1_700_000_000_000_000_000 + i, i * 0.25
        )
        for i in range(N)
    ]
    batch = Batch("agent-1", 1, Kind.READING, readings)
    raw_rows = [[r.asset, r.tag, r.ts_ns, r.value, int(r.quality), r.status] for r in readings]
    blob = encode_batch(batch)
    raw_blob = msgpack.packb(raw_rows)

    def enc() -> int:
        encode_batch(batch)
        return N

    def raw_enc() -> int:
        msgpack.packb(
            [[r.asset, r.tag, r.ts_ns, r.value, int(r.quality), r.status] for r in readings]
        )
        return N

    def dec() -> int:
        decode_batch(blob)
        return N

    def raw_dec() -> int:
        # raw ceiling for decode: unpack plus building the same records without validation
        rows = msgpack.unpackb(raw_blob)
        [Reading.__new__(Reading) for _ in rows]
        return N

    return [
        Result(
            "codec", "encode readings/s", rate(enc), "rec/s", "raw msgpack.packb", rate(raw_enc)
        ),
        Result(
            "codec", "decode readings/s", rate(dec), "rec/s", "raw msgpack.unpackb", rate(raw_dec)
        ),
        Result(
            "codec",
            "bytes/reading",
            len(blob) / N,
            "B",
            "raw msgpack rows",
            len(raw_blob) / N,
            higher_is_better=False,
        ),
    ]
