"""The kernel's place in the mesh: one :class:`NotebookSession` per kernel, driven by the magics.

Everything here runs as tasks on the kernel's own event loop (ipykernel keeps it running between
cells), so cells return at once and the kernel stays usable while the mesh works. Each piece of work
is a task the session owns; later steps chain onto earlier ones (``serve`` waits for ``join``), so a
notebook run top to bottom does things in order without blocking a cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..mesh.identity import Identity
from ..mesh.peer import Mesh, join
from ..mesh.rendezvous import Rendezvous

log = logging.getLogger(__name__)


class NotebookSession:
    def __init__(self) -> None:
        self.rendezvous: Rendezvous | None = None
        self.mesh: Mesh | None = None
        self.server: Any = None
        self.engine: Any = None
        self.api: Any = None
        self._join_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.last_error: BaseException | None = None
        self.last_answer: str | None = None

    # -- tasks ---------------------------------------------------------------------------------
    def spawn(self, coro: Awaitable[Any], name: str,
              on_error: Callable[[BaseException], None] | None = None) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.last_error = t.exception()
                if on_error is not None:
                    on_error(t.exception())  # type: ignore[arg-type]
                else:
                    log.error("%s failed: %s", name, t.exception())

        task.add_done_callback(done)
        return task

    # -- mesh ----------------------------------------------------------------------------------
    def start_join(self, url: str | None, **kw: Any) -> asyncio.Task:
        if self._join_task is not None and not self._join_task.done():
            raise RuntimeError("already joining a mesh")
        if self.mesh is not None:
            raise RuntimeError(f"already in mesh {self.mesh.mesh_name!r}; run %mesh leave first")
        self._join_task = self.spawn(self._join(url, **kw), "gradient-nb-join")
        return self._join_task

    async def _join(self, url: str | None, **kw: Any) -> Mesh:
        if url is None:
            # No URL: this kernel introduces a new local mesh itself.
            self.rendezvous = await Rendezvous(secret=kw.get("secret")).start()
            url = self.rendezvous.url
        kw.setdefault("identity", Identity.generate() if kw.pop("ephemeral", False) else None)
        self.mesh = await join(url, **kw)
        return self.mesh

    async def wait_mesh(self, timeout: float = 120.0) -> Mesh:
        """The joined mesh, waiting for a join in progress."""
        if self.mesh is not None:
            return self.mesh
        if self._join_task is None:
            raise RuntimeError("this kernel has not joined a mesh: run %mesh join [URL] first")
        return await asyncio.wait_for(asyncio.shield(self._join_task), timeout)

    async def leave(self) -> None:
        for t in list(self._tasks):
            if t is not asyncio.current_task():
                t.cancel()
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.stop()
            self.api = None
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.stop(handover_timeout=10)
            self.server = None
        self.engine = None
        if self.mesh is not None:
            await self.mesh.leave()
            self.mesh = None
        if self.rendezvous is not None:
            await self.rendezvous.stop()
            self.rendezvous = None
        self._join_task = None

    def snapshot(self) -> dict[str, Any]:
        if self.mesh is None:
            return {"joined": False}
        return self.mesh.snapshot()

    # -- serving -------------------------------------------------------------------------------
    async def serve(self, config: dict[str, Any]) -> Any:
        from ..serve.node import ServingPeer
        from ..serve.pipeline import MeshEngine

        mesh = await self.wait_mesh()
        if self.server is not None:
            await self.server.stop(handover_timeout=5)
        self.server = await ServingPeer(mesh, config.get("model"), dtype=config["dtype"],
                                        quantization=config.get("quantization"), layers=config.get("layers"),
                                        memory_cap_bytes=config.get("memory_cap")).start()
        self.engine = await asyncio.to_thread(MeshEngine, mesh, config.get("model"))
        if config.get("api"):
            from ..serve.api import serve_api

            self.api = await serve_api(self.engine, host=config.get("host", "127.0.0.1"),
                                       port=config.get("port", 0), api_key=config.get("api_key"))
        return self.server

    async def wait_engine(self, timeout: float = 300.0) -> Any:
        from ..serve.cluster import wait_ready

        mesh = await self.wait_mesh()
        if self.engine is None:
            from ..serve.pipeline import MeshEngine

            self.engine = await asyncio.to_thread(MeshEngine, mesh, None)
        await wait_ready(mesh, self.engine, 1, timeout)
        return self.engine


_session: NotebookSession | None = None


def current() -> NotebookSession:
    """This kernel's session (created on first use)."""
    global _session
    if _session is None:
        _session = NotebookSession()
    return _session
