"""``edgeloop discover opc.tcp://host:port``: what an OPC UA server offers, and a starter config.

Browses the address space below ``Objects`` (the ``Server`` object is skipped), collects every
Variable with its DataType and engineering units (``EngineeringUnits``/``EURange`` properties),
subscribes to all of them for ``options.seconds`` and reports observed update rate, value range
and share of bad quality. The starter config names nodes as ``nsu=<namespace uri>;<id>`` so it
survives namespace index changes, and is validated against :class:`OpcUaConfig` before it is
returned. Variables whose values a reading cannot carry (arrays, structures, byte strings) are
listed but left out of the starter config.
"""

# asyncua 2.1 re-exports ua names implicitly and types ints as its Int32/Boolean aliases:
# mypy: disable-error-code="attr-defined,arg-type,assignment,union-attr"
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from asyncua import Client, ua
from asyncua.common.node import Node

from protocols.discovery import DiscoveredPoint, DiscoverOptions, DiscoveryReport
from protocols.opcua import (
    OpcUaConfig,
    Unrepresentable,
    _BatchSubscription,
    _NoHandler,
    _read_many,
    quality_of,
    variant_to_value,
)

__all__ = ["discover"]

log = logging.getLogger(__name__)

MAX_DEPTH = 12
MAX_VARIABLES = 5000
_SERVER_OBJECT = ua.NodeId(ua.ObjectIds.Server)
_HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
_UNREPRESENTABLE_TYPES = {"ByteString", "ExtensionObject", "DataValue", "DiagnosticInfo", "Variant"}


@dataclass(slots=True)
class _Var:
    nodeid: ua.NodeId
    path: list[str]  # browse names from below Objects to the variable
    type: str = "?"
    unit: str = ""
    samples: int = 0
    bad: int = 0
    minimum: float | None = None
    maximum: float | None = None
    first_at: float | None = None
    last_at: float | None = None
    example: str = ""
    unrepresentable: str = ""
    values: set[Any] = field(default_factory=set)


def _endpoint(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "opcua":
        parts = parts._replace(scheme="opc.tcp")
    return urlunsplit(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "node"


async def _browse_variables(client: Client) -> list[_Var]:
    """Breadth-first over hierarchical references below Objects; properties are not points."""
    out: list[_Var] = []
    seen: set[ua.NodeId] = set()
    level: list[tuple[Node, list[str]]] = [(client.nodes.objects, [])]
    for _ in range(MAX_DEPTH):
        if not level:
            break
        nxt: list[tuple[Node, list[str]]] = []
        for parent, path in level:
            refs = await parent.get_references(
                refs=ua.ObjectIds.HierarchicalReferences,
                direction=ua.BrowseDirection.Forward,
                includesubtypes=True,
            )
            for ref in refs:
                nid = ua.NodeId(
                    ref.NodeId.Identifier, ref.NodeId.NamespaceIndex, ref.NodeId.NodeIdType
                )
                if nid == _SERVER_OBJECT or nid in seen or ref.ReferenceTypeId == _HAS_PROPERTY:
                    continue
                seen.add(nid)
                child_path = [*path, ref.BrowseName.Name]
                if ref.NodeClass == ua.NodeClass.Variable:
                    out.append(_Var(nid, child_path))
                    if len(out) >= MAX_VARIABLES:
                        return out
                    nxt.append((client.get_node(nid), child_path))  # variables may nest
                elif ref.NodeClass == ua.NodeClass.Object:
                    nxt.append((client.get_node(nid), child_path))
        level = nxt
    return out


async def _describe(client: Client, variables: list[_Var]) -> None:
    """DataType names, array-ness and engineering units, in batched reads."""
    dtypes = await _read_many(
        client,
        [
            (v.nodeid, a)
            for v in variables
            for a in (ua.AttributeIds.DataType, ua.AttributeIds.ValueRank)
        ],
        500,
    )
    names: dict[ua.NodeId, str] = {}
    for k, v in enumerate(variables):
        dt_value, rank = dtypes[2 * k], dtypes[2 * k + 1]
        dtid = dt_value.Value.Value if dt_value.StatusCode.is_good() else None
        if isinstance(dtid, ua.NodeId):
            if dtid not in names:
                try:
                    names[dtid] = (await client.get_node(dtid).read_browse_name()).Name
                except Exception:  # noqa: BLE001 - an unnamed type is still reportable
                    names[dtid] = dtid.to_string()
            v.type = names[dtid]
        if (
            rank.StatusCode.is_good()
            and isinstance(rank.Value.Value, int)
            and rank.Value.Value >= 0
        ):
            v.type += "[]"
            v.unrepresentable = "array"
        elif v.type in _UNREPRESENTABLE_TYPES:
            v.unrepresentable = v.type
    # EngineeringUnits properties
    bps = []
    for v in variables:
        el = ua.RelativePathElement()
        el.ReferenceTypeId = _HAS_PROPERTY
        el.IsInverse = False
        el.IncludeSubtypes = True
        el.TargetName = ua.QualifiedName("EngineeringUnits", 0)
        bp = ua.BrowsePath()
        bp.StartingNode = v.nodeid
        bp.RelativePath = ua.RelativePath(Elements=[el])
        bps.append(bp)
    results = await client.uaclient.translate_browsepaths_to_nodeids(bps) if bps else []
    found = [
        (variables[k], r.Targets[0].TargetId)
        for k, r in enumerate(results)
        if r.StatusCode.is_good() and r.Targets
    ]
    if found:
        units = await _read_many(
            client,
            [
                (ua.NodeId(t.Identifier, t.NamespaceIndex, t.NodeIdType), ua.AttributeIds.Value)
                for _, t in found
            ],
            500,
        )
        for (v, _), dv in zip(found, units, strict=True):
            eu = dv.Value.Value if dv.Value is not None else None
            if isinstance(eu, ua.EUInformation):
                v.unit = eu.DisplayName.Text or ""


async def _observe(client: Client, variables: list[_Var], seconds: float) -> None:
    by_handle = {k + 1: v for k, v in enumerate(variables)}

    def on_batch(items: Sequence[ua.MonitoredItemNotification]) -> None:
        now = time.monotonic()
        for item in items:
            v = by_handle.get(item.ClientHandle)
            if v is None:
                continue
            v.samples += 1
            v.first_at = v.first_at if v.first_at is not None else now
            v.last_at = now
            dv = item.Value
            status = dv.StatusCode.value if dv.StatusCode is not None else 0
            if quality_of(status) != 0:
                v.bad += 1
            try:
                value = variant_to_value(dv.Value.Value if dv.Value is not None else None)
            except Unrepresentable as exc:
                v.unrepresentable = v.unrepresentable or str(exc)
                continue
            if value is not None:
                v.example = str(value)[:40]
            if isinstance(value, int | float) and not isinstance(value, bool):
                f = float(value)
                v.minimum = f if v.minimum is None else min(v.minimum, f)
                v.maximum = f if v.maximum is None else max(v.maximum, f)

    params = ua.CreateSubscriptionParameters()
    params.RequestedPublishingInterval = 100
    params.RequestedMaxKeepAliveCount = 10
    params.RequestedLifetimeCount = 300
    params.MaxNotificationsPerPublish = 0
    params.PublishingEnabled = True
    params.Priority = 0
    sub = _BatchSubscription(client.uaclient.session, params, handler=_NoHandler())
    sub.on_batch = on_batch
    await sub.init()
    try:
        requests = []
        for handle, v in by_handle.items():
            rv = ua.ReadValueId()
            rv.NodeId = v.nodeid
            rv.AttributeId = ua.AttributeIds.Value
            mp = ua.MonitoringParameters()
            mp.ClientHandle = handle
            mp.SamplingInterval = 0  # fastest the server offers: observe the real update rate
            mp.QueueSize = 100
            mp.DiscardOldest = True
            mir = ua.MonitoredItemCreateRequest()
            mir.ItemToMonitor = rv
            mir.MonitoringMode = ua.MonitoringMode.Reporting
            mir.RequestedParameters = mp
            requests.append(mir)
        for start in range(0, len(requests), 500):
            await sub.create_monitored_items(requests[start : start + 500])
        await asyncio.sleep(seconds)
    finally:
        try:
            await asyncio.wait_for(sub.delete(), 5)
        except Exception as exc:  # noqa: BLE001 - the session is closed next anyway
            log.debug("deleting the discovery subscription: %r", exc)


async def discover(url: str, options: DiscoverOptions) -> DiscoveryReport:
    """Browse, describe and observe the server at ``url``; return the report and starter config."""
    endpoint = _endpoint(url)
    report = DiscoveryReport(source=endpoint, kind="opcua")
    client = Client(endpoint, timeout=options.timeout)
    client.application_uri = "urn:edgeloop:discover"
    client.name = client.description = "edgeloop discover"
    await asyncio.wait_for(client.connect(), options.timeout * 3)
    try:
        ns_array: list[str] = await client.get_namespace_array()
        variables = await _browse_variables(client)
        if not variables:
            report.notes.append("no variables found below Objects (Server object skipped)")
        else:
            await _describe(client, variables)
            await _observe(client, variables, options.seconds)
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), options.timeout)
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            log.debug("disconnect: %r", exc)
            client.disconnect_socket()
    nodes: list[dict[str, Any]] = []
    used: set[tuple[str, str]] = set()
    for v in variables:
        asset = _slug(".".join(v.path[:-1])) if len(v.path) > 1 else "server"
        tag = _slug(v.path[-1])
        n = 2
        while (asset, tag) in used:
            tag = f"{_slug(v.path[-1])}_{n}"
            n += 1
        used.add((asset, tag))
        uri = ns_array[v.nodeid.NamespaceIndex] if v.nodeid.NamespaceIndex < len(ns_array) else ""
        plain = ua.NodeId(v.nodeid.Identifier, 0, v.nodeid.NodeIdType).to_string()
        address = f"nsu={uri};{plain}" if v.nodeid.NamespaceIndex else v.nodeid.to_string()
        span = (v.last_at - v.first_at) if v.first_at is not None and v.last_at is not None else 0
        rate = (v.samples - 1) / span if v.samples > 1 and span > 0 else None
        report.points.append(
            DiscoveredPoint(
                asset=asset,
                tag=tag,
                address=address,
                type=v.type,
                samples=v.samples,
                rate_hz=rate,
                minimum=v.minimum,
                maximum=v.maximum,
                bad_share=v.bad / v.samples if v.samples else 0.0,
                unit=v.unit,
                example=v.example,
            )
        )
        if v.unrepresentable:
            report.notes.append(f"{address}: left out of the starter config ({v.unrepresentable})")
        else:
            nodes.append({"node": address, "asset": asset, "tag": tag})
    host = urlsplit(endpoint).hostname or "server"
    if nodes:
        starter = {
            "kind": "opcua",
            "name": _slug(f"opcua-{host}-{urlsplit(endpoint).port or 4840}"),
            "endpoint": endpoint,
            "nodes": nodes,
        }
        OpcUaConfig.model_validate(starter)  # the starter config must be one the agent accepts
        report.starter_config = starter
    return report
