"""Event rules: CEL conditions per asset with ``for``, cooldown and hysteresis, and their actions.

Each (rule, asset) pair is a small state machine evaluated every tick for assets that received
readings or a frame, and for every pair that is pending or active (so ``for`` timers expire and
clear conditions are checked without new data):

* idle -> pending when ``when`` holds; pending -> idle when it stops holding;
* pending -> active (FIRE) once ``when`` held for ``for`` seconds and the cooldown since the last
  firing has passed;
* active -> idle (CLEAR) when ``clear`` holds (hysteresis), or, without ``clear``, when ``when``
  no longer holds.

A condition that fails to evaluate (a missing tag, a type mismatch) counts as false and is
counted per rule; guard optional data with ``has(r.tag)``.

Firing produces an :class:`~shared.records.Event` (unless ``emit_event: false``) which the agent
writes to the outbox *before* the actions run; actions run as tasks owned by
:class:`ActionRunner`: writes through a connector, MQTT publishes (an MQTT connector's
``publish`` or a client of the action's own), webhooks (httpx, timeout, bounded retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlparse

import cel

from edge.config import MqttAction, RuleConfig, WebhookAction, WriteAction
from protocols.base import Connector
from shared.records import Event

__all__ = ["ActionRunner", "Firing", "RuleEngine"]

log = logging.getLogger(__name__)
_REF = re.compile(r"\b(r|f|age)\.([A-Za-z_][A-Za-z0-9_]*)")
_REF_CALL = re.compile(r"\b(r|f|age)\.([A-Za-z_][A-Za-z0-9_]*)(\s*\()?")
_BARE = re.compile(r"\b(r|f|age)\b")
_NAMESPACES = ("r", "f", "age")


def projection(expressions: Sequence[str]) -> dict[str, frozenset[str] | None]:
    """Per context map (``r``, ``f``, ``age``): the keys the expressions can read, or None.

    Only plain field selections (``r.temp``, ``has(age.temp)``) are projectable; any other use of
    a map (``r["temp"]``, ``size(r)``, a macro such as ``r.exists(...)``) needs the whole map.
    Converting a 100-entry map to CEL costs ~200 us per evaluation; the referenced keys alone
    cost a few us — and the result is the same (an absent key is absent either way).
    """
    names: dict[str, set[str] | None] = {ns: set() for ns in _NAMESPACES}
    for text in expressions:
        for m in _REF_CALL.finditer(text):
            ns, name, call = m.group(1), m.group(2), m.group(3)
            if call is not None:
                names[ns] = None
            else:
                keys = names[ns]
                if keys is not None:
                    keys.add(name)
        for bare in _BARE.findall(_REF_CALL.sub("", text)):
            names[bare] = None
    return {ns: (None if keys is None else frozenset(keys)) for ns, keys in names.items()}


@dataclass(slots=True)
class _PairState:
    pending_since: float | None = None
    active: bool = False
    last_fired: float | None = None


@dataclass(frozen=True, slots=True)
class Firing:
    """A rule fired (``cleared`` False) or cleared for one asset."""

    rule: RuleConfig
    asset: str
    cleared: bool
    event: Event | None
    context: dict[str, Any]


@dataclass(slots=True)
class _Rule:
    config: RuleConfig
    when: Any
    clear: Any
    refs: list[tuple[str, str]]
    states: dict[str, _PairState] = field(default_factory=dict)
    matches: dict[str, bool] = field(default_factory=dict)

    def applies(self, asset: str) -> bool:
        hit = self.matches.get(asset)
        if hit is None:
            hit = self.matches[asset] = any(
                fnmatch.fnmatchcase(asset, p) for p in self.config.assets
            )
        return hit


class _SafeFormat(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render(template: str, context: Mapping[str, Any]) -> str:
    """``str.format_map`` that leaves unknown ``{names}`` as they are."""
    try:
        return template.format_map(_SafeFormat(context))
    except (ValueError, IndexError, AttributeError):
        return template


class RuleEngine:
    """Evaluates every rule for the assets it is asked about; returns firings and clearings."""

    def __init__(
        self,
        rules: Sequence[RuleConfig],
        *,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.rules = [
            _Rule(
                r,
                cel.compile(r.when),
                cel.compile(r.clear) if r.clear else None,
                sorted(set(_REF.findall(r.when + " " + (r.clear or "")))),
            )
            for r in rules
        ]
        #: what the agent must put in the context: per map the keys read, None for all of it
        self.needs = projection([e for r in rules for e in (r.when, r.clear or "")])
        self._on_error = on_error
        self.errors: dict[str, int] = {}
        self.last_error: dict[str, str] = {}

    def watched_assets(self) -> set[str]:
        """Assets with a pending or active rule (they are evaluated even without new data)."""
        return {
            a
            for rule in self.rules
            for a, s in rule.states.items()
            if s.active or s.pending_since is not None
        }

    def _holds(self, rule: _Rule, program: Any, ctx: dict[str, Any]) -> bool:
        try:
            return program.execute(ctx) is True
        except Exception as exc:  # noqa: BLE001 - CEL raises RuntimeError/ValueError/TypeError
            name = rule.config.name
            self.errors[name] = self.errors.get(name, 0) + 1
            self.last_error[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self._on_error is not None:
                self._on_error(name)
            return False

    def evaluate(self, asset: str, ctx: dict[str, Any], now: float, ts_ns: int) -> list[Firing]:
        """Advance every applicable rule for ``asset``; ``now`` is monotonic seconds."""
        out: list[Firing] = []
        for rule in self.rules:
            if not rule.applies(asset):
                continue
            cfg = rule.config
            st = rule.states.get(asset)
            if st is None:
                st = rule.states[asset] = _PairState()
            if st.active:
                if rule.clear is not None:
                    cleared = self._holds(rule, rule.clear, ctx)
                else:
                    cleared = not self._holds(rule, rule.when, ctx)
                if cleared:
                    st.active = False
                    st.pending_since = None
                    out.append(Firing(cfg, asset, True, None, self._context(rule, asset, ctx)))
                continue
            if not self._holds(rule, rule.when, ctx):
                st.pending_since = None
                continue
            if st.pending_since is None:
                st.pending_since = now
            if now - st.pending_since < cfg.for_:
                continue
            if st.last_fired is not None and now - st.last_fired < cfg.cooldown:
                continue
            st.active = True
            st.last_fired = now
            context = self._context(rule, asset, ctx)
            event = None
            if cfg.emit_event:
                values = {k: v for k, v in context.items() if k not in ("rule", "asset")}
                event = Event(
                    cfg.name,
                    asset,
                    ts_ns,
                    cfg.severity_level,
                    render(cfg.message, context) if cfg.message else f"{cfg.name}: {cfg.when}",
                    values,
                )
            out.append(Firing(cfg, asset, False, event, context))
        return out

    @staticmethod
    def _context(rule: _Rule, asset: str, ctx: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": rule.config.name, "asset": asset}
        for ns, name in rule.refs:
            value = ctx.get(ns, {}).get(name)
            if value is not None:
                out[f"{ns}_{name}" if ns != "r" else name] = value
        for key in ("prediction", "score"):
            if ctx.get("has_frame") and ctx.get(key) is not None:
                out[key] = ctx[key]
        return out


class ActionRunner:
    """Runs rule actions as owned tasks: connector writes, MQTT publishes, webhooks."""

    def __init__(
        self,
        connectors: Mapping[str, Connector[Any]],
        *,
        on_result: Callable[[str, str, bool], None] | None = None,
        max_pending: int = 1000,
    ) -> None:
        self.connectors = connectors
        self._on_result = on_result
        self.max_pending = max_pending
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: Any = None  # httpx.AsyncClient, made on the first webhook (import cost)
        self._mqtt: dict[str, Any] = {}
        self.dropped = 0
        self._closed = True

    async def start(self) -> None:
        if not self._closed:
            return
        self._closed = False

    async def stop(self) -> None:
        """Let running actions finish for a moment, then cancel the rest. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=2.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        for client in self._mqtt.values():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._mqtt_close, client)
        self._mqtt.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def dispatch(self, firing: Firing) -> None:
        """Start the firing's actions (in order, one task per firing)."""
        if self._closed:
            return
        acts = [a for a in firing.rule.actions if a.type != "event"]
        if firing.cleared:
            acts = [a for a in acts if isinstance(a, WriteAction) and a.on_clear is not None]
        if not acts:
            return
        if len(self._tasks) >= self.max_pending:
            self.dropped += 1
            log.warning(
                "rule %s: %d actions pending; dropped this one", firing.rule.name, self.pending
            )
            return
        task = asyncio.create_task(self._run(firing, acts), name=f"rule:{firing.rule.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, firing: Firing, acts: Sequence[Any]) -> None:
        for act in acts:
            ok = True
            try:
                if isinstance(act, WriteAction):
                    value = act.on_clear if firing.cleared else act.value
                    conn = self.connectors[act.connector]
                    tag = render(act.tag, firing.context)  # e.g. "{asset}/alarm_lamp"
                    await asyncio.wait_for(conn.write(tag, value), timeout=10.0)
                elif isinstance(act, MqttAction):
                    await self._publish(act, firing)
                elif isinstance(act, WebhookAction):
                    await self._webhook(act, firing)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing action must not stop the others
                ok = False
                log.warning(
                    "rule %s asset %s: %s action failed: %s: %s",
                    firing.rule.name,
                    firing.asset,
                    act.type,
                    type(exc).__name__,
                    exc,
                )
            if self._on_result is not None:
                self._on_result(firing.rule.name, act.type, ok)

    def _payload(self, template: str, firing: Firing) -> bytes:
        if template:
            return render(template, firing.context).encode()
        doc = dict(firing.context)
        doc["cleared"] = firing.cleared
        if firing.event is not None:
            doc["message"] = firing.event.message
            doc["severity"] = firing.event.severity.name.lower()
            doc["ts_ns"] = firing.event.ts_ns
        return json.dumps(doc, default=str).encode()

    async def _publish(self, act: MqttAction, firing: Firing) -> None:
        payload = self._payload(act.payload, firing)
        topic = render(act.topic, firing.context)
        if act.connector is not None:
            publish: Any = getattr(self.connectors[act.connector], "publish", None)
            if publish is None:
                raise RuntimeError(f"connector {act.connector!r} cannot publish MQTT")
            await asyncio.wait_for(
                publish(topic, payload, qos=act.qos, retain=act.retain, within=act.timeout),
                timeout=act.timeout + 1,
            )
            return
        assert act.url is not None
        key = f"{act.url} {act.username or ''}"
        client: Any = self._mqtt.get(key)
        if client is None:
            # the thread itself gives up within act.timeout (TCP connect, then CONNACK)
            client = await asyncio.wait_for(
                asyncio.to_thread(self._mqtt_connect, act), act.timeout + 5
            )
            self._mqtt[key] = client
        info = client.publish(topic, payload, qos=act.qos, retain=act.retain)
        await asyncio.wait_for(
            asyncio.to_thread(info.wait_for_publish, act.timeout), act.timeout + 1
        )
        if not info.is_published():
            raise TimeoutError(
                f"MQTT publish to {act.url} {topic} not acknowledged within {act.timeout}s"
            )

    @staticmethod
    def _mqtt_connect(act: MqttAction) -> Any:
        """A connected paho client (its network thread running), or a clear error.

        Waits for the broker's CONNACK, so a refusal (bad credentials, not authorised) is an
        error naming the broker and the reason, not a publish that is never acknowledged.
        """
        import threading
        import time

        import paho.mqtt.client as mqtt

        assert act.url is not None
        u = urlparse(act.url)
        host, tls = u.hostname or "127.0.0.1", u.scheme == "mqtts"
        port = u.port or (8883 if tls else 1883)
        deadline = time.monotonic() + act.timeout
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)  # type: ignore[attr-defined]
        client.connect_timeout = act.timeout
        if act.username is not None:
            client.username_pw_set(act.username, act.password)
        if tls:
            client.tls_set()
        acked = threading.Event()
        outcome: list[Any] = []

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            outcome.append(reason)
            acked.set()

        client.on_connect = on_connect
        try:
            client.connect(host, port)
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"MQTT broker {host}:{port}: {exc}") from None
        client.loop_start()
        ok = acked.wait(max(0.0, deadline - time.monotonic()))
        if ok and not outcome[0].is_failure:
            return client
        client.disconnect()
        client.loop_stop()
        if not ok:
            raise TimeoutError(f"no CONNACK from MQTT broker {host}:{port} within {act.timeout}s")
        raise ConnectionError(f"MQTT broker {host}:{port} refused the connection: {outcome[0]}")

    @staticmethod
    def _mqtt_close(client: Any) -> None:
        client.disconnect()
        client.loop_stop()

    async def _webhook(self, act: WebhookAction, firing: Firing) -> None:
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient()
        body = self._payload("", firing)
        headers = {"content-type": "application/json", **act.headers}
        delay = act.backoff
        for attempt in range(act.retries + 1):
            try:
                resp = await self._http.request(
                    act.method, act.url, content=body, headers=headers, timeout=act.timeout
                )
                if resp.status_code < 500 and resp.status_code != 429:
                    resp.raise_for_status()
                    return
                err: Exception = httpx.HTTPStatusError(
                    f"HTTP {resp.status_code}", request=resp.request, response=resp
                )
            except httpx.TransportError as exc:
                err = exc
            if attempt == act.retries:
                raise err
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
