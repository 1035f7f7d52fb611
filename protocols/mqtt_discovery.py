"""``edgeloop discover mqtt://host:port``: what a broker carries, and a starter connector config.

Subscribes to ``#`` (which by the MQTT spec never matches ``$SYS/...`` topics) for
``options.seconds``, then reports per topic (or per JSON field) the payload shape, update rate,
value range and the share of messages that did not fit the topic's usual shape. The starter
config groups topics of the same depth and payload kind into one subscription template:
the last levels become ``{tag}``/``{asset}``, levels that vary become captured fields, and JSON
objects become ``fields`` selectors (with timestamp and quality members recognised by name).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocols.discovery import DiscoveredPoint, DiscoverOptions, DiscoveryReport
from protocols.mqtt import MqttLink, PahoClient, parse_broker_url
from protocols.mqtt_payload import (
    NameTemplate,
    PayloadError,
    TopicTemplate,
    parse_number,
    parse_timestamp,
)

__all__ = ["discover"]

MAX_TOPICS = 5000
MAX_FIELDS = 64
_TS_NAMES = {"ts", "timestamp", "time", "t", "datetime", "sourcetimestamp"}
_Q_NAMES = {"quality", "q", "status", "statuscode", "qc"}
_SAFE_LEVEL = re.compile(r"[^{}+#]*\Z")


@dataclass(slots=True)
class _Stat:
    """Samples of one value stream (a number topic or one JSON field)."""

    types: Counter[str] = field(default_factory=Counter)
    n: int = 0
    lo: float | None = None
    hi: float | None = None
    example: str = ""
    ts_like: bool = True  # every value parsed as a timestamp
    q_like: bool = True  # every value looks like a quality

    def add(self, value: Any) -> None:
        self.n += 1
        kind = _kind(value)
        self.types[kind] += 1
        if not self.example:
            self.example = json.dumps(value)[:40]
        if kind in ("int", "float"):
            v = float(value)
            self.lo = v if self.lo is None else min(self.lo, v)
            self.hi = v if self.hi is None else max(self.hi, v)
        if self.ts_like:
            try:
                ns = parse_timestamp(value, "auto")
                self.ts_like = ns >= 1_000_000_000 * 10**9  # after 2001: a real timestamp
            except PayloadError:
                self.ts_like = False
        if self.q_like:
            self.q_like = (kind == "int" and 0 <= value <= 2) or (
                kind == "str" and str(value).lower() in ("good", "bad", "uncertain", "ok")
            )

    @property
    def type(self) -> str:
        return self.types.most_common(1)[0][0] if self.types else "none"


@dataclass(slots=True)
class _Topic:
    topic: str
    n: int = 0
    retained: int = 0
    first: float = 0.0
    last: float = 0.0
    live: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    value: _Stat = field(default_factory=_Stat)
    fields: dict[tuple[str, ...], _Stat] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.kinds.most_common(1)[0][0]

    @property
    def rate(self) -> float | None:
        if self.live < 2 or self.last <= self.first:
            return None
        return (self.live - 1) / (self.last - self.first)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if value is None:
        return "null"
    return type(value).__name__


def _flatten(obj: dict[str, Any], prefix: tuple[str, ...] = (), depth: int = 0) -> Any:
    for key, value in obj.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and depth < 4:
            yield from _flatten(value, path, depth + 1)
        else:
            yield path, value


def _observe(stats: _Topic, payload: bytes, now: float, retained: bool) -> None:
    stats.n += 1
    if retained:
        stats.retained += 1
    else:
        if stats.live == 0:
            stats.first = now
        stats.last = now
        stats.live += 1
    try:
        stats.value.add(parse_number(payload))
        stats.kinds["number"] += 1
        return
    except PayloadError:
        pass
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            stats.kinds["binary"] += 1
            return
        stats.kinds["text" if text.strip() else "empty"] += 1
        if text.strip():
            stats.value.add(text)
        return
    if not isinstance(doc, dict):
        stats.kinds["json-" + _kind(doc)] += 1
        return
    stats.kinds["json"] += 1
    for path, value in _flatten(doc):
        st = stats.fields.get(path)
        if st is None:
            if len(stats.fields) >= MAX_FIELDS:
                continue
            st = stats.fields[path] = _Stat()
        st.add(value)


async def _collect(url: str, options: DiscoverOptions) -> dict[str, _Topic]:
    host, port, tls = parse_broker_url(url)
    client = PahoClient(
        CallbackAPIVersion.VERSION2,
        client_id=f"edgeloop-discover-{os.getpid()}",
        clean_session=True,
        protocol=MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
    )
    client.suppress_exceptions = True
    if tls:
        client.tls_set()
    link = MqttLink(client, connect_timeout=options.timeout)
    topics: dict[str, _Topic] = {}
    loop = asyncio.get_running_loop()

    def on_message(msg: Any) -> None:
        topic = msg.topic
        if topic.startswith("$"):
            return
        stats = topics.get(topic)
        if stats is None:
            if len(topics) >= MAX_TOPICS:
                return
            stats = topics[topic] = _Topic(topic)
        _observe(stats, bytes(msg.payload), loop.time(), bool(msg.retain))

    link.on_message = on_message
    try:
        await link.connect(host, port, 30, clean_start=True, props=None)
        await link.subscribe([("#", 0)], options.timeout)
        # the observation window itself: how long the user asked us to watch
        await asyncio.sleep(options.seconds)
    finally:
        await link.close()
    return topics


def _selector(path: tuple[str, ...]) -> str:
    return ".".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in path)


@dataclass(slots=True)
class _Group:
    depth: int
    kind: str  # number | text | json
    topics: list[_Topic]


def _template(group: _Group) -> tuple[str, str, str | None]:
    """(topic template, asset template, tag template or None for JSON fields)."""
    levels = [t.topic.split("/") for t in group.topics]
    d = group.depth
    varying = [len({lv[i] for lv in levels}) > 1 for i in range(d)]
    asset_at: int | None
    tag_at: int | None
    if group.kind == "json":
        asset_at = d - 2 if d >= 2 and not varying[d - 1] else d - 1
        tag_at = None
    elif d >= 2:
        tag_at, asset_at = d - 1, d - 2
    else:  # a one-level topic: it is the asset, its value the tag "value"
        tag_at, asset_at = None, 0
    parts: list[str] = []
    asset_parts: list[str] = []
    tag = None
    for i in range(d):
        value = levels[0][i]
        literal = not varying[i] and bool(value) and _SAFE_LEVEL.match(value) is not None
        if i == tag_at:
            parts.append(value if literal else "{tag}")
            tag = value if literal else "{tag}"
        elif i == asset_at:
            parts.append(value if literal else "{asset}")
            asset_parts.append(value if literal else "{asset}")
        elif literal or not value:
            parts.append(value)
        else:
            parts.append(f"{{l{i}}}")
            asset_parts.append(f"{{l{i}}}")
    if group.kind != "json" and tag is None:
        tag = "value"
    return "/".join(parts), ".".join(asset_parts), tag


def _literal_levels(topic: str) -> int:
    return sum(1 for level in topic.split("/") if "{" not in level and level != "+")


def _starter(name: str, url: str, groups: list[_Group], notes: list[str]) -> dict[str, Any]:
    subs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for g in groups:
        topic, asset, tag = _template(g)
        if topic in seen:
            notes.append(f"topics of {topic!r} carry mixed payload kinds; kept the first")
            continue
        seen.add(topic)
        sub: dict[str, Any] = {"topic": topic, "qos": 1, "asset": asset}
        if g.kind == "text":
            sub["tag"] = tag
            sub["payload"] = {"format": "text"}
        elif g.kind == "number":
            sub["tag"] = tag
            sub["payload"] = {"format": "number"}
        else:
            merged: dict[tuple[str, ...], _Stat] = {}
            for t in g.topics:
                for path, st in t.fields.items():
                    if path not in merged or merged[path].n < st.n:
                        merged[path] = st
            payload: dict[str, Any] = {"format": "json"}
            fields: dict[str, str] = {}
            for path, st in sorted(merged.items()):
                leaf = path[-1].lower()
                if leaf in _TS_NAMES and st.ts_like and "timestamp" not in payload:
                    payload["timestamp"] = _selector(path)
                    payload["timestamp_required"] = False
                elif leaf in _Q_NAMES and st.q_like and "quality" not in payload:
                    payload["quality"] = _selector(path)
                elif st.type in ("int", "float", "bool", "str"):
                    fields[".".join(path)] = _selector(path)
            if not fields:
                notes.append(f"{topic!r}: JSON objects without scalar fields; left out")
                continue
            payload["fields"] = fields
            sub["tag"] = "{field}"
            sub["payload"] = payload
        subs.append(sub)
    return {
        "kind": "mqtt",
        "name": name,
        "url": url,
        "protocol": "3.1.1",
        "persistent_session": True,
        "subscriptions": subs,
    }


async def discover(url: str, options: DiscoverOptions) -> DiscoveryReport:
    """Watch the broker for ``options.seconds`` and describe what it carries."""
    topics = await _collect(url, options)
    notes: list[str] = []
    groups: dict[tuple[int, str], _Group] = {}
    for t in topics.values():
        kind = t.kind
        if kind not in ("number", "text", "json"):
            notes.append(f"{t.topic}: {kind} payloads are not mapped to readings")
            continue
        depth = t.topic.count("/") + 1
        groups.setdefault((depth, kind), _Group(depth, kind, [])).topics.append(t)
    # more literal levels first: the connector routes a topic to the first template it fits
    ordered = sorted(groups.values(), key=lambda g: -_literal_levels(_template(g)[0]))
    host = parse_broker_url(url)[0]
    starter = _starter(f"mqtt-{host}", url, ordered, notes) if ordered else {}
    report = DiscoveryReport(source=url, kind="mqtt", starter_config=starter, notes=notes)
    templates = [
        (TopicTemplate(s["topic"]), NameTemplate(s["asset"]), s)
        for s in starter.get("subscriptions", [])
    ]
    for t in sorted(topics.values(), key=lambda t: t.topic):
        asset, tag_t = t.topic, None
        for tt, at, sub in templates:
            captured = tt.match(t.topic)
            if captured is not None:
                asset = at.format(captured)
                tag_t = (sub["tag"], captured)
                break
        good = sum(t.kinds[k] for k in ("number", "text", "json"))
        if t.kind in ("number", "text"):
            tag = NameTemplate(tag_t[0]).format(tag_t[1]) if tag_t else "value"
            st = t.value
            report.points.append(
                DiscoveredPoint(
                    asset=asset,
                    tag=tag,
                    address=t.topic,
                    type=st.type if t.kind == "number" else "text",
                    samples=t.n,
                    rate_hz=t.rate,
                    minimum=st.lo,
                    maximum=st.hi,
                    bad_share=1 - t.kinds[t.kind] / t.n,
                    example=st.example,
                )
            )
        elif t.kind == "json":
            for path, st in sorted(t.fields.items()):
                name = ".".join(path)
                report.points.append(
                    DiscoveredPoint(
                        asset=asset,
                        tag=name,
                        address=f"{t.topic} {_selector(path)}",
                        type=st.type,
                        samples=st.n,
                        rate_hz=t.rate,
                        minimum=st.lo,
                        maximum=st.hi,
                        bad_share=1 - min(st.n, good) / t.n if t.n else 0.0,
                        example=st.example,
                    )
                )
        else:
            report.points.append(
                DiscoveredPoint(
                    asset=asset,
                    tag="-",
                    address=t.topic,
                    type=t.kind,
                    samples=t.n,
                    rate_hz=t.rate,
                    bad_share=1.0,
                )
            )
    if not topics:
        notes.append(f"no messages in {options.seconds:g}s (is anything publishing?)")
    retained = sum(1 for t in topics.values() if t.retained)
    if retained:
        notes.append(f"{retained} topic(s) had a retained message (not counted in rates)")
    return report
