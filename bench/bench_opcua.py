"""OPC UA connector readings/s vs a plain asyncua subscription, against the same server, same run.

A separate process runs an asyncua server with N variables and changes all of them R times a
second (or as fast as it can). The raw ceiling is asyncua's own subscription iterator
(``async for event in subscription``) counting data-change events; the connector is
``OpcUaConnector`` delivering Reading batches to a counting sink. Both subscribe with the same
publishing interval, sampling interval 0 and queue size 1, one after the other for the same time.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import time

from bench.common import Result

N_VARS = int(os.environ.get("BENCH_OPCUA_VARS", "1000"))
RATE_HZ = float(os.environ.get("BENCH_OPCUA_HZ", "10"))
SECONDS = float(os.environ.get("BENCH_OPCUA_SECONDS", "5"))
NS = "urn:edgeloop:bench"


def _serve(port: int, n: int, hz: float, ready: mp.synchronize.Event, stop: mp.synchronize.Event):
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)

    async def main() -> None:
        from asyncua import Server, ua

        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench/")
        idx = await server.register_namespace(NS)
        obj = await server.nodes.objects.add_object(idx, "Bench")
        nodes = [
            await obj.add_variable(ua.NodeId(f"v{i}", idx), ua.QualifiedName(f"v{i}", idx), 0.0)
            for i in range(n)
        ]
        aspace = server.iserver.aspace
        async with server:
            ready.set()
            k = 0
            period = 1.0 / hz
            next_at = time.monotonic()
            while not stop.is_set():
                k += 1
                for i, node in enumerate(nodes):
                    await aspace.write_attribute_value(
                        node.nodeid,
                        ua.AttributeIds.Value,
                        ua.DataValue(ua.Variant(float(k + i), ua.VariantType.Double)),
                    )
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    asyncio.run(main())


async def _raw(url: str, seconds: float) -> float:
    from asyncua import Client, ua

    client = Client(url, timeout=10)
    async with client:
        ns = await client.get_namespace_index(NS)
        sub = await client.create_subscription(50, queue_maxsize=1_000_000)
        params = []
        for i in range(N_VARS):
            params.append(client.get_node(ua.NodeId(f"v{i}", ns)))
        await sub.subscribe_data_change(params, queuesize=1, sampling_interval=0)
        count = 0
        start = time.perf_counter()
        warm = start + 1.0
        counted_from = None
        async with sub:
            while True:
                ev = await sub.next_event(timeout=1.0)
                now = time.perf_counter()
                if ev is None:
                    continue
                if now >= warm:
                    if counted_from is None:
                        counted_from = now
                    count += 1
                if now - start >= seconds + 1.0:
                    break
        assert counted_from is not None
        return count / (time.perf_counter() - counted_from)


async def _connector(url: str, seconds: float) -> float:
    from protocols.opcua import OpcUaConfig, OpcUaConnector

    cfg = OpcUaConfig(
        name="bench-opcua",
        endpoint=url,
        nodes=[
            {"node": f"nsu={NS};s=v{i}", "asset": "bench", "tag": f"v{i}"} for i in range(N_VARS)
        ],
        publishing_interval=50,
        sampling_interval=0,
        queue_size=1,
        request_timeout=10,
    )
    conn = OpcUaConnector(cfg)
    counted = 0
    counting = False
    first = asyncio.Event()

    def sink(batch) -> None:
        nonlocal counted
        first.set()
        if counting:
            counted += len(batch)

    conn.set_sink(sink)
    async with conn:
        await asyncio.wait_for(first.wait(), 30)
        await asyncio.sleep(1.0)  # warm-up, as for the raw loop
        counting = True
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        counting = False
        elapsed = time.perf_counter() - t0
    return counted / elapsed


def run() -> list[Result]:
    from edgeloop.services import free_port

    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    port = free_port()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(port, N_VARS, RATE_HZ, ready, stop), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("bench OPC UA server did not start within 60 s")
        url = f"opc.tcp://127.0.0.1:{port}/bench/"
        raw = asyncio.run(_raw(url, SECONDS))
        ours = asyncio.run(_connector(url, SECONDS))
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    offered = N_VARS * RATE_HZ
    return [
        Result(
            "opcua",
            f"subscription readings/s ({N_VARS} vars @ {RATE_HZ:g} Hz, offered {offered:,.0f}/s)",
            ours,
            "rd/s",
            "raw asyncua subscription",
            raw,
            target=">= 0.8x",
        )
    ]
