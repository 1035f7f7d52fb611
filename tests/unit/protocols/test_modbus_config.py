"""ModbusConfig: what it accepts, what it refuses (with the key path), and the read plan it implies."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocols.base import WriteError
from protocols.modbus import ModbusConfig, ModbusConnector
from shared.config import ConfigError, parse_config

BASE = """
name: line1
transport: {type: tcp, host: 10.0.0.5, port: 502}
devices:
  - unit_id: 3
    asset: press-3
    poll_interval: 0.5
    word_order: little
    points:
      - {tag: count, address: 0, type: uint32}
      - {tag: temp, address: 2, type: float32, word_order: big}
      - {tag: speed, address: 9, scale: 0.1, offset: -10, writable: true}
      - {tag: running, table: coil, address: 5, writable: true}
      - {tag: alarm, address: 30, type: bit, bit: 3}
      - {tag: name, address: 40, type: string, length: 8}
"""


def test_a_full_config_parses_with_defaults_filled_in():
    cfg = parse_config(BASE, ModbusConfig)
    assert cfg.kind == "modbus"
    dev = cfg.devices[0]
    assert dev.points[0].type == "uint32" and dev.points[0].word_order is None
    assert dev.points[3].type == "bool"  # coils default to bool
    assert dev.points[2].type == "int16"  # registers default to int16


def test_serial_and_rtu_over_tcp_transports():
    serial = BASE.replace(
        "{type: tcp, host: 10.0.0.5, port: 502}",
        "{type: serial, port: /dev/ttyUSB0, baudrate: 9600, parity: E, stopbits: 1}",
    )
    assert parse_config(serial, ModbusConfig).transport.type == "serial"
    rtu = BASE.replace("port: 502}", "port: 502, framing: rtu}")
    assert parse_config(rtu, ModbusConfig).transport.framing == "rtu"


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ("{tag: x, table: coil, address: 1, type: int16}", "type must be bool"),
        ("{tag: x, address: 1, type: bit}", "type bit needs bit"),
        ("{tag: x, address: 1, type: string}", "type string needs length"),
        ("{tag: x, address: 1, bit: 3}", "bit is only for type bit"),
        ("{tag: x, table: input, address: 1, writable: true}", "read-only table"),
        ("{tag: x, address: 65535, type: float32}", "runs past 65535"),
        ("{tag: x, address: 1, scale: 0}", "scale must not be 0"),
        ("{tag: x, address: 1, type: flaot32}", "flaot32"),
        ("{tag: x, address: 1, type: string, length: 200}", "less than or equal to 125"),
        ("{tag: count, address: 7}", "already at devices[0].points[0]"),
    ],
)
def test_bad_points_are_refused_with_the_key_path(point, message):
    text = BASE + f"      - {point}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, ModbusConfig, source="edge.yaml")
    assert message in str(err.value)
    assert "edge.yaml" in str(err.value) and "devices" in str(err.value)


def test_duplicate_unit_ids_are_refused():
    cfg = parse_config(BASE, ModbusConfig).model_dump()
    cfg["devices"].append({**cfg["devices"][0], "asset": "other"})
    with pytest.raises(ValidationError, match="unit_id 3 appears twice"):
        ModbusConfig.model_validate(cfg)


def test_read_plan_coalesces_per_table_and_unit():
    conn = ModbusConnector(parse_config(BASE, ModbusConfig))
    plan = conn.read_plan[3]
    # holding 0..3 and 9 merge (gap 5 <= 8); 30 and 40..47 are further apart; coil alone
    assert [(b.table, b.address, b.count) for b in plan] == [
        ("holding", 0, 10),
        ("holding", 30, 1),
        ("holding", 40, 8),
        ("coil", 5, 1),
    ]
    tight = ModbusConnector(parse_config(BASE + "max_gap: 0\n", ModbusConfig))
    assert len(tight.read_plan[3]) == 5  # 0..3 are contiguous: still one read


async def test_writes_are_checked_before_anything_is_sent():
    conn = ModbusConnector(parse_config(BASE, ModbusConfig))
    with pytest.raises(WriteError, match="not writable"):
        await conn.write("temp", 1.0)
    with pytest.raises(WriteError, match="no tag 'nope'"):
        await conn.write("nope", 1)
    with pytest.raises(WriteError, match="expected true or false"):
        await conn.write("running", 1)
    with pytest.raises(WriteError, match="out of range"):
        await conn.write("press-3/speed", 5000.0)
    with pytest.raises(WriteError, match="not connected"):
        await conn.write("speed", 12.5)


def test_the_documented_sample_config_is_valid():
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).parents[3] / "docs/connectors/modbus.md").read_text()
    sample = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    cfg = ModbusConfig.model_validate(sample[0])
    assert cfg.devices[0].word_order == "little"
    assert len(ModbusConnector(cfg).read_plan[1]) == 7
