"""``edgeloop models``: list, show, promote, roll back and register models via the cloud API.

Reads need no token; writes send ``Authorization: Bearer $EDGELOOP_API_TOKEN`` (or ``--token``).
Errors name the URL and what the API said; the exit code is 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import httpx

__all__ = ["models"]


class _Api:
    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        target = f"{self.url}{path}"
        try:
            with httpx.Client(timeout=self.timeout) as client:
                resp = client.request(method, target, headers=headers, **kw)
        except httpx.HTTPError as exc:
            raise click.ClickException(
                f"cannot reach the cloud API at {self.url} ({type(exc).__name__}: {exc}); "
                "check --url / EDGELOOP_API_URL"
            ) from None
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            hint = ""
            if resp.status_code in (401, 403):
                hint = " (set EDGELOOP_API_TOKEN or pass --token)"
            raise click.ClickException(
                f"{method} {target}: HTTP {resp.status_code}: {detail}{hint}"
            )
        return resp.json()


def _api(ctx: click.Context) -> _Api:
    api: _Api = ctx.obj
    return api


def _echo(doc: Any, as_json: bool) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str) if as_json else doc)


@click.group()
@click.option(
    "--url",
    envvar="EDGELOOP_API_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="Cloud API base URL (env EDGELOOP_API_URL).",
)
@click.option("--token", envvar="EDGELOOP_API_TOKEN", help="Bearer token (env EDGELOOP_API_TOKEN).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per request.")
@click.pass_context
def models(ctx: click.Context, url: str, token: str | None, timeout: float) -> None:
    """List, show, promote, roll back and register models."""
    ctx.obj = _Api(url, token, timeout)


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def list_models(ctx: click.Context, as_json: bool) -> None:
    """Every model with its champion and challenger."""
    docs = _api(ctx).call("GET", "/api/models")
    if as_json:
        _echo(docs, True)
        return
    click.echo(f"{'model':<20} {'task':<15} {'samples':>8}  {'champion':<10} challenger")
    for d in docs:
        champ = d.get("champion") or {}
        ver = f"v{champ['version']}" if champ else "-"
        click.echo(
            f"{d['name']:<20} {d['task']:<15} {d['samples']:>8}  {ver:<10} "
            f"{d.get('challenger') or '-'}"
        )


@models.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def show(ctx: click.Context, name: str, as_json: bool) -> None:
    """A model's versions (status, lineage, artifact) and its live state."""
    api = _api(ctx)
    live = api.call("GET", f"/api/models/{name}")
    versions = api.call("GET", f"/api/models/{name}/versions")
    if as_json:
        _echo({"model": live, "versions": versions}, True)
        return
    click.echo(f"model {name} ({live['task']}), {live['samples']} samples learned")
    for v in versions:
        art = v.get("artifact") or {}
        sha = art.get("sha256", "")
        parity = (art.get("parity") or {}).get("max_abs_diff")
        extra = f" sha256 {sha[:12]}" if sha else ""
        if parity is not None:
            extra += f" parity {parity:.1e}"
        reason = f" ({v['status_reason']})" if v.get("status_reason") else ""
        click.echo(
            f"  v{v['version']:<4} {v['status']:<12} {v['learner']:<16} {v['reason']:<9} "
            f"parent {v['parent'] if v['parent'] is not None else '-'}{extra}{reason}"
        )


@models.command("promote")
@click.argument("name")
@click.argument("version", type=int)
@click.pass_context
def promote(ctx: click.Context, name: str, version: int) -> None:
    """Make VERSION the champion (it is compiled if needed, signed and pushed)."""
    doc = _api(ctx).call("POST", f"/api/models/{name}/promote", json={"version": version})
    click.echo(f"model {name}: v{doc['version']} is champion")


@models.command("rollback")
@click.argument("name")
@click.option("--to", "to", type=int, default=None, help="Version (default: the parent).")
@click.pass_context
def rollback(ctx: click.Context, name: str, to: int | None) -> None:
    """Go back to the champion's parent (or --to VERSION); the edge gets a signed rollback."""
    body = {} if to is None else {"version": to}
    doc = _api(ctx).call("POST", f"/api/models/{name}/rollback", json=body)
    click.echo(f"model {name}: rolled back to v{doc['version']}")


@models.command("register")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The configured model name it serves.")
@click.option("--features", required=True, help="Input columns in order: a,b,c")
@click.option(
    "--kind",
    type=click.Choice(["classifier", "regressor"]),
    default="classifier",
    show_default=True,
)
@click.option("--output", default=None, help="The output to read when the model has several.")
@click.option("--promote", "promote_now", is_flag=True, help="Promote it once registered.")
@click.pass_context
def register(
    ctx: click.Context,
    file: Path,
    name: str,
    features: str,
    kind: str,
    output: str | None,
    promote_now: bool,
) -> None:
    """Upload your own ONNX model; the cloud validates it (test batch, latency) first."""
    feats = [f.strip() for f in features.split(",") if f.strip()]
    if not feats:
        raise click.BadParameter(
            "expected a comma-separated list, e.g. a,b,c", param_hint="--features"
        )
    params: dict[str, Any] = {"features": ",".join(feats), "kind": kind, "filename": file.name}
    if output:
        params["output"] = output
    api = _api(ctx)
    doc = api.call(
        "POST",
        f"/api/models/{name}/versions",
        params=params,
        content=file.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    val = doc["artifact"]["validation"]
    click.echo(
        f"model {name}: registered v{doc['version']} ({len(feats)} features, "
        f"p50 {val['latency_p50_ms']:.3f} ms, p99 {val['latency_p99_ms']:.3f} ms)"
    )
    if promote_now:
        out = api.call("POST", f"/api/models/{name}/promote", json={"version": doc["version"]})
        click.echo(f"model {name}: v{out['version']} is champion")
