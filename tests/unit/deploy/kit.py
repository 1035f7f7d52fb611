"""What the deploy checks share: paths, compose variable substitution, PromQL metric names,
Prometheus exposition parsing and Go-template checks for the Helm chart."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
CHART = DEPLOY / "helm" / "edgeloop"
UNIT = DEPLOY / "systemd" / "edgeloop-edge.service"

#: values a test gives the variables compose reads from .env (what .env.example lists)
COMPOSE_ENV = {
    "EDGELOOP_API_TOKEN": "test-token-0123456789abcdefghij",
    "POSTGRES_PASSWORD": "test-password",
    "GRAFANA_ADMIN_PASSWORD": "test-admin",
}

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def substitute(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ``${V}``, ``${V:-default}``, ``${V:?error}``, ``$$``."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":-", "-"):
            return value if value else (arg or "")
        if op in (":?", "?"):
            if not value:
                raise KeyError(f"compose requires ${{{name}}}: {arg}")
            return value
        return value or ""

    return _VAR.sub(repl, text)


def compose(env: Mapping[str, str] = COMPOSE_ENV) -> dict[str, Any]:
    doc = yaml.safe_load(substitute(COMPOSE_FILE.read_text(), env))
    assert isinstance(doc, dict)
    return doc


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """container path -> host path of a service's bind mounts (relative to the compose file)."""
    out: dict[str, Path] = {}
    for vol in service.get("volumes") or []:
        src, _, rest = vol.partition(":")
        target = rest.split(":")[0]
        if src.startswith(("./", "../", "/")):
            out[target] = (COMPOSE_DIR / src).resolve()
    return out


def container_ports(service: Mapping[str, Any]) -> set[int]:
    """Ports a service offers: ``expose`` and the container side of ``ports``."""
    ports = {int(p) for p in service.get("expose") or []}
    for p in service.get("ports") or []:
        ports.add(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return ports


# --- PromQL --------------------------------------------------------------------------------

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![A-Za-z_:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names (in ``{}`` or grouping clauses), durations, numbers or Grafana variables."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    s = _NUMBER.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        rest = s[m.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function (or aggregation) call
        if m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def grafana_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, template variable and annotation."""

    def panels(items: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels") or [])

    for p in panels(dashboard.get("panels") or []):
        for t in p.get("targets") or []:
            if t.get("expr"):
                yield f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]
    for v in (dashboard.get("templating") or {}).get("list") or []:
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            m = _LABEL_VALUES.search(q)
            yield f"variable {v['name']!r}", m.group(1) if m else q
    for a in (dashboard.get("annotations") or {}).get("list") or []:
        if a.get("expr"):
            yield f"annotation {a.get('name')!r}", a["expr"]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboards() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, json.loads(p.read_text())) for p in sorted(DASHBOARDS.glob("*.json"))]


#: series Prometheus makes itself, not our exporters
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exposed_names(text: str) -> tuple[set[str], set[str]]:
    """(names with samples, names declared by HELP/TYPE without samples yet) in an exposition.

    A labelled metric has no sample until its first child exists (e.g. drift detections before
    any drift); its family is still declared, so the names it will have are known."""
    sampled: set[str] = set()
    declared: set[str] = set()
    for fam in text_string_to_metric_families(text):
        if fam.samples:
            sampled.update(s.name for s in fam.samples)
        else:
            declared.update(fam.name + sfx for sfx in _SUFFIXES.get(fam.type, ("",)))
    return sampled, declared - sampled


# --- Helm templates ------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)
_VALUES_REF = re.compile(r"\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def template_actions(text: str) -> list[str]:
    return [m.group(1) for m in _ACTION.finditer(text)]


def values_refs(text: str) -> set[tuple[str, ...]]:
    return {tuple(m.group(1).strip(".").split(".")) for m in _VALUES_REF.finditer(text)}


def block_balance(text: str) -> list[str]:
    """Problems with the nesting of if/range/with/define/block ... end in a template."""
    depth = 0
    problems = []
    for action in template_actions(text):
        if action.startswith("/*"):
            continue
        word = action.split(None, 1)[0] if action else ""
        if word in {"if", "range", "with", "define", "block"}:
            depth += 1
        elif word == "end":
            depth -= 1
            if depth < 0:
                problems.append("'end' without an open block")
                depth = 0
        elif word == "else" and depth == 0:
            problems.append("'else' outside a block")
    if depth:
        problems.append(f"{depth} block(s) not closed with 'end'")
    if text.count("{{") != text.count("}}"):
        problems.append("unbalanced '{{' / '}}'")
    return problems
