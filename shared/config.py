"""YAML configuration on pydantic, with errors a person can act on.

Every problem names the file, the key path (``connectors[2].modbus.registers[5].type``), the line,
the bad value and what was expected::

    edge.yaml: 1 problem
      connectors[2].modbus.registers[5].type (line 31): got 'flaot'; expected one of 'int16', ...

Environment overrides: ``EDGELOOP__UPLINK__BOOTSTRAP_SERVERS=kafka:9092`` sets
``uplink.bootstrap_servers`` (the value is parsed as YAML, so numbers and lists work; the value
of a secret field, typed ``SecretStr``, is taken as it is). Duplicate keys in a mapping are an
error rather than silently taking the last one.

Secrets are never printed: the value of a ``SecretStr`` field, or of a key named like one
(token, password, secret, passphrase, private key, ...), shows as ``<redacted>`` in every error,
whatever its type, and so do credentials in URLs. The YAML loader bounds what aliases may expand
to (``MAX_ALIAS_NODES``) and how deep a document may nest (``MAX_DEPTH``).
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, SecretBytes, SecretStr, ValidationError

__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_DEPTH",
    "REDACTED",
    "ConfigError",
    "ConfigModel",
    "ConfigProblem",
    "format_path",
    "load_config",
    "load_yaml",
    "parse_config",
]

M = TypeVar("M", bound=BaseModel)

#: Deepest nesting of mappings and sequences a document may have (aliases counted expanded).
MAX_DEPTH = 64
#: Most nodes the aliases of one document may add when expanded (the "billion laughs" bound).
MAX_ALIAS_NODES = 100_000
#: What an error shows instead of a secret.
REDACTED = "<redacted>"


class ConfigModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment.

    pydantic's own error text leaves the input out (it may hold a secret); :func:`parse_config`
    shows bad values itself, redacted where secret.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, hide_input_in_errors=True
    )


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path or '<top level>'}"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"


class ConfigError(ValueError):
    """A configuration file is unreadable or invalid; ``problems`` lists every issue found."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        n = len(problems)
        lines = [f"{source}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


def format_path(loc: tuple[int | str, ...]) -> str:
    """('connectors', 2, 'modbus', 'type') -> 'connectors[2].modbus.type'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Refused(yaml.composer.ComposerError):
    """A document over the loader's bounds (alias expansion, depth); valid YAML, refused."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(None, None, problem, mark)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and remembers node positions.

    Bounded: aliases may add at most ``MAX_ALIAS_NODES`` nodes when expanded (each alias counts
    the whole subtree it stands for, so nested aliases cannot multiply unseen), an alias may not
    stand for a node that contains it, and nesting, aliases expanded, is at most ``MAX_DEPTH``
    deep (the composer and constructor recurse; deeper would be a ``RecursionError``).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._alias_nodes = 0
        self._open_anchors: list[str] = []
        self._measured: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor) if event.anchor is not None else None
            if target is not None:
                self._check_alias(event, target)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if anchor is not None:
            self._open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open_anchors.pop()

    def _check_alias(self, event: yaml.AliasEvent, target: yaml.Node) -> None:
        if event.anchor in self._open_anchors:
            raise _Refused(
                f"the alias *{event.anchor} stands for a node that contains it",
                event.start_mark,
            )
        size, height = self._measure(target)
        self._alias_nodes += size
        if self._alias_nodes > MAX_ALIAS_NODES:
            raise _Refused(
                f"too many YAML aliases: they expand to over {MAX_ALIAS_NODES} nodes",
                event.start_mark,
            )
        if self._depth + height > MAX_DEPTH:
            raise _Refused(
                f"nested deeper than {MAX_DEPTH} levels (with the alias *{event.anchor} expanded)",
                event.start_mark,
            )

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        """Nodes and height of ``node`` with its aliases expanded (memoised: shared subtrees
        are measured once; heights are bounded by ``MAX_DEPTH``, so the recursion is too)."""
        known = self._measured.get(id(node))
        if known is not None:
            return known
        size, height = 1, 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                s, h = self._measure(child)
                size, height = size + s, max(height, h + 1)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                for child in (key, value):
                    s, h = self._measure(child)
                    size, height = size + s, max(height, h + 1)
        self._measured[id(node)] = (size, height)
        return size, height


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first defined on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _locate(root: yaml.Node | None, loc: tuple[int | str, ...]) -> tuple[str, int | None]:
    """The key path as the user wrote it, and the 1-based line of the node it names.

    pydantic puts the tag of a discriminated union into ``loc`` (``connectors[2].modbus...``);
    a part that is not a key of the YAML mapping at that point, and is not the last part (a
    missing key), is such a tag and is left out of the path.
    """
    node = root
    line = None if node is None else node.start_mark.line + 1
    shown: list[int | str] = []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next(
                (
                    (k, v)
                    for k, v in node.value
                    if isinstance(k, yaml.ScalarNode) and k.value == part
                ),
                None,
            )
            if match is None:
                if last:
                    shown.append(part)
                continue
            node = match[1]
            line = match[0].start_mark.line + 1
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            node = None
        shown.append(part)
    return format_path(tuple(shown)), line


#: Key names whose values are secrets whatever their declared type (OPC UA ``password: str``,
#: webhook ``headers: {Authorization: ...}``, a misspelled or unknown key holding a token).
_SECRET_NAME = re.compile(
    r"token|passw|passphrase|secret|credential|api_?key|private_?key|authorization|cookie",
    re.IGNORECASE,
)
_SECRET_TYPES: tuple[type, ...] = tuple(
    t for t in (SecretStr, SecretBytes, getattr(pydantic, "Secret", None)) if isinstance(t, type)
)
#: ``scheme://user:password@host``: the password part of a URL.
_URL_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):[^/@\s]*@")
_MAX_SHOWN = 200
#: Shorter secrets are removed from messages only where quoted.
_MIN_BARE_SECRET = 8


def _members(tp: Any) -> list[Any]:
    """The alternatives of ``tp`` with ``Annotated`` and ``Optional``/unions unwrapped."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _step(tp: Any, part: int | str) -> Any | None:
    """The declared type one ``loc`` step below ``tp``; ``None`` where it cannot be told."""
    tagged = []
    for m in _members(tp):
        origin, args = typing.get_origin(m), typing.get_args(m)
        if _is_model(m) and isinstance(part, str):
            field = m.model_fields.get(part)
            if field is not None:
                return field.annotation
            # pydantic names the member of a discriminated union by its tag
            for f in m.model_fields.values():
                if typing.get_origin(f.annotation) is typing.Literal and part in typing.get_args(
                    f.annotation
                ):
                    tagged.append(m)
                    break
        elif origin in (list, set, frozenset, tuple) and isinstance(part, int) and args:
            return args[0]
        elif origin is dict and isinstance(part, str) and len(args) == 2:
            return args[1]
    if tagged:
        return tagged[0] if len(tagged) == 1 else typing.Union[tuple(tagged)]  # noqa: UP007
    return None


def _declared_secret(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> bool:
    """Whether the field at ``loc`` is declared secret (``SecretStr`` and kin) in ``model``."""
    tp: Any = model
    for part in loc:
        if tp is None:
            return False
        tp = _step(tp, part)
    return tp is not None and any(
        isinstance(m, type) and issubclass(m, _SECRET_TYPES) for m in _members(tp)
    )


def _is_secret(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> bool:
    """A value at ``loc`` must not be shown: a secret field, or a key named like a secret."""
    named = any(isinstance(p, str) and _SECRET_NAME.search(p) for p in loc)
    return named or _declared_secret(model, loc)


class _Redacted:
    def __repr__(self) -> str:
        return REDACTED


def _redacted(
    value: Any,
    model: type[BaseModel] | None,
    loc: tuple[int | str, ...],
    found: list[str],
    depth: int = 0,
) -> Any:
    """``value`` with every secret in it (by declared type or key name) replaced; the secrets'
    texts are added to ``found``."""
    if _is_secret(model, loc):
        _collect(value, found, depth)
        return _Redacted()
    if depth > MAX_DEPTH:
        return ...
    if isinstance(value, str):
        for m in _URL_PASSWORD.finditer(value):
            found.append(m.group(0))
        return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", value)
    if isinstance(value, Mapping):
        return {
            k: _redacted(v, model, (*loc, k) if isinstance(k, str | int) else loc, found, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redacted(v, model, (*loc, i), found, depth + 1) for i, v in enumerate(value)]
    return value


def _collect(value: Any, found: list[str], depth: int) -> None:
    """The texts a secret value could show up as in a message (its scalars, as written)."""
    if depth > MAX_DEPTH:
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _collect(k, found, depth + 1)
            _collect(v, found, depth + 1)
    elif isinstance(value, list | tuple | set):
        for v in value:
            _collect(v, found, depth + 1)
    elif isinstance(value, SecretStr | SecretBytes):
        _collect(value.get_secret_value(), found, depth + 1)
    elif value is not None and not isinstance(value, bool):
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if text:
            found.append(text)


def _scrub(text: str, secrets: list[str]) -> str:
    """``text`` without any of ``secrets`` (longest first) or URL passwords in it.

    A secret is removed wherever it is quoted; bare, only when it is long enough not to be a
    word of the message itself (a token ``token`` must not blank out ``api.token``).
    """
    for secret in sorted(set(secrets), key=len, reverse=True):
        for quoted in (repr(secret), f'"{secret}"', f"'{secret}'"):
            text = text.replace(quoted, REDACTED)
        if len(secret) >= _MIN_BARE_SECRET:
            text = text.replace(secret, REDACTED)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)


def _show(shown: Any) -> str:
    text = repr(shown)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _describe(
    err: Mapping[str, Any],
    model: type[BaseModel] | None = None,
    loc: tuple[int | str, ...] = (),
) -> str:
    """What was wrong at ``loc``, with the bad value unless it is a secret; a secret in the
    value (or echoed by a validator's message) shows as ``<redacted>``."""
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        # the value of an unknown key is not shown: it may be a misspelled secret
        return "unknown key; check the spelling against the configuration reference"
    secrets: list[str] = []
    value = _redacted(err.get("input"), model, loc, secrets)
    if msg.startswith("Input should be "):
        out = f"got {_show(value)}; expected {msg[len('Input should be ') :]}"
    else:
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        # a check of a whole section names the section; its contents are not the point
        out = msg if isinstance(value, Mapping) else f"got {_show(value)}; {msg}"
    return _scrub(out, secrets)


def _apply_env(
    doc: dict[str, Any],
    prefix: str,
    environ: Mapping[str, str],
    model: type[BaseModel] | None = None,
) -> tuple[dict[tuple[str, ...], str], list[ConfigProblem]]:
    """Set ``PREFIX__A__B=value`` overrides in ``doc``; returns which variable set which key
    path, and the variables that could not be read (never showing a secret's value)."""
    head = f"{prefix}__"
    origins: dict[tuple[str, ...], str] = {}
    problems: list[ConfigProblem] = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(head):
            continue
        keys = [k.lower() for k in name[len(head) :].split("__") if k]
        if not keys:
            continue
        path = tuple(keys)
        value: Any = raw
        if raw and not _declared_secret(model, path):
            try:
                value = _load_yaml(raw)[1]
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or "cannot be parsed"
                problems.append(
                    ConfigProblem(
                        format_path(path),
                        f"environment variable {name}: not valid YAML ({problem})",
                    )
                )
                continue
        target = doc
        for key in keys[:-1]:
            nxt = target.get(key)
            if not isinstance(nxt, dict):
                nxt = target[key] = {}
            target = nxt
        target[keys[-1]] = value
        origins[path] = name
    return origins, problems


def load_yaml(text: str) -> Any:
    """One YAML document as data, with the config loader's rules: safe tags only, duplicate
    keys refused, aliases and nesting bounded; raises ``yaml.YAMLError``."""
    return _load_yaml(text)[1]


def _load_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """Compose and construct one document with the bounded loader: (root node, data)."""
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
        return root, None if root is None else loader.construct_document(root)
    finally:
        loader.dispose()


def parse_config(
    text: str,
    model: type[M],
    *,
    source: str = "<config>",
    env_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> M:
    """Parse YAML text into ``model``; raise :class:`ConfigError` naming every problem."""
    try:
        root, doc = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = None if mark is None else mark.line + 1
        problem = getattr(exc, "problem", None) or str(exc)
        if not isinstance(exc, _Refused):
            problem = f"not valid YAML: {problem}"
        raise ConfigError(source, [ConfigProblem("", problem, line)]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(
            source,
            [
                ConfigProblem(
                    "", f"expected a mapping of keys at the top level, got {type(doc).__name__}", 1
                )
            ],
        )
    origins: dict[tuple[str, ...], str] = {}
    if env_prefix:
        environ = os.environ if environ is None else environ
        origins, env_problems = _apply_env(doc, env_prefix, environ, model)
        if env_problems:
            raise ConfigError(source, env_problems)
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            path, line = _locate(root, loc)
            problem = ConfigProblem(path, _describe(err, model, loc), line)
            env = next(((k, v) for k, v in origins.items() if loc[: len(k)] == k), None)
            if env is not None:
                # not in the file: no line, and the key path as the variable spells it
                if not path.startswith(format_path(env[0])):
                    path = format_path(loc)
                problem = ConfigProblem(path, f"{problem.message} (from {env[1]})")
            problems.append(problem)
        raise ConfigError(source, problems) from None


def load_config(
    path: str | os.PathLike[str],
    model: type[M],
    *,
    env_prefix: str | None = "EDGELOOP",
    environ: Mapping[str, str] | None = None,
) -> M:
    """Load a YAML file into ``model``; raise :class:`ConfigError` naming file, key path, line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            str(p), [ConfigProblem("", f"cannot read the file: {exc.strerror}")]
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [ConfigProblem("", f"not UTF-8 text: {exc}")]) from exc
    return parse_config(text, model, source=str(p), env_prefix=env_prefix, environ=environ)
