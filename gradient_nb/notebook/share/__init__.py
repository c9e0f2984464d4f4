"""Shared notebooks across NATed machines: one notebook, edited live from two (or more) JupyterLabs.

Each user runs their own Jupyter server behind their own NAT; jupyter-collaboration keeps each server's
notebook in a Yjs document ("room"). A *bridge* joins the room on each side as one more Yjs client and
relays Yjs updates and awareness (presence, cursors) between the rooms over the mesh::

    browser A ⇄ room A (server A) ⇄ bridge A ═══ mesh link (WebRTC / TCP+TLS) ═══ bridge B ⇄ room B ⇄ browser B
                                    owner: share_notebook()                 joiner: open_shared(code)

**Where the bridge runs: in the kernel, not in a Jupyter server extension.** The kernel is where this
project's mesh peer lives (``%mesh join``, the Mesh panel's autojoin); a server extension would need a
second peer, identity and join configuration inside the server process. The bridge only uses the server's
public collaboration protocol (REST session + websocket room, the same one JupyterLab's front end
speaks, see ``room.py``), so it does not depend on jupyter-server-ydoc's internal classes, which change
between major versions. The price: a share lives as long as the kernel that made it (the capability is
signed by that peer's key); a joiner whose kernel restarts calls ``open_shared`` again and resyncs by
state vector with what its server kept.

**Exactly one seed.** jupyter-server-ydoc seeds a room from its file with Yjs client id 0, so that the
same file always gives the same history (FACTS: two independent seeds of one notebook merge into every
cell twice). Two *different* seeds under client 0 are worse than duplicates: Yjs identifies an item by
(client, clock), so the second seed's items would be taken for the first's and the documents corrupted.
Hence the joiner's room must start from the owner's history, not from a file of its own: ``open_shared``
fetches the owner's document (sync step 1/2 against an empty state vector), writes it as the new
notebook file *and* into the joiner server's YStore (pycrdt-store ``SQLiteYStore``, the store the
server loads a room from before it would seed from the file), then opens the room and checks that the
room's client-0 clock equals the owner's (:func:`open_shared` refuses with the reason otherwise, before
anything is merged). Joiners never seed; every later sync is state-vector against state-vector.

**Capabilities.** The owner signs a capability (``capability.py``) per share code: read-write or
read-only, bound to one peer or a bearer token that expires; it can be revoked. Read-only is enforced
by the owner's bridge, which refuses the updates (``bridge.py``); a read-only joiner's lab is not
locked, so what its users type stays in their copy and never reaches the owner.

**Presence.** The bridge relays the awareness of the document's own room (who is in the notebook, their
name, colour and cursor: what JupyterLab draws in the cells), not the lab-wide
``JupyterLab:globalAwareness`` room, which would tell the other side about every user of the lab and
every document they have open.

Public surface: :func:`share_notebook` → :class:`Share` (``.code``, ``.grant``, ``.revoke``, ``.close``),
:func:`open_shared` → :class:`SharedNotebook` (``.path``, ``.suspend``, ``.resume``, ``.close``),
:class:`ShareError` (and :class:`CapabilityRefused`).
"""

from __future__ import annotations

import os
import posixpath
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
from jupyter_ydoc import YNotebook
from pycrdt.store import SQLiteYStore

from .bridge import MESH, Share, ShareClosed, SharedNotebook, ShareHost, fetch_state
from .capability import CapabilityRefused, Mode, ShareError, decode_code, issue
from .room import JupyterServer, RoomClient, delete_file, file_exists, open_session, write_notebook
from .yproto import TaggedDoc, state_vector

__all__ = ["CapabilityRefused", "Share", "ShareClosed", "ShareError", "SharedNotebook", "open_shared", "share_notebook"]

DEFAULT_BEARER_EXPIRY_S = 24 * 3600.0
YSTORE_FILE = ".jupyter_ystore.db"  # jupyter-server-ydoc's default SQLiteYStore.db_path


async def share_notebook(mesh: Any, path: str, *, server_url: str | None = None, token: str | None = None,
                         mode: Mode = "rw",
                         grantee: str | None = None, expires_in: float | None = None) -> Share:
    """Offer the notebook at ``path`` (relative to the Jupyter server's root) to the mesh.

    ``server_url``/``token``: this peer's Jupyter server (default: the one Jupyter server running on
    this machine, as ``jupyter server list`` shows it). The returned :class:`Share`'s ``code`` is a
    capability for ``grantee`` (a peer id), or, without one, a bearer code that expires after
    ``expires_in`` seconds (24 h by default). ``share.grant(...)`` makes more codes.
    """
    if mode not in ("rw", "ro"):
        raise ValueError(f"mode is 'rw' or 'ro', not {mode!r}")
    if grantee is None and expires_in is None:
        expires_in = DEFAULT_BEARER_EXPIRY_S
    host = ShareHost.of(mesh)
    doc = TaggedDoc()
    room = RoomClient(_server(server_url, token), path, doc)
    await room.start()  # the owner's bridge starts empty and takes the room's document as it is
    doc_id = secrets.token_hex(16)
    cap = issue(mesh.identity, mesh=mesh.mesh_name, doc=doc_id, name=posixpath.basename(path), mode=mode,
                grantee=grantee, expires_in=expires_in)
    share = Share(host, doc_id, path, room, doc, mode, cap.code)
    host.shares[doc_id] = share
    return share


async def open_shared(mesh: Any, code: str, *, server_url: str | None = None, token: str | None = None,
                      path: str | None = None,
                      ystore_db: str | os.PathLike[str] | None = None,
                      timeout: float = 60.0) -> SharedNotebook:
    """Open the notebook of share code ``code`` in this peer's Jupyter server and keep it in sync.

    ``path`` (default ``shared/<name>``) is where the notebook appears in the server; a new file is
    made there from the owner's document, or an existing one from an earlier ``open_shared`` of the same
    share is resynced. ``ystore_db`` is the server's YStore database (default: ``.jupyter_ystore.db``
    in the root of the running server found at ``server_url``). ``server_url``/``token`` as for
    :func:`share_notebook`.
    Raises :class:`ShareError` (:class:`CapabilityRefused` when the owner refuses the code).
    """
    cap = decode_code(code)
    if cap.mesh != mesh.mesh_name:
        raise ShareError(f"this share is for mesh {cap.mesh!r}; this peer is in {mesh.mesh_name!r}")
    if cap.owner == mesh.id:
        raise ShareError("this peer is the notebook's owner: open the notebook itself")
    server = _server(server_url, token)
    path = path or f"shared/{_safe_name(cap.name)}"
    full, hello = await fetch_state(mesh, cap, timeout=timeout)
    async with aiohttp.ClientSession() as http:
        created = not await file_exists(http, server, path)
        if created:
            db = _ystore_path(server, ystore_db)
            owner_doc = TaggedDoc()
            owner_doc.apply(full, MESH)
            await write_notebook(http, server, path, YNotebook(owner_doc.doc).get())
            file_id, _ = await open_session(http, server, path)
            await _preload_ystore(db, file_id, full)
        doc = TaggedDoc()
        room = RoomClient(server, path, doc)
        await room.start(timeout)
        theirs, ours = state_vector(hello["sv"]).get(0), state_vector(doc.state()).get(0)
        if ours != theirs:
            await room.close()
            if created:  # leave nothing behind: the file made here is not the shared notebook
                await delete_file(http, server, path)
            raise ShareError(
                f"the room of {path!r} was seeded from its file (Yjs client 0 at clock {ours}), not from "
                f"the owner's document (clock {theirs}): merging would corrupt it. Either {path!r} existed "
                f"with other content (pass another path), or the server's YStore is not the SQLite "
                f"database given as ystore_db")
    doc.apply(full, MESH)  # nothing new when the store was preloaded; sent to the room otherwise
    shared = SharedNotebook(mesh, cap, path, room, doc, hello["sv"])
    try:
        await shared.wait_connected(timeout)
    except BaseException:
        await shared.close()
        raise
    return shared


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", posixpath.basename(name)).strip(". ") or "shared"
    return name if name.endswith(".ipynb") else name + ".ipynb"


def _running(url: str | None) -> dict[str, Any]:
    """The ``jupyter server list`` entry of the server at ``url``, or of the only one running."""
    from jupyter_server.serverapp import list_running_servers

    servers = list(list_running_servers())
    if url is None:
        if len(servers) != 1:
            raise ShareError(f"{len(servers)} Jupyter servers run on this machine: pass server_url and token")
        return servers[0]
    want = urlparse(url)
    for info in servers:
        got = urlparse(info.get("url", ""))
        if got.port == want.port and got.hostname in (want.hostname, "localhost", "127.0.0.1"):
            return info
    raise ShareError(f"no running Jupyter server found at {url}")


def _server(url: str | None, token: str | None) -> JupyterServer:
    if url is not None and token is not None:
        return JupyterServer(url, token)
    info = _running(url)
    return JupyterServer(url or info["url"], info.get("token", "") if token is None else token)


def _ystore_path(server: JupyterServer, ystore_db: str | os.PathLike[str] | None) -> Path:
    if ystore_db is not None:
        return Path(ystore_db)
    try:
        root = _running(server.url).get("root_dir", ".")
    except ShareError as exc:
        raise ShareError(f"{exc}: pass ystore_db=<its {YSTORE_FILE}>") from None
    return Path(root) / YSTORE_FILE


async def _preload_ystore(db: Path, file_id: str, update: bytes) -> None:
    """Write the owner's document as the room's stored history, so the joiner's server loads it
    instead of seeding the room from the file (jupyter-server-ydoc names a room's store ``.notebook:<id>.y``)."""
    doc = TaggedDoc()
    doc.apply(update, MESH)
    store = SQLiteYStore(path=f".notebook:{file_id}.y")
    store.db_path = str(db)
    async with store:
        await store.encode_state_as_update(doc.doc)
