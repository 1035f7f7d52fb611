"""The dashboard: one page served by the cloud API, and the two read endpoints it polls.

``GET /`` redirects to ``/dashboard/``; the page, its script and its stylesheet come from this
package (no CDN, nothing fetched at run time; a strict Content-Security-Policy says so to the
browser). The page polls ``/api/dashboard/overview`` (fleet with health, throughput, models) and
``/api/dashboard/timeline`` (accuracy over time with drift detections, promotions and edge model
swaps) every 2 s, and writes through the existing token-protected promote and rollback endpoints.

Throughput is computed from the ingest counters sampled when the overview is read (at most one
sample per ``min_sample_interval_s``, ``throughput_samples`` kept): no background task to own, and
several open pages share one series. A rate is the counter difference between two samples over
their wall-clock distance, so while no page is open the next rate is an average over the gap.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import RedirectResponse

from cloud.service import CloudService
from shared.records import now_ns

__all__ = ["ThroughputSampler", "dashboard_router", "fleet_health"]

#: the files the page is made of: name -> media type (anything else is a 404)
_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

#: the page loads only its own files and talks only to its own origin
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> bytes:
    return resources.files("cloud.dashboard").joinpath("static", name).read_bytes()


def fleet_health(
    age_s: float, status_text: str, *, stale_after_s: float, down_after_s: float
) -> str:
    """``down`` / ``stale`` by heartbeat age first, then ``degraded`` when the agent says so."""
    if age_s > down_after_s:
        return "down"
    if age_s > stale_after_s:
        return "stale"
    return "ok" if status_text == "ok" else "degraded"


@dataclass(frozen=True, slots=True)
class _Sample:
    mono: float
    ts_ns: int
    records: dict[str, int]
    learned: int


#: uplink kinds as the page names them, in display order
_KINDS = ("telemetry", "frames", "labels", "events", "agents")


class ThroughputSampler:
    """Ingest rates per uplink kind from successive reads of the service's counters."""

    def __init__(self, keep: int = 300, min_interval_s: float = 1.0) -> None:
        self.samples: deque[_Sample] = deque(maxlen=keep)
        self.min_interval_s = min_interval_s

    def sample(self, svc: CloudService) -> None:
        mono = time.monotonic()
        if self.samples and mono - self.samples[-1].mono < self.min_interval_s:
            return
        by_topic = svc.stats.records
        records = {kind: by_topic.get(getattr(svc.topics, kind), 0) for kind in _KINDS}
        self.samples.append(_Sample(mono, now_ns(), records, svc.learned))

    def series(self) -> list[dict[str, Any]]:
        """One point per pair of consecutive samples: records per second per kind."""
        out: list[dict[str, Any]] = []
        for a, b in itertools.pairwise(self.samples):
            dt = b.mono - a.mono
            if dt <= 0:
                continue
            point: dict[str, Any] = {"ts_ns": b.ts_ns, "interval_s": round(dt, 3)}
            for kind in _KINDS:
                # a counter only goes back when a checkpoint was restored: no negative rates
                point[kind] = max(0, b.records[kind] - a.records[kind]) / dt
            point["learned"] = max(0, b.learned - a.learned) / dt
            out.append(point)
        return out


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a figure is reported as absent."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _downsample(points: list[dict[str, Any]], max_points: int) -> list[dict[str, Any]]:
    """Every k-th point, always keeping the last one (the newest value must be drawn)."""
    if len(points) <= max_points:
        return points
    step = math.ceil(len(points) / max_points)
    kept = points[::step]
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept


def _model_summary(svc: CloudService, name: str) -> dict[str, Any]:
    ml = svc.learners[name]
    report = ml.report()
    champ = report["champion"]
    candidates = {
        cname: {
            "n_learned": c["n_learned"],
            "rolling": c.get("rolling", {}),
            "overall": c.get("overall", {}),
        }
        for cname, c in report["candidates"].items()
    }
    summary: dict[str, Any] = _finite(
        {
            "name": name,
            "task": ml.task,
            "primary": "accuracy" if ml.task == "classification" else "mae",
            "samples": report["samples"],
            "challenger": report["challenger"],
            "champion": None
            if champ is None
            else {
                "version": champ["version"],
                "learner": champ["learner"],
                "cloud": {k: champ["cloud"][k] for k in ("n", "rolling", "overall")},
                "edge": {k: champ["edge"][k] for k in ("n", "rolling", "overall")},
            },
            "candidates": candidates,
            "drift": report["drift"],
            "edge_frames": report["edge_frames"],
            "edge_frames_other_version": report["edge_frames_other_version"],
        }
    )
    return summary


def dashboard_router(
    *,
    stale_after_s: float = 30.0,
    down_after_s: float = 120.0,
    throughput_samples: int = 300,
    min_sample_interval_s: float = 1.0,
) -> APIRouter:
    """The page at ``/dashboard/`` and its read endpoints under ``/api/dashboard``.

    An agent is ``stale`` when its last heartbeat is older than ``stale_after_s`` (three of the
    edge's default 10 s heartbeats) and ``down`` past ``down_after_s``.
    """
    if not 0 < stale_after_s < down_after_s:
        raise ValueError(
            f"dashboard health thresholds: expected 0 < stale_after_s < down_after_s, "
            f"got {stale_after_s} and {down_after_s}"
        )
    sampler = ThroughputSampler(throughput_samples, min_sample_interval_s)
    r = APIRouter()

    def service(request: Request) -> CloudService:
        svc: CloudService = request.app.state.service
        return svc

    @r.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard/", status_code=status.HTTP_307_TEMPORARY_REDIRECT)

    @r.get("/dashboard", include_in_schema=False)
    async def dashboard_no_slash() -> RedirectResponse:
        return RedirectResponse("/dashboard/", status_code=status.HTTP_307_TEMPORARY_REDIRECT)

    @r.get("/dashboard/", include_in_schema=False)
    async def page() -> Response:
        return Response(
            _asset("index.html"), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS
        )

    @r.get("/dashboard/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        media = _ASSETS.get(name)
        if media is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dashboard asset {name!r}")
        return Response(_asset(name), media_type=media, headers=_PAGE_HEADERS)

    @r.get(
        "/api/dashboard/overview",
        tags=["dashboard"],
        summary="Fleet with health, ingest throughput and lag, models (what the page polls)",
    )
    async def overview(request: Request) -> dict[str, Any]:
        svc = service(request)
        sampler.sample(svc)
        now = now_ns()
        champions = {
            name: (ml.champion.version if ml.champion is not None else None)
            for name, ml in svc.learners.items()
        }
        fleet = []
        for agent_id, (hb, received) in sorted(svc.fleet.items()):
            age = max(0.0, (now - hb.ts_ns) / 1e9)
            got = hb.info.get("outbox")
            outbox: dict[str, Any] = got if isinstance(got, dict) else {}
            fleet.append(
                {
                    "agent_id": agent_id,
                    "health": fleet_health(
                        age, hb.status, stale_after_s=stale_after_s, down_after_s=down_after_s
                    ),
                    "status": hb.status,
                    "reasons": list(hb.info.get("reasons", [])),
                    "seconds_since_heartbeat": age,
                    "last_heartbeat_ns": hb.ts_ns,
                    "received_ns": received,
                    "models": hb.models,
                    # a model the agent runs that is not the champion: a push is pending (or failed)
                    "behind": {
                        m: champions[m]
                        for m, v in hb.models.items()
                        if champions.get(m) is not None and champions[m] != v
                    },
                    "outbox_depth": hb.outbox_depth,
                    "outbox_bytes": hb.outbox_bytes,
                    "uptime_s": hb.info.get("uptime_s"),
                    "dropped": hb.info.get("dropped", {}),
                    # the outbox's identity: a new one means the gateway lost its state directory
                    "incarnation": outbox.get("incarnation"),
                    # sent batches the cloud has not confirmed yet (end-to-end acknowledgement)
                    "unconfirmed": outbox.get("unacked", 0),
                    "unconfirmed_age_s": outbox.get("unacked_age_s", 0.0),
                }
            )
        lag: dict[str, int] = dict.fromkeys(_KINDS, 0)
        kind_of = {getattr(svc.topics, k): k for k in _KINDS}
        for (topic, _partition), behind in svc.ingest_lag().items():
            kind = kind_of.get(topic)
            if kind is not None:
                lag[kind] += behind
        series = sampler.series()
        join = svc.join.stats.as_dict()
        return {
            "now_ns": now,
            "instance": svc.config.instance,
            "environment": svc.config.environment,
            "running": svc.running,
            "started_ns": svc.started_ns,
            "write_protected": svc.config.api.token is not None,
            "health_thresholds": {"stale_after_s": stale_after_s, "down_after_s": down_after_s},
            "fleet": fleet,
            "throughput": {
                "current": series[-1] if series else None,
                "series": series,
                "lag": lag,
                "lag_total": sum(lag.values()),
                "totals": {k: svc.stats.records.get(getattr(svc.topics, k), 0) for k in _KINDS},
                "learned": svc.learned,
                "join": {
                    **join,
                    "pending_frames": svc.join.pending_frames,
                    "pending_labels": svc.join.pending_labels,
                },
                "dedupe_dropped": sum(svc.stats.dedupe_dropped.values()),
                "poison": sum(svc.stats.poison.values()),
                "checkpoints": svc.checkpoints,
            },
            "models": [_model_summary(svc, name) for name in svc.learners],
        }

    @r.get(
        "/api/dashboard/timeline",
        tags=["dashboard"],
        summary="Metrics over time per subject (edge, champion, candidates) with drift "
        "detections, promotions and edge model swaps",
    )
    async def timeline(
        request: Request,
        model: str,
        window_s: Annotated[float, Query(gt=0, le=30 * 86400)] = 900.0,
        max_points: Annotated[int, Query(ge=10, le=5000)] = 600,
    ) -> dict[str, Any]:
        svc = service(request)
        ml = svc.learners.get(model)
        if ml is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"no model {model!r}; configured: {sorted(svc.learners)}"
            )
        now = now_ns()
        since = max(0, now - int(window_s * 1e9))
        reg = svc.registry
        rows, drifts, promotions = await asyncio.gather(
            asyncio.to_thread(reg.metric_points, model, since_ns=since, limit=50_000),
            asyncio.to_thread(reg.drifts, model, 1000),
            asyncio.to_thread(reg.promotions, model, 1000),
        )
        by_subject: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            m = row["metrics"] or {}
            by_subject.setdefault(row["subject"], []).append(
                {
                    "ts_ns": row["ts_ns"],
                    "version": row["version"],
                    "samples": row["samples"],
                    "rolling": _finite(m.get("rolling", {})),
                    "overall": _finite(m.get("overall", {})),
                }
            )
        # the newest figures, not yet in a snapshot: the chart's right edge is "now"
        live: list[tuple[str, Any, int | None]] = [
            (c.name, c, None) for c in ml.candidates.values()
        ]
        if ml.champion is not None:
            live += [
                ("champion", ml.champion, ml.champion.version),
                ("edge", ml.champion.edge, ml.champion.version),
            ]
        for subject, scored, version in live:
            if scored.metrics.n:
                rep = scored.metrics.report()
                by_subject.setdefault(subject, []).append(
                    {
                        "ts_ns": now,
                        "version": version,
                        "samples": rep["n"],
                        "rolling": _finite(rep["rolling"]),
                        "overall": _finite(rep["overall"]),
                        "live": True,
                    }
                )
        series = {s: _downsample(p, max_points) for s, p in by_subject.items()}
        swaps = [
            s for s in list(svc.model_swaps) if s["model"] == model and s["received_ns"] >= since
        ]
        return {
            "model": model,
            "task": ml.task,
            "primary": "accuracy" if ml.task == "classification" else "mae",
            "now_ns": now,
            "from_ns": since,
            "champion": None if ml.champion is None else ml.champion.version,
            "challenger": None if (ch := ml.challenger()) is None else ch.name,
            "series": series,
            "drifts": [_finite(d) for d in reversed(drifts) if d["ts_ns"] >= since],
            "promotions": [_finite(p) for p in reversed(promotions) if p["ts_ns"] >= since],
            "swaps": swaps,
        }

    return r
