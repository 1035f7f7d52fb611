"""Drift detection on the deployed model's error stream, and notifying people about it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
from river import drift as river_drift

from cloud.config import DriftConfig, WebhookConfig

__all__ = ["DriftDetection", "DriftMonitor", "WebhookNotifier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DriftDetection:
    """A detector fired on a champion's error stream."""

    model: str
    version: int | None
    source: str  # "edge" (the edge's own predictions) or "cloud" (the frozen replica)
    detector: str
    samples: int  # errors the detector had seen when it fired
    ts_ns: int
    evidence: dict[str, Any] = field(default_factory=dict)


class DriftMonitor:
    """A river drift detector (ADWIN by default) fed with 0/1 errors or absolute errors."""

    def __init__(self, config: DriftConfig) -> None:
        self.config = config
        self.detections = 0
        self.seen = 0
        self._detector: Any = self._make()

    def _make(self) -> Any:
        cls = getattr(river_drift, self.config.detector)
        try:
            return cls(**self.config.params)
        except TypeError as exc:
            raise ValueError(
                f"drift.params for {self.config.detector}: {exc} (see river.drift.{self.config.detector})"
            ) from None

    def update(self, error: float) -> bool:
        """Feed one error; True when the detector signals a drift at this sample."""
        self.seen += 1
        self._detector.update(error)
        if self._detector.drift_detected:
            self.detections += 1
            return True
        return False

    def update_many(self, errors: list[float]) -> list[int]:
        """:meth:`update` with every error, in order; the positions where a drift fired."""
        detector = self._detector
        update = detector.update
        hits: list[int] = []
        for i, error in enumerate(errors):
            update(error)
            if detector.drift_detected:
                hits.append(i)
        self.seen += len(errors)
        self.detections += len(hits)
        return hits

    def reset(self) -> None:
        """Start over (a new champion has a new error stream)."""
        self._detector = self._make()
        self.seen = 0


class WebhookNotifier:
    """POSTs JSON notifications to the configured webhooks.

    Each POST has a timeout; failures are retried at most ``retries`` times with backoff
    (0.5 s doubling); a webhook that still fails is logged and counted, never fatal. Sends run
    as tasks this notifier owns: :meth:`aclose` waits for them (bounded) and cancels leftovers.
    """

    def __init__(self, hooks: list[WebhookConfig]) -> None:
        self.hooks = hooks
        self.sent = 0
        self.failed = 0
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, event: str, payload: dict[str, Any]) -> None:
        for hook in self.hooks:
            if event in hook.events:
                if self._client is None:
                    self._client = httpx.AsyncClient()
                task = asyncio.create_task(self._send(hook, {"event": event, **payload}))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, hook: WebhookConfig, body: dict[str, Any]) -> None:
        assert self._client is not None
        delay = 0.5
        for attempt in range(hook.retries + 1):
            try:
                resp = await self._client.post(
                    hook.url, json=body, headers=hook.headers, timeout=hook.timeout_s
                )
                if resp.status_code < 500:
                    if resp.status_code >= 400:
                        log.warning("webhook %s refused %s: HTTP %s", hook.url, body["event"], resp)
                        self.failed += 1
                    else:
                        self.sent += 1
                    return
                why = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if attempt < hook.retries:
                await asyncio.sleep(delay)
                delay *= 2
        self.failed += 1
        log.warning("webhook %s failed after %d attempts: %s", hook.url, hook.retries + 1, why)

    async def aclose(self, grace: float = 5.0) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
