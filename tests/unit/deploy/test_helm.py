"""deploy/helm/edgeloop without a helm binary (none on apt or PyPI): Chart.yaml and values.yaml
parse, every ``.Values`` path a template uses exists, blocks nest, every ``include`` names a
defined template, and the cloud.yaml the ConfigMap renders names only real CloudConfig keys."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml
from pydantic import BaseModel

from cloud.config import CloudConfig
from tests.unit.deploy.kit import ALERTS, CHART, block_balance, template_actions, values_refs

TEMPLATES = sorted(
    p for p in (CHART / "templates").iterdir() if p.suffix in {".yaml", ".tpl", ".txt"}
)


def values():
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "edgeloop"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["type"] == "application" and chart["appVersion"]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_blocks_nest_and_values_exist(template):
    text = template.read_text()
    assert block_balance(text) == []
    vals = values()
    for ref in values_refs(text):
        node = vals
        for i, key in enumerate(ref):
            assert isinstance(node, dict) and key in node, (
                f"{template.name}: .Values.{'.'.join(ref)} - "
                f"{'.'.join(ref[: i + 1])} is not in values.yaml"
            )
            node = node[key]


def test_every_value_is_used_by_a_template():
    text = "\n".join(p.read_text() for p in TEMPLATES)
    used = set()
    for ref in values_refs(text):
        used.update(".".join(ref[:n]) for n in range(1, len(ref) + 1))
    # $sec is .Values.kafka.security in the templates
    used.update(f"kafka.security.{m}" for m in re.findall(r"\$sec\.([A-Za-z_.]+)", text))
    for m in re.findall(r"\$sec\.([A-Za-z_.]+)", text):
        parts = m.split(".")
        used.update("kafka.security." + ".".join(parts[:n]) for n in range(1, len(parts) + 1))

    def leaves(node, prefix=""):
        for k, v in node.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and v and path not in used:
                yield from leaves(v, path + ".")
            else:
                yield path

    unused = [p for p in leaves(values()) if p not in used]
    assert unused == []


def test_includes_name_defined_templates():
    defined = set()
    used = set()
    for p in TEMPLATES:
        for action in template_actions(p.read_text()):
            if m := re.match(r'define "([^"]+)"', action):
                defined.add(m.group(1))
            used.update(re.findall(r'include "([^"]+)"', action))
    assert used and used <= defined


def test_rendered_cloud_yaml_uses_only_real_config_keys():
    """The ConfigMap's keys (read off the template) and the pass-through sections must be
    fields of CloudConfig: the service rejects unknown keys."""
    tpl = (CHART / "templates" / "configmap.yaml").read_text()
    body = tpl.split("cloud.yaml: |", 1)[1]
    stack: list[tuple[int, str]] = []
    paths = []
    for line in body.splitlines():
        m = re.match(r"^( +)([a-z_]+):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        paths.append(tuple(k for _, k in stack))
    assert ("kafka", "security", "protocol") in paths and ("api", "port") in paths
    for path in paths:
        model = CloudConfig
        for key in path:
            assert key in model.model_fields, (
                f"cloud.yaml key {'.'.join(path)} is not a config field"
            )
            ann = model.model_fields[key].annotation
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                break
            model = ann
    assert ("instance",) not in paths  # per pod: EDGELOOP__INSTANCE from the pod name
    # the pass-through sections validate as they stand in values.yaml
    v = values()
    CloudConfig.model_validate(
        {
            "environment": "development",
            "models": v["models"],
            "drift": v["drift"],
            "promotion": v["promotion"],
            "join": v["join"],
            "webhooks": v["webhooks"],
        }
    )


def test_chart_ships_the_same_alert_rules_as_deploy_prometheus():
    assert (CHART / "files" / "alerts.yml").read_bytes() == ALERTS.read_bytes()


def test_helm_lint_when_helm_is_installed(tmp_path):
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm is not installed (not packaged on apt or PyPI); static checks above")
    import subprocess

    out = subprocess.run(
        [helm, "lint", str(CHART), "--set", "secrets.create=true", "--set",
         "secrets.apiToken=t", "--set", "secrets.databaseUrl=postgresql+psycopg://u@h/d"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
