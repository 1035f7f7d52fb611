"""The cloud half of the closed loop: compile, gate, store, sign, publish, serve.

For every new champion (:attr:`CloudService.on_promotion`, in order, one at a time)::

    VersionEntry -> artifact already stored (rollback, re-activation, user model)? reuse it
                 -> else compile the river pipeline (cloud.compile.compile_pipeline)
                    -> parity gate against river on the model's recent frames (1e-5)
                    -> failure: registry status cannot_ship + reason, the previous champion is
                       re-activated, nothing is published
                 -> artifact file (sha256) + registry.attach_artifact
                 -> ModelManifest (features, sha256, version, parent, metrics, artifact_url,
                    rollback) signed with the ed25519 private key
                 -> <prefix>.models, key = model name (acks=all)

Tansu does not compact, so readers keep the latest manifest per key, and every champion's
manifest is published again every ``republish_interval_s`` and whenever a heartbeat shows an
agent on another version (at most once per heartbeat): an agent that was offline catches up on
its own. Artifacts are served by the API at ``/api/models/{name}/versions/{v}/artifact`` with
their sha256 in ``X-Content-SHA256`` (the edge trusts only the signed manifest's sha256).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import pickle
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from cloud.api import require_token
from cloud.config import DeliveryConfig
from cloud.registry import RegistryError, VersionEntry
from shared.files import write_atomic
from shared.manifest import (
    ModelManifest,
    SignatureError,
    load_private_key,
    sign_manifest,
)
from shared.records import now_ns

if TYPE_CHECKING:
    from cloud.service import CloudService

__all__ = ["CannotShip", "Delivery", "ModelDelivery"]

log = logging.getLogger(__name__)

_MAX_UPLOAD = 64 * 1024 * 1024
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class CannotShip(Exception):
    """A version failed a delivery gate (compile or parity); the message is the reason."""


class Delivery(dict[str, Any]):
    """One delivery record: model, version, outcome, promoted_ns, published_ns, reason."""


def _flat_metrics(metrics: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            if math.isfinite(v):
                out[key] = float(v)
        elif isinstance(v, Mapping) and depth < 2:
            out.update(_flat_metrics(v, f"{key}.", depth + 1))
    return out


class ModelDelivery:
    """Ships champions to the edge. Owned by :class:`CloudService` (``delivery.enabled``)."""

    def __init__(self, service: CloudService, config: DeliveryConfig) -> None:
        self.service = service
        self.config = config
        self.topic = service.topics.models
        self.current: dict[str, ModelManifest] = {}
        self.deliveries: collections.deque[Delivery] = collections.deque(maxlen=1000)
        self.published = 0
        self._key: Any = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._publish_lock = asyncio.Lock()
        self._last_publish: dict[str, float] = {}
        self._last_full = 0.0
        self._hb_seen: dict[tuple[str, str], int] = {}
        self._started = False

    # --- lifecycle ----------------------------------------------------------------------

    def load_key(self) -> None:
        path = self.config.private_key
        assert path is not None
        try:
            self._key = load_private_key(path.read_bytes())
        except OSError as exc:
            raise RuntimeError(
                f"delivery.private_key {path}: cannot read ({exc.strerror})"
            ) from exc
        except (ValueError, SignatureError) as exc:
            raise RuntimeError(
                f"delivery.private_key {path}: not an ed25519 private key in PEM ({exc})"
            ) from exc

    async def start(self) -> None:
        """Open the producer, publish every stored champion's manifest, start republishing."""
        if self._started:
            return
        self._started = True
        if self._key is None:
            self.load_key()
        self.config.artifact_dir.mkdir(parents=True, exist_ok=True)
        from cloud.service import kafka_client_options

        kc = self.service.config.kafka
        opts = kafka_client_options(kc)
        opts["client_id"] = f"{kc.client_id}-delivery"
        self._producer = AIOKafkaProducer(**opts, acks="all", enable_idempotence=False, linger_ms=0)
        await self._producer.start()
        for name in self.service.learners:
            champ = await asyncio.to_thread(self.service.registry.champion, name)
            if champ is None:
                continue
            doc = champ.artifact.get("manifest")
            if isinstance(doc, dict):
                try:
                    self.current[name] = ModelManifest.from_json(doc)
                except ValueError as exc:
                    log.warning(
                        "stored manifest of %s v%d unreadable: %s", name, champ.version, exc
                    )
        for manifest in list(self.current.values()):
            await self.publish(manifest)
        self._last_full = time.monotonic()
        self._task = asyncio.create_task(self._republish_loop(), name="cloud-delivery-republish")

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    # --- the promotion hook ---------------------------------------------------------------

    async def on_promotion(self, entry: VersionEntry) -> None:
        """The hook: ship ``entry`` or record why it cannot ship."""
        await self.ship(entry)

    async def ship(self, entry: VersionEntry) -> ModelManifest | None:
        promoted_ns = entry.updated_ns
        record = Delivery(
            model=entry.model,
            version=entry.version,
            rollback=entry.rollback,
            reason=entry.reason,
            promoted_ns=promoted_ns,
        )
        self.deliveries.append(record)
        try:
            blob, info = await self._artifact_for(entry)
        except CannotShip as exc:
            record.update(outcome="cannot_ship", why=str(exc), published_ns=None)
            await self._cannot_ship(entry, str(exc))
            return None
        manifest = ModelManifest(
            name=entry.model,
            version=entry.version,
            features=tuple(info["features"]),
            output="label" if info["kind"] == "classifier" else "value",
            sha256=info["sha256"],
            created=now_ns(),
            metrics=_flat_metrics(entry.metrics),
            parent=entry.parent,
            artifact_url=self.artifact_url(entry.model, entry.version),
            rollback=entry.rollback,
            kind=info["kind"],
            info={
                "learner": entry.learner,
                "reason": entry.reason,
                "classes": info.get("classes", []),
                "source": info.get("source", ""),
                "promoted_ns": promoted_ns,
            },
        )
        manifest = sign_manifest(manifest, self._key)
        await asyncio.to_thread(
            self.service.registry.attach_artifact,
            entry.model,
            entry.version,
            {"manifest": _manifest_doc(manifest)},
        )
        self.current[entry.model] = manifest
        await self.publish(manifest)
        record.update(outcome="published", published_ns=now_ns(), sha256=manifest.sha256)
        log.info(
            "model %s v%d %s: %d bytes, sha256 %s..., published on %s",
            entry.model,
            entry.version,
            "rollback" if entry.rollback else "shipped",
            len(blob),
            manifest.sha256[:12],
            self.topic,
        )
        return manifest

    async def _artifact_for(self, entry: VersionEntry) -> tuple[bytes, dict[str, Any]]:
        art = entry.artifact
        sha = art.get("sha256")
        if isinstance(sha, str):
            path = self.artifact_path(entry.model, entry.version)
            with contextlib.suppress(OSError):
                blob = path.read_bytes()
                if hashlib.sha256(blob).hexdigest() == sha:
                    return blob, art
            log.warning(
                "stored artifact of %s v%d missing or changed; compiling again",
                entry.model,
                entry.version,
            )
        pipeline_blob = entry.pipeline_blob
        if pipeline_blob is None:
            full = await asyncio.to_thread(
                self.service.registry.version, entry.model, entry.version, with_pipeline=True
            )
            pipeline_blob = full.pipeline_blob
        if pipeline_blob is None:
            raise CannotShip("the version has neither a river pipeline nor a stored artifact")
        frames = list(self.service.recent_frames.get(entry.model, ()))
        compiled, parity = await asyncio.to_thread(
            self._compile, entry.model, pipeline_blob, list(entry.features), frames
        )
        path = self.artifact_path(entry.model, entry.version)
        await asyncio.to_thread(write_atomic, path, compiled.onnx)
        info = {
            "sha256": compiled.sha256,
            "bytes": len(compiled.onnx),
            "path": str(path),
            "kind": compiled.kind,
            "features": list(compiled.features),
            "classes": _jsonable_classes(compiled.classes),
            "source": compiled.source,
            "compile_seconds": compiled.compile_seconds,
            "parity": parity,
        }
        await asyncio.to_thread(
            self.service.registry.attach_artifact, entry.model, entry.version, info
        )
        return compiled.onnx, info

    def _compile(
        self,
        name: str,
        pipeline_blob: bytes,
        features: list[str],
        frames: Sequence[Mapping[str, float]],
    ) -> tuple[Any, dict[str, Any]]:
        from cloud.compile import CompileError, check_parity, compile_pipeline

        model = pickle.loads(pipeline_blob)  # noqa: S301 - written by this service's registry
        if not features:
            raise CannotShip("the version lists no features")
        try:
            compiled = compile_pipeline(model, features, name=name)
        except CompileError as exc:
            raise CannotShip(f"compile: {exc}") from None
        if not frames:
            raise CannotShip("parity: no recent frames to check the artifact against river")
        report = check_parity(model, compiled, frames, atol=self.config.parity_atol)
        if not report.passed:
            raise CannotShip(f"parity: {report.reason}")
        return compiled, report.as_dict()

    async def _cannot_ship(self, entry: VersionEntry, reason: str) -> None:
        log.error("model %s v%d cannot ship: %s", entry.model, entry.version, reason)
        reg = self.service.registry
        await asyncio.to_thread(reg.set_status, entry.model, entry.version, "cannot_ship", reason)
        if entry.parent is None or entry.rollback:
            return
        # the edge keeps running the parent: make it champion again so learning, drift and
        # promotion are measured against what is actually deployed
        try:
            await self.service.rollback(
                entry.model, version=entry.parent, actor="delivery (cannot ship)"
            )
        except (RegistryError, KeyError) as exc:
            log.warning("could not re-activate %s v%d: %s", entry.model, entry.parent, exc)

    # --- publishing -------------------------------------------------------------------------

    def artifact_path(self, name: str, version: int) -> Path:
        if not name or not set(name) <= _NAME_OK or name in {".", ".."}:
            raise ValueError(f"model name {name!r}: letters, digits, '_', '.', '-' only")
        return self.config.artifact_dir / name / f"v{version}.onnx"

    def artifact_url(self, name: str, version: int) -> str:
        base = self.config.public_url
        if base is None:
            api = self.service.config.api
            host = "127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host  # noqa: S104
            base = f"http://{host}:{self.service.api_port or api.port}"
        return f"{base.rstrip('/')}/api/models/{name}/versions/{version}/artifact"

    async def publish(self, manifest: ModelManifest) -> None:
        """Send a signed manifest to the models topic (key = model name), waiting for acks."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("delivery is not started")
        async with self._publish_lock:
            await producer.send_and_wait(self.topic, manifest.to_json(), key=manifest.name.encode())
            self.published += 1
            self._last_publish[manifest.name] = time.monotonic()

    def sign(self, manifest: ModelManifest) -> ModelManifest:
        return sign_manifest(manifest, self._key)

    async def _republish_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self._republish_due()
            except (KafkaError, OSError) as exc:
                log.warning("republishing manifests failed (%s); retrying", exc)

    async def _republish_due(self) -> None:
        now = time.monotonic()
        if now - self._last_full >= self.config.republish_interval_s:
            self._last_full = now
            for manifest in list(self.current.values()):
                await self.publish(manifest)
            return
        due: set[str] = set()
        for agent_id, (hb, _received) in list(self.service.fleet.items()):
            for name, manifest in self.current.items():
                running = hb.models.get(name)
                if running == manifest.version:
                    continue
                if running is None and name not in hb.models and hb.models:
                    continue  # the agent runs another model
                key = (agent_id, name)
                if self._hb_seen.get(key) == hb.ts_ns:
                    continue
                if now - self._last_publish.get(name, 0.0) < self.config.catchup_interval_s:
                    continue
                self._hb_seen[key] = hb.ts_ns
                due.add(name)
        for name in due:
            log.info("an agent reports another version of %s; manifest published again", name)
            await self.publish(self.current[name])

    # --- user models ------------------------------------------------------------------------

    async def register_user_model(
        self,
        name: str,
        blob: bytes,
        features: list[str],
        kind: str,
        *,
        output: str | None = None,
        filename: str = "",
    ) -> dict[str, Any]:
        """Validate an uploaded ONNX model, store it and register it as a candidate version."""
        from cloud.compile import validate_user_model

        learner = self.service.learners[name]
        want = "classifier" if learner.task == "classification" else "regressor"
        if kind != want:
            raise ValueError(f"model {name!r} is a {learner.task} model; expected --kind {want}")
        frames = list(self.service.recent_frames.get(name, ()))
        sample = [f for f in frames if all(k in f for k in features)][:64] or None
        report = await asyncio.to_thread(
            validate_user_model,
            blob,
            features,
            kind,  # type: ignore[arg-type]
            name=name,
            output=output,
            sample=sample,
        )
        compiled = report.model
        entry = await asyncio.to_thread(
            self.service.registry.add_version,
            model=name,
            task=learner.task,
            learner="user",
            reason="user",
            pipeline=None,
            metrics={"validation": report.as_dict()},
            features=list(features),
            steps=[{"user": filename or "model.onnx"}],
            offsets={},
            status="candidate",
            actor="api",
        )
        path = self.artifact_path(name, entry.version)
        await asyncio.to_thread(write_atomic, path, compiled.onnx)
        info = {
            "sha256": compiled.sha256,
            "bytes": len(compiled.onnx),
            "path": str(path),
            "kind": compiled.kind,
            "features": list(compiled.features),
            "classes": _jsonable_classes(compiled.classes),
            "source": compiled.source or "user",
            "validation": report.as_dict(),
            "original_sha256": hashlib.sha256(blob).hexdigest(),
        }
        await asyncio.to_thread(self.service.registry.attach_artifact, name, entry.version, info)
        return {**entry.as_dict(), "artifact": info}

    # --- HTTP -------------------------------------------------------------------------------

    def router(self) -> APIRouter:
        r = APIRouter(prefix="/api", tags=["delivery"])
        delivery = self

        def known(name: str) -> None:
            if name not in delivery.service.learners:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND,
                    f"no model {name!r}; configured: {sorted(delivery.service.learners)}",
                )

        @r.get(
            "/models/{name}/versions/{version}/artifact",
            summary="The ONNX artifact of a version (sha256 in X-Content-SHA256)",
            response_class=FileResponse,
        )
        async def get_artifact(
            name: str, version: Annotated[int, PathParam(ge=1, le=2**63 - 1)]
        ) -> FileResponse:
            known(name)
            try:
                entry = await asyncio.to_thread(delivery.service.registry.version, name, version)
            except RegistryError as exc:
                raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
            sha = entry.artifact.get("sha256")
            path = delivery.artifact_path(name, version)
            if not isinstance(sha, str) or not path.exists():
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND,
                    f"model {name!r} version {version} has no stored artifact "
                    f"(status {entry.status}{': ' + entry.status_reason if entry.status_reason else ''})",
                )
            return FileResponse(
                path,
                media_type="application/octet-stream",
                filename=f"{name}-v{version}.onnx",
                headers={"X-Content-SHA256": sha, "ETag": f'"{sha}"'},
            )

        @r.get("/models/{name}/manifest", summary="The signed manifest of the shipped champion")
        async def get_manifest(name: str) -> dict[str, Any]:
            known(name)
            manifest = delivery.current.get(name)
            if manifest is None:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND, f"model {name!r} has shipped no version yet"
                )
            return _manifest_doc(manifest)

        @r.get("/delivery", summary="Recent deliveries: promoted, published, or cannot ship")
        async def get_deliveries(
            limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        ) -> dict[str, Any]:
            return {
                "published": delivery.published,
                "current": {n: m.version for n, m in delivery.current.items()},
                "deliveries": list(delivery.deliveries)[-limit:],
            }

        @r.post(
            "/models/{name}/versions",
            summary="Register your own ONNX model (raw body; bearer token)",
            status_code=status.HTTP_201_CREATED,
        )
        async def register(
            request: Request,
            name: str,
            actor: Annotated[str, Depends(require_token)],
            features: Annotated[str, Query(description="comma-separated, in input order")],
            kind: Annotated[str, Query(pattern="^(classifier|regressor)$")] = "classifier",
            output: str | None = None,
            filename: str = "",
        ) -> dict[str, Any]:
            known(name)
            from cloud.compile import UserModelError

            feats = [f.strip() for f in features.split(",") if f.strip()]
            if not feats:
                raise HTTPException(422, "features: expected a,b,c")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > _MAX_UPLOAD:
                    raise HTTPException(
                        413,
                        f"model larger than {_MAX_UPLOAD} bytes",
                    )
            try:
                return await delivery.register_user_model(
                    name, bytes(body), feats, kind, output=output, filename=filename
                )
            except (UserModelError, ValueError) as exc:
                raise HTTPException(422, str(exc)) from None

        return r


def _manifest_doc(manifest: ModelManifest) -> dict[str, Any]:
    import json

    doc: dict[str, Any] = json.loads(manifest.to_json())
    return doc


def _jsonable_classes(classes: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for c in classes:
        out.append(c if isinstance(c, bool | int | float | str) else str(c))
    return out
