"""The line read through a plain asyncua client."""

from __future__ import annotations

from pathlib import Path

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from simulators import FactorySimulator
from simulators.config import OpcUaServerConfig, OpcUaUser
from simulators.opcua_server import APPLICATION_URI
from tests.integration.simulators.conftest import frozen_config, step
from tests.waiting import wait_until


async def test_address_space_values_units_and_timestamps_follow_the_scenario(frozen_sim) -> None:
    sim = frozen_sim
    step(sim, 40.0)
    await sim.update_once()
    snap = sim.scenario.snapshot()
    async with Client(sim.opcua_endpoint, timeout=10) as c:
        ns = await c.get_namespace_index("urn:edgeloop:simulator")
        temp = await c.nodes.objects.get_child([f"{ns}:line1", f"{ns}:m1", f"{ns}:spindle_temp"])
        assert temp.nodeid == ua.NodeId("line1.m1.spindle_temp", ns)
        dv = await temp.read_data_value()
        assert dv.Value.VariantType == ua.VariantType.Double
        assert dv.Value.Value == snap.value("m1", "spindle_temp")
        assert dv.StatusCode.is_good()
        assert abs(dv.SourceTimestamp.timestamp() * 1e9 - snap.ts_ns) < 1e4
        eu = await (await temp.get_child("0:EngineeringUnits")).read_value()
        assert eu.DisplayName.Text == "°C"
        for tag in ("part_counter", "state", "part_id", "energy", "power"):
            node = c.get_node(f"ns={ns};s=line1.m2.{tag}")
            assert await node.read_value() == snap.value("m2", tag), tag
        counter = c.get_node(f"ns={ns};s=line1.m2.part_counter")
        assert (await counter.read_data_type_as_variant_type()) == ua.VariantType.UInt32
        assert snap.value("m2", "part_id") == f"m2-{snap.value('m2', 'part_counter')}"

        # m3 is offline from t=5: every tag bad
        bad = await c.get_node(f"ns={ns};s=line1.m3.spindle_speed").read_data_value(
            raise_on_bad_status=False
        )
        assert bad.StatusCode.value == ua.StatusCodes.BadNoCommunication

        # a client's stop request reaches the scenario
        stop = c.get_node(f"ns={ns};s=line1.m1.stop_request")
        await stop.write_value(True)
        assert sim.scenario.stop_request[0] is True
        step(sim, 45.0)
        await sim.update_once()
        assert await c.get_node(f"ns={ns};s=line1.m1.state").read_value() == 0


async def test_signed_and_encrypted_endpoint_with_a_user(tmp_path: Path) -> None:
    cfg = frozen_config()
    cfg.opcua = OpcUaServerConfig(
        port=0,
        security=["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign"],
        cert_dir=str(tmp_path / "server"),
        users=[OpcUaUser(username="op", password="s3cret")],
        allow_anonymous=False,
    )
    cfg.update_hz = 20
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key, cert = tmp_path / "client-key.pem", tmp_path / "client-cert.der"
    await setup_self_signed_certificate(
        key,
        cert,
        "urn:edgeloop:test:client",
        "localhost",
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        {"commonName": "test"},
    )
    async with FactorySimulator(cfg) as sim:
        assert (tmp_path / "server" / "server-cert.der").is_file()
        client = Client(sim.opcua_endpoint, timeout=10)
        client.application_uri = "urn:edgeloop:test:client"
        client.set_user("op")
        client.set_password("s3cret")
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(cert),
            str(key),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        async with client:
            ns = await client.get_namespace_index("urn:edgeloop:simulator")
            node = client.get_node(f"ns={ns};s=line1.m1.energy")
            first = await node.read_value()
            await wait_until(lambda: sim.stats.updates > 3, 10, "updates")
            assert await node.read_value() >= first
            endpoints = await client.get_endpoints()
            assert {e.Server.ApplicationUri for e in endpoints} == {APPLICATION_URI}
            assert {e.SecurityMode for e in endpoints} == {
                ua.MessageSecurityMode.Sign,
                ua.MessageSecurityMode.SignAndEncrypt,
            }
        bad = Client(sim.opcua_endpoint, timeout=10)
        bad.set_user("op")
        bad.set_password("wrong")
        await bad.set_security(
            SecurityPolicyBasic256Sha256, str(cert), str(key), mode=ua.MessageSecurityMode.Sign
        )
        try:
            await bad.connect()
        except ua.UaError:
            pass
        else:
            await bad.disconnect()
            raise AssertionError("a wrong password was accepted")
