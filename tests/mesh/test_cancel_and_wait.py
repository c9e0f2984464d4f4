"""cancel_and_wait stops an owned task and absorbs its outcome, but never the caller's own cancellation."""

from __future__ import annotations

import asyncio

import pytest

from gradient_nb.mesh.tasks import cancel_and_wait


async def test_the_tasks_own_cancellation_and_error_are_absorbed() -> None:
    forever = asyncio.create_task(asyncio.Event().wait())
    await asyncio.sleep(0)
    await cancel_and_wait(forever)
    assert forever.cancelled()

    async def fail() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fail())
    await asyncio.sleep(0)
    await cancel_and_wait(failed)  # already ended with an error: absorbed, and marked retrieved
    await cancel_and_wait(None)


async def test_the_callers_cancellation_propagates() -> None:
    async def stubborn() -> None:
        # Ignores one cancellation, so stopping it takes a while and the caller can be cancelled meanwhile.
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(30)

    owned = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(owned))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    owned.cancel()
    await asyncio.wait({owned})
