"""OPC UA conformance harness, plus the real asyncua test server and a blackhole TCP proxy.

``OpcUaTestServer`` is a plain asyncua server on a free loopback port with a small machine
(``Objects/Line1/M1``) holding variables of several types, an EURange, writable and read-only
nodes, and a ticker that changes values every 50 ms. The OPC UA integration tests reuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgeloop.services import free_port
from protocols.base import BackoffConfig
from protocols.opcua import OpcUaConfig, OpcUaConnector, OpcUaNodeConfig

NS_URI = "urn:edgeloop:test"

for _name in ("asyncua", "asyncua.server", "asyncua.client"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


class _Users(UserManager):
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username is None:
            return None  # anonymous refused when users are configured
        if self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


class OpcUaTestServer:
    """A real asyncua server; ``start``/``stop`` may be called repeatedly on the same port."""

    def __init__(
        self,
        port: int | None = None,
        *,
        secure: bool = False,
        users: dict[str, str] | None = None,
        pki_dir: Path | None = None,
        tick: float = 0.05,
    ) -> None:
        self.port = port or free_port()
        self.secure = secure
        self.users = users
        self.tick = tick
        self._own_pki = pki_dir is None
        self.pki_dir = pki_dir or Path(tempfile.mkdtemp(prefix="opcua-srv-"))
        self.server: Server | None = None
        self.nodes: dict[str, Any] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.ticks = 0
        self.certificate_der: bytes | None = None

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/edgeloop/"

    async def _ensure_certificate(self) -> tuple[Path, Path]:
        cert = self.pki_dir / "server-cert.der"
        key = self.pki_dir / "server-key.pem"
        await cert_gen.setup_self_signed_certificate(
            key,
            cert,
            "urn:edgeloop:test-server",
            "localhost",
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            {},
        )
        self.certificate_der = cert.read_bytes()
        return cert, key

    async def start(self) -> OpcUaTestServer:
        if self.server is not None:
            return self
        server = Server(user_manager=_Users(self.users) if self.users else None)
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name("edgeloop test server")
        await server.set_application_uri("urn:edgeloop:test-server")
        if self.secure:
            cert, key = await self._ensure_certificate()
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
            server.set_security_policy(
                [
                    ua.SecurityPolicyType.NoSecurity,
                    ua.SecurityPolicyType.Basic256Sha256_Sign,
                    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                ]
            )
        if self.users:
            server.set_security_IDs(["Username"])
        idx = await server.register_namespace(NS_URI)
        line = await server.nodes.objects.add_folder(idx, "Line1")
        m1 = await line.add_object(idx, "M1")
        n: dict[str, Any] = {}
        n["Temperature"] = await m1.add_variable(
            ua.NodeId("Line1.M1.Temperature", idx), ua.QualifiedName("Temperature", idx), 20.0
        )
        await n["Temperature"].add_property(
            0, "EURange", ua.Variant(ua.Range(0.0, 200.0), ua.VariantType.ExtensionObject)
        )
        eu = ua.EUInformation(
            NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
            UnitId=4408652,
            DisplayName=ua.LocalizedText("°C"),
            Description=ua.LocalizedText("degree Celsius"),
        )
        await n["Temperature"].add_property(
            0, "EngineeringUnits", ua.Variant(eu, ua.VariantType.ExtensionObject)
        )
        n["Counter"] = await m1.add_variable(
            ua.NodeId(1000, idx), ua.QualifiedName("Counter", idx), 0, ua.VariantType.UInt32
        )
        n["Running"] = await m1.add_variable(idx, "Running", True)
        n["Name"] = await m1.add_variable(idx, "Name", "press-1")
        n["Speed"] = await m1.add_variable(idx, "Speed", 0, ua.VariantType.Int32)
        await n["Speed"].set_writable()
        n["Setpoint"] = await m1.add_variable(idx, "Setpoint", 50.0)
        await n["Setpoint"].set_writable()
        n["Locked"] = await m1.add_variable(idx, "Locked", 1.5)  # read-only
        n["Level"] = await m1.add_variable(idx, "Level", 0.0)  # moved by tests (deadbands)
        await n["Level"].add_property(
            0, "EURange", ua.Variant(ua.Range(0.0, 1000.0), ua.VariantType.ExtensionObject)
        )
        n["Blob"] = await m1.add_variable(
            ua.NodeId("Line1.M1.Blob", idx),
            ua.QualifiedName("Blob", idx),
            ua.Variant(None, ua.VariantType.Null),  # empty until a test stores raw bytes
            datatype=ua.NodeId(ua.ObjectIds.ByteString),
        )
        self.nodes = n
        self.ns = idx
        await server.start()
        self.server = server
        self._ticker = asyncio.create_task(self._tick(), name="opcua-test-ticker")
        return self

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.ticks += 1
            await self.nodes["Temperature"].write_value(20.0 + (self.ticks % 100) / 10)
            await self.nodes["Counter"].write_value(ua.Variant(self.ticks, ua.VariantType.UInt32))

    async def stop(self) -> None:
        task, self._ticker = self._ticker, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server, self.server = self.server, None
        if server is not None:
            await server.stop()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def set_raw(self, name: str, value: ua.DataValue) -> None:
        """Store a value bypassing the server's type check (what a misbehaving device does)."""
        assert self.server is not None
        status = await self.server.iserver.aspace.write_attribute_value(
            self.nodes[name].nodeid, ua.AttributeIds.Value, value
        )
        status.check()

    def subscription_count(self) -> int:
        assert self.server is not None
        return len(self.server.iserver.subscription_service.subscriptions)

    def session_count(self) -> int:
        assert self.server is not None
        return len(self.server.iserver._external_sessions)

    async def close(self) -> None:
        await self.stop()
        if self._own_pki:
            shutil.rmtree(self.pki_dir, ignore_errors=True)


class BlackholeProxy:
    """A TCP relay that can silently stop carrying bytes without closing anything.

    While ``blackholed``, bytes in both directions are dropped and closes are held back, as a
    pulled cable or a dead NAT entry would do. ``restore()`` resumes forwarding.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.blackholed = False
        self._restored = asyncio.Event()
        self._restored.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "/edgeloop/") -> str:
        return f"opc.tcp://127.0.0.1:{self.port}{path}"

    def blackhole(self) -> None:
        self.blackholed = True
        self._restored.clear()

    def restore(self) -> None:
        self.blackholed = False
        self._restored.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self.blackholed:
                    continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            await self._restored.wait()
            dst.close()
            with contextlib.suppress(Exception):
                await dst.wait_closed()
            self._writers.discard(dst)

    async def close(self) -> None:
        self.restore()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for w in list(self._writers):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
        self._writers.clear()


def fast_backoff() -> BackoffConfig:
    return BackoffConfig(initial=0.05, factor=2.0, max=0.5, jitter=0.1)


class OpcUaHarness:
    kind = "opcua"

    def __init__(self) -> None:
        self.server: OpcUaTestServer | None = None

    async def start_server(self) -> None:
        self.server = await OpcUaTestServer().start()

    async def stop_server(self) -> None:
        assert self.server is not None
        await self.server.stop()

    async def restart_server(self) -> None:
        assert self.server is not None
        await self.server.start()

    def config(self) -> OpcUaConfig:
        assert self.server is not None
        return OpcUaConfig(
            name="opcua-conformance",
            endpoint=self.server.url,
            namespaces={"t": NS_URI},
            nodes=[
                OpcUaNodeConfig(
                    node="0:Objects/t:Line1/t:M1/t:Temperature", asset="m1", tag="temperature"
                ),
                OpcUaNodeConfig(node=f"nsu={NS_URI};i=1000", asset="m1", tag="counter"),
                OpcUaNodeConfig(node="0:Objects/t:Line1/t:M1/t:Running", asset="m1", tag="running"),
                OpcUaNodeConfig(node=f"nsu={NS_URI};s=Line1.M1.Blob", asset="m1", tag="blob"),
            ],
            sampling_interval=50,
            publishing_interval=50,
            keepalive_interval=0.5,
            request_timeout=2.0,
            backoff=fast_backoff(),
        )

    def connector(self, config: Any) -> OpcUaConnector:
        return OpcUaConnector(config)

    def expected_tags(self) -> set[tuple[str, str]]:
        return {("m1", "temperature"), ("m1", "counter"), ("m1", "running"), ("m1", "blob")}

    async def inject_malformed(self) -> None:
        assert self.server is not None
        # A ByteString cannot be carried by a Reading: counted as malformed, never fatal.
        await self.server.set_raw(
            "Blob", ua.DataValue(ua.Variant(b"\x00\xffraw", ua.VariantType.ByteString))
        )

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


def make_harness() -> OpcUaHarness:
    return OpcUaHarness()


def certificate_sha256(der: bytes) -> str:
    import hashlib

    return hashlib.sha256(der).hexdigest()


def pem_of(der: bytes) -> bytes:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
