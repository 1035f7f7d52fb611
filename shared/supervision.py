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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["Supervisor", "cancel_requested", "close_quietly", "wait_for_stop"]


def cancel_requested() -> bool:
    """Whether the running task itself was asked to stop. A ``CancelledError`` can also come
    out of a library call whose own future it cancelled (aiokafka does when a broker goes away);
    a retry loop must survive that one and end only on a cancel addressed to it."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def close_quietly(close: Callable[[], Awaitable[Any]], within: float = 5.0) -> None:
    """Close a client (an aiokafka producer or consumer) for at most ``within`` seconds,
    swallowing what closing a broken connection raises — a ``CancelledError`` of the library's
    own included (aiokafka awaits the internal tasks it cancels) — but never a cancel of the
    running task."""
    try:
        async with asyncio.timeout(within):
            await close()
    except asyncio.CancelledError:
        if cancel_requested():
            raise
    except Exception:  # noqa: BLE001, S110 - closing what already failed: nothing to report
        pass


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

    def watch(
        self,
        tasks: Iterable[asyncio.Task[Any] | None],
        *,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        """Watch ``tasks``; ``stopping`` says when their own component was asked to stop (its
        tasks may then end); the owner's ``stopping`` always counts."""
        for task in tasks:
            if task is not None:
                task.add_done_callback(lambda t: self._done(t, stopping))

    def _done(self, task: asyncio.Task[Any], stopping: Callable[[], bool] | None) -> None:
        if self._stopping() or (stopping is not None and stopping()):
            return  # asked to stop: cancelled or returned is how it ends
        if task.cancelled():
            self.fail(f"core task {task.get_name()} was cancelled while nothing asked it to stop")
            return
        exc = task.exception()
        if exc is not None:
            self.fail(f"core task {task.get_name()} died ({type(exc).__name__}: {exc})", exc)
        else:
            self.fail(f"core task {task.get_name()} returned while nothing asked it to stop")

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
