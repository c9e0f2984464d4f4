"""A run's typed event log, and its Server-Sent Events endpoint (Gradientsys' observability stream).

Every run (a vote, a plan, a tool-using answer) appends typed events to its ``RunLog``: ``plan``,
``beacon``, ``bid``, ``select``, ``dispatch``, ``tool_call``, ``tool_result``, ``vote``, ``retry``,
``replan``, ``final`` (and ``error``). Event ids are 1, 2, 3... within the run, so they double as the
SSE ``id``: a client that lost its connection reconnects with ``Last-Event-ID: n`` and receives
exactly the events after ``n``, none twice, none lost (the log keeps a run's events until the run is
dropped; ``MAX_EVENTS`` bounds one run). The stream sends ``retry`` (the reconnection delay the SSE
spec lets a server suggest) with the first event, and ends after ``final``.

``EventServer`` serves ``GET /runs`` (the runs and their state) and ``GET /runs/{id}/events`` (the
stream) with sse-starlette on loopback by default.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

KINDS = frozenset({"plan", "beacon", "bid", "select", "dispatch", "tool_call", "tool_result", "vote", "retry",
                   "replan", "final", "error"})
MAX_EVENTS = 10_000
RETRY_MS = 1000


@dataclass
class Event:
    id: int
    kind: str
    data: dict[str, Any]
    time: float


@dataclass
class RunLog:
    """The events of one run, in order; awaitable by stream readers."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(6))
    events: list[Event] = field(default_factory=list)
    done: bool = False
    # Set (and replaced) at every event: each waiting reader holds the one current when it began to wait.
    _tick: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, kind: str, **data: Any) -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        if self.done:
            raise RuntimeError("the run has ended")
        if len(self.events) >= MAX_EVENTS:
            raise OverflowError(f"a run has at most {MAX_EVENTS} events")
        ev = Event(len(self.events) + 1, kind, data, time.time())
        self.events.append(ev)
        if kind == "final":
            self.done = True
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()
        return ev

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    async def follow(self, after: int = 0, *, idle_timeout: float = 15.0) -> AsyncIterator[Event | None]:
        """The events after id ``after``, as they come, until ``final``; None after ``idle_timeout`` of
        silence (the caller sends a keepalive comment)."""
        nxt = max(0, after)
        while True:
            while nxt < len(self.events):
                ev = self.events[nxt]
                nxt += 1
                yield ev
                if ev.kind == "final":
                    return
            if self.done:
                return
            try:
                await asyncio.wait_for(self._tick.wait(), idle_timeout)
            except TimeoutError:
                yield None


class Runs:
    """The runs this peer knows, by id (the newest ``keep``)."""

    def __init__(self, keep: int = 100) -> None:
        self.keep = keep
        self.runs: dict[str, RunLog] = {}

    def new(self) -> RunLog:
        run = RunLog()
        self.runs[run.run_id] = run
        while len(self.runs) > self.keep:
            self.runs.pop(next(iter(self.runs)))
        return run


def sse_app(runs: Runs) -> Any:
    """The Starlette app of the event stream."""
    from sse_starlette.sse import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def listing(request: Request) -> JSONResponse:
        return JSONResponse({"runs": [{"id": r.run_id, "events": len(r.events), "done": r.done}
                                      for r in runs.runs.values()]})

    async def stream(request: Request) -> Any:
        run = runs.runs.get(request.path_params["run_id"])
        if run is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        last = request.headers.get("last-event-id", "0").strip()
        after = int(last) if last.isdigit() else 0

        async def events() -> AsyncIterator[ServerSentEvent]:
            first = True
            async for ev in run.follow(after):
                if ev is None:
                    yield ServerSentEvent(comment="keepalive")
                    continue
                yield ServerSentEvent(data=json.dumps({**ev.data, "time": ev.time}), event=ev.kind, id=str(ev.id),
                                      retry=RETRY_MS if first else None)
                first = False

        return EventSourceResponse(events(), ping=None)

    return Starlette(routes=[Route("/runs", listing), Route("/runs/{run_id}/events", stream)])


def _quiet_server_class() -> Any:
    import contextlib

    import uvicorn

    class Quiet(uvicorn.Server):
        # A server inside a notebook kernel or a peer must not take over SIGINT/SIGTERM.
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    return Quiet


def _quiet_server(config: Any) -> Any:
    return _quiet_server_class()(config)


class EventServer:
    """The SSE endpoint on ``host:port`` (loopback by default): ``url(run)`` is where a run streams."""

    def __init__(self, runs: Runs, host: str = "127.0.0.1", port: int = 0) -> None:
        self.runs, self.host, self.port = runs, host, port
        self._server: Any = None
        self._task: asyncio.Task | None = None

    async def start(self) -> EventServer:
        import socket

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(sse_app(self.runs), log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=1)
        self._server = _quiet_server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        async with asyncio.timeout(10):
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                await asyncio.sleep(0.01)
        return self

    def url(self, run: RunLog | str) -> str:
        rid = run if isinstance(run, str) else run.run_id
        return f"http://{self.host}:{self.port}/runs/{rid}/events"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5)
            except TimeoutError:
                self._task.cancel()
