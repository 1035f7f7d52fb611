"""A misbehaving device as a process of its own: a real asyncua OPC UA server and the
simulator's Modbus TCP server, whose values the chaos suite poisons on command.

    python -m tests.chaos.device --opcua-port P --modbus-port Q

prints ``ready`` once both servers listen, then reads commands on stdin, one per line, and
answers each on stdout when done:

* ``poison`` — OPC UA: ``ua_far`` gets SourceTimestamp 9999-12-31 (legal in OPC UA, beyond a
  64-bit ns timestamp), ``ua_future`` a SourceTimestamp in 2200, ``ua_blob`` a ByteString and
  ``ua_array`` an array of doubles (values a reading cannot carry); Modbus: the string point
  ``mb_name`` holds bytes that are not UTF-8. Throughout, ``mb_beyond`` lies outside the
  register map (exception 0x02) and unit 9 does not exist (exception 0x0B).
* ``heal`` — plain values again (``ua_far`` = 78.0, ``ua_future`` = 67.0, ``mb_name`` = "OK"), so
  the checker can see each node go on after its poison.

``ua_good`` and ``mb_good`` change every 100 ms all along. :func:`agent_connectors` is the
matching part of the agent's config (asset ``dev``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import signal
import sys
import threading
from typing import Any

from asyncua import Server, ua

from simulators.modbus_server import ModbusSimServer, RegisterBank

NS_URI = "urn:edgeloop:chaos"
ASSET = "dev"
MODBUS_UNIT, MODBUS_GHOST_UNIT = 1, 9
OPCUA_NODES = ("ua_good", "ua_far", "ua_future", "ua_blob", "ua_array")
GOOD_REG, NAME_REG, NAME_LEN, BEYOND_REG = 100, 104, 4, 200


def agent_connectors(opcua_port: int, modbus_port: int) -> list[dict[str, Any]]:
    """The agent's connectors for this device."""
    return [
        {
            "kind": "opcua",
            "name": "poison-ua",
            "endpoint": f"opc.tcp://127.0.0.1:{opcua_port}/chaos/",
            "publishing_interval": 100,
            "sampling_interval": 50,
            "nodes": [
                {"node": f"nsu={NS_URI};s=dev.{n}", "asset": ASSET, "tag": n} for n in OPCUA_NODES
            ],
        },
        {
            "kind": "modbus",
            "name": "poison-mb",
            "transport": {"type": "tcp", "host": "127.0.0.1", "port": modbus_port},
            "timeout": 1.0,
            "devices": [
                {
                    "unit_id": MODBUS_UNIT,
                    "asset": ASSET,
                    "poll_interval": 0.2,
                    "points": [
                        {"tag": "mb_good", "address": GOOD_REG, "type": "uint16"},
                        {
                            "tag": "mb_name",
                            "address": NAME_REG,
                            "type": "string",
                            "length": NAME_LEN,
                        },
                        {"tag": "mb_beyond", "address": BEYOND_REG, "type": "uint16"},
                    ],
                },
                {
                    "unit_id": MODBUS_GHOST_UNIT,
                    "asset": ASSET,
                    "poll_interval": 0.5,
                    "points": [{"tag": "mb_ghost", "address": 0, "type": "uint16"}],
                },
            ],
        },
    ]


def _string_registers(raw: bytes) -> list[int]:
    raw = raw.ljust(2 * NAME_LEN, b"\x00")[: 2 * NAME_LEN]
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


class Device:
    def __init__(self, opcua_port: int, modbus_port: int) -> None:
        self.opcua_port = opcua_port
        self.bank = RegisterBank([ASSET], aux_registers=16)
        self.modbus = ModbusSimServer(self.bank, port=modbus_port)
        self.server: Server | None = None
        self.nodes: dict[str, Any] = {}
        self.ticks = 0

    async def start(self) -> None:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{self.opcua_port}/chaos/")
        server.set_server_name("edgeloop chaos device")
        idx = await server.register_namespace(NS_URI)
        obj = await server.nodes.objects.add_object(idx, "dev")
        for name in OPCUA_NODES:
            blob = name == "ua_blob"  # a ByteString node, empty until poisoned
            self.nodes[name] = await obj.add_variable(
                ua.NodeId(f"dev.{name}", idx),
                ua.QualifiedName(name, idx),
                ua.Variant(None, ua.VariantType.Null) if blob else 0.0,
                datatype=ua.NodeId(ua.ObjectIds.ByteString) if blob else None,
            )
        await server.start()
        self.server = server
        self._write_name(b"OK")
        await self.modbus.start()

    async def stop(self) -> None:
        await self.modbus.stop()
        if self.server is not None:
            await self.server.stop()

    def _write_name(self, raw: bytes) -> None:
        self.bank.units[MODBUS_UNIT].hr[NAME_REG : NAME_REG + NAME_LEN] = _string_registers(raw)

    async def _set_raw(self, name: str, value: ua.DataValue) -> None:
        assert self.server is not None
        status = await self.server.iserver.aspace.write_attribute_value(
            self.nodes[name].nodeid, ua.AttributeIds.Value, value
        )
        status.check()

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.ticks += 1
            self.bank.units[MODBUS_UNIT].hr[GOOD_REG] = self.ticks & 0xFFFF
            await self.nodes["ua_good"].write_value(float(self.ticks))

    async def poison(self) -> None:
        far = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
        future = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)
        await self._set_raw(
            "ua_far", ua.DataValue(ua.Variant(77.0, ua.VariantType.Double), SourceTimestamp=far)
        )
        await self._set_raw(
            "ua_future",
            ua.DataValue(ua.Variant(66.0, ua.VariantType.Double), SourceTimestamp=future),
        )
        await self._set_raw(
            "ua_blob", ua.DataValue(ua.Variant(b"\x00\xff\xfe", ua.VariantType.ByteString))
        )
        await self._set_raw(
            "ua_array", ua.DataValue(ua.Variant([1.0, 2.0, 3.0], ua.VariantType.Double))
        )
        self._write_name(b"\xff\xfe\xc3\x28")  # not UTF-8

    async def heal(self) -> None:
        now = dt.datetime.now(dt.UTC)
        await self._set_raw(
            "ua_far", ua.DataValue(ua.Variant(78.0, ua.VariantType.Double), SourceTimestamp=now)
        )
        await self._set_raw(
            "ua_future",
            ua.DataValue(ua.Variant(67.0, ua.VariantType.Double), SourceTimestamp=now),
        )
        self._write_name(b"OK")


async def main(opcua_port: int, modbus_port: int) -> None:
    for name in ("asyncua", "asyncua.server", "asyncua.client"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = Device(opcua_port, modbus_port)
    await device.start()
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(stop.set)  # stdin closed: the harness is gone

    threading.Thread(target=read_stdin, name="commands", daemon=True).start()
    ticker = asyncio.create_task(device.tick())
    print("ready", flush=True)

    async def serve() -> None:
        while True:
            cmd = await commands.get()
            if cmd == "poison":
                await device.poison()
                print("poisoned", flush=True)
            elif cmd == "heal":
                await device.heal()
                print("healed", flush=True)

    server = asyncio.create_task(serve())
    try:
        await stop.wait()
    finally:
        for task in (ticker, server):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # asyncua's server waits for its clients' sessions: a device going away does not
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3.0):
                await device.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--opcua-port", type=int, required=True)
    parser.add_argument("--modbus-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.opcua_port, args.modbus_port))
