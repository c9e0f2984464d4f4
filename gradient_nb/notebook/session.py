"""The kernel's place in the mesh: one :class:`NotebookSession` per kernel, driven by the magics.

Everything here runs as tasks on the kernel's own event loop (ipykernel keeps it running between
cells), so cells return at once and the kernel stays usable while the mesh works. Each piece of work
is a task the session owns; later steps chain onto earlier ones (``serve`` waits for ``join``), so a
notebook run top to bottom does things in order without blocking a cell.

Background tasks never ``display()`` anything: a cell shows its widgets while it runs, and the tasks
only change those widgets' state. Widget updates travel on comms, which every front-end routes by comm
id, whereas a plain output from a task that outlives its cell has no cell left to land in.

From a cell, the awaitable API waits for that work without blocking the kernel::

    nb = current()
    mesh = await nb.wait_mesh()          # the join started by %mesh join
    await nb.ready(serving_peers=3)      # the model is served and a route covers every layer
    text = await nb.ask("What is the capital of France?")   # interrupting the cell cancels only this
    text = await nb.answer()             # the answer of the last %%parallax ask (waits if it streams)

When the kernel exits (shutdown, restart), the session leaves the mesh cleanly from an ``atexit`` hook
(see :meth:`NotebookSession._at_exit`), so the other peers see it go at once instead of timing it out.

The session is a small state machine, and every failure leaves it in one of its states:

- *not joined* → ``join`` → *joined* (a failed join: *not joined* again, the local rendezvous stopped);
- *joined* → ``serve`` → *serving*. A serve config is checked (the model resolves, the layers fit it)
  before anything that runs is touched, so a wrong cell leaves the previous serve running. A start that
  fails after that leaves *joined*, never a half-made server: :attr:`server` is only ever assigned a
  server whose ``start()`` returned;
- *serving* → ``serve`` again → *serving* with the new config (the old server hands over first);
- a config with ``adapter: PATH`` serves a LoRA adapter (peft's folder, as ``%%echo train`` saves it)
  merged into this kernel's layers. It is checked first like the rest (the folder, the safetensors, and
  every matrix's shape against the model's weights), and requests from this kernel then route only
  through peers that serve the same adapter (``rl.sampler.AdapterGuard``): this kernel, and peers
  started with ``gradient-nb peer --serve MODEL --adapter PATH`` (``%mesh spawn N --serve MODEL
  --adapter PATH``), so no answer mixes adapted and base layers; without one, they avoid peers serving
  an adapter. Verification is off for them (the verifier recomputes with the base weights);
- any → ``leave`` → *not joined*, with every task, local peer and monitor of the session stopped.

Expected failures (not joined yet, no route, a config the model refuses) are :class:`SessionError` exceptions:
the magics show their one-line message, and the traceback goes to the log only.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..mesh.identity import Identity
from ..mesh.peer import Mesh, join
from ..mesh.processes import release_child, spawn_owned, stop_processes
from ..mesh.rendezvous import Rendezvous
from .route_status import RouteStatus, explain

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 120.0
# Loading a shard of the bundled model takes ~0.1 s from the safetensors cache, but ~20 s the first
# time on a fresh machine (the GGUF is dequantised once), and longer on a busy one.
SERVE_TIMEOUT = 300.0
PEER_START_TIMEOUT = 120.0
# At kernel shutdown jupyter_client waits `shutdown_wait_time` (5 s by default, the same in Jupyter
# Server) before it SIGKILLs the kernel; SIGTERM comes at half of it, which the exit hook holds off.
# The leave must fit in what is left after ipykernel's own shutdown, so the serving handover is short:
# withdrawing from serving is published at once, and requests on other entries fail over anyway.
EXIT_LEAVE_TIMEOUT = 3.5
EXIT_HANDOVER_TIMEOUT = 1.0
LEAVE_HANDOVER_TIMEOUT = 10.0
# An ask without a route waits this long for one before it fails with the reason (unless something is
# on its way: a peer loading its layers). Two coordinator re-plans fit in it, e.g. after a peer left.
NO_ROUTE_GRACE_S = 3.0
ROUTE_POLL_S = 0.25


class SessionError(RuntimeError):
    """A failure the user can act on (not joined, no route, a config the model refuses): its message is
    the whole story, shown as one line; the traceback belongs in the log."""


class NotJoined(SessionError):
    """This kernel has not joined a mesh."""


class NoRouteNow(SessionError):
    """No chain of peers covers the model, and waiting alone would not give one."""


class BadServeConfig(SessionError, ValueError):
    """A ``%%parallax serve`` config the model cannot take (e.g. layers beyond its last)."""


NOT_JOINED = "this kernel is not in a mesh: run %mesh join first"


class LocalPeer:
    """A headless ``gradient-nb peer`` process this kernel started on this machine."""

    def __init__(self, proc: subprocess.Popen, name: str, log_path: str) -> None:
        self.proc = proc
        self.name = name
        self.log_path = log_path  # its stderr: a pipe nobody reads would fill up and stall it
        self.peer_id: str | None = None
        self.joined = asyncio.get_running_loop().create_future()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def _read_joined(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        except TimeoutError:
            self.joined.set_exception(TimeoutError(f"{self.name} did not join within {timeout:.0f} s"))
            return
        if not line:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, 5)
            self.joined.set_exception(RuntimeError(f"{self.name} exited (code {self.proc.poll()}): "
                                                 f"{self.log_tail()}"))
            return
        self.peer_id = json.loads(line).get("peer_id")
        self.joined.set_result(self.peer_id)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""


class NotebookSession:
    """This kernel's mesh, serving and prompts; get it with :func:`current`."""

    def __init__(self) -> None:
        self.rendezvous: Rendezvous | None = None
        self.mesh: Mesh | None = None
        self.server: Any = None
        self.engine: Any = None
        self.api: Any = None
        self.local_peers: list[LocalPeer] = []
        # Notebooks shared or opened through the Mesh panel (share.Share / share.SharedNotebook): they live
        # while the kernel is in the mesh and close on leave (and so at kernel exit).
        self.shares: list[Any] = []
        self.last_error: BaseException | None = None
        self.last_answer: str | None = None
        self.answer_tokens = 0  # tokens of the answer being generated (or last generated)
        self._join_task: asyncio.Task | None = None
        self._serve_task: asyncio.Task | None = None
        self._ask_task: asyncio.Task | None = None
        self._leave_task: asyncio.Task | None = None
        self._ask_tasks: set[asyncio.Task] = set()  # every ask still generating (the last is _ask_task)
        # The kernel's event loop, where the mesh lives: the exit hook runs the leave on it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exiting = False
        # The widgets the last `%%parallax serve` / `%mesh watch` showed (to reuse or inspect them).
        self.serving_monitor: Any = None
        self.mesh_monitor: Any = None
        self.monitors: list[Any] = []  # every monitor shown, refreshed a last time by the leave
        self._seen_names: dict[str, str] = {}
        self._answered_at: float | None = None  # wall time the last answer ended (see metrics())
        self._tasks: set[asyncio.Task] = set()
        self._engine_lock: asyncio.Lock | None = None
        self._engine_adapter: str | None = None  # the adapter id the engine routes for (None: the base)
        # Registered after ipykernel's own atexit handlers (the extension loads after the kernel starts),
        # so it runs before them (atexit is last in, first out): iopub and the sockets are still open.
        atexit.register(self._at_exit)
        _quiet_logs()

    # -- tasks ---------------------------------------------------------------------------------
    def spawn(self, coro: Awaitable[Any], name: str,
              on_error: Callable[[BaseException], None] | None = None) -> asyncio.Task:
        """Run ``coro`` in the background, owned by this session (``leave`` cancels it).

        The task gets an empty context: ipykernel keeps the parent message in a context variable, and a
        task that kept the context of the cell that started it would address its comm messages to that
        finished cell. Without one, they go to the request being handled now, as in ipykernel 6, so a
        client that follows only the running cell (nbclient) still sees the widgets change.
        """
        task = asyncio.get_running_loop().create_task(_as_coro(coro), name=name, context=contextvars.Context())
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.last_error = t.exception()
                if on_error is not None:
                    on_error(t.exception())  # type: ignore[arg-type]
                else:
                    log.error("%s failed: %s", name, t.exception())

        when_done(task, done)
        return task

    @property
    def busy(self) -> list[str]:
        """Names of the background tasks running now."""
        return sorted(t.get_name() for t in self._tasks if not t.done())

    # -- mesh ----------------------------------------------------------------------------------
    def start_join(self, url: str | None, **kw: Any) -> asyncio.Task:
        """Start joining the mesh at ``url`` (``None``: start a local mesh in this kernel) in the background."""
        if self._join_task is not None and not self._join_task.done():
            raise SessionError("already joining a mesh")
        if self.mesh is not None:
            raise SessionError(f"already in mesh {self.mesh.mesh_name!r}; run %mesh leave first")
        self._loop = asyncio.get_running_loop()
        # Whoever waits for the join reports its failure (the magic's status line, the panel's reply).
        self._join_task = self.spawn(self._join(url, **kw), "gradient-nb-join", on_error=lambda _exc: None)
        return self._join_task

    async def _join(self, url: str | None, **kw: Any) -> Mesh:
        cert = None
        if kw.pop("ephemeral", False):
            kw["identity"] = Identity.generate()
        elif kw.get("identity") is None:
            # Each kernel is a peer of its own (two notebooks of one user must not share a peer id): a
            # per-kernel key that the user's persistent key certifies, as the panel's joins use.
            from .autojoin import kernel_key

            kw["identity"], cert = await asyncio.to_thread(kernel_key)
        host = kw.pop("host", None) or "127.0.0.1"
        if url is None:
            # No URL: this kernel introduces a new local mesh itself.
            self.rendezvous = await Rendezvous(host, secret=kw.get("secret")).start()
            url = self.rendezvous.url
        try:
            self.mesh = await asyncio.wait_for(join(url, **kw), JOIN_TIMEOUT)
            if cert is not None:
                self.mesh.publish(user_cert=cert)
        except BaseException:
            if self.rendezvous is not None:
                await self.rendezvous.stop()
                self.rendezvous = None
            raise
        return self.mesh

    async def wait_mesh(self, timeout: float = JOIN_TIMEOUT) -> Mesh:
        """The joined mesh, waiting for a join in progress."""
        if self.mesh is not None:
            return self.mesh
        if self._join_task is None:
            raise NotJoined(NOT_JOINED)
        # Shielded: a cell that stops waiting (interrupted) must not cancel the join itself.
        return await asyncio.wait_for(asyncio.shield(self._join_task), timeout)

    async def wait_peers(self, count: int, timeout: float = PEER_START_TIMEOUT) -> Mesh:
        """Wait until the mesh lists at least ``count`` live peers (this kernel included)."""
        mesh = await self.wait_mesh()
        deadline = time.monotonic() + timeout
        while len(mesh.peers()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(mesh.peers())} of {count} peers after {timeout:.0f} s")
            await asyncio.sleep(0.2)
        return mesh

    def spawn_local_peers(self, count: int, *, serve: str | None = None,
                          layers: list[tuple[int, int]] | None = None, name: str = "volunteer",
                          extra: list[str] | None = None) -> list[LocalPeer]:
        """Start ``count`` headless peers on this machine that join this kernel's mesh.

        They are separate processes (exactly what a volunteer runs: ``gradient-nb peer``), stopped by
        :meth:`leave`, at kernel exit, or by the kernel's death.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        if layers is not None and len(layers) != count:
            raise ValueError("give one layer range per peer")
        if self.mesh is None:
            raise NotJoined("join a mesh first (the join is still running, or was never started)")
        taken = {p.name for p in self.local_peers}
        started: list[LocalPeer] = []
        i = 0
        for k in range(count):
            i += 1
            while f"{name}-{i}" in taken:
                i += 1
            cmd = [sys.executable, "-m", "gradient_nb.cli", "peer", "--rendezvous", self.mesh.url,
                   "--mesh", self.mesh.mesh_name, "--name", f"{name}-{i}", "--ephemeral",
                   # The kernel's liveness settings: a peer that beats slower than the kernel expects
                   # would be dropped as dead between its heartbeats.
                   "--heartbeat", str(self.mesh.heartbeat_interval), "--peer-timeout", str(self.mesh.state.peer_timeout)]
            if self.mesh.secret:
                cmd += ["--secret", self.mesh.secret]
            if serve:
                cmd += ["--serve", serve]
                if layers:
                    cmd += ["--layers", f"{layers[k][0]}:{layers[k][1]}"]
            cmd += extra or []
            fd, log_path = tempfile.mkstemp(prefix=f"gradient-nb-{name}-{i}-", suffix=".log")
            try:
                # Owned: it ends with the kernel, however the kernel ends (see mesh/processes.py).
                proc = spawn_owned(cmd, stderr=fd)
            finally:
                os.close(fd)
            peer = LocalPeer(proc, f"{name}-{i}", log_path)
            self.local_peers.append(peer)
            started.append(peer)
            self.spawn(peer._read_joined(PEER_START_TIMEOUT), f"gradient-nb-peer-{peer.name}")
        return started

    async def stop_local_peers(self, wait: bool = True) -> None:
        """Stop the peers :meth:`spawn_local_peers` started; ``wait=False`` only asks them (SIGTERM)."""
        peers, self.local_peers = self.local_peers, []
        if peers:
            if wait:
                await asyncio.to_thread(stop_processes, [p.proc for p in peers])
            else:
                # Each one leaves the mesh by itself on SIGTERM (and hands its layers over); the kernel
                # need not outlive that, and at exit it cannot wait in a thread anyway.
                self._kill_local_peers(peers)
            for p in peers:
                with contextlib.suppress(Exception):
                    p.proc.stdout.close()  # type: ignore[union-attr]
                with contextlib.suppress(OSError):
                    os.unlink(p.log_path)

    def _kill_local_peers(self, peers: list[LocalPeer] | None = None) -> None:
        for p in self.local_peers if peers is None else peers:
            # EOF on its parent-watch first: it then leaves at once, without waiting to hand its layers
            # over to siblings that are stopping too.
            release_child(p.proc)
            if p.alive():
                with contextlib.suppress(Exception):
                    p.proc.terminate()

    def _at_exit(self) -> None:
        """The kernel is exiting (shutdown or restart): leave the mesh cleanly, then stop the local peers.

        Runs from ``atexit``: IPython has no shutdown event, and ipykernel (6 and 7) handles a
        shutdown_request by stopping the kernel's event loop and letting the process exit. The loop is
        stopped then, not closed, and every link, socket and task of the mesh belongs to it, so the leave
        runs on that same loop again, bounded. What it cannot use: worker threads (``to_thread``), since
        the interpreter has shut the executors down before ``atexit`` handlers run.
        """
        loop = self._loop
        try:
            if (loop is None or loop.is_closed() or loop.is_running()
                    or (self.mesh is None and self.server is None and self.rendezvous is None)):
                return
            self._exiting = True
            # jupyter_client sends SIGTERM half way through its wait, which would end the process in the
            # middle of the leave; the leave is bounded, and SIGKILL still follows if it were not.
            held = None
            with contextlib.suppress(ValueError):  # not the main thread: nothing to hold off
                held = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                loop.run_until_complete(asyncio.wait_for(self.leave(), EXIT_LEAVE_TIMEOUT))
            finally:
                if held is not None:
                    signal.signal(signal.SIGTERM, held)
        except BaseException as exc:  # at exit: report it, and still stop the local peers below
            log.error("leaving the mesh at kernel exit failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._kill_local_peers()

    def start_leave(self, on_error: Callable[[BaseException], None] | None = None) -> asyncio.Task:
        """:meth:`leave` in the background; :meth:`wait_left` waits for it."""
        if self._leave_task is None or self._leave_task.done():
            self._leave_task = self.spawn(self.leave(), "gradient-nb-leave", on_error=on_error)
        return self._leave_task

    async def wait_left(self, timeout: float = 60.0) -> None:
        """Wait until a leave started by ``%mesh leave`` is done."""
        if self._leave_task is not None:
            await asyncio.wait_for(asyncio.shield(self._leave_task), timeout)

    async def leave(self) -> None:
        """Stop serving, stop the local peers, leave the mesh and stop the local rendezvous."""
        local_ids = {p.peer_id for p in self.local_peers}
        if self._exiting:
            # First, so that they leave at the same time as this kernel rather than after it.
            await self.stop_local_peers(wait=False)
        me = asyncio.current_task()
        for t in list(self._tasks):
            if t is not me:
                t.cancel()
        if self.api is not None:
            with contextlib.suppress(Exception):
                # At exit, clients of the API lose it with the process anyway: the little time left
                # goes to what the other peers see (the withdrawal from serving and from the registry).
                await self.api.stop(timeout=0.5 if self._exiting else 5.0)
            self.api = None
        if self.server is not None:
            # Hand over only to peers that stay: the local ones are about to stop with us.
            from ..serve.coordinator import serving_peers

            ours = {self.server.mesh.id, *local_ids}
            stays = set(serving_peers(self.server.mesh, self.server.model_id)) - ours
            handover = EXIT_HANDOVER_TIMEOUT if self._exiting else LEAVE_HANDOVER_TIMEOUT
            with contextlib.suppress(Exception):
                await self.server.stop(handover_timeout=handover if stays else 0)
            self.server = None
        if self.engine is not None:
            with contextlib.suppress(Exception):
                await self.engine.aclose()
        self.engine = None
        await self.stop_local_peers()
        shares, self.shares = self.shares, []
        for share in shares:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(share.close(), 0.5 if self._exiting else 5.0)
        if self.mesh is not None:
            await self.mesh.leave()
            self.mesh = None
        if self.rendezvous is not None:
            await self.rendezvous.stop()
            self.rendezvous = None
        self._join_task = self._serve_task = self._ask_task = None
        self._show_left()

    def _show_left(self) -> None:
        # The monitors' refresh tasks were cancelled with the others: show the end state once more, so
        # that nothing keeps saying "3 peers" or "ready" after the leave.
        for monitor in (*self.monitors, self.serving_monitor, self.mesh_monitor):
            if monitor is not None:
                with contextlib.suppress(Exception):  # a widget the front-end closed
                    monitor.stop()
                    monitor.refresh()

    def snapshot(self) -> dict[str, Any]:
        """The mesh as plain data (``Mesh.snapshot()``), or ``{"joined": False}``.

        Each peer also gets ``memory_cap_bytes`` (what it offers to serve, if it set a cap) and
        ``offered_memory_bytes`` (its free memory within that cap: what the coordinator counts)."""
        if self.mesh is None:
            return {"joined": False}
        snap = self.mesh.snapshot()
        records = self.mesh.state.peers()
        for p in snap.get("peers", []):
            serving = (records.get(p["id"]) or {}).get("serving")
            cap = serving.get("memory_cap_bytes") if isinstance(serving, dict) else None
            free = int(p.get("free_memory_bytes") or 0)
            p["memory_cap_bytes"] = cap
            p["offered_memory_bytes"] = min(free, int(cap)) if cap else free
        if self.rendezvous is not None:
            snap["local_rendezvous"] = True
        return snap

    async def metrics(self, kind: str = "peers", timeout: float = 10.0) -> Any:
        """``Mesh.metrics(kind)``, current: first waits until every live peer has published a heartbeat
        after the last answer finished, and this kernel has recorded it (counts such as
        ``served_tokens`` travel with heartbeats, so a table read at once would miss the answer just
        served). Gives up waiting after ``timeout`` seconds and returns what it has."""
        mesh = self.mesh
        if mesh is None:
            raise NotJoined(NOT_JOINED)
        since = self._answered_at
        deadline = time.monotonic() + timeout
        if since is not None:
            while time.monotonic() < deadline:
                if all(float(r.get("ts") or 0) > since for r in mesh.state.peers().values()):
                    break
                await asyncio.sleep(0.1)
            seen = time.time()
            while time.monotonic() < deadline:
                df = mesh.metrics(kind)
                if not df.is_empty() and df["time"].max() >= seen:
                    break
                await asyncio.sleep(0.1)
        return mesh.metrics(kind)

    # -- serving -------------------------------------------------------------------------------
    def start_serve(self, config: dict[str, Any],
                    on_error: Callable[[BaseException], None] | None = None) -> asyncio.Task:
        """Serve this kernel's share of a model in the background (waits for the join first)."""
        if self._serve_task is not None and not self._serve_task.done():
            raise SessionError("already starting to serve; wait for it (or run %mesh leave)")
        if self.mesh is None and self._join_task is None:
            raise NotJoined(NOT_JOINED)
        self.check_serve_config(config, quick=True)
        self._serve_task = self.spawn(self.serve(config), "parallax-serve", on_error=on_error)
        return self._serve_task

    def check_serve_config(self, config: dict[str, Any], *, quick: bool = False) -> None:
        """Raise :class:`BadServeConfig` if the model cannot take ``config``. ``quick``: only what is known
        without loading anything (the model of the running serve), for an answer in the cell itself."""
        if config.get("adapter") is not None:
            _check_adapter(config, quick)
        layers = config.get("layers")
        if layers is None:
            return
        info = None
        model = config.get("model")
        for known in (self.server, self.engine):
            if known is None:
                continue
            if (model or _default_model_name()) in (str(known.path), known.path.name):
                info = known.info
                break
        if info is None and not quick:
            from ..models import model_info, resolve_model

            try:
                info = model_info(resolve_model(model) if model is not None else resolve_model())
            except (FileNotFoundError, OSError) as exc:
                raise BadServeConfig(str(exc)) from None
        if info is not None and not 0 <= layers[0] < layers[1] <= info.num_layers:
            raise BadServeConfig(f"layers {layers[0]}:{layers[1]} do not fit {info.name}, which has "
                                 f"{info.num_layers} layers (0:{info.num_layers})")

    async def serve(self, config: dict[str, Any]) -> Any:
        """Serve ``config`` from this kernel (see the state machine in the module docstring)."""
        mesh = await self.wait_mesh()
        # Off the event loop: the first import of the serving stack, and resolving a model (a GGUF is
        # de-quantised once, ~20 s), would otherwise stall the kernel and hold the cell's reply back.
        await asyncio.to_thread(_import_serving)
        await asyncio.to_thread(self.check_serve_config, config)
        from ..serve.node import ServingPeer
        from ..verify import attach_commitments

        server = await asyncio.to_thread(
            lambda: ServingPeer(mesh, config.get("model"), dtype=config.get("dtype", "float32"),
                                quantization=config.get("quantization"), layers=config.get("layers"),
                                memory_cap_bytes=config.get("memory_cap")))
        attach_commitments(server)
        adapter = config.get("adapter")
        service = None
        if adapter is not None:
            service = await asyncio.to_thread(_adapter_service, server, adapter)
        # The config is good: only now is what runs touched.
        old, self.server = self.server, None
        if old is not None:
            await old.stop(handover_timeout=5)
        if self.api is not None:
            api, self.api = self.api, None
            await api.stop()
        if mesh.extra_record.get("echo") is not None:
            mesh.publish(echo=None)  # the previous serve's adapter is not served any more
        try:
            if service is not None:
                service.start(sync=False)  # merged into the layers the server loads; no trainer may sync it
            await server.start()
        except BaseException:
            if service is not None:
                mesh.publish(echo=None)
            await _discard(server)
            raise
        self.server = server
        engine = await self._get_engine(config.get("model"), adapter=_adapter_id(adapter))
        if config.get("api"):
            from ..serve.api import serve_api

            self.api = await serve_api(engine, host=config.get("host", "127.0.0.1"),
                                       port=config.get("port", 0), api_key=config.get("api_key"))
        return self.server

    async def _get_engine(self, model: str | None, adapter: str | bool | None = False) -> Any:
        """The engine of the served model; ``adapter`` (an adapter id, or None for the base weights) makes
        a new one if the current one routes for another (False: whatever the current one routes for)."""
        mesh = await self.wait_mesh()
        await asyncio.to_thread(_import_serving)
        from ..serve.pipeline import MeshEngine

        if self._engine_lock is None:
            self._engine_lock = asyncio.Lock()
        async with self._engine_lock:
            want = self.server.model_id if self.server is not None else None
            switch = adapter is not False and adapter != self._engine_adapter
            if self.engine is None or self.engine.mesh is not mesh or (want and self.engine.model_name != want) \
                    or switch:
                from ..verify import attach_verification

                if self.engine is not None and (self.engine.mesh is not mesh or switch):
                    with contextlib.suppress(Exception):
                        await self.engine.aclose()  # its mesh is gone; a model switch lets old requests end
                self.engine = await asyncio.to_thread(MeshEngine, mesh, model)
                self._engine_adapter = None if adapter is False else adapter
                from ..rl.sampler import AdapterGuard

                # Only through peers serving this adapter (None: through none serving an adapter).
                self.engine.observers.append(AdapterGuard(mesh, self._engine_adapter))
                if self._engine_adapter is None:  # the verifier recomputes with the base weights
                    attach_verification(self.engine)
        return self.engine

    def _names(self) -> dict[str, str]:
        """Peer id -> name of every peer this kernel has seen (those that left included)."""
        if self.mesh is not None:
            with contextlib.suppress(Exception):
                df = self.mesh.metrics("peers")
                if not df.is_empty():
                    self._seen_names.update(dict(zip(df["peer"].to_list(), df["name"].to_list(), strict=True)))
            self._seen_names.update({p.id: p.name for p in self.mesh.peers()})
        return self._seen_names

    def _departed(self) -> dict[str, tuple[int, int]]:
        """Peers this kernel saw serving layers that are no longer live: id -> the layers they last held."""
        if self.mesh is None:
            return {}
        live = {p.id for p in self.mesh.peers()}
        out: dict[str, tuple[int, int]] = {}
        with contextlib.suppress(Exception):
            df = self.mesh.metrics("peers")
            if not df.is_empty():
                for pid, s, e in df.drop_nulls("layer_start").select("peer", "layer_start", "layer_end").rows():
                    if pid not in live:
                        out[pid] = (int(s), int(e))  # rows are in time order: the last one wins
        return out

    def _explain(self, engine: Any) -> RouteStatus:
        return explain(engine.mesh, engine, self._names(), departed=self._departed(),
                       starting=self._serving_starts())

    def route_status(self) -> RouteStatus | None:
        """Why no request can be routed now (``None``: one can, or nothing is served yet from here)."""
        from ..serve.pipeline import NoRoute

        engine = self.engine
        if engine is None or self.mesh is None:
            return None
        try:
            engine.current_route()
            return None
        except NoRoute:
            return self._explain(engine)

    def _serving_starts(self) -> bool:
        return (self._serve_task is not None and not self._serve_task.done()) or "gradient-nb-spawn" in self.busy

    async def wait_route(self, *, wait: float | None = None, serving_peers: int = 1,
                         on_wait: Callable[[str], None] | None = None) -> Any:
        """The engine of the served model, once a route of ready peers covers every layer.

        ``wait=None`` (the default) waits only while a route is on its way (a peer loading its layers,
        this kernel's serve starting; at most ``SERVE_TIMEOUT``) or for a short grace in which the
        coordinator re-plans, then raises :class:`NoRouteNow` saying which layers are missing and which
        peers left. ``wait=SECONDS`` waits that long in any case (for a peer to join, say).
        ``on_wait(message)`` hears why it is waiting, whenever the reason changes.
        """
        from ..serve.coordinator import serving_peers as serving
        from ..serve.pipeline import NoRoute

        if self.mesh is None and self._join_task is None:
            raise NotJoined(NOT_JOINED)
        start = time.monotonic()
        limit = SERVE_TIMEOUT if wait is None else wait
        said = None

        def tell(text: str) -> None:
            nonlocal said
            if text != said and on_wait is not None:
                said = text
                on_wait(text)

        if self.mesh is None:
            tell("waiting for this kernel to join the mesh")
            await self.wait_mesh()
        if self._serve_task is not None and not self._serve_task.done():
            tell("waiting for this kernel to start serving")
            await asyncio.wait_for(asyncio.shield(self._serve_task), max(0.1, limit - (time.monotonic() - start)))
        engine = await self._get_engine(None)
        while True:
            try:
                live = len(serving(engine.mesh, engine.model_name))
                engine.current_route()
                if live >= serving_peers:
                    return engine
                status = RouteStatus(f"{live} of {serving_peers} peers serve {engine.model_name}", True)
            except NoRoute:
                status = self._explain(engine)
            waited = time.monotonic() - start
            if waited > limit:
                raise NoRouteNow(f"no route after {waited:.0f} s: {status.message}")
            if wait is None and not status.progressing and waited > NO_ROUTE_GRACE_S:
                raise NoRouteNow(f"no route: {status.message} (ask with --wait SECONDS to wait for peers)")
            tell(status.message)
            await asyncio.sleep(ROUTE_POLL_S)

    async def wait_engine(self, timeout: float = SERVE_TIMEOUT, serving_peers: int = 1) -> Any:
        """The engine of the served model, waiting up to ``timeout`` for a route (see :meth:`wait_route`)."""
        return await self.wait_route(wait=timeout, serving_peers=serving_peers)

    async def ready(self, serving_peers: int = 1, timeout: float = SERVE_TIMEOUT) -> None:
        """Wait until at least ``serving_peers`` peers serve the model and a route covers all its layers."""
        await self.wait_engine(timeout, serving_peers)
        if self.serving_monitor is not None:  # the dashboard shows the route when this returns, not up to 1 s later
            with contextlib.suppress(Exception):  # a display glitch; the refresh loop logs those
                self.serving_monitor.refresh()

    async def ask(self, prompt: str | list[dict[str, str]], *, max_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int | None = None, wait: float | None = None,
                  on_text: Callable[[str, int], None] | None = None,
                  on_wait: Callable[[str], None] | None = None) -> str:
        """Prompt the served model (a string is one user message) and return its answer.

        Without a route it fails fast, saying what is missing, unless one is on its way or ``wait``
        seconds are given (see :meth:`wait_route`; ``on_wait(message)`` hears why it waits).
        ``on_text(text_so_far, tokens)`` is called as tokens arrive. Awaited in a cell, interrupting the
        cell cancels this request only: serving goes on.
        """
        from ..serve.sampling import SamplingParams

        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        engine = await self.wait_route(wait=wait, on_wait=on_wait)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = engine.encode(messages)
        out: list[int] = []
        self.answer_tokens = 0
        try:
            async for tok in engine.generate(ids, params):
                out.append(tok)
                self.answer_tokens = len(out)
                if on_text is not None:
                    on_text(engine.tokenizer.decode(out, skip_special_tokens=True), len(out))
        finally:
            self._answered_at = time.time()
        text = engine.tokenizer.decode(out, skip_special_tokens=True)
        self.last_answer = text
        return text

    def start_ask(self, prompt: str, on_text: Callable[[str, int], None] | None = None,
                  on_error: Callable[[BaseException], None] | None = None, **params: Any) -> asyncio.Task:
        """:meth:`ask` in the background; :meth:`answer` waits for it, :meth:`cancel_asks` stops it."""
        task = self.spawn(self.ask(prompt, on_text=on_text, **params), "parallax-ask", on_error=on_error)
        self._ask_task = task
        self._ask_tasks.add(task)
        when_done(task, self._ask_tasks.discard)
        return task

    def cancel_asks(self) -> int:
        """Cancel every request started by :meth:`start_ask` that is still generating; returns how many.

        Only those requests stop: serving and the mesh go on.
        """
        running = [t for t in self._ask_tasks if not t.done()]
        for t in running:
            t.cancel()
        return len(running)

    async def answer(self, timeout: float = SERVE_TIMEOUT) -> str:
        """The answer of the last ``%%parallax ask``, waiting for it to finish."""
        if self._ask_task is None:
            raise SessionError("nothing was asked yet: run %%parallax ask")
        return await asyncio.wait_for(asyncio.shield(self._ask_task), timeout)


def _import_serving() -> None:
    # The serving stack's first import takes ~1-2 s (torch, transformers); done in a worker thread.
    from ..serve import node, pipeline  # noqa: F401
    from ..verify import report  # noqa: F401


def _adapter_id(path: str | None) -> str | None:
    if path is None:
        return None
    from ..rl.sampler import adapter_id

    return adapter_id(path)


def _adapter_service(server: Any, path: str) -> Any:
    """A fixed-adapter ``SamplerService`` for ``server``, not started yet."""
    from pathlib import Path

    from ..models.adapter import load_adapter
    from ..rl.sampler import SamplerService, adapter_id

    return SamplerService(server, adapter=load_adapter(path), adapter_name=Path(path).name,
                          adapter_id=adapter_id(path))


def _check_adapter(config: dict[str, Any], quick: bool) -> None:
    """Raise :class:`BadServeConfig` unless ``config["adapter"]`` is a LoRA adapter folder this serve can
    merge: readable, valid (safetensors, LoRA keys, ranks), for float weights, and (unless ``quick``)
    every matrix the shape of the model's weight it patches (read from the safetensors headers only)."""
    from ..models.adapter import AdapterError, load_adapter

    path = config["adapter"]
    if config.get("quantization"):
        raise BadServeConfig(f"adapter {path}: a LoRA adapter merges into float weights; drop quantization")
    try:
        adapter = load_adapter(path)
    except (FileNotFoundError, OSError, AdapterError) as exc:
        raise BadServeConfig(f"adapter {path}: {exc}") from None
    if quick:
        return
    from ..models import model_info, resolve_model
    from ..models.loader import _tensor_index

    try:
        p = resolve_model(config["model"]) if config.get("model") is not None else resolve_model()
        n = model_info(p).num_layers
        shapes = {k: tuple(v[1]) for k, v in _tensor_index(p).items()}
    except (FileNotFoundError, OSError) as exc:
        raise BadServeConfig(str(exc)) from None
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        want = shapes.get(f"model.layers.{layer}.{module}.weight")
        if not 0 <= layer < n or want is None:
            raise BadServeConfig(f"adapter {path}: layer {layer} {module} is not a weight of {p.name} "
                                 "(an adapter for another model?)")
        if (b.shape[0], a.shape[1]) != want:
            raise BadServeConfig(f"adapter {path}: layer {layer} {module} is {b.shape[0]}x{a.shape[1]}, "
                                 f"{p.name}'s weight is {want[0]}x{want[1]} (an adapter for another model?)")


def _default_model_name() -> str:
    from ..models.loader import DEFAULT_MODEL

    return DEFAULT_MODEL


async def _discard(server: Any) -> None:
    """Undo what a ServingPeer whose ``start()`` failed may have done: offers, the announcement, tasks."""
    if getattr(server, "coordinator", None) is not None:
        with contextlib.suppress(Exception):
            await server.stop(handover_timeout=0)
        return
    with contextlib.suppress(Exception):
        if server._unwatch is not None:
            server._unwatch()
    with contextlib.suppress(Exception):
        server.mesh.publish(serving=None, layers=None)
    for service in ("shard.forward", "shard.drop"):
        with contextlib.suppress(Exception):
            server.mesh.withdraw(service)
    if server._task is not None:
        server._task.cancel()


def _quiet_logs() -> None:
    # Without any handler, Python prints every warning of the mesh (a coordinator that cannot place the
    # model until enough peers arrived) into whichever cell runs. Show errors only, unless the user
    # configured logging.
    lg = logging.getLogger("gradient_nb")
    if not lg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.ERROR)
        lg.addHandler(handler)


def when_done(task: asyncio.Future, callback: Callable[[Any], None]) -> None:
    """``task.add_done_callback`` without the caller's context: the callback updates widgets, and must not
    address its messages to the cell that registered it (see :meth:`NotebookSession.spawn`)."""
    task.add_done_callback(callback, context=contextvars.Context())


async def _as_coro(aw: Awaitable[Any]) -> Any:
    return await aw


_session: NotebookSession | None = None


def current() -> NotebookSession:
    """This kernel's session (created on first use)."""
    global _session
    if _session is None:
        _session = NotebookSession()
    return _session
