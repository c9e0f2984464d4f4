"""The kernel end of the "gradient_nb.mesh" comm that the JupyterLab Mesh panel opens.

The front-end opens a comm on target ``gradient_nb.mesh``. The kernel answers at once with a
snapshot of the mesh, then pushes a new one whenever it changes. Polling runs as a task on the
kernel's own event loop, so the kernel keeps executing cells; each open comm owns its tasks and
cancels them when it closes.

Messages, kernel -> front-end::

    {"type": "snapshot", "snapshot": {...}}
    {"type": "reply", "request": "join" | "leave" | "snapshot" | "share" | "open", "id": <echoed>, "ok": bool,
     "error": str, "code": str (share), "path": str (open)}

Front-end -> kernel::

    {"request": "snapshot"}
    {"request": "join", "url": "ws://...", "name": "..." | null, "mesh": ..., "secret": ..., "stun": ...,
     "turn": ..., "turn_username": ..., "turn_password": ...}   (options: strings, optional)
    {"request": "join", "local": true, "name": ...}   (a new local mesh, introduced by this kernel)
    {"request": "leave"}
    {"request": "share", "path": "dir/nb.ipynb", "mode": "rw" | "ro", "expires_in": seconds | null,
     "server_url": ..., "token": ..., "server_root": ...}   -> "code": the share code
    {"request": "open", "code": "...", "server_url": ..., "token": ..., "server_root": ...}   -> "path"

``share``/``open`` run :func:`gradient_nb.notebook.share.share_notebook` / ``open_shared`` with this kernel's
mesh (it must have joined) and the Jupyter server the front-end names: its base URL and token (the front-end
knows them), and its root directory (where its YStore, ``.jupyter_ystore.db``, lies). The Share and
SharedNotebook objects belong to the kernel's session: they live while it is in the mesh and close on leave.

Any request may carry an ``id``, echoed in its reply so the front-end can pair them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

__all__ = ["TARGET_NAME", "MeshCommTarget", "register", "unregister"]

TARGET_NAME = "gradient_nb.mesh"

SnapshotSource = Callable[[], "Mapping[str, Any] | Awaitable[Mapping[str, Any]]"]
# join_cb(url, name, **options): url None is a new local mesh; options are JOIN_OPTIONS that were given.
JoinCallback = Callable[..., Awaitable[Any]]
LeaveCallback = Callable[[], Awaitable[Any]]

_log = logging.getLogger(__name__)

# Joining waits on signaling and ICE through the rendezvous; past this the front-end gets an
# error instead of a spinner that never ends.
_DEFAULT_REQUEST_TIMEOUT = 60.0
# A snapshot is read from in-process state; one that takes longer than this is a bug upstream,
# and the poll loop must not hang on it.
_SNAPSHOT_TIMEOUT = 5.0


def _json_safe(value: Any) -> Any:
    """Turn a snapshot into plain JSON: tuples become lists, NaN/inf become None.

    The comm travels as JSON, which has no NaN, and an RTT that was never measured is
    more honestly shown as "-" than as a fake number.
    """
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item):
        try:
            return _json_safe(item())
        except (TypeError, ValueError):
            pass
    return str(value)


# Join options the panel may send (its settings), each a string or null.
JOIN_OPTIONS = ("mesh", "secret", "stun", "turn", "turn_username", "turn_password")


def _join_arguments(data: Mapping[str, Any]) -> tuple[str | None, str | None, dict[str, str]]:
    """``(url, name, options)`` of a join request; ``url`` None means a new local mesh (``"local": true``)."""
    url, name = data.get("url"), data.get("name")
    if data.get("local") is True:
        if url not in (None, ""):
            raise ValueError("a join is either local or to a rendezvous URL, not both")
        url = None
    elif not isinstance(url, str) or not url:
        raise ValueError("join needs a rendezvous URL (or local: true for a new local mesh)")
    if name is not None and not isinstance(name, str):
        raise ValueError("name must be a string")
    options: dict[str, str] = {}
    for key in JOIN_OPTIONS:
        value = data.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
        options[key] = value
    return url, name or None, options


_SESSION_MODULE = "gradient_nb.notebook.session"
NOT_JOINED = "this notebook's kernel has not joined a mesh: join it first (gradient-nb: Join a Mesh…, or %mesh join)"
# open_shared waits this long for the owner, so that its error comes back before the request times out.
_OPEN_TIMEOUT = 45.0


def _joined_session() -> Any:
    """This kernel's notebook session, which must be in a mesh."""
    module = sys.modules.get(_SESSION_MODULE)  # not loaded: the kernel never joined
    session = None if module is None else module.current()
    if session is None or session.mesh is None:
        raise RuntimeError(NOT_JOINED)
    return session


def _string(data: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None or (value == "" and not required):
        if required:
            raise ValueError(f"{key} is missing")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string")
    return value.strip()


def _server_arguments(data: Mapping[str, Any]) -> dict[str, Any]:
    """``server_url``/``token`` (and the YStore path, from ``server_root``) of the front-end's Jupyter server."""
    url = _string(data, "server_url")
    token = data.get("token")
    if token is not None and not isinstance(token, str):
        raise ValueError("token must be a string")
    args: dict[str, Any] = {"server_url": url, "token": token if url is not None else None}
    root = _string(data, "server_root")
    if root is not None:
        from .share import YSTORE_FILE

        args["ystore_db"] = os.path.join(os.path.expanduser(root), YSTORE_FILE)
    return args


async def share_request(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``share`` request: share the notebook at ``path`` with this kernel's mesh; ``{"code": ...}``."""
    path = _string(data, "path", required=True)
    mode = data.get("mode", "rw")
    if mode not in ("rw", "ro"):
        raise ValueError(f"mode is 'rw' or 'ro', not {mode!r}")
    expires_in = data.get("expires_in")
    if expires_in is not None and (isinstance(expires_in, bool) or not isinstance(expires_in, int | float)
                                   or expires_in <= 0):
        raise ValueError("expires_in must be a positive number of seconds")
    session = _joined_session()
    from .share import share_notebook

    server = _server_arguments(data)
    server.pop("ystore_db", None)  # the owner's room is read as it is: no store to write
    share = await share_notebook(session.mesh, path, mode=mode, expires_in=expires_in, **server)
    if session.mesh is None:  # left while sharing
        await share.close()
        raise RuntimeError(NOT_JOINED)
    session.shares.append(share)
    return {"code": share.code}


async def open_request(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``open`` request: open share code ``code`` in the front-end's server; ``{"path": ...}``."""
    code = _string(data, "code", required=True)
    session = _joined_session()
    from .share import open_shared

    shared = await open_shared(session.mesh, code, timeout=_OPEN_TIMEOUT, **_server_arguments(data))
    if session.mesh is None:
        await shared.close()
        raise RuntimeError(NOT_JOINED)
    session.shares.append(shared)
    return {"path": shared.path}


class _Session:
    """One open comm: its poll task, its request tasks, and the last snapshot it sent."""

    def __init__(self, target: MeshCommTarget, comm: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._comm = comm
        self._loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_sent: str | None = None
        self._closed = False

    def start(self) -> None:
        self._spawn(self._poll())

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        self._target._sessions.discard(self)

    async def _read_snapshot(self) -> dict[str, Any]:
        try:
            result = self._target._snapshot_source()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, _SNAPSHOT_TIMEOUT)
            return _json_safe(result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the panel should say what broke rather than go blank
            _log.warning("mesh snapshot failed", exc_info=True)
            return {"joined": False, "error": f"{type(exc).__name__}: {exc}"}

    async def _push(self, *, force: bool) -> None:
        snapshot = await self._read_snapshot()
        key = json.dumps(snapshot, sort_keys=True)
        if not force and key == self._last_sent:
            return
        if self._closed:
            return
        self._last_sent = key
        self._comm.send({"type": "snapshot", "snapshot": snapshot})

    async def _poll(self) -> None:
        await self._push(force=True)
        while True:
            await asyncio.sleep(self._target._poll_interval)
            await self._push(force=False)

    def on_msg(self, msg: Mapping[str, Any]) -> None:
        data = msg.get("content", {}).get("data") or {}
        if not isinstance(data, Mapping):
            return
        request = data.get("request")
        self._spawn(self._handle(request, data))

    async def _handle(self, request: Any, data: Mapping[str, Any]) -> None:
        reply: dict[str, Any] = {"type": "reply", "request": request, "ok": True, "error": ""}
        if "id" in data:
            reply["id"] = data["id"]
        try:
            if request == "snapshot":
                await self._push(force=True)
            elif request == "join":
                url, name, options = _join_arguments(data)
                if self._target._join_cb is None:
                    raise RuntimeError("this kernel does not offer join from the panel")
                # Options only when there are some: a two-argument callback keeps working.
                join = self._target._join_cb(url, name, **options) if options else self._target._join_cb(url, name)
                await asyncio.wait_for(join, self._target._request_timeout)
            elif request == "leave":
                if self._target._leave_cb is None:
                    raise RuntimeError("this kernel does not offer leave from the panel")
                await asyncio.wait_for(self._target._leave_cb(), self._target._request_timeout)
            elif request == "share":
                reply.update(await asyncio.wait_for(share_request(data), self._target._request_timeout))
            elif request == "open":
                reply.update(await asyncio.wait_for(open_request(data), self._target._request_timeout))
            else:
                raise ValueError(f"unknown request {request!r}")
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            reply.update(ok=False, error=f"{request} timed out after {self._target._request_timeout:g} s")
        except Exception as exc:
            if request in ("share", "open"):
                _log.info("mesh %s request failed", request, exc_info=True)
            reply.update(ok=False, error=str(exc) or type(exc).__name__)
        if self._closed:
            return
        self._comm.send(reply)
        if request in ("join", "leave"):
            # The panel should not wait up to a poll interval to see what it just asked for.
            await self._push(force=False)


class MeshCommTarget:
    """The registered comm target; holds the callbacks and every open session.

    Made by :func:`register`; call :meth:`close` (or :func:`unregister`) to stop it.
    """

    def __init__(
        self,
        manager: Any,
        snapshot_source: SnapshotSource,
        join_cb: JoinCallback | None,
        leave_cb: LeaveCallback | None,
        poll_interval: float,
        request_timeout: float,
    ) -> None:
        self._manager = manager
        self._snapshot_source = snapshot_source
        self._join_cb = join_cb
        self._leave_cb = leave_cb
        self._poll_interval = poll_interval
        self._request_timeout = request_timeout
        self._sessions: set[_Session] = set()

    @property
    def open_comms(self) -> int:
        return len(self._sessions)

    def _on_open(self, comm: Any, msg: Mapping[str, Any]) -> None:
        # Comm messages are handled on the kernel's main thread inside its running loop; tasks
        # made here run while the kernel is idle and between awaits of a running cell.
        loop = asyncio.get_running_loop()
        session = _Session(self, comm, loop)
        self._sessions.add(session)
        comm.on_msg(session.on_msg)
        comm.on_close(lambda _msg: session.close())
        session.start()

    def close(self) -> None:
        """Stop every open session and unregister the target."""
        for session in list(self._sessions):
            session.close()
            try:
                session._comm.close()
            except Exception:
                _log.debug("closing mesh comm failed", exc_info=True)
        try:
            self._manager.unregister_target(TARGET_NAME, self._on_open)
        except Exception:
            _log.debug("unregistering %s failed", TARGET_NAME, exc_info=True)


def _comm_manager(ipython: Any) -> Any:
    kernel = getattr(ipython, "kernel", None)
    manager = getattr(kernel, "comm_manager", None)
    if manager is not None:
        return manager
    import comm  # ipykernel installs its manager here too

    return comm.get_comm_manager()


def register(
    ipython: Any,
    snapshot_source: SnapshotSource,
    join_cb: JoinCallback | None = None,
    leave_cb: LeaveCallback | None = None,
    *,
    poll_interval: float = 1.0,
    request_timeout: float = _DEFAULT_REQUEST_TIMEOUT,
) -> MeshCommTarget:
    """Register the ``gradient_nb.mesh`` comm target on the kernel behind ``ipython``.

    ``snapshot_source()`` returns the mesh snapshot (a dict, or an awaitable of one);
    ``join_cb(url, name)`` and ``leave_cb()`` are coroutines run when the panel asks.
    Registering again replaces the previous registration.
    """
    if poll_interval <= 0:
        raise ValueError("poll_interval must be positive")
    unregister(ipython)
    manager = _comm_manager(ipython)
    target = MeshCommTarget(manager, snapshot_source, join_cb, leave_cb, poll_interval, request_timeout)
    manager.register_target(TARGET_NAME, target._on_open)
    _registered[id(ipython)] = target
    return target


def unregister(ipython: Any) -> None:
    """Close every open mesh comm of this kernel and remove the target (no-op if none)."""
    target = _registered.pop(id(ipython), None)
    if target is not None:
        target.close()


_registered: dict[int, MeshCommTarget] = {}
