"""The isolation proxy's handling of worker data messages, without a worker: drops reach the
agent's counter, and a message with nothing storable is still answered so the worker's acking
connector is never left waiting."""

from __future__ import annotations

from typing import Any

from edge.isolation import ProcessConnector
from edge.packed import RowPacker
from protocols.modbus import ModbusConfig
from shared.records import Reading

CONFIG = {
    "kind": "modbus",
    "name": "proxy-unit",
    "isolation": "process",
    "transport": {"type": "tcp", "host": "127.0.0.1", "port": 1502},
    "devices": [
        {"unit_id": 1, "asset": "m1", "points": [{"tag": "t", "address": 0, "type": "uint16"}]}
    ],
}


def proxy() -> tuple[ProcessConnector, list[Any], list[int], list[tuple[Any, ...]]]:
    conn = ProcessConnector(ModbusConfig.model_validate(CONFIG))
    delivered: list[Any] = []
    dropped: list[int] = []
    sent: list[tuple[Any, ...]] = []

    def sink(state: Any, packed: Any, n: int, on_durable: Any) -> None:
        delivered.append((list(state), list(packed), n))
        on_durable(True)

    conn.set_packed_sink(sink, on_dropped=dropped.append)
    conn._send = lambda *fields: sent.append(fields)  # type: ignore[method-assign]
    return conn, delivered, dropped, sent


def test_worker_drops_are_reported_and_an_empty_acking_message_is_answered():
    conn, delivered, dropped, sent = proxy()
    conn._handle(["data", 7, True, {}, [], None, 42])
    assert dropped == [42]
    assert delivered == []  # nothing to store
    assert sent == [("durable", [7], True)]  # the worker's callbacks for seq 7 can run


def test_rows_and_wanted_readings_reach_the_packed_sink_and_are_acknowledged():
    conn, delivered, dropped, sent = proxy()
    rs = [Reading("m1", "t", 1, 5), Reading("m1", "u", 1, 2.5)]
    packer = RowPacker()
    packer.add(rs)
    news, frags = packer.take()
    cols = [[r.asset for r in rs[:1]], ["t"], [1], [5], [0], [0]]
    conn._handle(["data", 3, True, news, [list(f) for f in frags], cols, 0])
    [(state, packed, n)] = delivered
    assert n == 2 and state == rs[:1] and dropped == []
    assert [r for p in packed for r in p.readings()] == rs
    assert sent == [("durable", [3], True)]


class _Writer:
    """What the worker's Host writes, kept (a stand-in for the socket pair's stream writer)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.transport = self

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.out += data


def test_columns_in_the_worker_reach_the_agent_as_rows_and_only_wanted_readings():
    import asyncio

    from edge.connector_host import Host
    from edge.isolation import decode_message
    from protocols.base import PointSet, ReadingColumns

    async def worker_side(want: frozenset[str] | None = frozenset({"t"})) -> bytes:
        writer = _Writer()
        host = Host(writer)  # type: ignore[arg-type]
        host.set_want(want)
        names = PointSet(["m1", "m1", "m1"], ["t", "u", "v"])
        host.columns([ReadingColumns(names, 10, [5, 2.5, True])])
        host.columns([ReadingColumns(names, 11, [6, 3.5, False])])
        host.sink([Reading("m1", "w", 12, "x")], lambda ok: None)  # a reading, same message
        host.flush()
        return bytes(writer.out)

    body = asyncio.run(worker_side())
    msg = decode_message(body[4:])
    assert msg[0] == "data"
    conn, delivered, dropped, sent = proxy()
    conn._handle(msg)
    [(state, packed, n)] = delivered
    assert n == 7 and dropped == []
    assert sent == [("durable", [1], True)]  # the reading's callback, in the same message
    assert state == [Reading("m1", "t", 10, 5), Reading("m1", "t", 11, 6)]
    assert [r for p in packed for r in p.readings()] == [
        Reading("m1", "t", 10, 5),
        Reading("m1", "u", 10, 2.5),
        Reading("m1", "v", 10, True),
        Reading("m1", "t", 11, 6),
        Reading("m1", "u", 11, 3.5),
        Reading("m1", "v", 11, False),
        Reading("m1", "w", 12, "x"),
    ]
    # an agent that wants every reading (labels, rules reading r/age as maps) gets them all
    conn, delivered, _, _ = proxy()
    conn._handle(decode_message(asyncio.run(worker_side(None))[4:]))
    [(state, packed, n)] = delivered
    assert state == [r for p in packed for r in p.readings()] and n == 7
