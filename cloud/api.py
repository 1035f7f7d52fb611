"""The cloud HTTP API (FastAPI, OpenAPI at ``/docs`` and ``/openapi.json``).

Reads are open; writes (promote, roll back) need ``Authorization: Bearer <api.token>``. Without a
configured token (allowed only with ``environment: development``) writes are open and a warning
is logged at start. ``/metrics`` is the Prometheus exposition. The dashboard page is at
``/dashboard/`` (``/`` redirects there). More routers (the closed loop's artifact download) are
mounted with ``create_app(service, routers=[...])``.

Every write passes an early gate (:class:`WriteGate`) before any of its body is read: a write
that needs the token is refused (401/403) without reading the body, and bodies are capped
(``MAX_JSON_BODY``; uploads ``MAX_UPLOAD_BODY``) with 413. Integers in paths, queries and bodies
are bounded to the signed 64-bit range the registry stores (422 beyond, never a 500).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    status,
)
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, SecretStr
from starlette.requests import HTTPConnection
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.dashboard import dashboard_router
from cloud.registry import RegistryError
from cloud.service import CloudService
from shared.records import now_ns

__all__ = [
    "BODY_LIMITS",
    "INT64_MAX",
    "MAX_JSON_BODY",
    "MAX_UPLOAD_BODY",
    "WriteGate",
    "create_app",
    "require_token",
]

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="api.token from cloud.yaml")

#: The largest integer a path, query or body parameter may carry: the registry stores signed
#: 64-bit integers (SQLite INTEGER, PostgreSQL BIGINT).
INT64_MAX = 2**63 - 1
#: Body cap of a JSON write (promote, roll back: a few fields).
MAX_JSON_BODY = 1 << 20
#: Body cap of an upload: ``edgeloop models register`` sends an ONNX file (cloud/delivery.py
#: refuses more than this too).
MAX_UPLOAD_BODY = 64 << 20
#: Body caps of writes by route path as declared (OpenAPI paths); other writes get
#: ``MAX_JSON_BODY``.
BODY_LIMITS: dict[str, int] = {"/api/models/{name}/versions": MAX_UPLOAD_BODY}

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _service(request: Request) -> CloudService:
    svc: CloudService = request.app.state.service
    return svc


Service = Annotated[CloudService, Depends(_service)]


def require_token(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Dependency for every write: the bearer token must equal ``api.token``."""
    return _authorize(_service(request).config.api.token, creds)


def _authorize(token: SecretStr | None, creds: HTTPAuthorizationCredentials | None) -> str:
    """The one decision on a write's credentials (``require_token`` and :class:`WriteGate`):
    the actor's name, or ``HTTPException`` 401 (no bearer token) / 403 (another token)."""
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

    version: int | None = Field(default=None, ge=1, le=INT64_MAX)
    learner: str | None = None


class RollbackRequest(BaseModel):
    """Roll back to ``version`` (default: the champion's parent)."""

    version: int | None = Field(default=None, ge=1, le=INT64_MAX)


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
                    "incarnation": svc.incarnations.get(agent_id, ("", 0))[0] or None,
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
    async def get_version(
        svc: Service, name: str, version: Annotated[int, Path(ge=1, le=INT64_MAX)]
    ) -> dict[str, Any]:
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
        since_ns: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
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


# --- the early gate of writes -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WriteRoute:
    method: str
    path: re.Pattern[str]
    needs_token: bool
    max_body: int


class _BodyTooLarge(Exception):
    """Raised into the app by the gate's ``receive`` when a body passes its cap."""


class WriteGate:
    """Pure ASGI middleware: the early gate of every write (any method but GET, HEAD, OPTIONS).

    A write to an operation that needs the bearer token (its OpenAPI operation lists the bearer
    scheme, i.e. it depends on :func:`require_token`) is checked with the same decision
    ``require_token`` makes, before a byte of its body is read: an unauthenticated client
    cannot make the service buffer or parse a body. The body of every write to a known route is
    capped (``BODY_LIMITS``, else ``MAX_JSON_BODY``): a ``Content-Length`` above the cap is
    answered 413 at once, a body that grows beyond it (chunked) is cut off with 413. Early
    answers close the connection, since the body was not read. ``require_token`` stays the
    authority; with no token configured (development) writes are open here as there. The
    routes are read from the app's OpenAPI schema on the first write (a route left out of the
    schema is not gated early; its dependencies still decide).
    """

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api
        self._routes: list[_WriteRoute] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _READ_METHODS:
            await self.app(scope, receive, send)
            return
        route = self._match(scope)
        if route is None:  # no such write: the router answers 404/405 without reading the body
            await self.app(scope, receive, send)
            return
        if route.needs_token:
            token: SecretStr | None = self.api.state.service.config.api.token
            try:
                _authorize(token, await _bearer(HTTPConnection(scope)))
            except HTTPException as exc:
                await _refuse(scope, receive, send, exc.status_code, exc.detail, exc.headers)
                return
        length = _content_length(scope)
        if length == -1:
            await _refuse(
                scope, receive, send, 400, "Content-Length: expected a number of bytes", None
            )
            return
        if length is not None and length > route.max_body:
            await _refuse(scope, receive, send, 413, _too_large(route.max_body), None)
            return
        await self._capped(route.max_body, scope, receive, send)

    def _match(self, scope: Scope) -> _WriteRoute | None:
        if self._routes is None:
            self._routes = _write_routes(self.api)
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        method: str = scope["method"]
        return next((r for r in self._routes if r.method == method and r.path.match(path)), None)

    async def _capped(self, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        cut = False
        started = False

        async def receive_capped() -> Message:
            nonlocal received, cut
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut = True
                    raise _BodyTooLarge
            return message

        async def send_unless_cut(message: Message) -> None:
            nonlocal started
            if cut and not started:
                return  # the app's answer to a body it could not read; ours is 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_capped, send_unless_cut)
        except Exception:
            if not cut or started:
                raise
            # whatever the app raised, it raised because the body was cut off
            log.debug("a %s body over %d bytes was cut off", scope["path"], limit, exc_info=True)
        if cut and not started:
            await _refuse(scope, receive, send, 413, _too_large(limit), None)


def _write_routes(api: FastAPI) -> list[_WriteRoute]:
    """Every write operation the app documents, with whether it needs the token and its cap."""
    scheme = _bearer.scheme_name
    routes = []
    for path, operations in api.openapi().get("paths", {}).items():
        regex = compile_path(path)[0]
        for method, op in operations.items():
            if method.upper() in _READ_METHODS or not isinstance(op, dict):
                continue
            needs_token = any(scheme in req for req in op.get("security", ()))
            limit = BODY_LIMITS.get(path, MAX_JSON_BODY)
            routes.append(_WriteRoute(method.upper(), regex, needs_token, limit))
    return routes


def _content_length(scope: Scope) -> int | None:
    """The declared body length; ``None`` when absent, ``-1`` when not a number."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            digits = value.strip().lstrip(b"0") or b"0"
            if not digits.isdigit():
                return -1
            # more digits than any cap has: too large without parsing an unbounded number
            return INT64_MAX if len(digits) > 18 else int(digits)
    return None


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    code: int,
    detail: Any,
    headers: Mapping[str, str] | None,
) -> None:
    """Answer like FastAPI's HTTPException (JSON ``detail``) and close: the body is unread."""
    response = JSONResponse(
        {"detail": detail}, status_code=code, headers={**(headers or {}), "Connection": "close"}
    )
    await response(scope, receive, send)


#: A run of digits no signed 64-bit integer has (19 digits reach 9223372036854775807).
_BIG_INTEGER = re.compile(r"(?<![0-9])[0-9]{19,}")


async def _integer_overflow(request: Request, exc: Exception) -> Response:
    """The last line of defence: an integer from the request that the database cannot store
    is the client's error (422). An overflow with no such integer in the path or query is the
    service's own and stays a 500."""
    where = f"{request.url.path}?{request.url.query}"
    if not any(len(m) > 19 or int(m) > INT64_MAX for m in _BIG_INTEGER.findall(where)):
        log.error("%s %s: %r", request.method, request.url.path, exc, exc_info=exc)
        return JSONResponse({"detail": "Internal Server Error"}, status_code=500)
    log.warning("%s %s: integer out of range (%s)", request.method, request.url.path, exc)
    return JSONResponse(
        {
            "detail": "a number in the request is out of range: integers must fit in a signed "
            f"64-bit integer (at most {INT64_MAX})"
        },
        status_code=422,
    )


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

    @app.get(
        "/healthz",
        summary="Liveness: ok | degraded (200, with reasons) or failing (503: a core task died)",
        tags=["ops"],
    )
    async def healthz(request: Request) -> JSONResponse:
        doc = _service(request).health()
        code = 503 if doc["status"] in ("failing", "stopping") else 200
        return JSONResponse(doc, status_code=code)

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
    app.add_middleware(WriteGate, api=app)
    app.add_exception_handler(OverflowError, _integer_overflow)
    return app
