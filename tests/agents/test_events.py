"""The SSE stream of a run, read by a real HTTP client (httpx + httpx-sse) that disconnects and resumes."""

from __future__ import annotations

import asyncio

import httpx
from httpx_sse import aconnect_sse

from gradient_nb.agents.events import EventServer, Runs

KINDS = ["plan", "beacon", "bid", "select", "dispatch", "tool_call", "tool_result", "vote", "retry", "replan",
         "final"]


async def test_every_event_in_order_and_resume_after_disconnect() -> None:
    runs = Runs()
    run = runs.new()
    server = await EventServer(runs).start()
    try:
        async def producer() -> None:
            for i, kind in enumerate(KINDS):
                run.emit(kind, step=i)
                await asyncio.sleep(0.05)

        task = asyncio.ensure_future(producer())
        got: list[tuple[str, str, int]] = []
        async with httpx.AsyncClient(timeout=10) as http:
            async with aconnect_sse(http, "GET", server.url(run)) as source:
                assert source.response.headers["content-type"].startswith("text/event-stream")
                async for sse in source.aiter_sse():
                    got.append((sse.id, sse.event, sse.json()["step"]))
                    if len(got) == 1:
                        assert sse.retry == 1000
                    if len(got) == 4:
                        break  # the client drops the connection mid-run
            last = got[-1][0]
            async with aconnect_sse(http, "GET", server.url(run), headers={"Last-Event-ID": last}) as source:
                async for sse in source.aiter_sse():
                    got.append((sse.id, sse.event, sse.json()["step"]))
            await task
            assert got == [(str(i + 1), k, i) for i, k in enumerate(KINDS)]
            listing = (await http.get(server.url(run).rsplit("/", 2)[0])).json()
            assert listing["runs"] == [{"id": run.run_id, "events": len(KINDS), "done": True}]
            assert (await http.get(server.url("nope"))).status_code == 404
    finally:
        await server.stop()
