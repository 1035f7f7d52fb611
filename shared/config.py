"""YAML configuration on pydantic, with errors a person can act on.

Every problem names the file, the key path (``connectors[2].modbus.registers[5].type``), the line,
the bad value and what was expected::

    edge.yaml: 1 problem
      connectors[2].modbus.registers[5].type (line 31): got 'flaot'; expected one of 'int16', ...

Environment overrides: ``EDGELOOP__UPLINK__BOOTSTRAP_SERVERS=kafka:9092`` sets
``uplink.bootstrap_servers`` (the value is parsed as YAML, so numbers and lists work). Duplicate
keys in a mapping are an error rather than silently taking the last one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ConfigError",
    "ConfigModel",
    "ConfigProblem",
    "format_path",
    "load_config",
    "parse_config",
]

M = TypeVar("M", bound=BaseModel)


class ConfigModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and remembers node positions."""


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


def _describe(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    value = err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return (
            f"unknown key (value {value!r}); check the spelling against the configuration reference"
        )
    if msg.startswith("Input should be "):
        expected = msg[len("Input should be ") :]
        return f"got {value!r}; expected {expected}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"got {value!r}; {msg}"


def _apply_env(doc: dict[str, Any], prefix: str, environ: Mapping[str, str]) -> None:
    head = f"{prefix}__"
    for name, raw in sorted(environ.items()):
        if not name.startswith(head):
            continue
        keys = [k.lower() for k in name[len(head) :].split("__") if k]
        if not keys:
            continue
        target = doc
        for key in keys[:-1]:
            nxt = target.get(key)
            if not isinstance(nxt, dict):
                nxt = target[key] = {}
            target = nxt
        target[keys[-1]] = yaml.safe_load(raw) if raw else raw


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
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = None if mark is None else mark.line + 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [ConfigProblem("", f"not valid YAML: {problem}", line)]) from exc
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
    if env_prefix:
        _apply_env(doc, env_prefix, os.environ if environ is None else environ)
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path, line = _locate(root, tuple(err["loc"]))
            problems.append(ConfigProblem(path, _describe(err), line))
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
