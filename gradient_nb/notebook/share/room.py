"""A Python Yjs client of one document room of a Jupyter server (jupyter-server-ydoc 3).

It speaks only the server's public collaboration protocol, the one JupyterLab's front end speaks:

1. ``PUT /api/collaboration/session/<path>`` with ``{"format": "json", "type": "notebook"}`` gives the
   file id and the server's session id;
2. the websocket ``/api/collaboration/room/json:notebook:<fileId>?sessionId=<id>`` carries y-protocol
   messages: ``[0, sync message]`` (sync step 1 = a state vector, step 2 / update = a Yjs update) and
   ``[1, awareness update]``.

On every (re)connection both sides send sync step 1 and answer the other's with step 2, so whatever
either side changed while apart (the room while we reconnected, our doc while the mesh delivered
updates) is exchanged by state vector: nothing is replayed from a queue, and nothing is lost when a queue
is dropped. Updates the doc gets from anywhere but the room are sent to the room as they happen.

Why not ``pycrdt.Provider`` over a custom Channel (FACTS): it syncs the document but not awareness, and
it does not say where an update came from, which the bridge needs to send each update on to every side
but its source. The protocol is small enough to speak directly with pycrdt's own helpers.

The client reconnects on its own (backoff up to ``MAX_BACKOFF_S``); a session the server refuses
(websocket closed with 1003 / 44xx: the file is gone, the server restarted) is reported in
``last_error`` and retried with a fresh session. Every wait on the network has a timeout; the run task
belongs to the client and ``close()`` cancels it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from pycrdt import (
    YMessageType,
    YSyncMessageType,
    create_awareness_message,
    create_update_message,
    read_message,
    write_message,
)

from ...mesh.tasks import cancel_and_wait
from .capability import ShareError
from .yproto import TaggedDoc

log = logging.getLogger(__name__)

ROOM = "room"  # the origin of updates that came from the Jupyter room
HTTP_TIMEOUT_S = 15.0
SYNC_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 10.0
CLOSE_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 15.0
MAX_WS_MESSAGE = 64 << 20
AWARENESS_ROOM = "JupyterLab:globalAwareness"


@dataclass(frozen=True)
class JupyterServer:
    """A Jupyter server's base URL (``http://127.0.0.1:8888/`` or with a base path) and its token."""

    url: str
    token: str = ""

    def api(self, path: str) -> str:
        return self.url.rstrip("/") + "/" + path.lstrip("/")

    def ws(self, path: str) -> str:
        return self.api(path).replace("http://", "ws://", 1).replace("https://", "wss://", 1)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}


async def _json(resp: aiohttp.ClientResponse, what: str) -> Any:
    if resp.status >= 400:
        text = (await resp.text())[:300]
        raise ShareError(f"{what}: the Jupyter server answered {resp.status}: {text}")
    return await resp.json()


async def open_session(http: aiohttp.ClientSession, server: JupyterServer, path: str) -> tuple[str, str]:
    """``(file id, session id)`` of the collaboration session of the notebook at ``path``."""
    async with http.put(server.api(f"api/collaboration/session/{quote(path)}"), headers=server.headers,
                        json={"format": "json", "type": "notebook"},
                        timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as resp:
        body = await _json(resp, f"opening a collaboration session on {path!r}")
    file_id, session_id = body.get("fileId"), body.get("sessionId")
    if not isinstance(file_id, str) or not isinstance(session_id, str):
        raise ShareError(f"the Jupyter server's session reply lacks fileId/sessionId: {body!r}"[:300])
    return file_id, session_id


async def file_exists(http: aiohttp.ClientSession, server: JupyterServer, path: str) -> bool:
    async with http.get(server.api(f"api/contents/{quote(path)}"), params={"content": "0"},
                        headers=server.headers, timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as resp:
        if resp.status == 404:
            return False
        await _json(resp, f"looking up {path!r}")
        return True


async def delete_file(http: aiohttp.ClientSession, server: JupyterServer, path: str) -> None:
    async with http.delete(server.api(f"api/contents/{quote(path)}"), headers=server.headers,
                           timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as resp:
        if resp.status >= 400 and resp.status != 404:
            await _json(resp, f"deleting {path!r}")


async def write_notebook(http: aiohttp.ClientSession, server: JupyterServer, path: str,
                         content: dict[str, Any]) -> None:
    """Save ``content`` (an nbformat dict) at ``path`` through the contents API, creating folders."""
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        folder = "/".join(parts[:i])
        if not await file_exists(http, server, folder):
            async with http.put(server.api(f"api/contents/{quote(folder)}"), headers=server.headers,
                                json={"type": "directory"},
                                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as resp:
                await _json(resp, f"creating folder {folder!r}")
    async with http.put(server.api(f"api/contents/{quote(path)}"), headers=server.headers,
                        json={"type": "notebook", "format": "json", "content": content},
                        timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as resp:
        await _json(resp, f"saving {path!r}")


class RoomClient:
    """Keeps ``doc`` in sync with the document room of ``path`` on ``server``, reconnecting as needed.

    ``on_awareness(update)`` receives the room's awareness updates; :meth:`send_awareness` sends one.
    """

    def __init__(self, server: JupyterServer, path: str, doc: TaggedDoc, *,
                 on_awareness: Any = None) -> None:
        self.server, self.path, self.doc = server, path, doc
        self.on_awareness = on_awareness
        self.file_id: str | None = None
        self.synced = asyncio.Event()  # the current connection has received the room's state
        self.connections = 0
        self.last_error = ""
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._out: asyncio.Queue[bytes] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._was_synced = False
        self._unlisten = doc.listen(self._on_update)

    async def start(self, timeout: float = SYNC_TIMEOUT_S) -> None:
        """Connect and wait for the room's state; ShareError (with the server's reason) if that fails."""
        self._http = aiohttp.ClientSession()
        try:
            self.file_id, session = await open_session(self._http, self.server, self.path)
            ws = await self._connect(session)
        except BaseException:
            await self._http.close()
            raise
        self._task = asyncio.ensure_future(self._run(ws))
        try:
            await asyncio.wait_for(self.synced.wait(), timeout)
        except TimeoutError:
            await self.close()
            raise ShareError(f"no sync from the room of {self.path!r} within {timeout:.0f} s "
                             f"({self.last_error or 'no error reported'})") from None

    async def close(self) -> None:
        self._unlisten()
        await cancel_and_wait(self._task)
        if self._http is not None:
            await self._http.close()

    @property
    def room_id(self) -> str:
        return f"json:notebook:{self.file_id}"

    def send_awareness(self, update: bytes) -> None:
        """Send an awareness update to the room (dropped while disconnected: presence is refreshed
        every few seconds by its owner anyway)."""
        if self._ws is not None and self.synced.is_set():
            self._out.put_nowait(create_awareness_message(update))

    def _on_update(self, update: bytes, origin: str) -> None:
        # While disconnected the update is not queued: sync step 2 on reconnect carries it.
        if origin != ROOM and self._ws is not None:
            self._out.put_nowait(create_update_message(update))

    async def _connect(self, session: str) -> aiohttp.ClientWebSocketResponse:
        assert self._http is not None
        url = self.server.ws(f"api/collaboration/room/{self.room_id}") + f"?sessionId={quote(session)}"
        try:
            # compress=0: aiohttp shields compressed sends from cancellation, which made closing a
            # connection to a slow server hang; notebook updates are small and the link is local.
            return await asyncio.wait_for(
                self._http.ws_connect(url, headers=self.server.headers, max_msg_size=MAX_WS_MESSAGE,
                                      heartbeat=20.0, timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
                                      autoping=True, compress=0),
                HTTP_TIMEOUT_S)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ShareError(f"cannot open the room of {self.path!r} on {self.server.url}: {exc}") from None

    async def _run(self, ws: aiohttp.ClientWebSocketResponse | None) -> None:
        delay = 0.5
        while True:
            if ws is not None:
                try:
                    await self._serve(ws)
                except (aiohttp.ClientError, OSError, TimeoutError, ShareError, ValueError) as exc:
                    self.last_error = str(exc)
                    log.info("room %s: %s; reconnecting", self.path, exc)
                if self._was_synced:
                    delay = 0.5
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)
            ws = None
            try:
                assert self._http is not None
                self.file_id, session = await open_session(self._http, self.server, self.path)
                ws = await self._connect(session)
            except (aiohttp.ClientError, OSError, TimeoutError, ShareError) as exc:
                self.last_error = str(exc)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.connections += 1
        self._was_synced = False
        self._out = asyncio.Queue()
        # Our half of the handshake: our state vector; the room answers with what we lack.
        self._out.put_nowait(bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP1]) + write_message(self.doc.state()))
        self._ws = ws
        writer = asyncio.ensure_future(self._write(ws))
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                        break
                    continue
                try:
                    self._handle(bytes(msg.data))
                except (IndexError, AssertionError, RuntimeError) as exc:  # pycrdt's decoder on a truncated message
                    raise ValueError(f"malformed message from the room: {exc!r}") from None
            raise ShareError(f"the room closed the connection ({ws.close_code}: {ws.exception() or ''})")
        finally:
            self._ws = None
            self.synced.clear()
            await _stop(writer, ws)

    def _handle(self, data: bytes) -> None:
        if len(data) < 2:
            return
        kind = data[0]
        if kind == YMessageType.SYNC:
            step, body = data[1], data[2:]
            if step == YSyncMessageType.SYNC_STEP1:
                # The room's state vector: answer with everything it lacks (what changed while apart).
                diff = self.doc.diff(read_message(body))
                self._out.put_nowait(bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP2]) + write_message(diff))
            elif step in (YSyncMessageType.SYNC_STEP2, YSyncMessageType.SYNC_UPDATE):
                self.doc.apply(read_message(body), ROOM)
                if step == YSyncMessageType.SYNC_STEP2:
                    self._was_synced = True
                    self.synced.set()
        elif kind == YMessageType.AWARENESS and self.on_awareness is not None:
            try:
                self.on_awareness(read_message(data[1:]))
            except ValueError as exc:
                log.info("room %s: bad awareness update: %s", self.path, exc)

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        send: asyncio.Future | None = None
        try:
            while True:
                data = await self._out.get()
                # A send that cannot complete (the server stopped reading) ends the connection: the
                # reader then sees it closed, and the reconnection resyncs by state vector.
                send = asyncio.ensure_future(ws.send_bytes(data))
                await asyncio.wait({send}, timeout=SEND_TIMEOUT_S)
                if not send.done() or send.exception() is not None:
                    self.last_error = (f"sending to the room failed: {send.exception()}" if send.done()
                                       else f"a send to the room took over {SEND_TIMEOUT_S:.0f} s")
                    _abort(ws)
                    return
        finally:
            if send is not None and not send.done():
                # Cancelled mid-frame: aiohttp finishes the frame, or fails it when _stop drops the
                # connection; either way its outcome is retrieved here, not logged as lost.
                send.add_done_callback(lambda t: t.cancelled() or t.exception())


def _abort(ws: aiohttp.ClientWebSocketResponse) -> None:
    conn = ws._response.connection  # no public way to abort a websocket's transport
    if conn is not None and conn.transport is not None:
        conn.transport.abort()


async def _stop(writer: asyncio.Task, ws: aiohttp.ClientWebSocketResponse) -> None:
    """End a connection's writer and close its websocket, in bounded time.

    aiohttp finishes a frame it has started even when the sending task is cancelled, so a send blocked
    on a server that has stopped reading (seen in tests: seconds, on a busy 2-core machine)
    ignores ``cancel()``; ``wait_for`` around it would then hang too. So: cancel, wait a bounded time,
    close the websocket (bounded), and as a last resort drop the connection under the send, which fails it.
    """
    writer.cancel()
    await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT_S)
    closing = asyncio.ensure_future(ws.close())
    await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_S)
    if not (writer.done() and closing.done()):
        _abort(ws)
    await cancel_and_wait(closing)
    await cancel_and_wait(writer)
