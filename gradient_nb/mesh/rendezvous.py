"""The rendezvous: introduces peers of any number of named meshes, then gets out of the way.

It relays signaling between the peers of a mesh (addressed by peer id; the sender of every message is
the peer that proved its key at connect time), serves the first state sync from a verifying
:class:`~.state.Replica` per mesh (it keeps only records signed by their owners, so it relays but cannot
forge, delete or roll back anything), checks an optional join secret, and answers ``GET /health``. It
never carries model traffic, and the mesh keeps working without it once links exist.

One websocket per peer, ``/mesh/<name>``, carries msgpack messages with a type field ``t``:

- server ``challenge`` {nonce} -> peer ``hello`` {peer_id, key, name, sig, mac}; ``sig`` signs
  ``HELLO_CONTEXT | mesh | nonce`` with the peer's Ed25519 key, ``mac`` is HMAC-SHA256(secret, nonce)
  when the mesh has a secret. Server: ``welcome`` {peers} or ``error`` {code, message} and close.
- ``signal`` {to, env} from a peer is forwarded as ``signal`` {from, env}; an unknown target gets
  ``signal-error`` {to, message}. The envelope is signed end to end by the sender (see ``signaling``):
  the rendezvous cannot forge or alter it.
- ``y`` {data}: state sync messages (``state._Session``) between the peer and the mesh's replica.
- server ``joined`` / ``left`` {peer} as peers come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgpack
from aiohttp import WSMsgType, web

from .identity import peer_id_of, verify_signature
from .state import STALE_AFTER_S, Replica
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

HELLO_CONTEXT = b"gradient-nb/rendezvous-hello/v1|"
MAX_MESSAGE = 4 << 20  # signaling and the initial state sync only: no tensors ever go through here
HELLO_TIMEOUT = 10.0


def hello_signature_payload(mesh: str, nonce: bytes) -> bytes:
    return HELLO_CONTEXT + mesh.encode() + b"|" + nonce


def secret_mac(secret: str, nonce: bytes) -> bytes:
    return hmac.new(hashlib.sha256(secret.encode()).digest(), nonce, hashlib.sha256).digest()


class YChannel:
    """The state sync messages multiplexed on a rendezvous websocket, as the channel that a replica's
    sync session runs over (either side). The websocket's reader feeds ``inbox``; ``None`` there ends
    the channel."""

    def __init__(self, ws: Any, path: str) -> None:
        self._ws = ws
        self._path = path
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> YChannel:
        return self

    async def __anext__(self) -> bytes:
        item = await self.inbox.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def recv(self) -> bytes:
        return await self.__anext__()

    async def send(self, message: bytes) -> None:
        if self._ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._ws.send_bytes(msgpack.packb({"t": "y", "data": bytes(message)}))

    def close(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.inbox.put_nowait(None)


@dataclass
class _Mesh:
    name: str
    peers: dict[str, web.WebSocketResponse] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    state: Replica = field(default_factory=Replica)


class Rendezvous:
    """An introducer for named meshes. ``await start()``, then give peers :attr:`url`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, secret: str | None = None) -> None:
        self.host, self.port = host, port
        self.secret = secret if secret is not None else os.environ.get("GRADIENT_NB_SECRET") or None
        self._meshes: dict[str, _Mesh] = {}
        self._gc_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self.refused = 0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"ws://{host}:{self.port}"

    async def start(self) -> Rendezvous:
        self._gc_task = asyncio.create_task(self._forget_loop(), name="rendezvous-state-gc")
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/mesh/{name}", self._mesh_socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("rendezvous listening on %s", self.url)
        return self

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in [self._gc_task, *self._tasks]:
            await cancel_and_wait(task)
        self._gc_task = None

    async def _forget_loop(self) -> None:
        """Forget the records of owners long silent, and the meshes nobody is in any more."""
        while True:
            await asyncio.sleep(STALE_AFTER_S / 4)
            for name, mesh in list(self._meshes.items()):
                mesh.state.refresh()
                if not mesh.peers and not mesh.state.export():
                    del self._meshes[name]

    def rejected(self, mesh: str) -> dict[str, int]:
        """State records (and junk) the replica of ``mesh`` refused, by reason."""
        m = self._meshes.get(mesh)
        return dict(m.state.rejected) if m is not None else {}

    async def __aenter__(self) -> Rendezvous:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "ok": True,
            "secret_required": self.secret is not None,
            "meshes": {m.name: {"peers": len(m.peers), "state_records": len(m.state.export()),
                                "state_rejected": m.state.forged_entries}
                       for m in self._meshes.values() if m.peers},
        })

    async def _refuse(self, ws: web.WebSocketResponse, code: str, message: str) -> web.WebSocketResponse:
        self.refused += 1
        log.info("refused a peer: %s", message)
        with contextlib.suppress(Exception):
            await ws.send_bytes(msgpack.packb({"t": "error", "code": code, "message": message}))
            await ws.close()
        return ws

    async def _mesh_socket(self, request: web.Request) -> web.WebSocketResponse:
        mesh_name = request.match_info["name"]
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=15)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            return await self._session(ws, mesh_name)
        finally:
            self._sockets.discard(ws)

    async def _session(self, ws: web.WebSocketResponse, mesh_name: str) -> web.WebSocketResponse:
        if not mesh_name or len(mesh_name) > 128:
            return await self._refuse(ws, "bad-mesh", "mesh names are 1 to 128 characters")
        nonce = secrets.token_bytes(32)
        await ws.send_bytes(msgpack.packb({"t": "challenge", "nonce": nonce, "mesh": mesh_name,
                                           "secret_required": self.secret is not None}))
        try:
            msg = await ws.receive(timeout=HELLO_TIMEOUT)
            hello = msgpack.unpackb(msg.data, raw=False) if msg.type == WSMsgType.BINARY else None
        except (TimeoutError, ValueError, msgpack.UnpackException):
            hello = None
        if not isinstance(hello, dict) or hello.get("t") != "hello":
            return await self._refuse(ws, "bad-hello", "expected a hello message")
        key, sig, peer_id = hello.get("key"), hello.get("sig"), hello.get("peer_id")
        if not (isinstance(key, bytes) and isinstance(sig, bytes) and isinstance(peer_id, str)):
            return await self._refuse(ws, "bad-hello", "hello lacks key, signature or peer id")
        if peer_id_of(key) != peer_id or not verify_signature(key, hello_signature_payload(mesh_name, nonce),
                                                                sig):
            return await self._refuse(ws, "bad-signature", "the hello signature does not match the peer id")
        if self.secret is not None:
            mac = hello.get("mac")
            if not isinstance(mac, bytes) or not hmac.compare_digest(mac, secret_mac(self.secret, nonce)):
                return await self._refuse(ws, "bad-secret", f"wrong or missing join secret for mesh "
                                                            f"{mesh_name!r}")
        mesh = self._meshes.setdefault(mesh_name, _Mesh(mesh_name))
        old = mesh.peers.get(peer_id)
        # The same identity reconnecting (e.g. after a network change) replaces its old socket. The new one
        # is in place before the old one is closed, so the old handler's cleanup sees that it was replaced
        # and does not tell the others that the peer left.
        mesh.peers[peer_id] = ws
        mesh.names[peer_id] = str(hello.get("name", ""))[:64]
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        await ws.send_bytes(msgpack.packb({"t": "welcome", "peers": [p for p in mesh.peers if p != peer_id]}))
        await self._broadcast(mesh, {"t": "joined", "peer": peer_id}, exclude=peer_id)
        channel = YChannel(ws, f"{mesh_name}/{peer_id}")
        room_task = asyncio.create_task(mesh.state.sync(channel).start(), name=f"room-{peer_id[:8]}")
        try:
            await self._relay(ws, mesh, peer_id, channel)
        finally:
            channel.close()
            # The departure is recorded before anything awaits, and told to the others by a task of the
            # rendezvous: aiohttp may cancel this handler when the peer goes, and a cancelled handler must
            # still leave no stale entry behind (signals would be relayed to a dead socket).
            if mesh.peers.get(peer_id) is ws:
                del mesh.peers[peer_id]
                mesh.names.pop(peer_id, None)
                self._spawn(self._tell_left(mesh, peer_id), f"left-{peer_id[:8]}")
            await cancel_and_wait(room_task)
        return ws

    async def _relay(self, ws: web.WebSocketResponse, mesh: _Mesh, peer_id: str,
                     channel: YChannel) -> None:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break
                continue
            try:
                m = msgpack.unpackb(msg.data, raw=False)
            except (ValueError, msgpack.UnpackException):
                m = None
            if not isinstance(m, dict):
                await ws.send_bytes(msgpack.packb({"t": "error", "code": "bad-message",
                                                   "message": "not a msgpack map"}))
                continue
            kind = m.get("t")
            if kind == "y" and isinstance(m.get("data"), bytes) and m["data"]:
                try:
                    channel.inbox.put_nowait(m["data"])
                except asyncio.QueueFull:
                    log.warning("state sync from %s is too fast; dropping its connection", peer_id[:8])
                    break
            elif kind == "signal" and isinstance(m.get("to"), str) and isinstance(m.get("env"), bytes):
                target = mesh.peers.get(m["to"])
                if target is None or target.closed:
                    await ws.send_bytes(msgpack.packb({"t": "signal-error", "to": m["to"],
                                                       "message": "peer is not connected to the rendezvous"}))
                    continue
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await target.send_bytes(msgpack.packb({"t": "signal", "from": peer_id, "env": m["env"]}))
            else:
                await ws.send_bytes(msgpack.packb({"t": "error", "code": "bad-message",
                                                   "message": f"unexpected message type {kind!r}"}))

    async def _tell_left(self, mesh: _Mesh, peer_id: str) -> None:
        if peer_id not in mesh.peers:  # not back already (a "left" after its "joined" would undo it)
            await self._broadcast(mesh, {"t": "left", "peer": peer_id})

    async def _broadcast(self, mesh: _Mesh, message: dict[str, Any], exclude: str | None = None) -> None:
        data = msgpack.packb(message)
        for pid, ws in list(mesh.peers.items()):
            if pid != exclude and not ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_bytes(data)
