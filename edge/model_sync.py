"""Model delivery on the gateway: signed manifests in, verified, shadowed, swapped, watched.

Data flow (see docs/delivery.md)::

    <prefix>.models (own consumer, no group, from the beginning; latest manifest per name)
      -> signature check against the pinned public key     (refused: nothing downloaded)
      -> version rule: higher than the active one, or a signed rollback
      -> download the artifact (httpx; timeout, retries with capped backoff, size bound)
      -> sha256 of the bytes == manifest.sha256           (refused: nothing loaded)
      -> load in a second onnxruntime session (input shape, probe batch)
      -> shadow on live frames: shape, NaN rate, p99 latency, agreement with the champion
      -> ModelSlot.swap (one reference assignment; the previous model is kept)
      -> watch: NaN rate and error rate against labels seen on the edge -> automatic rollback

Every refusal and rollback is an ``Event`` (rule ``model_refused`` / ``model_rollback``), a
metric and part of the heartbeat's ``info.model_sync``. The active model (its bytes and signed
manifest) is kept in ``<state_dir>/models/<name>/``: a restart comes back with it, re-verified.

:class:`LabelExtractor` turns a quality station's readings into ``Label`` records (the
``labels:`` section of the edge config).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from prometheus_client import Counter

from edge.config import LabelConfig, ModelSyncConfig
from edge.frames import PendingFrame
from edge.inference import LoadedModel, ModelLoadError, load_model
from shared.files import write_atomic
from shared.manifest import (
    ManifestError,
    ModelManifest,
    SignatureError,
    load_public_key,
    verify_manifest,
)
from shared.records import Event, Frame, Label, Reading, Severity, now_ns
from shared.supervision import cancel_requested, close_quietly
from shared.topics import Topics

if TYPE_CHECKING:
    from edge.agent import Agent

__all__ = ["LabelExtractor", "ModelSync", "ModelSyncError"]

log = logging.getLogger(__name__)

_UPDATES = Counter(
    "edgeloop_edge_model_updates_total",
    "Delivered models by outcome (swapped, refused, rolled_back)",
    ["agent", "outcome"],
)
_ROLLBACKS = Counter(
    "edgeloop_edge_model_rollbacks_total",
    "Automatic rollbacks after a swap, by reason",
    ["agent", "reason"],
)


class ModelSyncError(Exception):
    """A delivered model is refused; the message says which check failed and why."""


class LabelExtractor:
    """Readings of a key tag and a target tag with the same (asset, ts) -> one ``Label``.

    A message that cannot become a label is skipped and counted, never fatal: ``missing_key``
    (a target without a key reading, or an empty key), ``missing_target`` (a key without a
    target reading), ``invalid`` (a target that is neither bool nor a finite number, nor a
    string spelling one: "true"/"false", "1.5"). ``skipped`` has the three counts together;
    the first of each kind per connector is logged with the offending message.
    """

    def __init__(self, configs: Sequence[LabelConfig]) -> None:
        self.by_connector: dict[str, list[LabelConfig]] = {}
        for c in configs:
            self.by_connector.setdefault(c.connector, []).append(c)
        self.invalid = 0  # target values that were neither bool nor a finite number
        self.missing_key = 0
        self.missing_target = 0
        self.extracted = 0
        self._logged: set[tuple[str, str]] = set()

    @property
    def skipped(self) -> dict[str, int]:
        return {
            "missing_key": self.missing_key,
            "missing_target": self.missing_target,
            "invalid": self.invalid,
        }

    def _skip(self, connector: str, kind: str, detail: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if (connector, kind) not in self._logged:
            self._logged.add((connector, kind))
            log.warning(
                "labels from %s: %s skipped (%s; counted from now on)", connector, kind, detail
            )

    def extract(self, connector: str, readings: Sequence[Reading]) -> list[Label]:
        specs = self.by_connector.get(connector)
        if not specs:
            return []
        out: list[Label] = []
        for spec in specs:
            keys: dict[tuple[str, int], Any] = {}
            targets: dict[tuple[str, int], Any] = {}
            for r in readings:
                if r.tag == spec.key_tag:
                    keys[(r.asset, r.ts_ns)] = r.value
                elif r.tag == spec.target_tag:
                    targets[(r.asset, r.ts_ns)] = r.value
            if not keys and not targets:
                continue
            for at in targets.keys() - keys.keys():
                if _matches(at[0], spec.assets):
                    self._skip(connector, "missing_key", f"asset {at[0]}: no {spec.key_tag!r}")
            for (asset, ts), value in keys.items():
                if not _matches(asset, spec.assets):
                    continue
                if value is None or (isinstance(value, str) and not value.strip()):
                    if (asset, ts) in targets:
                        self._skip(
                            connector, "missing_key", f"asset {asset}: empty {spec.key_tag!r}"
                        )
                    continue
                if (asset, ts) not in targets:
                    self._skip(
                        connector,
                        "missing_target",
                        f"asset {asset} {spec.key_tag}={value!r}: no {spec.target_tag!r}",
                    )
                    continue
                target = _target(targets[(asset, ts)])
                if target is None:
                    self._skip(
                        connector,
                        "invalid",
                        f"asset {asset} {spec.key_tag}={value!r}: {spec.target_tag}="
                        f"{targets[(asset, ts)]!r} is neither bool nor a finite number",
                    )
                    continue
                out.append(Label(asset, spec.key.format(asset=asset, value=value), ts, target))
        self.extracted += len(out)
        return out


def _matches(asset: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(asset, p) for p in patterns)


def _target(value: Any) -> bool | int | float | None:
    """A label target: bool, a finite number, or a string spelling one; None otherwise."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        try:
            value = int(low)
        except ValueError:
            try:
                value = float(low)
            except ValueError:
                return None
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


@dataclass
class _Shadow:
    model: LoadedModel
    manifest: ModelManifest
    started: float
    frames: int = 0
    nan: int = 0
    errors: int = 0
    agree: int = 0
    compared: int = 0
    latencies: list[float] = field(default_factory=list)
    last_error: str = ""

    def report(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else None
        return {
            "version": self.manifest.version,
            "frames": self.frames,
            "nan": self.nan,
            "errors": self.errors,
            "agreement": self.agree / self.compared if self.compared else None,
            "compared": self.compared,
            "latency_p99_ms": p99,
            "seconds": round(time.monotonic() - self.started, 3),
            "last_error": self.last_error,
        }


@dataclass
class _Watch:
    version: int
    classifier: bool
    baseline_version: int | None = None
    baseline_labelled: int = 0  # the previous model's last watch_labels labelled frames
    baseline_wrong: int = 0
    frames: int = 0
    nan: int = 0
    labelled: int = 0
    wrong: int = 0

    def report(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "frames": self.frames,
            "nan": self.nan,
            "labelled": self.labelled,
            "error_rate": self.wrong / self.labelled if self.labelled else None,
            "baseline_version": self.baseline_version,
            "baseline_labelled": self.baseline_labelled,
            "baseline_error_rate": (
                self.baseline_wrong / self.baseline_labelled if self.baseline_labelled else None
            ),
        }


class _Outcomes:
    """The edge's own predictions joined with its own labels by (asset, key), per version.

    Every scored frame is remembered (bounded, oldest first out) until its label arrives; a
    labelled prediction becomes one outcome (wrong or not) of the model version that made it.
    The last ``window`` outcomes of each version are kept: the previous model's are the
    baseline a freshly swapped-in model is compared with.
    """

    def __init__(self, window: int, pending: int = 20_000) -> None:
        self.window = window
        self.max_pending = pending
        self.pending: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self.by_version: dict[int, deque[bool]] = {}

    def predicted(self, frames: Sequence[Frame]) -> None:
        for f in frames:
            if f.prediction is None or f.model_version is None:
                continue
            self.pending[(f.asset, f.key)] = (f.model_version, f.prediction)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)

    def labelled(self, labels: Sequence[Label]) -> list[tuple[int, bool]]:
        """(version, wrong) for each label that matches a remembered prediction."""
        out: list[tuple[int, bool]] = []
        for lab in labels:
            hit = self.pending.pop((lab.asset, lab.key), None)
            if hit is None:
                continue
            version, pred = hit
            wrong = abs(pred - float(lab.target)) > 0.5
            window = self.by_version.get(version)
            if window is None:
                window = self.by_version[version] = deque(maxlen=self.window)
                while len(self.by_version) > 4:  # the active, the previous and a little history
                    del self.by_version[min(self.by_version)]
            window.append(wrong)
            out.append((version, wrong))
        return out

    def last(self, version: int) -> tuple[int, int]:
        """(labelled, wrong) over the version's last ``window`` labelled frames."""
        window = self.by_version.get(version)
        return (0, 0) if window is None else (len(window), sum(window))


class ModelSync:
    """Keeps the agent's model slot on the cloud's signed champion. Async context manager."""

    def __init__(self, agent: Agent, config: ModelSyncConfig) -> None:
        self.agent = agent
        self.config = config
        up = agent.config.uplink
        self.bootstrap = config.bootstrap_servers or up.bootstrap_servers
        self.topics = Topics(config.topic_prefix or up.topic_prefix)
        self.dir = agent.config.state_dir / "models" / config.name
        self.threads = agent.config.model.intra_op_threads if agent.config.model else 1
        self._public_key: Any = None
        self._consumer: AIOKafkaConsumer | None = None
        self._http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._latest: ModelManifest | None = None
        self._wake = asyncio.Event()
        self._caught_up = False
        self._handled: set[tuple[int, str, bool, int]] = set()
        self._shadow: _Shadow | None = None
        self._shadow_done = asyncio.Event()
        self._watch: _Watch | None = None
        self.outcomes = _Outcomes(config.watch_labels)
        self.last_watch: dict[str, Any] | None = None
        self.refused: dict[str, str] = {}  # "v<version>:<sha>" -> reason (persisted)
        self.history: deque[dict[str, Any]] = deque(maxlen=50)
        self.state = "idle"  # idle | downloading | shadow | watching
        self.last_refusal: dict[str, Any] | None = None
        self.last_rollback: dict[str, Any] | None = None
        self.manifests_seen = 0
        self.swaps = 0
        self._started = False
        self._updates = {o: _UPDATES.labels(agent.agent_id, o) for o in _OUTCOMES}

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        try:
            pem = self.config.public_key.read_bytes()
        except OSError as exc:
            raise ModelSyncError(
                f"models.public_key {self.config.public_key}: cannot read ({exc.strerror})"
            ) from exc
        try:
            self._public_key = load_public_key(pem)
        except (ValueError, SignatureError) as exc:
            raise ModelSyncError(
                f"models.public_key {self.config.public_key}: not an ed25519 public key in PEM "
                f"({exc})"
            ) from exc
        self._started = True
        self.dir.mkdir(parents=True, exist_ok=True)
        await self._restore()
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.download_timeout), follow_redirects=True
        )
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"model-sync:{self.agent.agent_id}:consume"),
            asyncio.create_task(self._work(), name=f"model-sync:{self.agent.agent_id}:work"),
        ]

    def tasks(self) -> list[asyncio.Task[None]]:
        """The running tasks (the agent watches them: one that dies fails the agent)."""
        return list(self._tasks)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._consumer is not None:
            await close_quietly(self._consumer.stop)
            self._consumer = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> ModelSync:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- persisted state ----------------------------------------------------------------

    def _paths(self, version: int) -> tuple[Path, Path]:
        return self.dir / f"v{version}.onnx", self.dir / f"v{version}.manifest.json"

    def _save_state(self) -> None:
        slot = self.agent.slot
        doc = {
            "active": slot.current.version if slot.current else None,
            "previous": slot.previous.version if slot.previous else None,
            "refused": self.refused,
        }
        write_atomic(self.dir / "state.json", json.dumps(doc, indent=1).encode())
        keep = {v for v in (doc["active"], doc["previous"]) if v is not None}
        for p in self.dir.glob("v*.onnx"):
            with contextlib.suppress(ValueError, OSError):
                if int(p.stem[1:]) not in keep:
                    p.unlink()
                    p.with_name(p.stem + ".manifest.json").unlink(missing_ok=True)

    async def _restore(self) -> None:
        """Bring back the persisted active (and previous) model, verified again."""
        path = self.dir / "state.json"
        if not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.error("model state %s unreadable (%s); waiting for the cloud's manifest", path, exc)
            return
        self.refused = dict(doc.get("refused") or {})
        for key in ("previous", "active"):
            version = doc.get(key)
            if not isinstance(version, int):
                continue
            onnx, man = self._paths(version)
            try:
                manifest = ModelManifest.from_json(man.read_bytes())
                verify_manifest(manifest, self._public_key)
                model = await asyncio.to_thread(
                    load_model, onnx, man, intra_op_threads=self.threads
                )
            except (OSError, ManifestError, SignatureError, ModelLoadError) as exc:
                log.error("persisted model v%s not restored: %s", version, exc)
                continue
            self._activate(model, persist=False)
            self._handled.add((version, manifest.sha256, manifest.rollback, manifest.created))
        if self.agent.slot.current is not None:
            log.info("restored model %s v%d", self.config.name, self.agent.slot.current.version)

    # --- the models topic ---------------------------------------------------------------

    async def _consume(self) -> None:
        """Read the models topic from the beginning for ever; keep the latest manifest."""
        backoff = self.config.backoff.initial
        while True:
            try:
                consumer = AIOKafkaConsumer(
                    self.topics.models,
                    bootstrap_servers=self.bootstrap,
                    group_id=None,
                    auto_offset_reset="earliest",
                    enable_auto_commit=False,
                    metadata_max_age_ms=2000,
                    request_timeout_ms=10_000,
                    # a manifest is tiny and rare: answer fetches fast rather than fill them
                    fetch_max_wait_ms=50,
                )
                self._consumer = consumer
                await consumer.start()
                ends: dict[Any, int] | None = None
                backoff = self.config.backoff.initial
                while True:
                    got = await consumer.getmany(timeout_ms=250)
                    for msgs in got.values():
                        for msg in msgs:
                            self._offer(msg.key, msg.value)
                    if not self._caught_up:
                        parts = consumer.assignment()
                        if parts and ends is None:
                            ends = await consumer.end_offsets(list(parts))
                        behind = False
                        for tp, end in (ends or {}).items():
                            behind = behind or await consumer.position(tp) < end
                        if ends is not None and not behind:
                            self._caught_up = True
                            if self._latest is not None:
                                self._wake.set()
            except asyncio.CancelledError:
                if cancel_requested():
                    raise
                log.warning(
                    "models topic: a broker call was cancelled; retrying in %.1f s", backoff
                )
            except (KafkaError, OSError) as exc:
                log.warning("models topic: %s; retrying in %.1f s", exc, backoff)
            finally:
                c, self._consumer = self._consumer, None
                if c is not None:
                    await close_quietly(c.stop)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff.max)

    def _offer(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:
            return
        try:
            manifest = ModelManifest.from_json(value)
        except ManifestError as exc:
            log.warning("models topic: unreadable manifest skipped: %s", exc)
            return
        if manifest.name != self.config.name:
            return
        self.manifests_seen += 1
        self._latest = manifest
        if self._caught_up:
            self._wake.set()

    def offer(self, manifest: ModelManifest) -> None:
        """Hand a manifest to the worker as if it had come from the topic."""
        self._offer(None, manifest.to_json())

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            manifest = self._latest
            if manifest is None:
                continue
            # republished manifests are the same object (same ``created``): handled once
            ident = (manifest.version, manifest.sha256, manifest.rollback, manifest.created)
            if ident in self._handled:
                continue
            self._handled.add(ident)
            try:
                await self.apply(manifest)
            except ModelSyncError as exc:
                self._refuse(manifest, str(exc))
            except Exception as exc:
                log.exception("applying model %s v%d failed", manifest.name, manifest.version)
                self._refuse(manifest, f"unexpected error: {exc!r}")
            finally:
                self.state = "watching" if self._watch is not None else "idle"

    # --- applying one manifest ----------------------------------------------------------

    async def apply(self, manifest: ModelManifest) -> None:
        """Verify, download, load, shadow and swap ``manifest``; raise ModelSyncError if not."""
        # 1. the signature, before anything is downloaded
        try:
            verify_manifest(manifest, self._public_key)
        except SignatureError as exc:
            raise ModelSyncError(f"signature: {exc}") from None
        slot = self.agent.slot
        active = slot.current
        if active is not None and active.manifest.name == manifest.name:
            if manifest.version == active.version and manifest.sha256 == active.manifest.sha256:
                return  # already running it (a republished manifest)
            if manifest.version <= active.version and not manifest.rollback:
                raise ModelSyncError(
                    f"version {manifest.version} is not newer than the active "
                    f"{active.version} and the manifest is not a signed rollback"
                )
        if not manifest.rollback and self.refused.get(self._rkey(manifest)):
            log.info("model v%d was refused before; ignored", manifest.version)
            return
        # 2. a signed rollback to the model kept in the slot is instant
        prev = slot.previous
        if (
            manifest.rollback
            and prev is not None
            and prev.version == manifest.version
            and prev.manifest.sha256 == manifest.sha256
        ):
            slot.rollback()
            self._activate(slot.current, swap=False)  # type: ignore[arg-type]
            self._record("rolled_back", manifest, "signed rollback from the cloud")
            return
        # 3. download and check the bytes
        self.state = "downloading"
        blob = await self._download(manifest)
        digest = _sha256(blob)
        if digest != manifest.sha256:
            raise ModelSyncError(
                f"artifact sha256 {digest[:16]}... does not match the signed manifest's "
                f"{manifest.sha256[:16]}... (tampered or corrupt); nothing loaded"
            )
        onnx, man = self._paths(manifest.version)
        tmp_onnx = onnx.with_name(onnx.name + ".new")
        tmp_man = man.with_name(man.name + ".new")
        write_atomic(tmp_onnx, blob)
        write_atomic(tmp_man, manifest.to_json())
        # 4. a second session
        try:
            model = await asyncio.to_thread(
                load_model, tmp_onnx, tmp_man, intra_op_threads=self.threads
            )
        except ModelLoadError as exc:
            tmp_onnx.unlink(missing_ok=True)
            tmp_man.unlink(missing_ok=True)
            raise ModelSyncError(f"load: {exc}") from None
        # 5. shadow on live frames (a signed rollback goes back to a known model at once)
        if not manifest.rollback and active is not None and self.config.shadow_frames > 0:
            try:
                report = await self._run_shadow(model, manifest)
            except ModelSyncError:
                tmp_onnx.unlink(missing_ok=True)
                tmp_man.unlink(missing_ok=True)
                raise
        else:
            report = None
        os.replace(tmp_onnx, onnx)
        os.replace(tmp_man, man)
        model = _relocate(model, onnx)
        self._activate(model)
        self._record(
            "rolled_back" if manifest.rollback else "swapped",
            manifest,
            "signed rollback" if manifest.rollback else "shadow passed",
            shadow=report,
        )

    def _rkey(self, manifest: ModelManifest) -> str:
        return f"v{manifest.version}:{manifest.sha256}"

    async def _download(self, manifest: ModelManifest) -> bytes:
        url = manifest.artifact_url
        if not url:
            raise ModelSyncError("the manifest has no artifact_url")
        http = self._http
        assert http is not None
        delay = self.config.backoff.initial
        last = ""
        for attempt in range(1, self.config.download_attempts + 1):
            try:
                async with http.stream("GET", url) as resp:
                    if resp.status_code == 200:
                        chunks: list[bytes] = []
                        size = 0
                        async for chunk in resp.aiter_bytes():
                            size += len(chunk)
                            if size > self.config.max_artifact_bytes:
                                raise ModelSyncError(
                                    f"artifact {url} is larger than max_artifact_bytes "
                                    f"({self.config.max_artifact_bytes})"
                                )
                            chunks.append(chunk)
                        return b"".join(chunks)
                    last = f"HTTP {resp.status_code}"
                    if resp.status_code in (404, 410) or 400 <= resp.status_code < 429:
                        raise ModelSyncError(f"artifact {url}: {last}")
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            log.warning(
                "artifact %s: %s (attempt %d of %d)",
                url,
                last,
                attempt,
                self.config.download_attempts,
            )
            if attempt < self.config.download_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.backoff.max)
        raise ModelSyncError(
            f"artifact {url}: not downloaded after {self.config.download_attempts} attempts "
            f"({last})"
        )

    async def _run_shadow(self, model: LoadedModel, manifest: ModelManifest) -> dict[str, Any]:
        self.state = "shadow"
        shadow = _Shadow(model, manifest, time.monotonic())
        self._shadow = shadow
        self._shadow_done.clear()
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._shadow_done.wait(), self.config.shadow_timeout)
        finally:
            self._shadow = None
        report = shadow.report()
        cfg = self.config
        if shadow.errors:
            raise ModelSyncError(
                f"shadow: {shadow.errors} of {shadow.frames + shadow.errors} batches failed "
                f"({shadow.last_error})"
            )
        if shadow.frames and shadow.nan / shadow.frames > cfg.max_nan_rate:
            raise ModelSyncError(
                f"shadow: {shadow.nan} of {shadow.frames} outputs were NaN "
                f"(max_nan_rate {cfg.max_nan_rate})"
            )
        p99 = report["latency_p99_ms"]
        if p99 is not None and p99 > cfg.max_latency_ms:
            raise ModelSyncError(
                f"shadow: p99 latency {p99:.1f} ms > max_latency_ms {cfg.max_latency_ms}"
            )
        agreement = report["agreement"]
        if (
            cfg.min_agreement is not None
            and agreement is not None
            and agreement < cfg.min_agreement
        ):
            raise ModelSyncError(
                f"shadow: agreement with the champion {agreement:.3f} < min_agreement "
                f"{cfg.min_agreement}"
            )
        if not shadow.frames:
            log.warning(
                "model v%d: no live frames within shadow_timeout %.0f s; swapped on the probe "
                "batch alone (the watch still applies)",
                manifest.version,
                cfg.shadow_timeout,
            )
        return report

    # --- called by the agent every tick ---------------------------------------------------

    def observe(
        self, pending: Sequence[PendingFrame], frames: Sequence[Frame], labels: Sequence[Label]
    ) -> None:
        """Shadow-score the tick's frames with a candidate; watch the swapped-in model."""
        shadow = self._shadow
        if shadow is not None and pending:
            self._shadow_tick(shadow, pending, frames)
        outcomes: list[tuple[int, bool]] = []
        if self.agent.label_extractor.by_connector:
            self.outcomes.predicted(frames)
            if labels:
                outcomes = self.outcomes.labelled(labels)
        watch = self._watch
        if watch is not None:
            self._watch_tick(watch, frames, outcomes)

    def _shadow_tick(
        self, shadow: _Shadow, pending: Sequence[PendingFrame], frames: Sequence[Frame]
    ) -> None:
        names = shadow.model.features
        rows: list[int] = []
        x = np.empty((len(pending), len(names)), dtype=np.float64)
        for i, p in enumerate(pending):
            try:
                x[len(rows)] = [p.features[n] for n in names]
            except KeyError:
                continue
            rows.append(i)
        if not rows:
            return
        t0 = time.perf_counter()
        try:
            preds, scores = shadow.model.predict(x[: len(rows)])
            if len(preds) != len(rows):
                raise ValueError(f"{len(preds)} outputs for {len(rows)} rows")
        except Exception as exc:  # noqa: BLE001 - any failure of the candidate is a finding
            shadow.errors += 1
            shadow.last_error = f"{type(exc).__name__}: {exc}"[:300]
            self._shadow_done.set()
            return
        shadow.latencies.append(time.perf_counter() - t0)
        for k, i in enumerate(rows):
            pred, score = preds[k], scores[k]
            shadow.frames += 1
            if math.isnan(pred) or (score is not None and math.isnan(score)):
                shadow.nan += 1
                continue
            champ = frames[i].prediction if i < len(frames) else None
            if champ is not None:
                shadow.compared += 1
                if abs(champ - pred) < 1e-9:
                    shadow.agree += 1
        if shadow.frames >= self.config.shadow_frames:
            self._shadow_done.set()

    def _watch_tick(
        self, watch: _Watch, frames: Sequence[Frame], outcomes: Sequence[tuple[int, bool]]
    ) -> None:
        current = self.agent.slot.current
        if current is None or current.version != watch.version:
            self._watch = None
            return
        for f in frames:
            if f.model_version != watch.version:
                continue
            watch.frames += 1
            if f.prediction is None and not f.marks:
                watch.nan += 1  # an unmarked frame scored to nothing: NaN from the model
        for version, wrong in outcomes:
            if version == watch.version:
                watch.labelled += 1
                watch.wrong += wrong
        cfg = self.config
        reason = ""
        if (
            watch.frames >= cfg.watch_min_frames
            and watch.nan / watch.frames > cfg.watch_max_nan_rate
        ):
            reason = (
                f"NaN rate {watch.nan}/{watch.frames} above watch_max_nan_rate "
                f"{cfg.watch_max_nan_rate}"
            )
        elif watch.classifier and watch.labelled >= cfg.watch_min_labels:
            reason = self._error_verdict(watch)
        if reason:
            self._auto_rollback(watch, reason)
            return
        labels_done = (
            not watch.classifier
            or not self.agent.label_extractor.by_connector
            or (cfg.watch_max_error_rate is None and cfg.watch_error_margin is None)
            or watch.labelled >= cfg.watch_labels
        )
        if watch.frames >= cfg.watch_frames and (
            labels_done or watch.frames >= _WATCH_FRAMES_CAP * cfg.watch_frames
        ):
            if not labels_done:
                log.warning(
                    "model v%d: only %d labelled frames after %d frames; watch ended without "
                    "a full error-rate check",
                    watch.version,
                    watch.labelled,
                    watch.frames,
                )
            log.info("model v%d passed its watch: %s", watch.version, watch.report())
            self.last_watch = {"outcome": "passed", **watch.report()}
            self._watch = None
            self.state = "idle"

    def _error_verdict(self, watch: _Watch) -> str:
        """Why the watched model's error rate calls for a rollback ("" if it does not)."""
        cfg = self.config
        n1, p1 = watch.labelled, watch.wrong / watch.labelled
        if cfg.watch_max_error_rate is not None and p1 > cfg.watch_max_error_rate:
            return (
                f"error rate {watch.wrong}/{n1} ({p1:.3f}) against edge labels above "
                f"watch_max_error_rate {cfg.watch_max_error_rate}"
            )
        n0 = watch.baseline_labelled
        if cfg.watch_error_margin is None or n0 < cfg.watch_min_labels:
            return ""
        p0 = watch.baseline_wrong / n0
        se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
        if p1 - p0 > cfg.watch_error_margin + _WATCH_Z * se:
            return (
                f"error rate {watch.wrong}/{n1} ({p1:.3f}) against edge labels exceeds "
                f"v{watch.baseline_version}'s {watch.baseline_wrong}/{n0} ({p0:.3f}) by more "
                f"than watch_error_margin {cfg.watch_error_margin} + {_WATCH_Z:g} standard "
                f"errors ({se:.3f})"
            )
        return ""

    def _auto_rollback(self, watch: _Watch, reason: str) -> None:
        slot = self.agent.slot
        bad = slot.current
        assert bad is not None
        self._watch = None
        self.last_watch = {"outcome": "rolled_back", "reason": reason, **watch.report()}
        self.refused[self._rkey(bad.manifest)] = f"rolled back: {reason}"
        if slot.previous is None:
            # nothing to go back to: run without a model rather than with a broken one
            slot.current = None
            slot.previous = bad
            slot.fail(f"model v{bad.version} rolled back ({reason}); no previous model")
            self.agent.metrics.model_version.set(0)
        else:
            back = slot.rollback()
            self.agent.frames.use_model_features(back.features)
            self.agent.metrics.model_version.set(back.version)
        self._save_state()
        kind = "nan" if reason.startswith("NaN") else "error"
        _ROLLBACKS.labels(self.agent.agent_id, kind).inc()
        now = slot.current.version if slot.current else None
        self.last_rollback = {
            "from": bad.version,
            "to": now,
            "reason": reason,
            "ts_ns": now_ns(),
        }
        self._updates["rolled_back"].inc()
        self.history.append({"outcome": "auto_rollback", **self.last_rollback})
        log.error("model v%d rolled back to v%s: %s", bad.version, now, reason)
        self.agent.emit(
            [
                Event(
                    "model_rollback",
                    self.agent.agent_id,
                    now_ns(),
                    Severity.CRITICAL,
                    f"model {bad.manifest.name} v{bad.version} rolled back to v{now}: {reason}",
                    {
                        "model": bad.manifest.name,
                        "from": bad.version,
                        "to": now,
                        "reason": reason,
                        "watch": watch.report(),
                    },
                )
            ]
        )
        self.state = "idle"

    # --- bookkeeping ----------------------------------------------------------------------

    def _activate(self, model: LoadedModel, *, swap: bool = True, persist: bool = True) -> None:
        if swap:
            self.agent.slot.swap(model)
        self.agent.frames.use_model_features(model.features)
        self.agent.metrics.model_version.set(model.version)
        if persist:
            # a signed rollback is the operator's call: NaN and absolute checks only
            replaced = self.agent.slot.previous if swap and not model.manifest.rollback else None
            self._save_state()
            self._watch = None
            if self.config.watch_frames > 0:
                watch = _Watch(model.version, model.manifest.kind == "classifier")
                if replaced is not None:
                    watch.baseline_version = replaced.version
                    n, wrong = self.outcomes.last(replaced.version)
                    watch.baseline_labelled, watch.baseline_wrong = n, wrong
                self._watch = watch
            self.swaps += 1
        log.info("model %s v%d active", model.manifest.name, model.version)

    def _record(self, outcome: str, manifest: ModelManifest, why: str, shadow: Any = None) -> None:
        self._updates[outcome].inc()
        self.history.append(
            {
                "outcome": outcome,
                "version": manifest.version,
                "why": why,
                "shadow": shadow,
                "ts_ns": now_ns(),
            }
        )

    def _refuse(self, manifest: ModelManifest, reason: str) -> None:
        self._updates["refused"].inc()
        self.agent.metrics.model_errors.inc()
        self.refused[self._rkey(manifest)] = reason
        with contextlib.suppress(OSError):
            self._save_state()
        self.last_refusal = {"version": manifest.version, "reason": reason, "ts_ns": now_ns()}
        self.history.append({"outcome": "refused", **self.last_refusal})
        active = self.agent.slot.current
        log.error(
            "model %s v%d refused (still serving v%s): %s",
            manifest.name,
            manifest.version,
            active.version if active else None,
            reason,
        )
        self.agent.emit(
            [
                Event(
                    "model_refused",
                    self.agent.agent_id,
                    now_ns(),
                    Severity.WARNING,
                    f"model {manifest.name} v{manifest.version} refused: {reason}",
                    {"model": manifest.name, "version": manifest.version, "reason": reason},
                )
            ]
        )

    def status(self) -> dict[str, Any]:
        """What the heartbeat and /healthz report."""
        cur = self.agent.slot.current
        prev = self.agent.slot.previous
        shadow = self._shadow
        return {
            "name": self.config.name,
            "state": self.state,
            "active": cur.version if cur else None,
            "previous": prev.version if prev else None,
            "latest_seen": self._latest.version if self._latest else None,
            "caught_up": self._caught_up,
            "shadow": shadow.report() if shadow is not None else None,
            "last_refusal": self.last_refusal,
            "last_rollback": self.last_rollback,
            "watch": self._watch.report() if self._watch is not None else None,
            "last_watch": self.last_watch,
            "labels": {
                "extracted": self.agent.label_extractor.extracted,
                **self.agent.label_extractor.skipped,
            },
        }


_OUTCOMES = ("swapped", "refused", "rolled_back")
_WATCH_Z = 2.0  # standard errors on top of watch_error_margin: noise does not roll back
_WATCH_FRAMES_CAP = 10  # a watch waiting for labels ends after this many watch_frames


def _sha256(blob: bytes) -> str:
    import hashlib

    return hashlib.sha256(blob).hexdigest()


def _relocate(model: LoadedModel, path: Path) -> LoadedModel:
    from dataclasses import replace

    return replace(model, path=path)
