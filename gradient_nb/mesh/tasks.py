"""Stopping a task we own, without swallowing our own cancellation.

``task.cancel()`` followed by ``with suppress(BaseException): await task`` is the common way to stop an
owned task, and it is wrong: if the *caller* is cancelled while it waits, that CancelledError is swallowed
too and the caller carries on as if nothing happened. ``asyncio.wait`` never raises the awaited task's
outcome but does raise the caller's own cancellation, so it separates the two.
"""

from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task | asyncio.Future | None) -> None:
    """Cancel ``task`` and wait until it has ended. Its own outcome (cancelled, or an error its owner
    already logs) is absorbed; a cancellation of the caller while waiting propagates."""
    if task is None:
        return
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: asyncio would otherwise log "exception was never retrieved"
