"""Core tasks that may not die quietly, and a process that ends when one does.

Both tiers run a handful of long-lived asyncio tasks (the agent's tick, uplink and control
loops; the cloud's ingest, hooks and control publisher). A loop that raises out of itself would
otherwise leave the process half alive: heartbeats going on, ``/healthz`` saying ok, nothing
processed. A :class:`Supervisor` watches such tasks: the first that ends with an exception makes
its owner *failing* (``failure`` says why, ``failed`` is set, a CRITICAL log line names it), and
:func:`wait_for_stop` — what ``edgeloop edge run`` and ``edgeloop cloud run`` wait on — returns
so the process exits non-zero and its supervisor (systemd, Kubernetes) restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Supervisor", "wait_for_stop"]


class Supervisor:
    """Turns the death of a watched task into a failure of its owner (``what``)."""

    def __init__(
        self,
        what: str,
        log: logging.Logger,
        *,
        stopping: Callable[[], bool],
        on_fail: Callable[[], None] | None = None,
    ) -> None:
        self.what = what
        self.log = log
        self._stopping = stopping
        self._on_fail = on_fail
        #: why the owner is failing (None while it is not)
        self.failure: str | None = None
        self.failed = asyncio.Event()

    def watch(self, tasks: Iterable[asyncio.Task[Any] | None]) -> None:
        for task in tasks:
            if task is not None:
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        # cancelled or returned is how the loops end when asked to; an exception is a death
        if task.cancelled() or self._stopping():
            return
        exc = task.exception()
        if exc is not None:
            self.fail(f"core task {task.get_name()} died ({type(exc).__name__}: {exc})", exc)

    def fail(self, reason: str, exc: BaseException | None = None) -> None:
        """The owner cannot go on as it is (the first reason wins)."""
        if self.failure is not None:
            return
        self.failure = reason
        if self._on_fail is not None:
            self._on_fail()
        self.log.critical(
            "%s; the %s is failing and exits so that its supervisor restarts it",
            reason,
            self.what,
            exc_info=exc,
        )
        self.failed.set()


async def wait_for_stop(failed: asyncio.Event) -> bool:
    """Wait for SIGINT/SIGTERM or ``failed``; True when it was the failure."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = {
        asyncio.create_task(stop.wait(), name="wait-for-stop:signal"),
        asyncio.create_task(failed.wait(), name="wait-for-stop:failure"),
    }
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return failed.is_set()
