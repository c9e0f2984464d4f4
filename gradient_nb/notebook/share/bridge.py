"""The mesh half of the bridge: the owner serves its notebook's Yjs document to joiners over mesh RPC.

Wire (two methods, like ``agents/mcp_mesh.py``: a stream one way, unary calls the other):

- ``nbshare.open`` (streaming, joiner → owner). Request ``{"cap": signed capability, "sv": the joiner's
  state vector, "session": id}``. The owner admits the capability (``capability.admit``), registers the
  session, then yields ``{"hello", "mode", "sv": the owner's state vector, "name"}``, the owner's diff
  against the joiner's state vector in chunks ``{"u": bytes, "more": bool}``, ``{"synced": true}``, the
  awareness states it knows ``{"aw": bytes}``, and from then on every update and awareness change of the
  document (from its Jupyter room or from other joiners), with ``{"ka": true}`` every ``KEEPALIVE_S`` on
  a quiet document so the stream's per-item deadline never fires.
- ``nbshare.push`` (unary, joiner → owner). ``{"session", "u", "more"}`` carries the joiner's updates
  (chunked), ``{"session", "aw"}`` its room's awareness. A session belongs to the peer that opened it
  (keyed by the link-authenticated peer id). **A read-only session's updates are refused here**, counted
  in ``Share.refused_updates``, and never applied: the owner's document cannot be changed through a
  read-only capability whatever the joiner's software does. Awareness (presence) is accepted from both.

Sync is the Yjs protocol's, by state vector, on every (re)connection: the joiner sends its state vector
and receives what it lacks; it answers the owner's state vector with what the owner lacks. Queues between
the two are only a fast path: a session whose queue overflows (a slow link) is ended and the joiner
reconnects and resyncs, so nothing is lost and nothing is applied twice (a Yjs update applied twice is a
no-op). Edits made on both sides while the link is down merge on reconnect.

Bounds: every piece is at most ``CHUNK_BYTES``, a reassembled update at most ``MAX_UPDATE_BYTES``, an
awareness update at most ``yproto.MAX_AWARENESS_BYTES``; the methods have their own rate and size limit
(``LIMIT``); sessions per peer are capped. Updates are parsed only by pycrdt's Yjs decoder (a malformed
one is a ``ValueError`` reply); awareness states only by ``json.loads``. Nothing is unpickled or evaluated.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pycrdt import merge_updates

from ...mesh.errors import MeshError, RemoteError
from ...mesh.frames import Message
from ...mesh.rpc import CallContext, Limit
from ...mesh.tasks import cancel_and_wait
from .capability import Capability, CapabilityRefused, Mode, ShareError, admit, decode_code, issue
from .room import ROOM, RoomClient
from .yproto import AwarenessRelay, Reassembler, TaggedDoc, check_state_vector, chunks

log = logging.getLogger(__name__)

OPEN, PUSH = "nbshare.open", "nbshare.push"
LIMIT = Limit(rate=200.0, burst=2000.0, max_bytes=1 << 20)
KEEPALIVE_S = 5.0
STREAM_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 20.0
CHUNK_BYTES = 256 << 10
MAX_UPDATE_BYTES = 64 << 20
QUEUE_ITEMS = 4096
MAX_SESSIONS_PER_PEER = 8
MAX_BACKOFF_S = 5.0
MESH = "mesh"  # the origin of updates a joiner received from the owner
_SESSION_ID = re.compile(r"[0-9a-f]{8,64}")
# Refusals that retrying cannot fix: the joiner stops and reports them.
FINAL_CODES = frozenset({"CapabilityRefused", "ShareClosed", "PermissionError"})


class ShareClosed(ShareError):
    """The owner no longer shares this notebook."""


@dataclass
class _Session:
    id: str
    peer: str
    cap: Capability
    mode: Mode
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_ITEMS))
    inbox: Reassembler = field(default_factory=lambda: Reassembler(MAX_UPDATE_BYTES))
    ended: str = ""  # why the owner ends this session (lagging, revoked)

    def send(self, item: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # The joiner resyncs by state vector when it reconnects: ending the session loses nothing.
            self.ended = "the joiner fell too far behind; reconnect to resync"

    def end(self, why: str) -> None:
        self.ended = why
        while not self.queue.empty():  # make room for the item that wakes the stream up
            self.queue.get_nowait()
        self.queue.put_nowait({"ka": True})


class Share:
    """A notebook of this peer's Jupyter server offered to the mesh. Create with ``share_notebook``."""

    def __init__(self, host: ShareHost, doc_id: str, path: str, room: RoomClient, doc: TaggedDoc,
                 mode: Mode, code: str) -> None:
        self.host, self.doc_id, self.path, self.room, self.doc = host, doc_id, path, room, doc
        self.mode = mode  # the most any capability of this share grants
        self.code = code  # the capability made with the share
        self.sessions: dict[str, _Session] = {}
        self.revoked: set[str] = set()
        self.refused_updates = 0
        self.awareness = AwarenessRelay()
        self._unlisten = doc.listen(self._on_update)
        room.on_awareness = self._on_room_awareness

    def __repr__(self) -> str:
        return f"Share({self.path!r}, mode={self.mode!r}, sessions={len(self.sessions)})"

    def grant(self, *, grantee: str | None = None, mode: Mode | None = None,
              expires_in: float | None = None) -> str:
        """Another share code for this notebook: bound to ``grantee`` (a peer id) or a bearer code
        (which must expire), read-write or read-only (never more than the share itself)."""
        mode = mode or self.mode
        if self.mode == "ro" and mode == "rw":
            raise ValueError("this share is read-only: it cannot grant read-write")
        mesh = self.host.mesh
        return issue(mesh.identity, mesh=mesh.mesh_name, doc=self.doc_id, name=self.path.rsplit("/", 1)[-1],
                     mode=mode, grantee=grantee, expires_in=expires_in).code

    def revoke(self, code: str) -> None:
        """Refuse the capability of ``code`` from now on, and end the sessions opened with it."""
        nonce = decode_code(code).nonce
        self.revoked.add(nonce)
        for s in list(self.sessions.values()):
            if s.cap.nonce == nonce:
                s.end("the capability was revoked")

    def peers(self) -> list[tuple[str, Mode]]:
        """``(peer id, mode)`` of every open session."""
        return [(s.peer, s.mode) for s in self.sessions.values()]

    async def close(self) -> None:
        """Stop sharing: end every session and leave the room."""
        self.host.shares.pop(self.doc_id, None)
        for s in list(self.sessions.values()):
            s.end("the owner stopped sharing")
        self._unlisten()
        await self.room.close()

    def _on_update(self, update: bytes, origin: str) -> None:
        item_chunks = list(chunks(update, CHUNK_BYTES))
        for s in list(self.sessions.values()):
            if s.id != origin:
                for piece, more in item_chunks:
                    s.send({"u": piece, "more": more})

    def _on_room_awareness(self, update: bytes) -> None:
        news = self.awareness.news(update, ROOM)
        if news is not None:
            for s in list(self.sessions.values()):
                s.send({"aw": news})

    def _on_session_awareness(self, session: _Session, update: bytes) -> None:
        news = self.awareness.news(update, session.peer)
        if news is not None:
            self.room.send_awareness(news)
            for s in list(self.sessions.values()):
                if s is not session:
                    s.send({"aw": news})


class ShareHost:
    """This peer's shared notebooks and the two methods that serve them (one per mesh: :meth:`of`)."""

    _by_mesh: ClassVar[weakref.WeakKeyDictionary[Any, ShareHost]] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, mesh: Any) -> ShareHost:
        """The share host of ``mesh``, made (and its methods offered) on first use."""
        return cls._by_mesh.get(mesh) or cls._by_mesh.setdefault(mesh, cls(mesh))

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.shares: dict[str, Share] = {}
        mesh.services.limit("nbshare.", LIMIT)
        mesh.offer(OPEN, self._open, streaming=True)
        mesh.offer(PUSH, self._push)

    def _find(self, peer: str, session_id: Any) -> tuple[Share, _Session]:
        for share in self.shares.values():
            s = share.sessions.get(session_id) if isinstance(session_id, str) else None
            if s is not None and s.peer == peer:
                return share, s
        raise LookupError("no such share session of yours")

    async def _open(self, msg: Message, ctx: CallContext) -> AsyncIterator[Message]:
        h = msg.header
        cap = admit(h.get("cap"), host=self.mesh.id, mesh=self.mesh.mesh_name, caller=ctx.peer_id)
        share = self.shares.get(cap.doc)
        if share is None:
            raise ShareClosed("this notebook is no longer shared")
        if cap.nonce in share.revoked:
            raise CapabilityRefused("the capability was revoked")
        sv = check_state_vector(h.get("sv"))
        sid = h.get("session")
        if not isinstance(sid, str) or not _SESSION_ID.fullmatch(sid) or sid in share.sessions:
            raise ValueError("a session id is 8 to 64 hex digits, new for this share")
        if sum(1 for s in share.sessions.values() if s.peer == ctx.peer_id) >= MAX_SESSIONS_PER_PEER:
            raise OverflowError(f"at most {MAX_SESSIONS_PER_PEER} sessions per peer")
        mode: Mode = "ro" if "ro" in (cap.mode, share.mode) else "rw"
        # Registered before the diff is taken: an update made in between reaches the joiner twice at
        # worst (a no-op), never zero times.
        session = share.sessions[sid] = _Session(sid, ctx.peer_id, cap, mode)
        log.info("share %s: peer %s joined (%s)", share.path, ctx.peer_id[:8], mode)
        try:
            yield Message({"hello": True, "mode": mode, "sv": share.doc.state(), "name": cap.name})
            for piece, more in chunks(share.doc.diff(sv), CHUNK_BYTES):
                yield Message({"u": piece, "more": more})
            yield Message({"synced": True})
            if share.awareness.states:
                yield Message({"aw": share.awareness.snapshot()})
            while True:
                if session.ended:
                    raise ConnectionAbortedError(session.ended)
                if cap.expires is not None and time.time() > cap.expires:
                    raise CapabilityRefused("the capability expired")
                try:
                    item = await asyncio.wait_for(session.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    item = {"ka": True}
                if session.ended:
                    raise ConnectionAbortedError(session.ended)
                yield Message(item)
        finally:
            share.sessions.pop(sid, None)
            log.info("share %s: peer %s left", share.path, ctx.peer_id[:8])

    async def _push(self, msg: Message, ctx: CallContext) -> Message:
        h = msg.header
        share, session = self._find(ctx.peer_id, h.get("session"))
        if "aw" in h:
            share._on_session_awareness(session, h["aw"])
            return Message()
        if session.mode != "rw":
            share.refused_updates += 1
            raise PermissionError("this share is read-only for you: your edits are not applied")
        whole = session.inbox.add(h.get("u"), h.get("more"))
        if whole is not None:
            share.doc.apply(whole, session.id)
        return Message()


class SharedNotebook:
    """A notebook shared by another peer, bridged into a room of this peer's Jupyter server.
    Create with ``open_shared``."""

    def __init__(self, mesh: Any, cap: Capability, path: str, room: RoomClient, doc: TaggedDoc,
                 owner_sv: bytes) -> None:
        self.mesh, self.cap, self.path, self.room, self.doc = mesh, cap, path, room, doc
        self.mode: Mode = cap.mode
        self.awareness = AwarenessRelay()
        self.connected = asyncio.Event()  # a session with the owner is up and its first sync done
        self.sessions = 0
        self.error = ""  # why the last session ended
        self.refused = False  # the owner refused the capability: no more retries
        self._owner_sv = owner_sv
        self._pending: list[bytes] = []
        self._pending_aw: list[bytes] = []
        self._wake = asyncio.Event()
        self._in_session = False
        self._synced = False
        self._online = asyncio.Event()
        self._online.set()
        self._current: asyncio.Task | None = None
        self._unlisten = doc.listen(self._on_update)
        room.on_awareness = self._on_room_awareness
        self._task = asyncio.ensure_future(self._run())

    def __repr__(self) -> str:
        return f"SharedNotebook({self.path!r}, mode={self.mode!r}, connected={self.connected.is_set()})"

    async def suspend(self) -> None:
        """Go offline: end the session with the owner (edits on either side keep accumulating)."""
        self._online.clear()
        await cancel_and_wait(self._current)

    def resume(self) -> None:
        """Go back online: reconnect and resync by state vector."""
        self._online.set()

    async def wait_connected(self, timeout: float = 30.0) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            raise ShareError(f"not connected to the owner within {timeout:.0f} s ({self.error})") from None

    async def close(self) -> None:
        """Stop bridging (the local notebook stays, with everything it received)."""
        self._online.clear()
        self._unlisten()
        await cancel_and_wait(self._task)
        await cancel_and_wait(self._current)
        await self.room.close()

    def _on_update(self, update: bytes, origin: str) -> None:
        # Only a session in progress queues; between sessions the next resync carries the update.
        if origin == ROOM and self._in_session and self.mode == "rw":
            self._pending.append(update)
            self._wake.set()

    def _on_room_awareness(self, update: bytes) -> None:
        news = self.awareness.news(update, ROOM)
        if news is not None and self._in_session:
            self._pending_aw.append(news)
            self._wake.set()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            await self._online.wait()
            self._current = asyncio.ensure_future(self._session())
            try:
                await asyncio.wait({self._current})
            finally:
                await cancel_and_wait(self._current)
            exc = None if self._current.cancelled() else self._current.exception()
            if isinstance(exc, RemoteError) and exc.code in FINAL_CODES:
                self.error, self.refused = f"{exc.code}: {exc}", True
                log.warning("shared notebook %s: the owner refused: %s", self.path, self.error)
                return
            if exc is not None:
                self.error = f"{type(exc).__name__}: {exc}"
                log.info("shared notebook %s: session ended (%s); reconnecting", self.path, self.error)
            if self._synced:  # that session worked: the next attempt need not wait long
                self._synced, delay = False, 0.5
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)

    async def _session(self) -> None:
        sid = secrets.token_hex(8)
        stream = self.mesh.stream(self.cap.owner, OPEN,
                                  Message({"cap": self.cap.record, "sv": self.doc.state(), "session": sid}),
                                  timeout=STREAM_TIMEOUT_S)
        pusher: asyncio.Task | None = None
        try:
            hello = (await anext(stream)).header
            if not hello.get("hello") or hello.get("mode") not in ("rw", "ro"):
                raise ShareError("the owner's first message is not a hello")
            self.mode = hello["mode"]
            self._owner_sv = check_state_vector(hello.get("sv"))
            self.sessions += 1
            self._pending.clear()
            self._pending_aw.clear()
            self._in_session = True
            pusher = asyncio.ensure_future(self._push_loop(sid, self._owner_sv))
            inbox = Reassembler(MAX_UPDATE_BYTES)
            async for item in stream:
                h = item.header
                if "u" in h:
                    whole = inbox.add(h["u"], h.get("more"))
                    if whole is not None:
                        self.doc.apply(whole, MESH)
                elif "aw" in h:
                    news = self.awareness.news(h["aw"], MESH)
                    if news is not None:
                        self.room.send_awareness(news)
                elif h.get("synced"):
                    self._synced = True
                    self.connected.set()
                if pusher.done():
                    pusher.result()  # its failure ends the session
            raise ShareError("the owner ended the session")
        finally:
            self._in_session = False
            self.connected.clear()
            await cancel_and_wait(pusher)
            await stream.aclose()

    async def _push_loop(self, sid: str, owner_sv: bytes) -> None:
        if self.mode == "rw":
            # Our half of the resync: everything the owner lacks, edits made while apart included.
            await self._push_update(sid, self.doc.diff(owner_sv))
        while True:
            await self._wake.wait()
            self._wake.clear()
            updates, self._pending = self._pending, []
            aws, self._pending_aw = self._pending_aw, []
            for aw in aws:
                await self.mesh.call(self.cap.owner, PUSH, Message({"session": sid, "aw": aw}),
                                     timeout=CALL_TIMEOUT_S)
            if updates:
                # Keystrokes arrive one update each; merged, a burst costs one call.
                await self._push_update(sid, merge_updates(*updates) if len(updates) > 1 else updates[0])

    async def _push_update(self, sid: str, update: bytes) -> None:
        if update == b"\x00\x00":
            return
        for piece, more in chunks(update, CHUNK_BYTES):
            await self.mesh.call(self.cap.owner, PUSH, Message({"session": sid, "u": piece, "more": more}),
                                 timeout=CALL_TIMEOUT_S)


async def fetch_state(mesh: Any, cap: Capability, timeout: float = STREAM_TIMEOUT_S) -> tuple[bytes, dict]:
    """The owner's whole document (one update) and its hello, over a session that ends right after."""
    stream = mesh.stream(cap.owner, OPEN, Message({"cap": cap.record, "sv": b"\x00",
                                                   "session": secrets.token_hex(8)}), timeout=timeout)
    try:
        try:
            hello = (await anext(stream)).header
        except RemoteError as exc:
            if exc.code == "CapabilityRefused":
                raise CapabilityRefused(f"the owner refused: {exc}") from None
            if exc.code in FINAL_CODES:
                raise ShareError(f"the owner refused: {exc}") from None
            raise
        if not hello.get("hello"):
            raise ShareError("the owner's first message is not a hello")
        check_state_vector(hello.get("sv"))
        inbox = Reassembler(MAX_UPDATE_BYTES)
        parts = []
        async for item in stream:
            h = item.header
            if "u" in h:
                whole = inbox.add(h["u"], h.get("more"))
                if whole is not None:
                    parts.append(whole)
            elif h.get("synced"):
                return (merge_updates(*parts) if len(parts) > 1 else parts[0] if parts else b"\x00\x00"), hello
        raise ShareError("the owner ended the session before the document was sent")
    except (MeshError, TimeoutError) as exc:
        raise ShareError(f"cannot reach the owner {cap.owner[:8]}: {exc}") from None
    finally:
        await stream.aclose()
