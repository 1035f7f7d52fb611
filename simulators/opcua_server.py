"""OPC UA server of the simulator (asyncua): Objects/<line>/<asset>/<tag>.

Every update writes all analog values straight into asyncua's address space (one
``write_attribute_value`` per node, no service-layer round trip), with the scenario's source
timestamp and a status code (``BadSensorFailure`` in a dropout, ``BadNoCommunication`` on every
tag of an offline machine). Discrete tags are written only when they change. ``alarm_lamp`` and
``stop_request`` are writable; a client's write reaches the scenario.

Security: ``None`` and/or ``Basic256Sha256`` Sign / SignAndEncrypt with a self-signed certificate
generated on first start (application URI ``urn:edgeloop:simulator:server``); username/password
users.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncua import ua as _ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import NodeData
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from simulators.config import OpcUaServerConfig
from simulators.scenario import FLOAT_TAGS, INT_TAGS, Snapshot, TagStatus, aux_tag_names

__all__ = ["APPLICATION_URI", "OpcUaSimServer", "ensure_certificate"]

log = logging.getLogger(__name__)

# asyncua's generated ua types are too loosely annotated for mypy --strict (NodeId wants
# "String | Int32", timestamps want "DateTime"); checked at runtime by asyncua itself.
ua: Any = _ua

APPLICATION_URI = "urn:edgeloop:simulator:server"

# UNECE codes (OPC UA Part 8, EUInformation.UnitId), namespace http://www.opcfoundation.org/UA/units/un/cefact
_UNECE = {
    "rpm": ("RPM", "revolutions per minute", "r/min"),
    "mm/min": ("H81", "millimetre per minute", "mm/min"),
    "degC": ("CEL", "degree Celsius", "°C"),
    "mm/s": ("C16", "millimetre per second", "mm/s"),
    "kW": ("KWT", "kilowatt", "kW"),
    "kWh": ("KWH", "kilowatt hour", "kW·h"),
}
_STATUS = {
    TagStatus.GOOD: ua.StatusCode(ua.StatusCodes.Good),
    TagStatus.SENSOR_FAILURE: ua.StatusCode(ua.StatusCodes.BadSensorFailure),
    TagStatus.OFFLINE: ua.StatusCode(ua.StatusCodes.BadNoCommunication),
}
_VT = {
    "float": ua.VariantType.Double,
    "state": ua.VariantType.Int32,
    "part_counter": ua.VariantType.UInt32,
    "tool_changes": ua.VariantType.UInt32,
    "part_id": ua.VariantType.String,
    "bool": ua.VariantType.Boolean,
}

CommandSink = Callable[[str, str, bool], None]


def _unece_code(code: str) -> int:
    out = 0
    for ch in code:
        out = (out << 8) | ord(ch)
    return out


def _eu(unit: str) -> ua.EUInformation:
    code, name, symbol = _UNECE[unit]
    return ua.EUInformation(
        NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
        UnitId=_unece_code(code),
        DisplayName=ua.LocalizedText(symbol),
        Description=ua.LocalizedText(name),
    )


def ensure_certificate(cert_dir: Path, host: str) -> tuple[Path, Path]:
    """A self-signed server certificate (DER) and key (PEM) in ``cert_dir``, generated if absent.

    The certificate carries the application URI in its subjectAltName, as OPC UA requires."""
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )

    cert_dir.mkdir(parents=True, exist_ok=True)
    cert, key = cert_dir / "server-cert.der", cert_dir / "server-key.pem"
    if cert.is_file() and key.is_file():
        return cert, key
    private = generate_private_key()
    names = [
        x509.UniformResourceIdentifier(APPLICATION_URI),
        x509.DNSName(host),
        x509.DNSName(socket.gethostname()),
    ]
    certificate = generate_self_signed_app_certificate(
        private,
        "edgeloop simulator",
        {"organizationName": "edgeloop"},
        names,
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=3650,
    )
    key.write_bytes(dump_private_key_as_pem(private))
    key.chmod(0o600)
    cert.write_bytes(certificate.public_bytes(Encoding.DER))
    return cert, key


class _Users(UserManager):
    def __init__(self, users: dict[str, str], allow_anonymous: bool) -> None:
        self.users = users
        self.allow_anonymous = allow_anonymous

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is None:
            # asyncua's default ruleset lets the Anonymous role do nothing at all; an allowed
            # anonymous session may read and write like a user
            return User(role=UserRole.User, name="anonymous") if self.allow_anonymous else None
        if username in self.users and self.users[username] == password:
            return User(role=UserRole.User, name=username)
        return None


class OpcUaSimServer:
    """Serves scenario snapshots over OPC UA. Async context manager; ``stop`` is idempotent."""

    def __init__(
        self,
        config: OpcUaServerConfig,
        line: str,
        assets: list[str],
        extra_tags: int = 0,
        on_command: CommandSink | None = None,
    ) -> None:
        self.config = config
        self.line = line
        self.assets = assets
        self.extra_tags = extra_tags
        self.on_command = on_command
        self.port = config.port
        self.ns = 0
        self._server: Server | None = None
        self._started = False
        self._float_ids: list[list[ua.NodeId]] = []  # [tag row][machine]
        self._aux_ids: list[list[ua.NodeId]] = []
        self._disc_ids: dict[str, list[ua.NodeId]] = {}
        self._last: dict[ua.NodeId, Any] = {}
        self.updates = 0

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.config.host}:{self.port}"

    def node_id(self, asset: str, tag: str) -> str:
        return f"ns={self.ns};s={self.line}.{asset}.{tag}"

    async def start(self) -> None:
        if self._started:
            return
        cfg = self.config
        if self.port == 0:
            with socket.socket() as s:
                s.bind((cfg.host, 0))
                self.port = int(s.getsockname()[1])
        users = _Users({u.username: u.password for u in cfg.users}, cfg.allow_anonymous)
        server = Server(user_manager=users)
        await server.init()
        server.set_endpoint(f"opc.tcp://{cfg.host}:{self.port}")
        server.set_server_name("edgeloop factory simulator")
        await server.set_application_uri(APPLICATION_URI)
        policies = []
        for mode in cfg.security:
            policies.append(
                {
                    "None": ua.SecurityPolicyType.NoSecurity,
                    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
                    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                }[mode]
            )
        server.set_security_policy(policies)
        tokens: list[type] = [ua.UserNameIdentityToken] if cfg.users else []
        if cfg.allow_anonymous:
            tokens.insert(0, ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        if any(m != "None" for m in cfg.security):
            cert_dir = Path(cfg.cert_dir) if cfg.cert_dir else Path.home() / ".edgeloop" / "sim-pki"
            cert, key = ensure_certificate(cert_dir, cfg.host)
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
        self.ns = await server.register_namespace(cfg.namespace)
        await self._build(server)
        await server.start()
        self._server = server
        self._started = True

    async def _build(self, server: Server) -> None:
        ns = self.ns
        line = await server.nodes.objects.add_object(
            ua.NodeId(self.line, ns), ua.QualifiedName(self.line, ns)
        )
        self._float_ids = [[] for _ in FLOAT_TAGS]
        self._aux_ids = [[] for _ in range(self.extra_tags)]
        aux_names = aux_tag_names(self.extra_tags)
        for asset in self.assets:
            obj = await line.add_object(
                ua.NodeId(f"{self.line}.{asset}", ns), ua.QualifiedName(asset, ns)
            )

            async def var(
                tag: str,
                vt: ua.VariantType,
                initial: Any,
                description: str,
                _obj: Any = obj,
                _a: str = asset,
            ) -> Any:
                node = await _obj.add_variable(
                    ua.NodeId(f"{self.line}.{_a}.{tag}", ns),
                    ua.QualifiedName(tag, ns),
                    ua.Variant(initial, vt),
                )
                await node.write_attribute(
                    ua.AttributeIds.Description,
                    ua.DataValue(ua.Variant(ua.LocalizedText(description))),
                )
                return node

            for row, spec in enumerate(FLOAT_TAGS):
                node = await var(spec.name, ua.VariantType.Double, 0.0, spec.description)
                await node.add_property(
                    ua.NodeId(f"{self.line}.{asset}.{spec.name}.EngineeringUnits", ns),
                    ua.QualifiedName("EngineeringUnits", 0),
                    _eu(spec.unit),
                )
                self._float_ids[row].append(node.nodeid)
            for spec in INT_TAGS:
                node = await var(spec.name, _VT[spec.name], 0, spec.description)
                self._disc_ids.setdefault(spec.name, []).append(node.nodeid)
            node = await var(
                "part_id",
                ua.VariantType.String,
                "",
                "id of the last finished part: '<asset>-<part_counter>'",
            )
            self._disc_ids.setdefault("part_id", []).append(node.nodeid)
            for name, desc in (
                ("alarm_lamp", "alarm lamp (writable)"),
                ("stop_request", "true stops the machine until cleared (writable)"),
            ):
                node = await var(name, ua.VariantType.Boolean, False, desc)
                await node.set_writable(True)
                self._disc_ids.setdefault(name, []).append(node.nodeid)
                server.set_attribute_value_setter(node.nodeid, self._command_setter(asset, name))
            for k, name in enumerate(aux_names):
                node = await var(name, ua.VariantType.Double, 0.0, "filler signal for scale tests")
                self._aux_ids[k].append(node.nodeid)

    def _command_setter(
        self, asset: str, command: str
    ) -> Callable[[NodeData, ua.AttributeIds, ua.DataValue], None]:
        def setter(node: NodeData, attr: ua.AttributeIds, value: ua.DataValue) -> None:
            node.attributes[attr].value = value
            v = value.Value.Value if value.Value is not None else None
            if isinstance(v, bool) and self.on_command is not None:
                self.on_command(asset, command, v)

        return setter

    async def stop(self) -> None:
        server, self._server = self._server, None
        self._started = False
        if server is not None:
            await server.stop()

    async def __aenter__(self) -> OpcUaSimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def update(self, snap: Snapshot) -> int:
        """Write a snapshot into the address space; returns how many nodes were written."""
        server = self._server
        if server is None:
            return 0
        aspace = server.iserver.aspace
        write = aspace.write_attribute_value
        value_attr = ua.AttributeIds.Value
        ts = dt.datetime.fromtimestamp(snap.ts_ns / 1e9, dt.UTC).replace(tzinfo=None)
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        n = 0
        good = _STATUS[TagStatus.GOOD]
        offline_status = _STATUS[TagStatus.OFFLINE]
        floats = snap.floats.tolist()
        status = snap.status.tolist()
        offline = snap.offline.tolist()
        double = ua.VariantType.Double
        for row, ids in enumerate(self._float_ids):
            vals, st = floats[row], status[row]
            for m, nodeid in enumerate(ids):
                if offline[m]:
                    sc = offline_status
                else:
                    sc = good if st[m] == 0 else _STATUS[TagStatus(st[m])]
                await write(
                    nodeid,
                    value_attr,
                    ua.DataValue(
                        ua.Variant(vals[m], double), sc, SourceTimestamp=ts, ServerTimestamp=now
                    ),
                )
                n += 1
        if self._aux_ids:
            aux = snap.aux.tolist()
            for k, ids in enumerate(self._aux_ids):
                for m, nodeid in enumerate(ids):
                    await write(
                        nodeid,
                        value_attr,
                        ua.DataValue(
                            ua.Variant(aux[k][m], double),
                            offline_status if offline[m] else good,
                            SourceTimestamp=ts,
                            ServerTimestamp=now,
                        ),
                    )
                    n += 1
        disc: dict[str, list[Any]] = {
            "state": snap.ints[0].tolist(),
            "part_counter": snap.ints[1].tolist(),
            "tool_changes": snap.ints[2].tolist(),
            "part_id": snap.part_ids,
            "alarm_lamp": snap.alarm_lamp,
            "stop_request": snap.stop_request,
        }
        for name, ids in self._disc_ids.items():
            vt = _VT.get(name, _VT["bool"])
            for m, nodeid in enumerate(ids):
                key = (offline[m], disc[name][m])
                if self._last.get(nodeid) == key:
                    continue
                self._last[nodeid] = key
                await write(
                    nodeid,
                    value_attr,
                    ua.DataValue(
                        ua.Variant(disc[name][m], vt),
                        offline_status
                        if offline[m] and name not in ("alarm_lamp", "stop_request")
                        else good,
                        SourceTimestamp=ts,
                        ServerTimestamp=now,
                    ),
                )
                n += 1
        self.updates += 1
        return n
