"""Waiting on conditions with deadlines: the only way tests synchronise (never a bare sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def wait_until(
    cond: Callable[[], bool], within: float, what: str, poll: float = 0.02
) -> None:
    """Return as soon as ``cond()`` is true; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(poll)


def wait_until_sync(cond: Callable[[], bool], within: float, what: str, poll: float = 0.02) -> None:
    """The same for synchronous tests."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(poll)


async def wait_until_async(
    cond: Callable[[], Awaitable[bool]], within: float, what: str, poll: float = 0.05
) -> None:
    """:func:`wait_until` for a condition that must itself await (e.g. read the outbox)."""
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(poll)
