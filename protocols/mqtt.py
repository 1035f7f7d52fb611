"""MQTT connector (paho-mqtt 2.x driven by the asyncio event loop, no network thread).

Data flow: broker -> paho ``loop_read`` (called from an ``add_reader`` callback, draining every
complete packet the socket holds) -> ``on_message`` routes the topic to a subscription (a cached
topic -> (asset, tag) lookup), parses the payload and appends readings to a pending batch -> one
``call_soon`` flush per event-loop iteration hands the whole batch to the sink -> the QoS 1/2
messages of that batch are acknowledged (paho ``manual_ack``) once the sink reports them durable:
under the agent (an acking sink, see :mod:`protocols.base`) that is after the outbox transaction
holding them committed, so a crash before the commit leaves them unacknowledged and the broker
redelivers them.

Delivery guarantee: QoS 1 subscriptions are at-least-once into the sink, across broker restarts,
connection losses and agent restarts (persistent session: ``clean_session=False`` on 3.1.1, a
session expiry interval on 5; the PUBACK is sent only after the readings are durable: the agent's
outbox commit, or the return of a plain sink). A message can be handed to the sink twice when the
link drops (or the process dies) between the commit and the PUBACK, and when the agent refuses a
batch (queue full): the connector then drops the connection so the broker redelivers. QoS 2 is
exactly-once while the process lives; paho keeps the QoS 2 receive state in memory, so a crash
between PUBREC and PUBREL loses that message (use QoS 1 when the agent may crash). QoS 0 is
at-most-once.

Reconnects use the base class's :class:`~protocols.base.Backoff` (``config.backoff``: 0.1 s
doubling to 30 s with 10 % jitter by default); paho's own reconnect machinery is not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import Field, SecretStr, field_validator, model_validator

from protocols.base import (
    Connector,
    ConnectorConfig,
    ConnectorError,
    ConnectorState,
    DeadLetter,
    DeadLetterConfig,
    WriteError,
)
from protocols.mqtt_payload import (
    JsonParser,
    NameTemplate,
    NumberParser,
    PayloadError,
    Sample,
    TemplateError,
    TextParser,
    TimestampFormat,
    TopicTemplate,
    ValueType,
    compile_selector,
)
from shared.config import ConfigModel
from shared.records import Reading, Value

__all__ = [
    "CommandConfig",
    "DeadLetter",
    "DeadLetterConfig",
    "JsonPayload",
    "MqttConfig",
    "MqttConnector",
    "MqttLink",
    "NumberPayload",
    "PahoClient",
    "Subscription",
    "TextPayload",
    "TlsConfig",
    "parse_broker_url",
]

log = logging.getLogger(__name__)

QoS = Literal[0, 1, 2]


# --- configuration --------------------------------------------------------------------------


class NumberPayload(ConfigModel):
    """The payload is a bare number or boolean (``21.5``, ``7``, ``true``)."""

    format: Literal["number"] = "number"


class TextPayload(ConfigModel):
    """The payload is one UTF-8 string value (a machine state, a recipe name)."""

    format: Literal["text"] = "text"


class JsonPayload(ConfigModel):
    """JSON with JMESPath selectors; exactly one of ``value``, ``fields``, ``expand``."""

    format: Literal["json"] = "json"
    value: str | None = Field(
        None, description="Selector of the one value, e.g. 'v' or 'data.temp'"
    )
    fields: dict[str, str] | None = Field(
        None, description="Name -> selector: one reading per field ({field} in the tag template)"
    )
    expand: str | None = Field(
        None, description="Selector of an object whose scalar members each become a reading"
    )
    timestamp: str | None = Field(None, description="Selector of the source timestamp")
    timestamp_format: TimestampFormat = "auto"
    timestamp_required: bool = Field(
        True, description="A message whose timestamp selector finds nothing is malformed"
    )
    quality: str | None = Field(None, description="Selector of a quality / status code")
    value_type: ValueType = "auto"

    @model_validator(mode="after")
    def _check(self) -> Self:
        given = [n for n in ("value", "fields", "expand") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of value, fields or expand"
                + (f" (got {', '.join(given)})" if given else "")
            )
        for name in ("value", "expand", "timestamp", "quality"):
            expr = getattr(self, name)
            if expr is not None:
                compile_selector(expr)
        if self.fields is not None:
            if not self.fields:
                raise ValueError("fields: give at least one name: selector")
            for expr in self.fields.values():
                compile_selector(expr)
        return self

    def parser(self) -> JsonParser:
        return JsonParser(
            value=self.value,
            fields=self.fields,
            expand=self.expand,
            timestamp=self.timestamp,
            timestamp_format=self.timestamp_format,
            timestamp_required=self.timestamp_required,
            quality=self.quality,
            value_type=self.value_type,
        )


Payload = Annotated[NumberPayload | TextPayload | JsonPayload, Field(discriminator="format")]


class Subscription(ConfigModel):
    """One topic template mapped to asset and tag names.

    ``topic`` captures levels (``plant/{line}/{asset}/{tag}``); the MQTT filter subscribed to
    is derived (``plant/+/+/+``). ``asset`` and ``tag`` are name templates over the captured
    fields; with a multi-value JSON payload the tag template may use ``{field}`` (the default
    tag is then ``{field}``, else ``{tag}``).
    """

    topic: str
    qos: QoS = 1
    asset: str = "{asset}"
    tag: str | None = None
    payload: Payload = Field(default_factory=NumberPayload)

    @model_validator(mode="after")
    def _check(self) -> Self:
        try:
            tt = TopicTemplate(self.topic)
            asset = NameTemplate(self.asset)
            tag = NameTemplate(self.tag_template)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        multi = isinstance(self.payload, JsonPayload) and self.payload.value is None
        known = set(tt.fields)
        for what, tmpl in (("asset", asset), ("tag", tag)):
            allowed = known | ({"field"} if multi and what == "tag" else set())
            unknown = [f for f in tmpl.fields if f not in allowed]
            if unknown:
                raise ValueError(
                    f"{what} template {tmpl.template!r} uses {{{unknown[0]}}}, which the topic "
                    f"template {self.topic!r} does not capture (it captures: "
                    f"{', '.join(sorted(allowed)) or 'nothing'})"
                )
        if multi and "field" not in tag.fields:
            raise ValueError(
                f"tag template {tag.template!r} must use {{field}}: the payload yields several "
                "values per message and each needs its own tag"
            )
        return self

    @property
    def tag_template(self) -> str:
        if self.tag is not None:
            return self.tag
        multi = isinstance(self.payload, JsonPayload) and self.payload.value is None
        return "{field}" if multi else "{tag}"


class TlsConfig(ConfigModel):
    """TLS towards the broker; on by default for ``mqtts://``. The server is always verified
    against ``ca_file`` (or the system trust store) unless ``insecure`` is set."""

    enabled: bool | None = Field(None, description="Default: true for mqtts://, false for mqtt://")
    ca_file: Path | None = None
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS)")
    key_file: Path | None = None
    key_password: SecretStr | None = None
    insecure: bool = Field(False, description="Skip hostname verification (not chain checks)")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None) and self.cert_file is None:
            raise ValueError("key_file given without cert_file")
        return self


class CommandConfig(ConfigModel):
    """How ``write(tag, value)`` publishes: a topic template such as
    ``plant/{line}/{asset}/{tag}/set``. Fields come from ``fields`` (static), the tag, and the
    topic fields captured from the latest reading of that tag."""

    topic: str
    qos: QoS = 1
    retain: bool = False
    payload: Literal["number", "json"] = Field(
        "number", description="number: the bare value; json: {'value': v, 'ts': epoch ms}"
    )
    fields: dict[str, str] = Field(default_factory=dict)
    tags: list[str] | None = Field(None, description="Writable tags (default: any)")
    timeout: float = Field(10.0, gt=0, description="Seconds to wait for the broker's ack")

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        try:
            tt = TopicTemplate(v)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        if "+" in v.split("/") or "#" in v.split("/"):
            raise ValueError(f"{v!r}: a command topic cannot hold wildcards")
        _ = tt
        return v


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` -> (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"{url!r}: expected mqtt://host:port or mqtts://host:port")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    if parts.username or parts.password:
        raise ValueError(f"{url!r}: put credentials in username/password, not in the URL")
    return parts.hostname, port, tls


class MqttConfig(ConnectorConfig):
    kind: Literal["mqtt"] = "mqtt"
    url: str = Field(..., description="mqtt://host:1883 or mqtts://host:8883")
    protocol: Literal["3.1.1", "5"] = "5"
    client_id: str | None = Field(
        None,
        description="Stable id the persistent session is keyed on (default edgeloop-<host>-<name>)",
    )
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig = Field(default_factory=TlsConfig)
    keepalive: int = Field(30, ge=5, le=65535)
    connect_timeout: float = Field(10.0, gt=0)
    persistent_session: bool = Field(
        True, description="Keep the session (subscriptions, queued QoS>0 messages) across links"
    )
    session_expiry: int = Field(
        86400, ge=0, description="MQTT 5: seconds the broker keeps the session after a disconnect"
    )
    receive_maximum: int = Field(
        1000, ge=1, le=65535, description="MQTT 5: QoS>0 messages in flight towards us"
    )
    subscriptions: list[Subscription] = Field(..., min_length=1)
    commands: CommandConfig | None = None
    max_batch: int = Field(5000, ge=1, description="Flush to the sink at this many readings")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_broker_url(v)
        return v

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"edgeloop-{socket.gethostname()}-{self.name}"


# --- the paho link on the asyncio loop ------------------------------------------------------


class MqttLink:
    """One paho client whose socket is serviced by the running asyncio loop.

    ``connect()`` opens the TCP/TLS connection in a worker thread (it blocks), then every read,
    write and keep-alive runs on the loop: no network thread and no locks around callbacks.
    The same paho client is reused across reconnects so in-flight QoS state survives.
    ``lost`` resolves (with a reason) when the connection ends.
    """

    #: how many packets one readable event may process before yielding to the loop
    MAX_PACKETS_PER_WAKEUP = 512

    def __init__(self, client: mqtt.Client, *, connect_timeout: float) -> None:
        self.client = client
        self.connect_timeout = connect_timeout
        self.received = 0  # on_message calls (drain progress)
        self.on_message: Callable[[mqtt.MQTTMessage], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id = 0
        self._sock: Any = None
        self._misc: asyncio.Task[None] | None = None
        self._connack: asyncio.Future[tuple[ReasonCode, bool]] | None = None
        self.lost: asyncio.Future[str] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.session_present = False
        client.connect_timeout = connect_timeout
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message

    @property
    def connected(self) -> bool:
        return self._sock is not None and self.client.is_connected()

    async def connect(
        self, host: str, port: int, keepalive: int, clean_start: bool, props: Properties | None
    ) -> bool:
        """Connect and wait for CONNACK; returns session_present. Raises ConnectorError."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._thread_id = threading.get_ident()
        self._connack = loop.create_future()
        self.lost = loop.create_future()
        call = functools.partial(
            self.client.connect,
            host,
            port,
            keepalive,
            clean_start=clean_start if self.client.protocol == mqtt.MQTTv5 else 3,
            properties=props,
        )
        fut = loop.run_in_executor(None, call)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.connect_timeout + 1)
        except BaseException:
            # the worker thread may still be connecting; let it finish (paho bounds it by
            # connect_timeout), then close whatever socket it opened
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(fut, self.connect_timeout + 1)
            self._force_close()
            raise
        rc = fut.result()
        sock: Any = self.client.socket()
        if sock is None or rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._force_close()
            raise ConnectorError(
                f"connection to {host}:{port} closed before CONNACK "
                f"({mqtt.error_string(rc) if rc else 'by the broker'}; "
                "with TLS: a client certificate required or refused?)"
            )
        self._sock = sock
        loop.add_reader(sock, self._readable)
        if self.client.want_write():
            loop.add_writer(sock, self._writable)
        self._misc = loop.create_task(self._misc_loop(), name="mqtt-keepalive")
        try:
            waiting: set[asyncio.Future[Any]] = {self._connack, self.lost}
            done, _ = await asyncio.wait(
                waiting,
                timeout=self.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._connack in done:
                code, present = self._connack.result()
                if code.is_failure:
                    raise ConnectorError(f"broker refused the connection: {code}")
                self.session_present = present
                return present
            if self.lost in done:
                raise ConnectorError(
                    f"connection to {host}:{port} closed before CONNACK ({self.lost.result()}; "
                    "with TLS: a client certificate required or refused?)"
                )
            raise ConnectorError(f"no CONNACK from {host}:{port} within {self.connect_timeout}s")
        except BaseException:
            await self.close(graceful=False)
            raise

    async def subscribe(self, topics: Sequence[tuple[str, int]], within: float) -> list[int]:
        """Subscribe and wait for SUBACK; returns the granted QoS per filter (128 = refused)."""
        if self.client.protocol == mqtt.MQTTv5:
            rc, mid = self.client.subscribe([(t, SubscribeOptions(qos=q)) for t, q in topics])
        else:
            rc, mid = self.client.subscribe(list(topics))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectorError(f"subscribe failed: {mqtt.error_string(rc)}")
        codes: list[ReasonCode] = await self._wait(mid, within, "SUBACK")
        return [c.value if c.is_failure else int(c.value) for c in codes]

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, within: float
    ) -> None:
        """Publish and wait until the broker acknowledged it (QoS 1/2) or it was written (QoS 0)."""
        if not self.connected:
            raise ConnectorError("not connected to the broker")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectorError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if info.is_published():
            return
        rc = await self._wait(info.mid, within, "publish acknowledgement")
        if isinstance(rc, ReasonCode) and rc.is_failure:
            raise ConnectorError(f"broker refused the publish to {topic!r}: {rc}")

    async def _wait(self, mid: int, within: float, what: str) -> Any:
        assert self._loop is not None and self.lost is not None
        fut = self._pending.get(mid)
        if fut is None:
            fut = self._pending[mid] = self._loop.create_future()
        try:
            done, _ = await asyncio.wait(
                {fut, self.lost}, timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._pending.pop(mid, None)
        if fut in done:
            return fut.result()
        if self.lost in done:
            raise ConnectorError(f"connection lost while waiting for {what}")
        raise ConnectorError(f"no {what} within {within}s")

    async def close(self, graceful: bool = True) -> None:
        """Disconnect (sending DISCONNECT when ``graceful``) and release the socket and task."""
        misc, self._misc = self._misc, None
        if misc is not None:
            misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await misc
        if graceful and self.connected:
            self.client.disconnect()
            # write the DISCONNECT now; paho closes the socket once it went out
            with contextlib.suppress(OSError):
                self.client.loop_write()
        self._force_close()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()

    def _force_close(self) -> None:
        if self.client.socket() is not None:
            # paho has no public "drop the socket" call short of disconnect(); _sock_close runs
            # our on_socket_close (unregistering it from the loop) and closes it
            self.client._sock_close()
        self._sock = None

    # --- event-loop callbacks -------------------------------------------------------------

    def _readable(self) -> None:
        client = self.client
        for _ in range(self.MAX_PACKETS_PER_WAKEUP):
            before = self.received
            rc = client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._sock is None:
                return
            if self.received == before:
                break
        sock = self._sock
        # TLS may hold decrypted bytes the selector cannot see
        if isinstance(sock, ssl.SSLSocket) and sock.pending() and self._loop is not None:
            self._loop.call_soon(self._readable)

    def _writable(self) -> None:
        self.client.loop_write()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.client.loop_misc()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is None:
            return
        if threading.get_ident() == self._thread_id:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if sock is self._sock:
            self._sock = None

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._thread_id:
            self._add_writer(sock)
        else:  # connect() runs in a worker thread and queues CONNECT there
            loop.call_soon_threadsafe(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        current: Any = self.client.socket()
        if self._loop is not None and current is not None and sock is current:
            self._loop.add_writer(current, self._writable)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and threading.get_ident() == self._thread_id:
            self._loop.remove_writer(sock)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result((rc, bool(flags.session_present)))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(str(rc))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        self._resolve(mid, codes)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        self._resolve(mid, rc)

    def _resolve(self, mid: int, value: Any) -> None:
        fut = self._pending.get(mid)
        if fut is None and self._loop is not None:
            # the ack can come before the caller started waiting (same loop iteration)
            fut = self._pending[mid] = self._loop.create_future()
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        if self.on_message is not None:
            self.on_message(msg)


class PahoClient(mqtt.Client):
    """paho's client, closing the TLS socket when the handshake fails (paho leaks it)."""

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        ctx = self._ssl_context
        if ctx is None:
            raise ConnectorError("TLS requested without an SSL context")
        try:
            ssl_sock = ctx.wrap_socket(
                tcp_sock, server_hostname=self._host, do_handshake_on_connect=False
            )
        except BaseException:
            tcp_sock.close()
            raise
        try:
            ssl_sock.settimeout(self._connect_timeout)
            # hostname checking is the context's (check_hostname), off only when insecure
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock


def build_client(config: MqttConfig, *, manual_ack: bool) -> mqtt.Client:
    """A paho client for ``config`` (no I/O besides reading TLS files)."""
    v5 = config.protocol == "5"
    client = PahoClient(
        CallbackAPIVersion.VERSION2,
        client_id=config.effective_client_id,
        clean_session=None if v5 else not config.persistent_session,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
        manual_ack=manual_ack,
    )
    # callbacks never raise by design; if one did, keep the link and let it be logged
    client.suppress_exceptions = True
    client.enable_logger(log)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    if config.username is not None:
        client.username_pw_set(
            config.username,
            config.password.get_secret_value() if config.password is not None else None,
        )
    _, _, scheme_tls = parse_broker_url(config.url)
    tls = config.tls
    if tls.enabled if tls.enabled is not None else scheme_tls:
        ctx = ssl.create_default_context(
            cafile=str(tls.ca_file) if tls.ca_file is not None else None
        )
        if tls.cert_file is not None:
            ctx.load_cert_chain(
                str(tls.cert_file),
                str(tls.key_file) if tls.key_file is not None else None,
                tls.key_password.get_secret_value() if tls.key_password is not None else None,
            )
        if tls.insecure:
            ctx.check_hostname = False
        client.tls_set_context(ctx)
        client.tls_insecure_set(tls.insecure)
    return client


def connect_properties(config: MqttConfig) -> Properties | None:
    if config.protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = config.session_expiry if config.persistent_session else 0
    props.ReceiveMaximum = config.receive_maximum
    return props


# --- the connector --------------------------------------------------------------------------


@dataclass(slots=True)
class _Route:
    """What a concrete topic maps to (cached per topic)."""

    parse: Callable[[bytes, int], list[Sample]]
    asset: str
    tag: str | None  # single-value payloads
    tags: dict[str, str] | None  # multi-value payloads: field -> tag (filled lazily)
    sub: int
    fields: dict[str, str]
    tag_template: NameTemplate


class MqttConnector(Connector[MqttConfig]):
    """Readings from MQTT topics; ``write`` and ``publish`` for actions. See the module doc."""

    kind = "mqtt"
    config_model = MqttConfig
    ROUTE_CACHE_SIZE = 100_000

    def __init__(self, config: MqttConfig) -> None:
        super().__init__(config)
        self._host, self._port, _ = parse_broker_url(config.url)
        self._subs = [
            (
                TopicTemplate(s.topic),
                NameTemplate(s.asset),
                NameTemplate(s.tag_template),
                self._parser(s),
            )
            for s in config.subscriptions
        ]
        self._command = TopicTemplate(config.commands.topic) if config.commands else None
        self._routes: dict[str, _Route | str] = {}
        self._link: MqttLink | None = None
        self._pending: list[Reading] = []
        self._acks: list[tuple[int, int]] = []
        self._flush_handle: asyncio.Handle | None = None
        self.messages_total = 0
        self.acked_total = 0  # QoS 1/2 messages acknowledged (after they were durable)
        self.refusals = 0  # batches refused downstream (not acked, redelivered)

    @staticmethod
    def _parser(s: Subscription) -> Callable[[bytes, int], list[Sample]]:
        p = s.payload
        if isinstance(p, JsonPayload):
            return p.parser().parse
        if isinstance(p, TextPayload):
            return TextParser().parse
        return NumberParser().parse

    @property
    def session_present(self) -> bool:
        return self._link is not None and self._link.session_present

    # --- main loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        cfg = self.config
        if self._link is None:
            client = build_client(cfg, manual_ack=True)
            self._link = MqttLink(client, connect_timeout=cfg.connect_timeout)
            self._link.on_message = self._on_message
        link = self._link
        self._set_status(
            ConnectorState.CONNECTING
            if self.status.state is not ConnectorState.RECONNECTING
            else ConnectorState.RECONNECTING,
            next_attempt_at=None,
        )
        try:
            await link.connect(
                self._host,
                self._port,
                cfg.keepalive,
                clean_start=not cfg.persistent_session,
                props=connect_properties(cfg),
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConnectorError(f"cannot connect to {cfg.url}: {exc}") from exc
        graceful = False
        try:
            filters = self._filters()
            granted = await link.subscribe(filters, cfg.connect_timeout)
            refused = [f for (f, _), g in zip(filters, granted, strict=False) if g >= 0x80]
            if refused:
                raise ConnectorError(f"broker refused subscription(s): {', '.join(refused)}")
            self._set_status(ConnectorState.CONNECTED)
            assert link.lost is not None
            reason = await link.lost
            raise ConnectorError(f"connection lost: {reason}")
        except asyncio.CancelledError:
            graceful = True  # stop(): say goodbye so the broker keeps the session cleanly
            raise
        finally:
            self._flush()
            await link.close(graceful=graceful)

    def _filters(self) -> list[tuple[str, int]]:
        """One (filter, qos) per distinct derived filter, at the highest QoS asked for it."""
        seen: dict[str, int] = {}
        for (tt, *_), s in zip(self._subs, self.config.subscriptions, strict=True):
            seen[tt.filter] = max(seen.get(tt.filter, 0), s.qos)
        return list(seen.items())

    async def _close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            self._flush()
            await link.close(graceful=True)

    # --- messages -------------------------------------------------------------------------

    def _route(self, topic: str) -> _Route | str:
        route = self._routes.get(topic)
        if route is not None:
            return route
        found: _Route | str = f"topic {topic!r} matches no subscription template"
        for i, (tt, asset_t, tag_t, parse) in enumerate(self._subs):
            fields = tt.match(topic)
            if fields is None:
                continue
            multi = "field" in tag_t.fields
            found = _Route(
                parse=parse,
                asset=asset_t.format(fields),
                tag=None if multi else tag_t.format(fields),
                tags={} if multi else None,
                sub=i,
                fields=fields,
                tag_template=tag_t,
            )
            break
        if len(self._routes) >= self.ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[topic] = found
        return found

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        self.messages_total += 1
        topic = msg.topic
        payload = bytes(msg.payload)
        try:
            route = self._route(topic)
            if isinstance(route, str):
                raise PayloadError(route)
            now = time.time_ns()
            samples = route.parse(payload, now)
            bounds = self.config.timestamps
            for sample in samples:
                ts = sample[2]
                if ts != now and (problem := bounds.problem(ts, now)) is not None:
                    raise PayloadError(problem)
            asset = route.asset
            out: list[Reading] = []
            if route.tag is not None:
                tag = route.tag
                for _, value, ts, quality, status in samples:
                    out.append(Reading(asset, tag, ts, value, quality, status))
            else:
                tags = route.tags
                assert tags is not None
                for field, value, ts, quality, status in samples:
                    name = tags.get(field)
                    if name is None:
                        name = tags[field] = route.tag_template.format(
                            {**route.fields, "field": field}
                        )
                    out.append(Reading(asset, name, ts, value, quality, status))
            self._pending += out  # all of the message or none of it
        except (PayloadError, ValueError, KeyError) as exc:
            self._reject(topic, payload, str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad message must never stop the link
            self._reject(topic, payload, f"{type(exc).__name__}: {exc}")
        if msg.qos:
            self._acks.append((msg.mid, msg.qos))
        if len(self._pending) >= self.config.max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _reject(self, topic: str, payload: bytes, reason: str) -> None:
        self._dead_letter(topic, payload, reason)

    def _flush(self) -> None:
        """Hand the pending batch to the sink; acknowledge its QoS 1/2 messages once durable.

        The acks go out from the sink's ``on_durable`` callback (at once for a plain sink; after
        the outbox commit for the agent), and only on the connection the messages came in on:
        after a reconnect the broker redelivers them under possibly reused packet ids.
        """
        handle, self._flush_handle = self._flush_handle, None
        if handle is not None:
            handle.cancel()
        batch, self._pending = self._pending, []
        acks, self._acks = self._acks, []
        link = self._link
        conn = None if link is None else link.lost
        on_durable = functools.partial(self._durable, acks, link, conn) if acks else None
        if not batch:
            if on_durable is not None:
                # only malformed messages: acknowledged once their dead letters are stored
                self._emit(batch, on_durable)
            return
        try:
            self._emit(batch, on_durable)
        except Exception:  # unacked: the broker redelivers after a reconnect
            self._m_errors.inc()
            log.exception(
                "mqtt connector %r: sink raised; %d messages not acked", self.name, len(acks)
            )

    def _durable(
        self,
        acks: list[tuple[int, int]],
        link: MqttLink | None,
        conn: asyncio.Future[str] | None,
        ok: bool,
    ) -> None:
        if link is None or link is not self._link or conn is None or link.lost is not conn:
            return  # that connection is gone: the broker redelivers on the new one
        if not ok:
            # refused downstream (the agent's queue is full): do not ack; drop the connection so
            # the broker redelivers these messages (persistent session) after the backoff
            self.refusals += 1
            if not conn.done():
                log.warning(
                    "mqtt connector %r: %d messages refused downstream; reconnecting for "
                    "redelivery",
                    self.name,
                    len(acks),
                )
                conn.set_result("readings refused downstream; reconnecting for redelivery")
            return
        if link.connected:
            ack = link.client.ack
            for mid, qos in acks:
                ack(mid, qos)
            self.acked_total += len(acks)

    # --- actions --------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: QoS = 1,
        retain: bool = False,
        within: float = 10.0,
    ) -> None:
        """Publish ``payload`` to ``topic``; returns once the broker acknowledged it (QoS 1/2).

        Raises :class:`ConnectorError` when not connected or the broker refuses.
        """
        if not topic or "+" in topic or "#" in topic:
            raise ConnectorError(f"cannot publish to {topic!r}: empty or holds a wildcard")
        link = self._link
        if link is None or not link.connected:
            raise ConnectorError(f"connector {self.name!r} is not connected")
        data = payload.encode() if isinstance(payload, str) else payload
        await link.publish(topic, data, qos, retain, within)

    async def write(self, tag: str, value: Value) -> None:
        """Publish ``value`` to the command topic of ``tag`` (see :class:`CommandConfig`)."""
        cmd = self.config.commands
        if cmd is None or self._command is None:
            raise WriteError(f"connector {self.name!r} has no commands: section; cannot write")
        if cmd.tags is not None and tag not in cmd.tags:
            raise WriteError(f"tag {tag!r} is not writable (commands.tags: {', '.join(cmd.tags)})")
        if value is None:
            raise WriteError(f"cannot write None to {tag!r}")
        fields = {**self._fields_for(tag), **cmd.fields, "tag": tag}
        try:
            topic = self._command.format(fields)
        except KeyError as exc:
            raise WriteError(
                f"cannot build the command topic {cmd.topic!r} for tag {tag!r}: no value for "
                f"{{{exc.args[0]}}} (set commands.fields, or wait for a reading of {tag!r})"
            ) from None
        if cmd.payload == "json":
            body = json.dumps({"value": value, "ts": time.time_ns() // 1_000_000}).encode()
        elif isinstance(value, bool):
            body = b"true" if value else b"false"
        else:
            body = str(value).encode()
        try:
            await self.publish(topic, body, cmd.qos, cmd.retain, cmd.timeout)
        except ConnectorError as exc:
            self._count_write("error")
            raise WriteError(f"write {tag!r}={value!r} to {topic!r}: {exc}") from exc
        self._count_write("ok")

    def _count_write(self, outcome: str) -> None:
        from protocols.base import WRITES

        WRITES.labels(self.name, self.kind, outcome).inc()

    def _fields_for(self, tag: str) -> dict[str, str]:
        """Topic fields of the most recent topic that produced ``tag``."""
        for route in reversed(list(self._routes.values())):
            if isinstance(route, str):
                continue
            if route.tag == tag or (route.tags is not None and tag in route.tags.values()):
                return {"asset": route.asset, **route.fields}
        return {}
