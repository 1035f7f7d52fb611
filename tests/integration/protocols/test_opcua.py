"""OPC UA connector against real asyncua servers: delivery, quality, deadbands, polling, writes,
restarts, blackholed links, security and users."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.common.callback import CallbackType
from cryptography import x509
from pydantic import ValidationError

from protocols.base import ConnectorState, WriteError
from protocols.opcua import OpcUaConfig, OpcUaConnector, OpcUaNodeConfig
from shared.records import Quality, Reading
from tests.integration.connectors.harness_opcua import (
    NS_URI,
    BlackholeProxy,
    OpcUaTestServer,
    certificate_sha256,
    fast_backoff,
    pem_of,
)
from tests.waiting import wait_until

M1 = "0:Objects/t:Line1/t:M1"


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[Reading]] = []

    def __call__(self, batch) -> None:
        self.batches.append(list(batch))

    @property
    def readings(self) -> list[Reading]:
        return [r for b in self.batches for r in b]

    def of(self, tag: str) -> list[Reading]:
        return [r for r in self.readings if r.tag == tag]


@pytest.fixture
async def server() -> AsyncIterator[OpcUaTestServer]:
    srv = await OpcUaTestServer().start()
    try:
        yield srv
    finally:
        await srv.close()


def node(name: str, **kw) -> OpcUaNodeConfig:
    return OpcUaNodeConfig(node=f"{M1}/t:{name}", asset="m1", tag=name.lower(), **kw)


def make_config(url: str, nodes: list[OpcUaNodeConfig], **kw) -> OpcUaConfig:
    base = {
        "name": "opcua-test",
        "endpoint": url,
        "namespaces": {"t": NS_URI},
        "nodes": nodes,
        "sampling_interval": 20,
        "publishing_interval": 50,
        "keepalive_interval": 0.5,
        "request_timeout": 2.0,
        "backoff": fast_backoff(),
    }
    base.update(kw)
    return OpcUaConfig(**base)


async def started(cfg: OpcUaConfig) -> tuple[OpcUaConnector, Sink]:
    conn = OpcUaConnector(cfg)
    sink = Sink()
    conn.set_sink(sink)
    await conn.start()
    return conn, sink


async def test_subscription_delivers_typed_values_with_source_timestamps_in_batches(server):
    source_ts = await server.nodes["Name"].read_data_value()
    cfg = make_config(
        server.url,
        [
            node("Temperature"),
            OpcUaNodeConfig(node=f"nsu={NS_URI};i=1000", asset="m1", tag="counter"),
            OpcUaNodeConfig(node=f"ns={server.ns};s=Line1.M1.Temperature", asset="m2", tag="t"),
            node("Running"),
            node("Name"),
            node("Speed"),
        ],
    )
    conn, sink = await started(cfg)
    async with conn:
        want = {("m1", "temperature"), ("m1", "counter"), ("m2", "t"), ("m1", "running")}
        want |= {("m1", "name"), ("m1", "speed")}
        await wait_until(lambda: want <= {(r.asset, r.tag) for r in sink.readings}, 10, "all")
        await wait_until(lambda: len(sink.of("counter")) >= 5, 10, "counter changes")
    by_tag = {r.tag: r for r in sink.readings}
    assert isinstance(by_tag["temperature"].value, float)
    assert isinstance(by_tag["counter"].value, int)
    assert by_tag["running"].value is True
    assert by_tag["name"].value == "press-1"
    assert by_tag["speed"].value == 0
    assert all(r.quality is Quality.GOOD and r.status == 0 for r in sink.readings)
    # Source timestamps, not the time of receipt: an unchanged node keeps its original stamp.
    expected_ns = int(source_ts.SourceTimestamp.timestamp() * 1e6) * 1000
    assert abs(by_tag["name"].ts_ns - expected_ns) < 1_000_000
    # The initial values of six nodes arrive in one notification message = one batch.
    assert max(len(b) for b in sink.batches) >= 6
    counters = [r.value for r in sink.of("counter")]
    assert counters == sorted(counters)


async def test_status_codes_map_to_quality_and_keep_the_raw_code(server):
    conn, sink = await started(make_config(server.url, [node("Level")]))
    async with conn:
        await wait_until(lambda: bool(sink.of("level")), 10, "first level")
        uncertain = ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)
        await server.set_raw("Level", ua.DataValue(ua.Variant(7.0), StatusCode=uncertain))
        await wait_until(lambda: sink.of("level")[-1].status == uncertain.value, 10, "uncertain")
        bad = ua.StatusCode(ua.StatusCodes.BadSensorFailure)
        await server.set_raw("Level", ua.DataValue(ua.Variant(8.0), StatusCode=bad))
        await wait_until(lambda: sink.of("level")[-1].status == bad.value, 10, "bad")
        await server.nodes["Level"].write_value(9.0)
        await wait_until(lambda: sink.of("level")[-1].value == 9.0, 10, "good again")
    levels = sink.of("level")
    u = next(r for r in levels if r.status == uncertain.value)
    b = next(r for r in levels if r.status == bad.value)
    assert (u.quality, u.value) == (Quality.UNCERTAIN, 7.0)
    assert (b.quality, b.value) == (Quality.BAD, None)
    assert levels[-1].quality is Quality.GOOD


async def test_missing_nodes_are_reported_and_skipped_while_others_flow(server):
    cfg = make_config(
        server.url,
        [
            node("Temperature"),
            OpcUaNodeConfig(node=f"ns={server.ns};s=No.Such.Node", asset="m1", tag="ghost"),
            OpcUaNodeConfig(node=f"{M1}/t:Nothing", asset="m1", tag="nothing"),
            OpcUaNodeConfig(node="nsu=urn:not:here;i=5", asset="m1", tag="elsewhere"),
            OpcUaNodeConfig(node=f"{M1}", asset="m1", tag="an-object"),
        ],
    )
    conn, sink = await started(cfg)
    async with conn:
        await wait_until(lambda: len(sink.of("temperature")) >= 3, 10, "temperature flows")
        assert conn.status.state is ConnectorState.CONNECTED
    assert {r.tag for r in sink.readings} == {"temperature"}
    assert len(conn.skipped) == 4
    reasons = " | ".join(conn.skipped.values())
    assert "not found" in reasons and "urn:not:here" in reasons and "not a Variable" in reasons
    assert conn.malformed_total == 4


async def test_unrepresentable_values_are_dead_letters_and_never_fatal(server):
    conn, sink = await started(make_config(server.url, [node("Blob"), node("Temperature")]))
    async with conn:
        await wait_until(lambda: bool(sink.of("blob")), 10, "first blob")
        await server.set_raw(
            "Blob", ua.DataValue(ua.Variant(b"\x01\x02", ua.VariantType.ByteString))
        )
        await wait_until(lambda: conn.malformed_total == 1, 10, "malformed counted")
        mark = len(sink.of("temperature"))
        await wait_until(lambda: len(sink.of("temperature")) > mark + 2, 10, "still flowing")
    assert all(r.value is None for r in sink.of("blob"))
    (letter,) = conn.dead_letters
    assert "Blob" in letter.source and "cannot be carried by a reading" in letter.reason
    assert b"\\x01\\x02" in letter.payload  # the value's repr travels with it


@pytest.mark.parametrize(
    ("deadband", "kind"),
    [(5.0, "absolute"), (1.0, "percent")],  # 1 % of EURange 0..1000 = 10
    ids=["absolute-5", "percent-1-of-eurange"],
)
async def test_deadband_filters_small_changes(server, deadband, kind):
    cfg = make_config(server.url, [node("Level", deadband=deadband, deadband_type=kind)])
    conn, sink = await started(cfg)
    step = 1.0 if kind == "absolute" else 2.0  # in units of the effective absolute band / 5
    # Every filtered step is within the band of both the last delivered and the previous value.
    path = [3 * step, 4 * step, 20 * step, 22 * step, 40 * step, 41 * step]
    async with conn:
        await wait_until(lambda: bool(sink.of("level")), 10, "first level")
        for v in path:
            await server.nodes["Level"].write_value(v)
            await asyncio.sleep(0.08)  # let the sampled value be published on its own
        await wait_until(lambda: sink.of("level")[-1].value >= 40 * step, 10, "last big step")
        await server.nodes["Level"].write_value(100 * step)
        await wait_until(lambda: sink.of("level")[-1].value == 100 * step, 10, "final")
    assert [r.value for r in sink.of("level")] == [0.0, 20 * step, 40 * step, 100 * step]


async def test_percent_deadband_without_eurange_is_reported_and_skipped(server):
    cfg = make_config(
        server.url,
        [node("Setpoint", deadband=2, deadband_type="percent"), node("Temperature")],
    )
    conn, sink = await started(cfg)
    async with conn:
        await wait_until(lambda: bool(sink.of("temperature")), 10, "others flow")
    assert any("EURange" in why for why in conn.skipped.values())
    assert not sink.of("setpoint")


async def test_polling_mode_reads_many_nodes_per_request_and_delivers_one_batch_per_poll(server):
    requests: list[int] = []

    async def count(event, dispatcher):
        if event.is_external:
            requests.append(len(event.request_params.NodesToRead))

    server.server.subscribe_server_callback(CallbackType.PreRead, count)
    names = ["Temperature", "Running", "Name", "Speed", "Setpoint"]
    cfg = make_config(
        server.url,
        [node(n) for n in names] + [node("Level", deadband=5.0)],
        mode="polling",
        poll_interval=0.1,
        max_nodes_per_read=3,
    )
    conn, sink = await started(cfg)
    async with conn:
        await wait_until(lambda: len(sink.batches) >= 5, 10, "five polls")
        requests.clear()
        polls = len(sink.batches)
        await wait_until(lambda: len(sink.batches) >= polls + 3, 10, "three more polls")
        await server.nodes["Level"].write_value(3.0)  # inside the deadband
        await asyncio.sleep(0.3)
        await server.nodes["Level"].write_value(30.0)
        await wait_until(lambda: sink.of("level")[-1].value == 30.0, 10, "level beyond band")
    # 6 nodes in requests of at most 3; each poll delivers one batch of every polled node
    assert requests and max(requests) == 3
    assert all(len(b) >= 5 for b in sink.batches)
    assert [r.value for r in sink.of("level")] == [0.0, 30.0]
    assert {r.tag for r in sink.batches[-1]} >= {n.lower() for n in names}


async def test_writes_use_the_node_data_type_and_refusals_are_clear(server):
    cfg = make_config(
        server.url,
        [
            node("Speed", writable=True),
            node("Setpoint", writable=True),
            node("Locked", writable=True),
            node("Running"),
        ],
    )
    conn, sink = await started(cfg)
    async with conn:
        await wait_until(lambda: conn.status.state is ConnectorState.CONNECTED, 10, "connected")
        await conn.write("speed", 1200)
        await conn.write("m1/setpoint", 7)  # int to a Double node
        speed = await server.nodes["Speed"].read_data_value()
        setpoint = await server.nodes["Setpoint"].read_data_value()
        assert (speed.Value.Value, speed.Value.VariantType) == (1200, ua.VariantType.Int32)
        assert (setpoint.Value.Value, setpoint.Value.VariantType) == (7.0, ua.VariantType.Double)
        await wait_until(lambda: any(r.value == 1200 for r in sink.of("speed")), 10, "echo")

        with pytest.raises(WriteError, match="expected an integer"):
            await conn.write("speed", "fast")
        with pytest.raises(WriteError, match="out of range"):
            await conn.write("speed", 2**40)
        with pytest.raises(WriteError, match=r"BadNotWritable|BadUserAccessDenied"):
            await conn.write("locked", 2.0)
        with pytest.raises(WriteError, match="not declared writable"):
            await conn.write("running", False)
        with pytest.raises(WriteError, match="unknown tag"):
            await conn.write("nope", 1)
        assert conn.status.state is ConnectorState.CONNECTED


async def test_server_restart_resumes_within_5s_without_duplicate_subscriptions(server):
    conn, sink = await started(make_config(server.url, [node("Temperature"), node("Name")]))
    async with conn:
        await wait_until(lambda: len(sink.of("temperature")) >= 3, 10, "first readings")
        assert server.subscription_count() == 1
        await server.stop()
        await wait_until(lambda: conn.status.state is not ConnectorState.CONNECTED, 10, "loss")
        assert conn.status.last_error
        await server.start()
        mark = len(sink.of("temperature"))
        await wait_until(lambda: len(sink.of("temperature")) > mark, 5, "readings within 5 s")
        assert conn.status.state is ConnectorState.CONNECTED
        # the fresh server sees exactly one subscription and one session from us
        assert server.subscription_count() == 1
        assert server.session_count() == 1
        # and a second restart behaves the same (no subscription piles up client-side either)
        await server.restart()
        mark = len(sink.of("temperature"))
        await wait_until(lambda: len(sink.of("temperature")) > mark, 5, "readings again")
        assert server.subscription_count() == 1


async def test_blackholed_link_is_noticed_and_recovered_on_the_same_subscription(server):
    proxy = await BlackholeProxy(server.port).start()
    try:
        cfg = make_config(proxy.url(), [node("Temperature")], keepalive_interval=0.5)
        conn, sink = await started(cfg)
        async with conn:
            await wait_until(lambda: len(sink.of("temperature")) >= 3, 10, "first readings")
            proxy.blackhole()
            await wait_until(
                lambda: conn.status.state is not ConnectorState.CONNECTED, 5, "blackhole noticed"
            )
            mark = len(sink.of("temperature"))
            proxy.restore()
            await wait_until(lambda: conn.status.state is ConnectorState.CONNECTED, 10, "back")
            await wait_until(lambda: len(sink.of("temperature")) > mark, 10, "readings again")
            # the session was re-activated and its subscription transferred: still exactly one
            assert server.subscription_count() == 1
        assert conn.status.state is ConnectorState.STOPPED
    finally:
        await proxy.close()


@pytest.fixture
async def secure_server(tmp_path) -> AsyncIterator[OpcUaTestServer]:
    srv = OpcUaTestServer(secure=True, users={"operator": "s3cret"}, pki_dir=tmp_path / "srv")
    (tmp_path / "srv").mkdir()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


def secure_config(srv: OpcUaTestServer, tmp_path: Path, mode: str, **security) -> OpcUaConfig:
    sec = {"mode": mode, "cert_dir": tmp_path / "client-pki"}
    sec.update(security)
    return make_config(
        srv.url,
        [node("Temperature")],
        security=sec,
        username="operator",
        password="s3cret",
        application_uri="urn:edgeloop:test-client",
    )


@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
async def test_secure_channel_with_generated_certificate_pinned_server_and_user(
    secure_server, tmp_path, mode
):
    pin = certificate_sha256(secure_server.certificate_der)
    cfg = secure_config(secure_server, tmp_path, mode, server_certificate_sha256=pin)
    conn, sink = await started(cfg)
    async with conn:
        await wait_until(lambda: len(sink.of("temperature")) >= 2, 15, "secure readings")
    der = (tmp_path / "client-pki" / "edgeloop-client-cert.der").read_bytes()
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:edgeloop:test-client"]
    # the generated certificate is reused on the next start, not regenerated
    conn2, sink2 = await started(cfg)
    async with conn2:
        await wait_until(lambda: bool(sink2.readings), 15, "second start")
    assert (tmp_path / "client-pki" / "edgeloop-client-cert.der").read_bytes() == der


async def test_trust_list_accepts_a_trusted_server_and_refuses_an_unknown_one(
    secure_server, tmp_path
):
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "server.pem").write_bytes(pem_of(secure_server.certificate_der))
    conn, sink = await started(
        secure_config(secure_server, tmp_path, "SignAndEncrypt", trust_dir=trusted)
    )
    async with conn:
        await wait_until(lambda: bool(sink.readings), 15, "trusted server readings")
    empty = tmp_path / "empty"
    empty.mkdir()
    conn, sink = await started(
        secure_config(secure_server, tmp_path, "SignAndEncrypt", trust_dir=empty)
    )
    async with conn:
        await wait_until(lambda: conn.status.attempts >= 2, 10, "refused attempts")
        assert "not in the trust list" in (conn.status.last_error or "")
        assert conn.status.state is not ConnectorState.CONNECTED
    assert not sink.readings


async def test_pinned_certificate_mismatch_is_refused_with_a_clear_error(secure_server, tmp_path):
    cfg = secure_config(
        secure_server, tmp_path, "SignAndEncrypt", server_certificate_sha256="0" * 64
    )
    conn, sink = await started(cfg)
    async with conn:
        await wait_until(lambda: conn.status.attempts >= 2, 10, "refused attempts")
        assert "does not match the pinned" in (conn.status.last_error or "")
        assert conn.status.state is not ConnectorState.CONNECTED
    assert not sink.readings


async def test_wrong_password_is_refused_with_a_clear_error(secure_server, tmp_path):
    pin = certificate_sha256(secure_server.certificate_der)
    cfg = secure_config(secure_server, tmp_path, "Sign", server_certificate_sha256=pin)
    cfg.password = "wrong"
    conn, sink = await started(cfg)
    async with conn:
        await wait_until(lambda: conn.status.attempts >= 1, 10, "refused")
        assert "BadUserAccessDenied" in (conn.status.last_error or "")
    assert not sink.readings


def test_secure_modes_refuse_to_trust_the_server_silently():
    with pytest.raises(ValidationError, match="never trusted silently"):
        OpcUaConfig(
            name="x",
            endpoint="opc.tcp://h:4840",
            nodes=[OpcUaNodeConfig(node="i=2258", asset="a", tag="t")],
            security={"mode": "SignAndEncrypt"},
        )
    with pytest.raises(ValidationError, match="namespace alias 'x'"):
        OpcUaConfig(
            name="x",
            endpoint="opc.tcp://h:4840",
            nodes=[OpcUaNodeConfig(node="0:Objects/x:A", asset="a", tag="t")],
        )


async def test_a_source_timestamp_of_9999_is_a_dead_letter_and_the_node_goes_on(server):
    """Issue 13, defect 2: 9999-12-31 is a legal OPC UA DateTime, but beyond what a 64-bit
    nanosecond timestamp holds. It must not reach the outbox (whose encoder would raise) nor
    stop the subscription: the value is dead-lettered with the reason, the next one is read."""
    import datetime as dt

    from asyncua import ua

    letters: list = []
    conn, sink = await started(make_config(server.url, [node("Setpoint")]))
    conn.set_dead_letter_sink(letters.extend)
    async with conn:
        await wait_until(lambda: sink.of("setpoint"), 10, "the first value")
        far = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
        await server.set_raw(
            "Setpoint", ua.DataValue(ua.Variant(77.0, ua.VariantType.Double), SourceTimestamp=far)
        )
        await wait_until(lambda: letters, 10, "the dead letter")
        await server.nodes["Setpoint"].write_value(78.0)
        await wait_until(lambda: any(r.value == 78.0 for r in sink.of("setpoint")), 10, "78.0")
    assert not any(r.value == 77.0 for r in sink.readings)
    (letter,) = letters
    assert "outside 1970..2262" in letter.reason and "Setpoint" in letter.source
    assert b"77.0" in letter.payload
    assert conn.dead_letters == letters and conn.malformed_total == 1
