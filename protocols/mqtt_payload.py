"""MQTT topics and payloads to values: templates, parsers, timestamps. Pure, no I/O.

A *topic template* such as ``plant/{line}/{asset}/{tag}`` names the topic levels it captures; the
MQTT filter it subscribes to is derived from it (``plant/+/+/+``). A *name template* such as
``{line}-{asset}`` builds an asset or tag name from captured fields.

A *payload parser* turns one message body into samples ``(field, value, ts_ns, quality, status)``;
``field`` is ``""`` for a single-value payload and the field's name when one JSON message carries
several values. Anything a parser cannot use raises :class:`PayloadError` with a reason a person
can act on (it ends up in the connector's dead-letter store).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

import jmespath
import jmespath.parser

from shared.records import Quality, Value

__all__ = [
    "JsonParser",
    "NameTemplate",
    "NumberParser",
    "PayloadError",
    "Sample",
    "TemplateError",
    "TextParser",
    "TimestampFormat",
    "TopicTemplate",
    "ValueType",
    "compile_selector",
    "parse_number",
    "parse_timestamp",
    "quality_of",
]

#: (field, value, ts_ns, quality, status)
Sample: TypeAlias = tuple[str, Value, int, Quality, int]
TimestampFormat: TypeAlias = Literal[
    "auto", "epoch_s", "epoch_ms", "epoch_us", "epoch_ns", "iso8601"
]
ValueType: TypeAlias = Literal["auto", "number", "bool", "string"]

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class TemplateError(ValueError):
    """A topic or name template is malformed (bad placeholder, misplaced wildcard...)."""


class PayloadError(ValueError):
    """A payload could not be turned into values; the message says why."""


def _placeholders(text: str) -> list[str]:
    names = []
    for m in _PLACEHOLDER.finditer(text):
        if not _NAME.match(m[1]):
            raise TemplateError(
                f"{text!r}: placeholder {{{m[1]}}} is not a name (letters, digits, _)"
            )
        names.append(m[1])
    stray = _PLACEHOLDER.sub("", text)
    if "{" in stray or "}" in stray:
        raise TemplateError(f"{text!r}: unbalanced brace (placeholders look like {{name}})")
    return names


class TopicTemplate:
    """A topic pattern whose ``{name}`` parts capture topic levels.

    A level holding a placeholder (alone or with literal text around it: ``line{n}``) becomes
    ``+`` in the derived filter; ``+`` and a final ``#`` may be written literally (matched, not
    captured). A placeholder never matches an empty level or crosses a ``/``.
    """

    __slots__ = ("_regex", "fields", "filter", "template")

    def __init__(self, template: str) -> None:
        if not template:
            raise TemplateError("topic template is empty")
        if "\x00" in template:
            raise TemplateError(f"{template!r}: topics cannot contain NUL")
        self.template = template
        levels = template.split("/")
        fields: list[str] = []
        filt: list[str] = []
        regex: list[str] = []
        for i, level in enumerate(levels):
            names = _placeholders(level)
            if level == "#":
                if i != len(levels) - 1:
                    raise TemplateError(f"{template!r}: '#' is only allowed as the last level")
                filt.append("#")
                # 'a/#' also matches 'a' itself (MQTT 3.1.1 section 4.7.1.2)
                if regex:
                    regex[-1] += "(?:/.*)?"
                else:
                    regex.append(".*")
                continue
            if ("#" in level) or ("+" in level and level != "+"):
                raise TemplateError(
                    f"{template!r}: level {level!r} mixes a wildcard with other text"
                )
            if level == "+":
                filt.append("+")
                regex.append("[^/]*")
                continue
            if not names:
                filt.append(level)
                regex.append(re.escape(level))
                continue
            filt.append("+")
            parts: list[str] = []
            pos = 0
            for m in _PLACEHOLDER.finditer(level):
                parts.append(re.escape(level[pos : m.start()]))
                name = m[1]
                if name in fields:
                    raise TemplateError(f"{template!r}: placeholder {{{name}}} appears twice")
                fields.append(name)
                parts.append(f"(?P<{name}>[^/]+)")
                pos = m.end()
            parts.append(re.escape(level[pos:]))
            regex.append("".join(parts))
        self.fields: tuple[str, ...] = tuple(fields)
        self.filter = "/".join(filt)
        self._regex = re.compile("/".join(regex) + r"\Z", re.DOTALL)

    def match(self, topic: str) -> dict[str, str] | None:
        """The captured fields when ``topic`` fits the template, else None."""
        m = self._regex.match(topic)
        return None if m is None else m.groupdict()

    def format(self, fields: Mapping[str, str]) -> str:
        """The topic for ``fields`` (used for command topics); raises KeyError naming a missing one."""
        if "+" in self.template.split("/"):
            raise TemplateError(f"{self.template!r}: a '+' level cannot be formatted into a topic")
        if self.template.endswith("#"):
            raise TemplateError(f"{self.template!r}: a '#' level cannot be formatted into a topic")
        return _PLACEHOLDER.sub(lambda m: fields[m[1]], self.template)

    def __repr__(self) -> str:
        return f"TopicTemplate({self.template!r})"


class NameTemplate:
    """An asset or tag name built from captured fields: ``{line}-{asset}``."""

    __slots__ = ("_parts", "fields", "template")

    def __init__(self, template: str) -> None:
        if not template:
            raise TemplateError("name template is empty")
        self.template = template
        self.fields: tuple[str, ...] = tuple(_placeholders(template))
        parts: list[tuple[bool, str]] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(template):
            if m.start() > pos:
                parts.append((False, template[pos : m.start()]))
            parts.append((True, m[1]))
            pos = m.end()
        if pos < len(template):
            parts.append((False, template[pos:]))
        self._parts = tuple(parts)

    def format(self, fields: Mapping[str, str]) -> str:
        if len(self._parts) == 1:
            is_field, text = self._parts[0]
            return fields[text] if is_field else text
        return "".join(fields[t] if f else t for f, t in self._parts)


# --- values ---------------------------------------------------------------------------------

_TRUE = frozenset({b"true", b"on", b"yes"})
_FALSE = frozenset({b"false", b"off", b"no"})


def parse_number(payload: bytes) -> bool | int | float:
    """A bare number or boolean: ``42``, ``-1.5e3``, ``true``/``false``/``on``/``off``/``yes``/``no``."""
    text = payload.strip()
    if not text:
        raise PayloadError("empty payload where a number was expected")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise PayloadError(f"not a number or boolean: {_preview(payload)}")


def _preview(payload: bytes, n: int = 40) -> str:
    text = repr(payload[:n])
    return text + ("..." if len(payload) > n else "")


def _coerce(value: Any, value_type: ValueType, what: str) -> Value:
    if value_type == "auto":
        if isinstance(value, bool | int | float | str):
            return value
    elif value_type == "number":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            try:
                n = parse_number(value.encode())
            except PayloadError:
                raise PayloadError(f"{what}: expected a number, got string {value!r}") from None
            return int(n) if isinstance(n, bool) else n
    elif value_type == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower().encode() in _TRUE | _FALSE:
            return value.lower().encode() in _TRUE
        raise PayloadError(f"{what}: expected a boolean, got {value!r}")
    elif isinstance(value, str):
        return value
    elif isinstance(value, bool | int | float):
        return json.dumps(value)
    if value is None:
        raise PayloadError(f"{what}: selector found nothing (null)")
    raise PayloadError(
        f"{what}: expected a {value_type if value_type != 'auto' else 'scalar'} value, got {type(value).__name__} {_short(value)}"
    )


def _short(value: Any, n: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= n else text[:n] + "..."


# --- timestamps -------------------------------------------------------------------------------

_SCALE = {"epoch_s": 1_000_000_000, "epoch_ms": 1_000_000, "epoch_us": 1_000, "epoch_ns": 1}
# numbers below these magnitudes are read as s / ms / us (auto): 1e11 s is the year 5138
_AUTO_LIMITS = ((1e11, 1_000_000_000), (1e14, 1_000_000), (1e17, 1_000))


def parse_timestamp(value: Any, fmt: TimestampFormat) -> int:
    """Nanoseconds since the epoch from an epoch number (s/ms/us/ns) or an ISO-8601 string.

    ``auto`` reads strings as ISO-8601 and numbers by magnitude (s, ms, us, ns). ISO-8601 without
    a UTC offset is taken as UTC. Raises :class:`PayloadError` for anything else.
    """
    if isinstance(value, bool) or value is None:
        raise PayloadError(f"timestamp: expected a number or ISO-8601 string, got {value!r}")
    if isinstance(value, str) and fmt != "iso8601":
        stripped = value.strip()
        try:
            value = int(stripped)
        except ValueError:
            try:
                value = float(stripped)
            except ValueError:
                if fmt != "auto":
                    raise PayloadError(f"timestamp: expected {fmt} number, got {value!r}") from None
    if isinstance(value, str):
        return _iso_ns(value)
    if not isinstance(value, int | float):
        raise PayloadError(f"timestamp: expected a number or ISO-8601 string, got {_short(value)}")
    if fmt == "iso8601":
        raise PayloadError(f"timestamp: expected an ISO-8601 string, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PayloadError(f"timestamp: not a finite number: {value!r}")
    if value < 0:
        raise PayloadError(f"timestamp: negative epoch time {value!r}")
    if fmt == "auto":
        scale = 1
        for limit, s in _AUTO_LIMITS:
            if value < limit:
                scale = s
                break
    else:
        scale = _SCALE[fmt]
    if isinstance(value, int):
        return value * scale
    # split to keep float precision for sub-second parts of epoch seconds
    whole = int(value)
    return whole * scale + round((value - whole) * scale)


def _iso_ns(text: str) -> int:
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    # datetime keeps microseconds; keep nanosecond digits ourselves
    frac_ns = 0
    m = re.match(r"(.*?[T ]\d{2}:\d{2}:\d{2})[.,](\d+)(.*)\Z", raw)
    if m:
        digits = m[2]
        frac_ns = int((digits + "000000000")[:9])
        raw = m[1] + m[3]
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise PayloadError(f"timestamp: not ISO-8601: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    seconds = int(dt.timestamp())
    ns = seconds * 1_000_000_000 + frac_ns
    if ns < 0:
        raise PayloadError(f"timestamp: before the epoch: {text!r}")
    return ns


# --- quality ---------------------------------------------------------------------------------

_QUALITY_WORDS = {
    "good": Quality.GOOD,
    "ok": Quality.GOOD,
    "uncertain": Quality.UNCERTAIN,
    "bad": Quality.BAD,
}


def quality_of(value: Any) -> tuple[Quality, int]:
    """``(quality, status)`` from a payload's quality field.

    0/1/2 are good/uncertain/bad; larger integers are OPC UA StatusCodes (severity in the top two
    bits) and are kept as the status; the words good/ok/uncertain/bad (any case) and booleans
    (true = good) are accepted.
    """
    if isinstance(value, bool):
        return (Quality.GOOD, 0) if value else (Quality.BAD, 0)
    if isinstance(value, int) and value >= 0:
        if value <= 2:
            return Quality(value), value
        if value > 0xFFFFFFFF:
            raise PayloadError(f"quality: {value} is not a 32-bit status code")
        severity = value >> 30
        return (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.BAD)[severity], value
    if isinstance(value, str):
        q = _QUALITY_WORDS.get(value.strip().lower())
        if q is not None:
            return q, 0
    raise PayloadError(f"quality: expected 0/1/2, a status code, good/uncertain/bad, got {value!r}")


# --- parsers ---------------------------------------------------------------------------------


def compile_selector(expression: str) -> jmespath.parser.ParsedResult:
    """Compile a JMESPath expression; raises ValueError with the position of the error."""
    try:
        return jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        raise ValueError(f"invalid JMESPath expression {expression!r}: {exc}") from None


class NumberParser:
    """The whole payload is one number or boolean."""

    multi = False

    def parse(self, payload: bytes, recv_ns: int) -> list[Sample]:
        return [("", parse_number(payload), recv_ns, Quality.GOOD, 0)]


class TextParser:
    """The whole payload is one UTF-8 string value (a state, a recipe name...)."""

    multi = False

    def parse(self, payload: bytes, recv_ns: int) -> list[Sample]:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        return [("", text, recv_ns, Quality.GOOD, 0)]


Selector: TypeAlias = Callable[[Any], Any]


class JsonParser:
    """JSON with JMESPath selectors.

    Exactly one of ``value`` (one value), ``fields`` (field name -> selector: several values per
    message) or ``expand`` (a selector yielding an object; each scalar member is one value,
    named by its key; non-scalar members are skipped). ``timestamp`` and ``quality`` selectors
    apply to every value of the message; when ``timestamp`` finds nothing the receipt time is
    used only if ``timestamp_required`` is false.
    """

    def __init__(
        self,
        *,
        value: str | None = None,
        fields: Mapping[str, str] | None = None,
        expand: str | None = None,
        timestamp: str | None = None,
        timestamp_format: TimestampFormat = "auto",
        timestamp_required: bool = True,
        quality: str | None = None,
        value_type: ValueType = "auto",
    ) -> None:
        given = [x is not None for x in (value, fields, expand)]
        if sum(given) != 1:
            raise ValueError("set exactly one of value, fields or expand")
        self.multi = value is None
        self._value = compile_selector(value) if value is not None else None
        self._fields = (
            [(name, compile_selector(expr)) for name, expr in fields.items()]
            if fields is not None
            else None
        )
        self._expand = compile_selector(expand) if expand is not None else None
        self._ts = compile_selector(timestamp) if timestamp else None
        self._ts_format: TimestampFormat = timestamp_format
        self._ts_required = timestamp_required
        self._quality = compile_selector(quality) if quality else None
        self._value_type: ValueType = value_type
        # the timestamp and quality members are metadata, not values of their own
        self._skip = frozenset(
            sel.expression
            for sel in (self._ts, self._quality)
            if sel is not None and _NAME.match(sel.expression)
        )

    def parse(self, payload: bytes, recv_ns: int) -> list[Sample]:
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError(f"not JSON: {exc} in {_preview(payload)}") from None
        ts = recv_ns
        if self._ts is not None:
            raw_ts = self._ts.search(doc)
            if raw_ts is not None:
                ts = parse_timestamp(raw_ts, self._ts_format)
            elif self._ts_required:
                raise PayloadError(f"timestamp: selector {self._ts.expression!r} found nothing")
        quality, status = Quality.GOOD, 0
        if self._quality is not None:
            raw_q = self._quality.search(doc)
            if raw_q is not None:
                quality, status = quality_of(raw_q)
        vt = self._value_type
        if self._value is not None:
            raw = self._value.search(doc)
            if raw is None:
                raise PayloadError(f"value: selector {self._value.expression!r} found nothing")
            return [("", _coerce(raw, vt, "value"), ts, quality, status)]
        out: list[Sample] = []
        if self._fields is not None:
            missing = []
            for name, sel in self._fields:
                raw = sel.search(doc)
                if raw is None:
                    missing.append(name)
                    continue
                out.append((name, _coerce(raw, vt, f"field {name!r}"), ts, quality, status))
            if not out:
                raise PayloadError(
                    f"no field found: selectors for {', '.join(missing)} found nothing"
                )
            return out
        assert self._expand is not None
        obj = self._expand.search(doc)
        if not isinstance(obj, dict):
            raise PayloadError(
                f"expand: selector {self._expand.expression!r} found "
                f"{'nothing' if obj is None else type(obj).__name__}, expected an object"
            )
        skip = self._skip
        for key, raw in obj.items():
            if key in skip or not isinstance(raw, bool | int | float | str) or not key:
                continue
            out.append((key, _coerce(raw, vt, f"field {key!r}"), ts, quality, status))
        if not out:
            raise PayloadError("expand: the object has no scalar members")
        return out
