# asyncua 2.1 re-exports ua names implicitly and types ints as its Int32/Boolean aliases:
# mypy: disable-error-code="attr-defined,arg-type,assignment,union-attr,name-defined"
"""OPC UA connector (asyncua): subscriptions or batched polling, security, deadbands, writes.

Data flow: ``OpcUaConfig`` -> connect (security, certificates, user) -> resolve every configured
node (NodeId with ``ns=`` / ``nsu=``, or a browse path) in a few batched service calls ->
one subscription whose monitored items carry each node's sampling interval, queue size and
deadband (or a polling loop issuing one Read request per ``max_nodes_per_read`` nodes) ->
each notification message becomes one batch of :class:`~shared.records.Reading` via ``_emit``.

Reconnects: the initial connect is retried by the base class with the configured backoff.
Once a session exists, asyncua's connection supervisor owns the link: it probes
``Server.ServerStatus.State`` every ``keepalive_interval`` with a timeout (so a blackholed link is
noticed, not only a reset one), re-opens the channel with backoff (1 s doubling up to
``backoff.max``), re-activates the server-side session when the server still holds it and
transfers the existing subscription (republishing missed notifications), or creates a fresh
session and re-creates the subscription once — never a second copy.

Percent deadbands are turned into the equivalent absolute deadband from the node's EURange
(Part 8: ``|v - last| > pct/100 * (high - low)``), so servers that implement only absolute
deadbands filter correctly; the same filter also runs client-side (against the last *delivered*
value), which makes polling mode and non-filtering servers behave the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, ClassVar, Literal

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import Subscription
from asyncua.common.ua_utils import data_type_to_variant_type
from asyncua.crypto import security_policies, uacrypto
from asyncua.crypto.truststore import TrustStore
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import Field, field_validator, model_validator

from protocols.base import (
    WRITES,
    Connector,
    ConnectorConfig,
    ConnectorError,
    ConnectorState,
    WriteError,
)
from shared.config import ConfigModel
from shared.records import Quality, Reading, Value

__all__ = [
    "OpcUaConfig",
    "OpcUaConnector",
    "OpcUaNodeConfig",
    "OpcUaSecurityConfig",
    "parse_browse_path",
    "quality_of",
    "variant_to_value",
]

log = logging.getLogger(__name__)

_NODEID_PREFIXES = ("ns=", "nsu=", "i=", "s=", "g=", "b=")
_HEX = re.compile(r"^[0-9a-f]{64}$")


# --- configuration -------------------------------------------------------------------------


class OpcUaSecurityConfig(ConfigModel):
    """Channel security. Anything but ``None`` needs the server certificate pinned or trusted."""

    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    policy: Literal["Basic256Sha256"] = "Basic256Sha256"
    certificate: Path | None = Field(
        None, description="Client certificate (DER or PEM); generated in cert_dir when absent"
    )
    private_key: Path | None = Field(None, description="Client private key (PEM or DER)")
    cert_dir: Path = Field(
        Path("pki/opcua"), description="Where a generated client certificate and key are kept"
    )
    server_certificate_sha256: str | None = Field(
        None, description="Pin: SHA-256 of the server certificate's DER bytes (hex, ':' allowed)"
    )
    trust_dir: Path | None = Field(
        None, description="Directory of trusted server (or CA) certificates, DER or PEM"
    )

    @field_validator("server_certificate_sha256")
    @classmethod
    def _normalise_pin(cls, v: str | None) -> str | None:
        if v is None:
            return None
        pin = v.replace(":", "").strip().lower()
        if not _HEX.match(pin):
            raise ValueError("expected 64 hex digits (SHA-256 of the DER certificate)")
        return pin

    @model_validator(mode="after")
    def _never_silently_trusted(self) -> OpcUaSecurityConfig:
        if (
            self.mode != "None"
            and self.server_certificate_sha256 is None
            and self.trust_dir is None
        ):
            raise ValueError(
                f"security mode {self.mode} needs server_certificate_sha256 (a pin) or trust_dir "
                "(trusted certificates); the server certificate is never trusted silently"
            )
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("give both certificate and private_key, or neither (to generate)")
        return self


class OpcUaNodeConfig(ConfigModel):
    """One OPC UA variable mapped to an (asset, tag)."""

    node: str = Field(
        ...,
        min_length=1,
        description=(
            "NodeId ('ns=2;s=M1.Temp', 'nsu=urn:plant;i=42') or a browse path from the Root "
            "folder ('0:Objects/2:Line1/2:M1/2:Temperature'; a prefix may be an alias from "
            "'namespaces')"
        ),
    )
    asset: str = Field(..., min_length=1)
    tag: str = Field(..., min_length=1)
    sampling_interval: float | None = Field(
        None, ge=0, description="ms; None = the connector default"
    )
    queue_size: int | None = Field(None, ge=1, description="None = the connector default")
    deadband: float | None = Field(None, ge=0, description="None = the connector default")
    deadband_type: Literal["absolute", "percent"] | None = None
    writable: bool = Field(False, description="Allow write(tag, value) to this node")

    @field_validator("node")
    @classmethod
    def _check_node(cls, v: str) -> str:
        if v.startswith(_NODEID_PREFIXES):
            if v.startswith("nsu="):
                uri, sep, rest = v[4:].partition(";")
                if not sep or not uri or not rest.startswith(("i=", "s=", "g=", "b=")):
                    raise ValueError(f"expected 'nsu=<uri>;<i|s|g|b>=<id>', got {v!r}")
                ua.NodeId.from_string(rest)
            else:
                try:
                    ua.NodeId.from_string(v)
                except Exception as exc:  # noqa: BLE001 - asyncua raises several types
                    raise ValueError(f"not a NodeId: {v!r} ({exc})") from None
        else:
            parse_browse_path(v)  # syntax only; aliases are checked by OpcUaConfig
        return v


class OpcUaConfig(ConnectorConfig):
    kind: Literal["opcua"] = "opcua"
    endpoint: str = Field(..., description="opc.tcp://host:port[/path]")
    nodes: list[OpcUaNodeConfig] = Field(..., min_length=1)
    namespaces: dict[str, str] = Field(
        default_factory=dict,
        description="Aliases for namespace URIs usable as browse-path prefixes ('sim': 'urn:...')",
    )
    mode: Literal["subscription", "polling"] = "subscription"
    publishing_interval: float = Field(100.0, gt=0, description="Subscription publishing, ms")
    sampling_interval: float = Field(100.0, ge=0, description="Default per-node sampling, ms")
    queue_size: int = Field(10, ge=1, description="Default per-node server queue size")
    deadband: float = Field(0.0, ge=0, description="Default deadband (0 = every change)")
    deadband_type: Literal["absolute", "percent"] = "absolute"
    poll_interval: float = Field(1.0, gt=0, description="Polling mode period, s")
    max_nodes_per_read: int = Field(500, ge=1, description="Nodes per Read request (polling)")
    security: OpcUaSecurityConfig = Field(default_factory=OpcUaSecurityConfig)
    application_uri: str = Field(
        "urn:edgeloop:opcua-client", description="Client ApplicationUri (certificate SAN URI)"
    )
    username: str | None = None
    password: str | None = Field(None, repr=False)
    request_timeout: float = Field(4.0, gt=0, description="Per request, s")
    keepalive_interval: float = Field(
        1.0, gt=0, description="Probe ServerStatus this often; a probe timing out = link lost, s"
    )
    session_timeout: float = Field(
        60.0, gt=0, description="Requested session timeout: how long a session survives a loss, s"
    )

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, v: str) -> str:
        if not v.startswith("opc.tcp://"):
            raise ValueError(f"expected opc.tcp://host:port, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_nodes(self) -> OpcUaConfig:
        seen: set[tuple[str, str]] = set()
        for i, n in enumerate(self.nodes):
            key = (n.asset, n.tag)
            if key in seen:
                raise ValueError(f"nodes[{i}]: asset/tag {n.asset}/{n.tag} is mapped twice")
            seen.add(key)
            if not n.node.startswith(_NODEID_PREFIXES):
                for ns, _ in parse_browse_path(n.node):
                    if isinstance(ns, str) and ns not in self.namespaces:
                        raise ValueError(
                            f"nodes[{i}].node: namespace alias {ns!r} is not in namespaces "
                            f"(known: {', '.join(sorted(self.namespaces)) or 'none'})"
                        )
        return self


def parse_browse_path(path: str) -> list[tuple[int | str, str]]:
    """'0:Objects/2:Line1/sim:M1' -> [(0, 'Objects'), (2, 'Line1'), ('sim', 'M1')].

    A segment without a prefix is in namespace 0. Raises ``ValueError`` on empty segments.
    """
    out: list[tuple[int | str, str]] = []
    for seg in path.strip("/").split("/"):
        if not seg:
            raise ValueError(f"empty segment in browse path {path!r}")
        prefix, sep, name = seg.partition(":")
        if not sep:
            out.append((0, seg))
        elif not name:
            raise ValueError(f"segment {seg!r} of {path!r} has no name after ':'")
        elif prefix.isdigit():
            out.append((int(prefix), name))
        else:
            out.append((prefix, name))
    return out


# --- value and status mapping --------------------------------------------------------------

_EPOCH_AWARE = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_NAIVE = dt.datetime(1970, 1, 1)


def _ts_ns(t: dt.datetime | None) -> int | None:
    if t is None:
        return None
    d = t - (_EPOCH_NAIVE if t.tzinfo is None else _EPOCH_AWARE)
    ns = (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1_000
    return ns if ns > 0 else None


def quality_of(status: int) -> Quality:
    """OPC UA StatusCode severity bits (30-31): 00 good, 01 uncertain, 1x bad."""
    severity = (status >> 30) & 0x3
    if severity == 0:
        return Quality.GOOD
    if severity == 1:
        return Quality.UNCERTAIN
    return Quality.BAD


class Unrepresentable(ValueError):
    """A value a Reading cannot carry (arrays, structures, byte strings)."""


def variant_to_value(v: Any) -> Value:
    """Map a Variant's Python value to a Reading value, or raise :class:`Unrepresentable`."""
    t = type(v)
    if v is None or t is float or t is int or t is bool or t is str:
        return v  # type: ignore[no-any-return]
    if isinstance(v, IntEnum):
        return int(v)
    if isinstance(v, bool | int | float | str):
        return v  # subclasses of builtins
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, ua.LocalizedText):
        return v.Text
    if isinstance(v, ua.QualifiedName | ua.NodeId):
        return v.to_string()
    if isinstance(v, ua.StatusCode):
        return int(v.value)
    raise Unrepresentable(f"value of type {t.__name__} cannot be carried by a reading")


# --- resolved nodes and deadband -----------------------------------------------------------


@dataclass(slots=True)
class _Point:
    handle: int
    cfg: OpcUaNodeConfig
    nodeid: ua.NodeId
    sampling_interval: float
    queue_size: int
    deadband_abs: float  # 0 = no deadband
    datatype: ua.NodeId | None = None
    variant_type: ua.VariantType | None = None
    last_value: Value = None
    last_quality: Quality | None = None
    seen: bool = False
    malformed_reported: set[str] = field(default_factory=set)


def _passes_deadband(p: _Point, value: Value, quality: Quality) -> bool:
    if not p.seen or quality is not p.last_quality or p.deadband_abs <= 0:
        return True
    last = p.last_value
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and isinstance(last, int | float)
        and not isinstance(last, bool)
    ):
        if math.isnan(value) or math.isnan(last):
            return True
        return abs(value - last) > p.deadband_abs
    return True


# --- the subscription ----------------------------------------------------------------------


class _BatchSubscription(Subscription):
    """A subscription that hands each notification message over as one batch.

    asyncua's default callback path schedules one task per changed value; a gateway watching
    thousands of nodes wants one call per publish response instead.
    """

    on_batch: Callable[[Sequence[ua.MonitoredItemNotification]], None] | None = None
    on_status: Callable[[ua.StatusChangeNotification], None] | None = None

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        message = publish_result.NotificationMessage
        if message.NotificationData is None:
            return
        self.last_sequence_number = int(message.SequenceNumber)
        for notif in message.NotificationData:
            if isinstance(notif, ua.DataChangeNotification):
                if self.on_batch is not None:
                    self.on_batch(notif.MonitoredItems)
            elif isinstance(notif, ua.StatusChangeNotification) and self.on_status is not None:
                self.on_status(notif)


# --- the connector -------------------------------------------------------------------------


class OpcUaConnector(Connector[OpcUaConfig]):
    """Reads OPC UA variables by subscription or polling and writes them for actions.

    ``skipped`` maps each configured node that could not be resolved at start-up to the reason
    (reported once, counted as malformed, never fatal for the others).
    """

    kind: ClassVar[str] = "opcua"
    config_model: ClassVar[type[ConnectorConfig]] = OpcUaConfig

    def __init__(self, config: OpcUaConfig) -> None:
        super().__init__(config)
        self._client: Client | None = None
        self._points: dict[int, _Point] = {}
        self._by_tag: dict[str, list[_Point]] = {}
        self.skipped: dict[str, str] = {}
        self._subscription: _BatchSubscription | None = None
        self._variant_types: dict[ua.NodeId, ua.VariantType] = {}

    # --- connection ----------------------------------------------------------------------

    async def _make_client(self) -> Client:
        c = self.config
        client = Client(
            c.endpoint,
            timeout=c.request_timeout,
            watchdog_intervall=c.keepalive_interval,
            auto_reconnect=True,
            reconnect_max_delay=c.backoff.max,
            reconnect_request_timeout=max(c.request_timeout, c.poll_interval),
        )
        client.application_uri = c.application_uri
        client.name = client.description = f"edgeloop {c.name}"
        client.session_timeout = int(c.session_timeout * 1000)
        if c.username is not None:
            client.set_user(c.username)
        if c.password is not None:
            client.set_password(c.password)
        if c.security.mode != "None":
            await self._set_security(client)
        return client

    async def _client_certificate(self, client: Client) -> tuple[Path, Path]:
        sec = self.config.security
        if sec.certificate is not None and sec.private_key is not None:
            return sec.certificate, sec.private_key
        cert = sec.cert_dir / "edgeloop-client-cert.der"
        key = sec.cert_dir / "edgeloop-client-key.pem"
        # Generates the pair on first run (SAN URI = application_uri, DNS = this host) and
        # regenerates it when the application URI or host changed or it expired.
        return await client.setup_self_signed_certificate(key, cert, host_name=socket.gethostname())

    async def _set_security(self, client: Client) -> None:
        sec = self.config.security
        cert_path, key_path = await self._client_certificate(client)
        mode = getattr(ua.MessageSecurityMode, sec.mode)
        policy = security_policies.SecurityPolicyBasic256Sha256
        endpoints = await asyncio.wait_for(
            client.connect_and_get_server_endpoints(), self.config.request_timeout * 2
        )
        try:
            endpoint = Client.find_endpoint(endpoints, mode, policy.URI)
        except ua.UaError:
            offered = sorted(
                {
                    f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}"
                    for e in endpoints
                }
            )
            raise ConnectorError(
                f"{self.config.endpoint} offers no {sec.policy}/{sec.mode} endpoint "
                f"(offered: {', '.join(offered)})"
            ) from None
        der = _first_certificate(endpoint.ServerCertificate)
        await self._check_server_certificate(der)
        await client.set_security(
            policy, str(cert_path), str(key_path), server_certificate=der, mode=mode
        )

    async def _check_server_certificate(self, der: bytes) -> None:
        sec = self.config.security
        digest = hashlib.sha256(der).hexdigest()
        if sec.server_certificate_sha256 is not None:
            if digest != sec.server_certificate_sha256:
                raise ConnectorError(
                    f"server certificate of {self.config.endpoint} has sha256 {digest}, which "
                    f"does not match the pinned {sec.server_certificate_sha256}; refusing to "
                    "connect"
                )
            return
        assert sec.trust_dir is not None
        cert = x509.load_der_x509_certificate(der)
        if not await _trusted(cert, sec.trust_dir):
            raise ConnectorError(
                f"server certificate of {self.config.endpoint} (subject {cert.subject.rfc4514_string()},"
                f" sha256 {digest}) is not in the trust list {sec.trust_dir}; refusing to connect"
            )

    async def _run(self) -> None:
        client = await self._make_client()
        self._client = client
        try:
            try:
                await asyncio.wait_for(client.connect(), self.config.request_timeout * 3)
            except ua.UaStatusCodeError as exc:
                raise ConnectorError(f"{self.config.endpoint}: {exc}") from exc
            client.connection_lost_callback = self._on_connection_lost
            await self._resolve(client)
            if not self._points:
                raise ConnectorError(
                    "none of the configured nodes could be resolved: "
                    + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
                )
            if self.config.mode == "subscription":
                await self._subscribe(client)
            async with asyncio.TaskGroup() as tg:
                if self.config.mode == "polling":
                    tg.create_task(self._poll_loop(client))
                self._set_status(ConnectorState.CONNECTED)
                tg.create_task(self._watch_state(client))
        finally:
            self._client = None
            self._subscription = None
            await _teardown(client, self.config.request_timeout)

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _teardown(client, self.config.request_timeout)

    async def _on_connection_lost(self, exc: Exception) -> None:
        self._m_errors.inc()
        self._set_status(
            ConnectorState.RECONNECTING, error=f"connection lost: {type(exc).__name__}: {exc}"
        )

    async def _watch_state(self, client: Client) -> None:
        """Mirror asyncua's link state into ``status`` (the supervisor does the reconnecting)."""
        async with client.uaclient.subscribe_state() as states:
            while True:
                state = await states.next_change()
                if state is UaClientState.CONNECTED:
                    if self.status.state is not ConnectorState.CONNECTED:
                        self._m_reconnects.inc()
                    self._set_status(ConnectorState.CONNECTED)
                elif self.status.state is ConnectorState.CONNECTED:
                    self._m_connected.set(0)
                    self._set_status(ConnectorState.RECONNECTING, error=f"link {state.value}")

    # --- node resolution -----------------------------------------------------------------

    async def _resolve(self, client: Client) -> None:
        """Resolve every configured node; unresolvable ones are reported in ``skipped``."""
        c = self.config
        self._points.clear()
        self._by_tag.clear()
        self.skipped.clear()
        ns_array: list[str] = await client.get_namespace_array()

        def ns_index(key: int | str, where: str) -> int:
            if isinstance(key, int):
                return key
            uri = c.namespaces.get(key, key)
            if uri not in ns_array:
                raise LookupError(f"{where}: namespace {uri!r} is not on the server")
            return ns_array.index(uri)

        nodeids: dict[int, ua.NodeId] = {}
        paths: list[tuple[int, ua.RelativePath]] = []
        for i, n in enumerate(c.nodes):
            try:
                if n.node.startswith("nsu="):
                    uri, _, rest = n.node[4:].partition(";")
                    nid = ua.NodeId.from_string(rest)
                    nid = ua.NodeId(nid.Identifier, ns_index(uri, n.node), nid.NodeIdType)
                    nodeids[i] = nid
                elif n.node.startswith(_NODEID_PREFIXES):
                    nodeids[i] = ua.NodeId.from_string(n.node)
                else:
                    elements = []
                    for ns, name in parse_browse_path(n.node):
                        el = ua.RelativePathElement()
                        el.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
                        el.IsInverse = False
                        el.IncludeSubtypes = True
                        el.TargetName = ua.QualifiedName(name, ns_index(ns, n.node))
                        elements.append(el)
                    paths.append((i, ua.RelativePath(Elements=elements)))
            except LookupError as exc:
                self._skip(n, str(exc))
        if paths:
            bps = []
            for _, rp in paths:
                bp = ua.BrowsePath()
                bp.StartingNode = ua.NodeId(ua.ObjectIds.RootFolder)
                bp.RelativePath = rp
                bps.append(bp)
            results = await client.uaclient.translate_browsepaths_to_nodeids(bps)
            for (i, _), res in zip(paths, results, strict=True):
                if res.StatusCode.is_good() and res.Targets:
                    nodeids[i] = _plain(res.Targets[0].TargetId)
                else:
                    self._skip(c.nodes[i], f"browse path not found ({res.StatusCode.name})")
        if not nodeids:
            return
        order = sorted(nodeids)
        # One Read for NodeClass + DataType of every node, then one browse for EURanges.
        attrs = await _read_many(
            client,
            [
                (nodeids[i], attr)
                for i in order
                for attr in (ua.AttributeIds.NodeClass, ua.AttributeIds.DataType)
            ],
            c.max_nodes_per_read,
        )
        for k, i in enumerate(order):
            n = c.nodes[i]
            node_class, dtype = attrs[2 * k], attrs[2 * k + 1]
            if not node_class.StatusCode.is_good():
                self._skip(
                    n, f"node {nodeids[i].to_string()} not found ({node_class.StatusCode.name})"
                )
                continue
            if node_class.Value.Value != ua.NodeClass.Variable:
                self._skip(n, f"node {nodeids[i].to_string()} is not a Variable")
                continue
            deadband = n.deadband if n.deadband is not None else c.deadband
            point = _Point(
                handle=i + 1,
                cfg=n,
                nodeid=nodeids[i],
                sampling_interval=(
                    n.sampling_interval if n.sampling_interval is not None else c.sampling_interval
                ),
                queue_size=n.queue_size if n.queue_size is not None else c.queue_size,
                deadband_abs=deadband,
                datatype=dtype.Value.Value if dtype.StatusCode.is_good() else None,
            )
            self._points[point.handle] = point
        percent = [
            p
            for p in self._points.values()
            if (p.cfg.deadband_type or c.deadband_type) == "percent" and p.deadband_abs > 0
        ]
        if percent:
            ranges = await self._eu_ranges(client, [p.nodeid for p in percent])
            for p, rng in zip(percent, ranges, strict=True):
                if rng is None:
                    self._points.pop(p.handle)
                    self._skip(p.cfg, "percent deadband needs an EURange property; none found")
                else:
                    p.deadband_abs = p.deadband_abs / 100.0 * (rng.High - rng.Low)
        for p in self._points.values():
            self._by_tag.setdefault(p.cfg.tag, []).append(p)
            self._by_tag.setdefault(f"{p.cfg.asset}/{p.cfg.tag}", []).append(p)

    async def _eu_ranges(self, client: Client, nodeids: list[ua.NodeId]) -> list[ua.Range | None]:
        bps = []
        for nid in nodeids:
            el = ua.RelativePathElement()
            el.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasProperty)
            el.IsInverse = False
            el.IncludeSubtypes = True
            el.TargetName = ua.QualifiedName("EURange", 0)
            bp = ua.BrowsePath()
            bp.StartingNode = nid
            bp.RelativePath = ua.RelativePath(Elements=[el])
            bps.append(bp)
        results = await client.uaclient.translate_browsepaths_to_nodeids(bps)
        found = [
            (k, _plain(r.Targets[0].TargetId))
            for k, r in enumerate(results)
            if r.StatusCode.is_good() and r.Targets
        ]
        out: list[ua.Range | None] = [None] * len(nodeids)
        values = await _read_many(
            client,
            [(nid, ua.AttributeIds.Value) for _, nid in found],
            self.config.max_nodes_per_read,
        )
        for (k, _), dv in zip(found, values, strict=True):
            v = dv.Value.Value if dv.Value is not None else None
            if isinstance(v, ua.Range) and v.High > v.Low:
                out[k] = v
        return out

    def _skip(self, n: OpcUaNodeConfig, reason: str) -> None:
        key = f"{n.asset}/{n.tag} ({n.node})"
        self.skipped[key] = reason
        log.warning("opcua %s: skipping %s: %s", self.name, key, reason)
        self._malformed(f"{key}: {reason}")

    # --- delivery ------------------------------------------------------------------------

    def _to_reading(self, p: _Point, dv: ua.DataValue, now: int) -> Reading | None:
        sc = dv.StatusCode
        status = sc.value if sc is not None else 0
        quality = quality_of(status)
        try:
            value = variant_to_value(dv.Value.Value if dv.Value is not None else None)
        except Unrepresentable as exc:
            raw = dv.Value.Value if dv.Value is not None else None
            self._dead_letter(
                f"{p.cfg.node} ({p.cfg.asset}/{p.cfg.tag})",
                f"value={raw!r:.1500} status=0x{status:08X}".encode(),
                f"{p.cfg.asset}/{p.cfg.tag}: {exc}",
            )
            return None
        ts = _ts_ns(dv.SourceTimestamp) or _ts_ns(dv.ServerTimestamp) or now
        if ts != now and (problem := self.config.timestamps.problem(ts, now)) is not None:
            source = dv.SourceTimestamp if _ts_ns(dv.SourceTimestamp) else dv.ServerTimestamp
            self._dead_letter(
                f"{p.cfg.node} ({p.cfg.asset}/{p.cfg.tag})",
                f"value={value!r} status=0x{status:08X} timestamp={source}".encode(),
                problem,
            )
            return None
        if not _passes_deadband(p, value, quality):
            return None
        p.seen, p.last_value, p.last_quality = True, value, quality
        return Reading(p.cfg.asset, p.cfg.tag, ts, value, quality, status)

    def _on_datachange(self, items: Sequence[ua.MonitoredItemNotification]) -> None:
        now = time.time_ns()
        out: list[Reading] = []
        points = self._points
        for item in items:
            p = points.get(item.ClientHandle)
            if p is None:
                continue
            r = self._to_reading(p, item.Value, now)
            if r is not None:
                out.append(r)
        self._emit(out)

    def _on_status_change(self, notif: ua.StatusChangeNotification) -> None:
        self._m_errors.inc()
        log.warning("opcua %s: subscription status changed to %s", self.name, notif.Status)

    async def _subscribe(self, client: Client) -> None:
        c = self.config
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = c.publishing_interval
        keepalive = max(1, math.ceil(c.keepalive_interval * 1000 / c.publishing_interval))
        params.RequestedMaxKeepAliveCount = keepalive
        # Long enough that the server keeps the subscription through a short outage, so the
        # reconnect can transfer it (and republish what was missed) rather than recreate it.
        params.RequestedLifetimeCount = max(
            3 * keepalive, math.ceil(c.session_timeout * 1000 / c.publishing_interval)
        )
        params.MaxNotificationsPerPublish = 0  # no limit
        params.PublishingEnabled = True
        params.Priority = 0
        sub = _BatchSubscription(client.uaclient.session, params, handler=_NoHandler())
        sub.on_batch = self._on_datachange
        sub.on_status = self._on_status_change
        sub.set_overflow_disconnect_handler(client.uaclient.notify_transport_lost)
        await sub.init()
        # asyncua's supervisor restores (transfers or re-creates) the subscriptions it tracks.
        client._subscriptions.append(sub)
        self._subscription = sub
        requests = [self._monitored_item_request(p) for p in self._points.values()]
        results = await sub.create_monitored_items(requests)
        for p, res in zip(list(self._points.values()), results, strict=True):
            if isinstance(res, ua.StatusCode):
                self._points.pop(p.handle)
                self._skip(p.cfg, f"cannot monitor {p.nodeid.to_string()}: {res.name}")

    def _monitored_item_request(self, p: _Point) -> ua.MonitoredItemCreateRequest:
        rv = ua.ReadValueId()
        rv.NodeId = p.nodeid
        rv.AttributeId = ua.AttributeIds.Value
        mp = ua.MonitoringParameters()
        mp.ClientHandle = p.handle
        mp.SamplingInterval = p.sampling_interval
        mp.QueueSize = p.queue_size
        mp.DiscardOldest = True
        if p.deadband_abs > 0:
            flt = ua.DataChangeFilter()
            flt.Trigger = ua.DataChangeTrigger.StatusValue
            flt.DeadbandType = ua.DeadbandType.Absolute
            flt.DeadbandValue = p.deadband_abs
            mp.Filter = flt
        mir = ua.MonitoredItemCreateRequest()
        mir.ItemToMonitor = rv
        mir.MonitoringMode = ua.MonitoringMode.Reporting
        mir.RequestedParameters = mp
        return mir

    async def _poll_loop(self, client: Client) -> None:
        c = self.config
        points = list(self._points.values())
        wanted = [(p.nodeid, ua.AttributeIds.Value) for p in points]
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                values = await asyncio.wait_for(
                    _read_many(client, wanted, c.max_nodes_per_read), c.request_timeout * 2
                )
            except (ConnectionError, TimeoutError, ua.UaError) as exc:
                # The supervisor notices a dead link and reconnects; polling resumes after.
                self._m_errors.inc()
                log.debug("opcua %s: poll failed: %r", self.name, exc)
            else:
                now = time.time_ns()
                out = []
                for p, dv in zip(points, values, strict=True):
                    r = self._to_reading(p, dv, now)
                    if r is not None:
                        out.append(r)
                self._emit(out)
            next_at += c.poll_interval
            delay = next_at - loop.time()
            if delay < 0:  # overran: skip missed periods rather than burst
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    # --- actions -------------------------------------------------------------------------

    async def write(self, tag: str, value: Value) -> None:
        """Write ``value`` to the node mapped to ``tag`` (or ``asset/tag``), typed as the node.

        Raises :class:`WriteError` for an unknown, ambiguous or non-writable tag, a value that
        does not fit the node's DataType, no connection, or a refusal by the server.
        """
        outcome = "error"
        try:
            await self._write(tag, value)
            outcome = "ok"
        finally:
            self._m_writes(outcome)

    def _m_writes(self, outcome: str) -> None:
        WRITES.labels(self.name, self.kind, outcome).inc()

    async def _write(self, tag: str, value: Value) -> None:
        points = self._by_tag.get(tag)
        if not points:
            known = sorted({p.cfg.tag for p in self._points.values()})
            raise WriteError(f"{self.name}: unknown tag {tag!r} (known: {', '.join(known)})")
        if len(points) > 1:
            raise WriteError(f"{self.name}: tag {tag!r} is ambiguous; write 'asset/tag'")
        p = points[0]
        if not p.cfg.writable:
            raise WriteError(
                f"{self.name}: tag {tag!r} is not declared writable (set writable: true)"
            )
        client = self._client
        if client is None or self.status.state is not ConnectorState.CONNECTED:
            raise WriteError(f"{self.name}: not connected ({self.status.state.value})")
        vtype = await self._variant_type(client, p)
        converted = _convert(value, vtype, tag)
        wv = ua.WriteValue()
        wv.NodeId = p.nodeid
        wv.AttributeId = ua.AttributeIds.Value
        wv.Value = ua.DataValue(Value=ua.Variant(converted, vtype))
        params = ua.WriteParameters()
        params.NodesToWrite = [wv]
        try:
            results = await asyncio.wait_for(
                client.uaclient.write(params), self.config.request_timeout
            )
        except (ConnectionError, TimeoutError, ua.UaError) as exc:
            raise WriteError(f"{self.name}: write to {tag!r} failed: {exc!r}") from exc
        sc = results[0]
        if not sc.is_good():
            raise WriteError(
                f"{self.name}: server refused write of {value!r} to {tag!r} "
                f"({p.nodeid.to_string()}): {sc.name}"
            )

    async def _variant_type(self, client: Client, p: _Point) -> ua.VariantType:
        if p.variant_type is not None:
            return p.variant_type
        if p.datatype is None:
            raise WriteError(f"{self.name}: DataType of {p.cfg.tag!r} is unknown")
        vt = self._variant_types.get(p.datatype)
        if vt is None:
            try:
                vt = await data_type_to_variant_type(client.get_node(p.datatype))
            except Exception as exc:
                raise WriteError(
                    f"{self.name}: cannot determine the type of {p.cfg.tag!r}: {exc!r}"
                ) from exc
            self._variant_types[p.datatype] = vt
        p.variant_type = vt
        return vt


class _NoHandler:
    """Placeholder so asyncua selects callback mode; batches go through ``on_batch``."""


_INT_RANGES = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}


def _convert(value: Value, vtype: ua.VariantType, tag: str) -> Any:
    """Convert ``value`` to the Python type asyncua encodes as ``vtype``, or raise WriteError."""

    def refuse(why: str) -> WriteError:
        return WriteError(f"cannot write {value!r} to {tag!r} ({vtype.name}): {why}")

    if vtype is ua.VariantType.Boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise refuse("expected a boolean")
    if vtype in _INT_RANGES:
        if isinstance(value, bool):
            raise refuse("expected an integer, got a boolean")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise refuse("expected an integer")
        lo, hi = _INT_RANGES[vtype]
        if not lo <= value <= hi:
            raise refuse(f"out of range {lo}..{hi}")
        return value
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise refuse("expected a number")
        return float(value)
    if vtype is ua.VariantType.String:
        if not isinstance(value, str):
            raise refuse("expected a string")
        return value
    raise refuse("this data type is not writable through the connector")


def _plain(target: ua.NodeId) -> ua.NodeId:
    """A browse target (an ExpandedNodeId) as a plain NodeId."""
    return ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)


def _first_certificate(der: bytes) -> bytes:
    """The leading certificate of a possibly chained DER blob."""
    length = int.from_bytes(der[2:4], "big") + 4
    return der[:length]


async def _trusted(cert: x509.Certificate, trust_dir: Path) -> bool:
    der = cert.public_bytes(Encoding.DER)
    exact: list[x509.Certificate] = []
    for path in sorted(trust_dir.glob("*")):  # noqa: ASYNC240 - a small local directory
        if path.suffix.lower() in (".der", ".pem", ".crt", ".cer"):
            with contextlib.suppress(Exception):
                exact.append(await uacrypto.load_certificate(path))
    if any(c.public_bytes(Encoding.DER) == der for c in exact):
        return True
    if not exact:
        return False
    # Not listed itself: accept it when a listed CA issued it (chain verification).
    store = TrustStore([trust_dir], [])
    await store.load()
    truststore_log = logging.getLogger("asyncua.crypto.truststore")
    truststore_log.disabled = True  # it logs a full traceback for every untrusted certificate
    try:
        return store.validate(cert)
    except ValueError:
        return False
    finally:
        truststore_log.disabled = False


async def _read_many(
    client: Client, items: Iterable[tuple[ua.NodeId, ua.AttributeIds]], per_request: int
) -> list[ua.DataValue]:
    """Read attributes in as few Read requests as ``per_request`` allows, in order."""
    rvs = []
    for nid, attr in items:
        rv = ua.ReadValueId()
        rv.NodeId = nid
        rv.AttributeId = attr
        rvs.append(rv)
    out: list[ua.DataValue] = []
    for start in range(0, len(rvs), per_request):
        params = ua.ReadParameters()
        params.NodesToRead = rvs[start : start + per_request]
        params.TimestampsToReturn = ua.TimestampsToReturn.Both
        out.extend(await client.uaclient.read(params))
    return out


async def _teardown(client: Client, timeout: float) -> None:  # noqa: ASYNC109
    """Close the session politely when the link is up; always stop every task and the socket."""
    polite = client.uaclient.state is UaClientState.CONNECTED
    client.uaclient.request_disconnect()  # the supervisor loops exit instead of reconnecting
    if polite:
        try:
            await asyncio.wait_for(client.disconnect(), timeout)
        except (TimeoutError, OSError, ua.UaError, ConnectionError) as exc:
            log.debug("opcua disconnect: %r", exc)
    tasks = (
        client._supervisor_task,
        client._stale_watchdog_task,
        client._renew_channel_task,
        client.uaclient.session._publish_task,
    )
    for task in tasks:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    client.disconnect_socket()
