"""The cloud HTTP API (FastAPI, OpenAPI at ``/docs`` and ``/openapi.json``).

Reads are open; writes (promote, roll back) need ``Authorization: Bearer <api.token>``. Without a
configured token (allowed only with ``environment: development``) writes are open and a warning
is logged at start. ``/metrics`` is the Prometheus exposition. The dashboard page is at
``/dashboard/`` (``/`` redirects there). More routers (the closed loop's artifact download) are
mounted with ``create_app(service, routers=[...])``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from cloud.dashboard import dashboard_router
from cloud.registry import RegistryError
from cloud.service import CloudService
from shared.records import now_ns

__all__ = ["create_app", "require_token"]

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="api.token from cloud.yaml")


def _service(request: Request) -> CloudService:
    svc: CloudService = request.app.state.service
    return svc


Service = Annotated[CloudService, Depends(_service)]


def require_token(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Dependency for every write: the bearer token must equal ``api.token``."""
    svc = _service(request)
    token = svc.config.api.token
    if token is None:
        return "anonymous (development)"
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this endpoint needs Authorization: Bearer <api.token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(creds.credentials.encode(), token.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "invalid token", headers={"WWW-Authenticate": "Bearer"}
        )
    return "api"


Writer = Annotated[str, Depends(require_token)]


class PromoteRequest(BaseModel):
    """Promote an existing version, or a snapshot of a learner (default: the challenger)."""

    version: int | None = Field(default=None, ge=1)
    learner: str | None = None


class RollbackRequest(BaseModel):
    """Roll back to ``version`` (default: the champion's parent)."""

    version: int | None = Field(default=None, ge=1)


def _model_or_404(svc: CloudService, name: str) -> None:
    if name not in svc.learners:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no model {name!r}; configured: {sorted(svc.learners)}"
        )


def _api_router() -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.get("/status", summary="Service status: ingest counters, join, checkpoints")
    async def get_status(svc: Service) -> dict[str, Any]:
        return {
            "instance": svc.config.instance,
            "environment": svc.config.environment,
            "running": svc.running,
            "started_ns": svc.started_ns,
            "learned": svc.learned,
            "checkpoints": svc.checkpoints,
            "restored_from": svc.restored_from,
            "ingest": svc.stats.as_dict(),
            "join": {
                **svc.join.stats.as_dict(),
                "pending_frames": svc.join.pending_frames,
                "pending_labels": svc.join.pending_labels,
                "watermark_ns": svc.join.watermark_ns,
            },
            "lag": {f"{t}:{p}": lag for (t, p), lag in svc.ingest_lag().items()},
            "offsets": svc.offsets(),
            "hook_failures": svc.hook_failures,
        }

    @r.get("/fleet", summary="Agents: last heartbeat, active model versions, outbox depth")
    async def get_fleet(svc: Service) -> list[dict[str, Any]]:
        now = now_ns()
        out = []
        for agent_id, (hb, received) in sorted(svc.fleet.items()):
            out.append(
                {
                    "agent_id": agent_id,
                    "last_heartbeat_ns": hb.ts_ns,
                    "received_ns": received,
                    "seconds_since_heartbeat": max(0.0, (now - hb.ts_ns) / 1e9),
                    "models": hb.models,
                    "outbox_depth": hb.outbox_depth,
                    "outbox_bytes": hb.outbox_bytes,
                    "status": hb.status,
                    "info": hb.info,
                }
            )
        return out

    @r.get("/events", summary="Recent rule events from the edge (checkpointed)")
    async def get_events(
        svc: Service,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        asset: str | None = None,
    ) -> list[dict[str, Any]]:
        return await asyncio.to_thread(svc.registry.events, limit, asset)

    @r.get("/models", summary="Every model: champion, challenger, candidates' metrics")
    async def list_models(svc: Service) -> list[dict[str, Any]]:
        return [ml.report() for ml in svc.learners.values()]

    @r.get("/models/{name}", summary="One model: live learner state and its champion")
    async def get_model(svc: Service, name: str) -> dict[str, Any]:
        _model_or_404(svc, name)
        return svc.learners[name].report()

    @r.get("/models/{name}/versions", summary="Registered versions with lineage and status")
    async def list_versions(svc: Service, name: str) -> list[dict[str, Any]]:
        _model_or_404(svc, name)
        return [v.as_dict() for v in await asyncio.to_thread(svc.registry.versions, name)]

    @r.get("/models/{name}/versions/{version}", summary="One version")
    async def get_version(svc: Service, name: str, version: int) -> dict[str, Any]:
        _model_or_404(svc, name)
        try:
            entry = await asyncio.to_thread(svc.registry.version, name, version)
        except RegistryError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        return entry.as_dict()

    @r.get("/models/{name}/metrics", summary="Prequential metrics over time")
    async def get_metrics(
        svc: Service,
        name: str,
        subject: str | None = None,
        since_ns: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> list[dict[str, Any]]:
        _model_or_404(svc, name)
        return await asyncio.to_thread(
            svc.registry.metric_points, name, subject=subject, since_ns=since_ns, limit=limit
        )

    @r.get("/models/{name}/promotions", summary="Champion changes and the evidence for each")
    async def get_promotions(
        svc: Service, name: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> list[dict[str, Any]]:
        _model_or_404(svc, name)
        return await asyncio.to_thread(svc.registry.promotions, name, limit)

    @r.get("/models/{name}/drift", summary="Drift detections")
    async def get_drift(
        svc: Service, name: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> list[dict[str, Any]]:
        _model_or_404(svc, name)
        return await asyncio.to_thread(svc.registry.drifts, name, limit)

    @r.post(
        "/models/{name}/promote",
        summary="Promote a version or a learner's current state (bearer token)",
        status_code=status.HTTP_201_CREATED,
    )
    async def promote(
        svc: Service, actor: Writer, name: str, body: PromoteRequest | None = None
    ) -> dict[str, Any]:
        _model_or_404(svc, name)
        body = body or PromoteRequest()
        try:
            entry = await svc.promote(name, learner=body.learner, version=body.version, actor=actor)
        except (RegistryError, KeyError, ValueError) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc).strip("'\"")) from None
        return entry.as_dict()

    @r.post(
        "/models/{name}/rollback",
        summary="Roll back to the champion's parent or a given version (bearer token)",
    )
    async def rollback(
        svc: Service, actor: Writer, name: str, body: RollbackRequest | None = None
    ) -> dict[str, Any]:
        _model_or_404(svc, name)
        body = body or RollbackRequest()
        try:
            entry = await svc.rollback(name, version=body.version, actor=actor)
        except (RegistryError, KeyError) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc).strip("'\"")) from None
        return entry.as_dict()

    return r


def create_app(service: CloudService, *, routers: list[APIRouter] | None = None) -> FastAPI:
    """The API bound to ``service``; ``routers`` are mounted after the built-in ones."""
    app = FastAPI(
        title="edgeloop cloud",
        version="1",
        description="Fleet, models, metrics, promotion and rollback of the edgeloop cloud tier.",
    )
    app.state.service = service
    if service.config.api.token is None:
        log.warning("api.token is not set (development): writes are open to anyone")

    @app.get("/healthz", summary="Liveness", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: consuming and the registry is open", tags=["ops"])
    async def readyz(request: Request) -> Response:
        svc = _service(request)
        ok = svc.running
        return Response(
            content='{"ready": %s}' % ("true" if ok else "false"),
            media_type="application/json",
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", summary="Prometheus exposition", tags=["ops"])
    async def metrics(request: Request) -> Response:
        svc = _service(request)
        svc.metrics.refresh(svc)
        return Response(
            svc.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    app.include_router(_api_router(), tags=["cloud"])
    app.include_router(dashboard_router())
    for router in routers or []:
        app.include_router(router)
    return app
