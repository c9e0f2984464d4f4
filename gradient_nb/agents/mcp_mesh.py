"""MCP across the mesh: an MCP server hosted by one peer, used by another with the official SDK on both ends.

MCP's transports (stdio, streamable HTTP) all reduce to one interface: a pair of anyio streams of
``SessionMessage`` (JSON-RPC messages) handed to ``Server.run`` on one side and to ``Client`` on the
other. This module is a third transport of that kind whose wire is a mesh link, so a tool on a
volunteer's machine behind a NAT is reachable wherever the mesh reaches:

- ``mcp.open`` (streaming RPC, one per session) carries the server → client messages. Its first item
  says the session is open; idle sessions get a keepalive item every ``KEEPALIVE_S`` so the RPC's
  per-item deadline never fires on a quiet session. Leaving the stream ends the session.
- ``mcp.send`` (unary RPC) carries one client → server message (and the transport headers the SDK's
  client attaches to it).

On the hosting peer, ``ToolHost`` runs one session per stream: an ``MCPServer`` over a pair of memory
streams (exactly as its stdio transport does), or, for a user's existing stdio or streamable-HTTP
server, the SDK's own client transport to it, the messages piped through unchanged. A session belongs
to the peer that opened it (keyed by its peer id): no other peer can send into it. Sessions per peer
are capped; everything that arrives is parsed by the SDK's JSON-RPC message model, nothing executed.

On the calling side, ``mesh_transport(mesh, peer, server)`` is the SDK ``Transport``
(``Client(mesh_transport(...))``), and ``Toolbox`` names the servers an agent may call (in-process,
stdio, HTTP or across the mesh) and turns MCP's ``isError`` results into ``ToolCallError`` with a
kind (``UnknownTool``, ``InvalidArguments``, or the kind the tool raised, e.g. ``ZeroDivision``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared._context_streams import create_context_streams
from mcp.shared.message import ClientMessageMetadata, SessionMessage

from ..mesh.errors import MeshError
from ..mesh.frames import Message
from ..mesh.rpc import CallContext

log = logging.getLogger(__name__)

OPEN, SEND = "mcp.open", "mcp.send"
KEEPALIVE_S = 5.0
STREAM_TIMEOUT_S = 30.0
MAX_SESSIONS_PER_PEER = 16
MAX_MESSAGE_CHARS = 4 << 20

ServerTarget = MCPServer | StdioServerParameters | str  # in-process, stdio command, streamable-HTTP URL


class ToolCallError(Exception):
    """A tool call that failed, with a kind: ``UnknownTool``, ``InvalidArguments``, ``Unavailable``
    (the server or its peer is gone), ``ToolFailed``, or the kind the tool raised (``ZeroDivision``...)."""

    def __init__(self, kind: str, tool: str, message: str) -> None:
        super().__init__(f"{tool}: {kind}: {message}")
        self.kind, self.tool, self.message = kind, tool, message


def _to_wire(sm: SessionMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"json": sm.message.model_dump_json(by_alias=True, exclude_unset=True)}
    headers = getattr(sm.metadata, "headers", None)
    if isinstance(sm.metadata, ClientMessageMetadata) and headers:
        out["headers"] = dict(headers)
    return out


def _from_wire(header: dict[str, Any]) -> SessionMessage:
    raw = header.get("json")
    if not isinstance(raw, str) or len(raw) > MAX_MESSAGE_CHARS:
        raise ValueError("an MCP message is a JSON string")
    message = types.jsonrpc_message_adapter.validate_json(raw, by_name=False)
    headers = header.get("headers")
    if isinstance(headers, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        return SessionMessage(message, ClientMessageMetadata(headers=headers))
    return SessionMessage(message)


@asynccontextmanager
async def _server_streams(target: ServerTarget) -> AsyncIterator[tuple[Any, Any]]:
    """(messages from the server, stream to send it messages) for any kind of target."""
    if isinstance(target, MCPServer):
        low = target._lowlevel_server
        to_server, server_reads = create_context_streams[SessionMessage | Exception](0)
        server_writes, from_server = create_context_streams[SessionMessage](0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(low.run, server_reads, server_writes, low.create_initialization_options())
            try:
                yield from_server, to_server
            finally:
                tg.cancel_scope.cancel()
    else:
        transport = stdio_client(target) if isinstance(target, StdioServerParameters) else \
            streamable_http_client(target)
        async with transport as (read, write):
            yield read, write


class _HostSession:
    def __init__(self, target: ServerTarget) -> None:
        self.target = target
        self.out: asyncio.Queue[str | None] = asyncio.Queue(maxsize=64)
        self.ready = asyncio.Event()
        self.write: Any = None
        self.error: BaseException | None = None
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async with _server_streams(self.target) as (read, write):
                self.write = write
                self.ready.set()
                async for item in read:
                    if isinstance(item, Exception):
                        log.info("MCP server sent an unreadable message: %s", item)
                        continue
                    await self.out.put(json.dumps(_to_wire(item)))
        except Exception as exc:  # the session's server failed: the stream reports it
            self.error = exc
        finally:
            self.ready.set()
            with contextlib.suppress(asyncio.QueueFull):
                self.out.put_nowait(None)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


class ToolHost:
    """Offers this peer's MCP servers to the mesh (``mcp.open`` / ``mcp.send``)."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.servers: dict[str, ServerTarget] = {}
        self.sessions: dict[tuple[str, str], _HostSession] = {}
        mesh.offer(OPEN, self._open, streaming=True)
        mesh.offer(SEND, self._send)

    def add(self, name: str, target: ServerTarget) -> None:
        """Host ``target`` under ``name``: an ``MCPServer``, ``StdioServerParameters`` or an HTTP URL."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"bad server name {name!r}")
        self.servers[name] = target

    async def close(self) -> None:
        for s in list(self.sessions.values()):
            await s.close()
        self.sessions.clear()

    async def _open(self, msg: Message, ctx: CallContext) -> AsyncIterator[Message]:
        name, sid = msg.header.get("server"), msg.header.get("session")
        if name not in self.servers:
            raise LookupError(f"this peer hosts no MCP server {name!r}")
        if not isinstance(sid, str) or not 8 <= len(sid) <= 64:
            raise ValueError("a session id is a string of 8 to 64 characters")
        key = (ctx.peer_id, sid)
        if key in self.sessions:
            raise ValueError("this session is already open")
        if sum(1 for p, _ in self.sessions if p == ctx.peer_id) >= MAX_SESSIONS_PER_PEER:
            raise OverflowError(f"at most {MAX_SESSIONS_PER_PEER} MCP sessions per peer")
        session = self.sessions[key] = _HostSession(self.servers[name])
        try:
            await session.ready.wait()
            if session.error is not None:
                raise RuntimeError(f"the MCP server {name!r} did not start: {session.error}")
            yield Message({"open": True})
            while True:
                try:
                    item = await asyncio.wait_for(session.out.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield Message({"keepalive": True})
                    continue
                if item is None:
                    if session.error is not None:
                        raise RuntimeError(f"the MCP server {name!r} failed: {session.error}")
                    return
                yield Message(json.loads(item))
        finally:
            self.sessions.pop(key, None)
            await session.close()

    async def _send(self, msg: Message, ctx: CallContext) -> Message:
        session = self.sessions.get((ctx.peer_id, msg.header.get("session")))
        if session is None or session.write is None:
            raise LookupError("no such MCP session of yours")
        await session.write.send(_from_wire(msg.header))
        return Message()


@asynccontextmanager
async def mesh_transport(mesh: Any, peer_id: str, server: str, *,
                         timeout: float = STREAM_TIMEOUT_S) -> AsyncIterator[tuple[Any, Any]]:
    """The MCP SDK transport to the server ``server`` hosted by ``peer_id``: ``Client(mesh_transport(...))``."""
    sid = secrets.token_hex(8)
    stream = mesh.stream(peer_id, OPEN, Message({"server": server, "session": sid}), timeout=timeout)
    try:
        first = await anext(stream)
        if not first.header.get("open"):
            raise MeshError("the MCP host did not open the session")
        read_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
        write_stream, write_reader = create_context_streams[SessionMessage](0)

        async def reader() -> None:
            async with read_writer:
                with contextlib.suppress(MeshError, TimeoutError):  # the host went away: the session ends
                    async for item in stream:
                        if "json" in item.header:
                            try:
                                sm = _from_wire(item.header)
                            except ValueError as exc:
                                await read_writer.send(exc)
                                continue
                            await read_writer.send(sm)

        async def writer() -> None:
            async with write_reader:
                async for sm in write_reader:
                    await mesh.call(peer_id, SEND, Message({"session": sid, **_to_wire(sm)}), timeout=timeout)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            tg.start_soon(writer)
            try:
                yield read_stream, write_stream
            finally:
                tg.cancel_scope.cancel()
    finally:
        await stream.aclose()


@dataclass
class MeshServer:
    """An MCP server hosted by another peer of the mesh."""

    peer_id: str
    name: str


class Toolbox:
    """The MCP servers an agent may call, by name: in-process, stdio, streamable HTTP or across the mesh."""

    def __init__(self, mesh: Any = None) -> None:
        self.mesh = mesh
        self.servers: dict[str, ServerTarget | MeshServer] = {}

    def add(self, name: str, target: ServerTarget | MeshServer) -> None:
        self.servers[name] = target

    def client(self, name: str) -> Client:
        target = self.servers[name]
        if isinstance(target, MeshServer):
            if self.mesh is None:
                raise ValueError("a mesh server needs a Toolbox with a mesh")
            return Client(mesh_transport(self.mesh, target.peer_id, target.name))
        return Client(target)

    async def list_tools(self) -> list[dict[str, Any]]:
        """Every tool of every server: ``{"server", "name", "description", "input_schema"}``."""
        out = []
        for name in self.servers:
            async with self.client(name) as c:
                for t in (await c.list_tools()).tools:
                    out.append({"server": name, "name": t.name, "description": t.description or "",
                                "input_schema": t.input_schema})
        return out

    async def call(self, server: str, tool: str, arguments: dict[str, Any]) -> Any:
        """Call ``tool``; its structured result (or text), or ``ToolCallError`` with a kind."""
        try:
            async with self.client(server) as c:
                result = await c.call_tool(tool, arguments)
        except ToolCallError:
            raise
        except (MeshError, TimeoutError, OSError) as exc:
            raise ToolCallError("Unavailable", tool, str(exc)) from None
        except Exception as exc:  # the SDK's own errors (connection closed, protocol): the server is gone
            if isinstance(exc, ExceptionGroup):
                raise ToolCallError("Unavailable", tool, "; ".join(map(str, exc.exceptions))) from None
            raise ToolCallError("Unavailable", tool, f"{type(exc).__name__}: {exc}") from None
        return result_value(tool, result)


_TOOL_KIND = re.compile(r"^Error executing tool [^:]+: ([A-Z][A-Za-z]+): (.*)$", re.S)


def result_value(tool: str, result: types.CallToolResult) -> Any:
    """The value of a tool result, or ``ToolCallError`` for an ``isError`` result."""
    text = "".join(getattr(c, "text", "") for c in result.content)
    if result.is_error:
        if text.startswith("Unknown tool"):
            raise ToolCallError("UnknownTool", tool, text)
        if "validation error" in text:
            raise ToolCallError("InvalidArguments", tool, text)
        m = _TOOL_KIND.match(text)
        if m:
            raise ToolCallError(m.group(1), tool, m.group(2))
        raise ToolCallError("ToolFailed", tool, text)
    if result.structured_content is not None:
        sc = result.structured_content
        return sc["result"] if isinstance(sc, dict) and set(sc) == {"result"} else sc
    return text
