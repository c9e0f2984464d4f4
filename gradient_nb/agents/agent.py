"""An agent: a mesh peer with skills, MCP tools it hosts, a model endpoint and a capacity.

The agent publishes its signed capability record every heartbeat (``Ledger.publish``): its skills,
the tools of the MCP servers it hosts with their JSON schemas, its model, its capacity (concurrent
tasks), its current load and the latency it observed on its last tasks. It hosts its MCP servers for
the mesh (``ToolHost``), answers beacons with a bid (``agent.bid``) and runs tasks (``agent.task``)
with at most ``capacity`` running at once: a task over capacity is refused with ``Overloaded``
rather than queued, so the requester's planner (which counts capacity too) can place it elsewhere.

What a task does is the agent's ``worker``: an async function ``(task: dict) -> dict`` (the LLM
worker in ``gradient_nb.agents.worker`` asks the model, with tools if the task says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import shlex
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mcp import StdioServerParameters
from mcp.server.mcpserver import MCPServer

from ..mesh.frames import Message
from ..mesh.rpc import CallContext
from .beacon import Bidder, embed
from .ledger import Ledger, Skill
from .mcp_mesh import ServerTarget, Toolbox, ToolHost

log = logging.getLogger(__name__)

Worker = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
BID, TASK = "agent.bid", "agent.task"


class Overloaded(Exception):
    """The agent is running ``capacity`` tasks already."""


def load_tools(spec: str) -> MCPServer:
    """An ``MCPServer`` from ``spec``: ``builtin`` (this package's tools) or a module path whose ``server``
    attribute is an MCPServer (or whose ``tools()`` returns one)."""
    if spec == "builtin":
        from .tools import builtin_tools

        return builtin_tools()
    module = importlib.import_module(spec)
    srv = getattr(module, "server", None)
    if srv is None and callable(getattr(module, "tools", None)):
        srv = module.tools()
    if not isinstance(srv, MCPServer):
        raise ValueError(f"module {spec!r} has no 'server' MCPServer and no tools() returning one")
    return srv


def server_target(text: str) -> ServerTarget:
    """A user's existing MCP server from a command line (stdio) or an http(s) URL (streamable HTTP)."""
    if text.startswith(("http://", "https://")):
        return text
    argv = shlex.split(text)
    if not argv:
        raise ValueError("an MCP server is a command line or an http(s) URL")
    return StdioServerParameters(command=argv[0], args=argv[1:])


class Agent:
    """Run with ``await agent.start()`` on a joined mesh; ``await agent.stop()`` withdraws it."""

    def __init__(self, mesh: Any, *, name: str, role: str = "worker", skills: list[Skill] | None = None,
                 servers: dict[str, ServerTarget] | None = None, model: str = "", capacity: int = 1,
                 worker: Worker | None = None, heartbeat: float = 1.0, bidder: Any = None) -> None:
        self.mesh = mesh
        self.name, self.role, self.model, self.capacity = name, role, model, capacity
        self.skills = list(skills or [])
        self.ledger = Ledger(mesh.state, mesh.identity)
        self.host = ToolHost(mesh)
        self.local = Toolbox()
        for n, target in (servers or {}).items():
            self.host.add(n, target)
            self.local.add(n, target)
        self.worker = worker
        self.bidder = bidder if bidder is not None else Bidder()
        self.heartbeat = heartbeat
        self.tools: list[dict[str, Any]] = []
        self.load = 0
        self.peak_load = 0
        self.latency_ms: float | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.tools = await self.local.list_tools()
        if not self.skills:  # an agent without declared skills offers what its tools describe
            self.skills = [Skill(t["name"], t["description"]) for t in self.tools]
        # Load the embedder and embed the skills now (off the loop): a first bid must meet a beacon's deadline.
        await asyncio.to_thread(lambda: [embed(f"{s.name}: {s.description}") for s in self.skills])
        self.mesh.offer(BID, self._on_bid)
        self.mesh.offer(TASK, self._on_task)
        self.publish()
        self._task = asyncio.ensure_future(self._heartbeat())

    def publish(self) -> None:
        self.ledger.publish(name=self.name, role=self.role, skills=self.skills, tools=self.tools, model=self.model,
                            capacity=self.capacity, load=self.load, latency_ms=self.latency_ms)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            self.publish()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.mesh.withdraw(BID)
        self.mesh.withdraw(TASK)
        with contextlib.suppress(Exception):
            self.ledger.withdraw()
        await self.host.close()

    async def _on_bid(self, msg: Message, ctx: CallContext) -> Message:
        if self.bidder is None:
            raise LookupError("this agent does not bid")
        # The embedder is slow to load and encode: off the event loop (the cache keeps the vectors).
        await asyncio.to_thread(lambda: [embed(f"{s.name}: {s.description}") for s in self.skills])
        return Message(self.bidder.bid(self, msg.header))

    async def _on_task(self, msg: Message, ctx: CallContext) -> Message:
        if self.worker is None:
            raise LookupError("this agent runs no tasks")
        if self.load >= self.capacity:
            raise Overloaded(f"{self.name} is running {self.load} of {self.capacity} tasks")
        self.load += 1
        self.peak_load = max(self.peak_load, self.load)
        t0 = time.perf_counter()
        try:
            out = await self.worker(dict(msg.header))
        finally:
            self.load -= 1
            ms = (time.perf_counter() - t0) * 1000
            self.latency_ms = ms if self.latency_ms is None else 0.8 * self.latency_ms + 0.2 * ms
        return Message(out)


async def run_volunteer(args: Any, stop: asyncio.Event, emit: Callable[[dict[str, Any]], None], *,
                        ice: Any = None) -> int:
    """``gradient-nb agent``: join the mesh, host the tools, publish the capability record until ``stop``.
    ``ice`` (an ``IceConfig``: the ``--stun``/``--turn`` options) lets an agent behind a NAT link out."""
    from ..mesh.identity import Identity
    from ..mesh.peer import join

    servers: dict[str, ServerTarget] = {"tools": load_tools(args.tools)}
    for item in args.mcp:
        name, sep, target = item.partition("=")
        if not sep:
            raise SystemExit("error: --mcp takes NAME=COMMAND or NAME=URL")
        servers[name] = server_target(target)
    skills = [Skill(*s.split("=", 1)) if "=" in s else Skill(s, s) for s in args.skill]
    identity = Identity.generate() if args.ephemeral else Identity.load_or_create()
    mesh = await join(args.rendezvous, mesh=args.mesh, name=args.name, secret=args.secret, identity=identity,
                      ice=ice, heartbeat=args.heartbeat, peer_timeout=args.peer_timeout)
    agent = Agent(mesh, name=args.name or mesh.name, skills=skills, servers=servers, capacity=args.capacity,
                  heartbeat=args.heartbeat, model=args.llm_model if args.llm else "")
    from .worker import LlmWorker, ToolWorker

    if args.llm:  # the agent answers with a model at an OpenAI-compatible URL, calling its own tools
        agent.worker = LlmWorker(args.llm, model=args.llm_model, api_key=args.llm_key, toolbox=agent.local).run
    else:  # no model: tasks are routed to the tools (arithmetic, conversions)
        agent.worker = ToolWorker(agent.local).run
    try:
        await agent.start()
        emit({"event": "agent", "peer_id": mesh.id, "name": agent.name,
              "tools": [f"{t['server']}.{t['name']}" for t in agent.tools]})
        await stop.wait()
    finally:
        await agent.stop()
        await mesh.leave()
    return 0
