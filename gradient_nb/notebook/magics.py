"""IPython magics: ``%mesh`` and ``%%parallax``. Load them with ``%load_ext gradient_nb``.

Each magic parses and checks its arguments in the cell (bad input is a clear ``UsageError`` at once),
shows its widgets in the cell, then hands the work to the kernel's :class:`NotebookSession`, which runs
it on the kernel's event loop: the cell returns immediately, its widgets keep updating, and other cells
run meanwhile. The exception is ``%%parallax ask``: a request belongs to its cell, so the cell runs until
the answer is complete (the event loop keeps running meanwhile) and interrupting it cancels that request
(see :class:`AskCell`); ``--background`` gives the old behaviour. ``%mesh?`` and ``%parallax?`` print the
full help.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import html
import logging
import shlex
import socket
import time
from collections.abc import Generator
from typing import Any

import ipywidgets as widgets
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.display import display

from ..mesh.errors import MeshError
from .session import NOT_JOINED, NotebookSession, SessionError, current, when_done

log = logging.getLogger(__name__)

__all__ = ["SERVE_KEYS", "AskCell", "GradientMagics", "parse_serve_config"]

MESH_USAGE = "usage: %mesh join [URL] | spawn N | status | watch | leave   (%mesh? for help)"
PARALLAX_USAGE = ("usage: %%parallax serve | %%parallax ask | %parallax status | %parallax cancel"
                  "   (%parallax? for help)")
STREAM_INTERVAL_S = 0.1  # stream answers, but don't flood the front-end with one message per token


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit the kernel's process
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage()}")

    def exit(self, status: int = 0, message: str | None = None) -> None:
        raise UsageError(message or self.format_help())


def _join_parser() -> _Parser:
    p = _Parser(prog="%mesh join", add_help=False)
    p.add_argument("url", nargs="?", help="rendezvous URL; none starts a local mesh in this kernel")
    p.add_argument("--mesh", default="default")
    p.add_argument("--name", default=None)
    p.add_argument("--secret", default=None)
    p.add_argument("--stun", default=None)
    p.add_argument("--turn", default=None)
    p.add_argument("--turn-user", default=None)
    p.add_argument("--turn-password", default=None)
    p.add_argument("--ephemeral", action="store_true")
    p.add_argument("--heartbeat", type=float, default=2.0)
    p.add_argument("--peer-timeout", type=float, default=10.0)
    p.add_argument("--host", default=None,
                   help="without URL: the address the local rendezvous listens on (default 127.0.0.1)")
    return p


def _spawn_parser() -> _Parser:
    p = _Parser(prog="%mesh spawn", add_help=False)
    p.add_argument("count", type=int)
    p.add_argument("--serve", default=None, metavar="MODEL")
    p.add_argument("--layers", default=None, help="one range per peer: 0:10,10:30")
    p.add_argument("--memory-cap", default=None, help="each peer offers at most this much memory, e.g. 300M")
    p.add_argument("--adapter", default=None, metavar="PATH", help="with --serve: merge this LoRA adapter")
    p.add_argument("--name", default="volunteer")
    return p


def _ask_parser() -> _Parser:
    p = _Parser(prog="%%parallax ask", add_help=False)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--background", action="store_true",
                   help="return at once; the answer streams into the cell while other cells run")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="without a route, wait this long for one (default: fail at once, saying why)")
    return p


def _parse_range(text: str, where: str) -> tuple[int, int]:
    try:
        s, e = (int(v) for v in text.split(":"))
    except ValueError:
        raise UsageError(f"{where}: expected START:END (e.g. 0:10), got {text!r}") from None
    if not 0 <= s < e:
        raise UsageError(f"{where}: need 0 <= START < END, got {text!r}")
    return s, e


SERVE_KEYS = {
    "model": "model name or local folder (default: the bundled SmolLM2-135M-Instruct)",
    "dtype": "float32 | bfloat16 | float16 (default float32)",
    "quantization": "none | int8 | nf4",
    "layers": "auto (the coordinator decides) or START:END",
    "memory_cap": "offer at most this much memory, e.g. 2G",
    "adapter": "a LoRA adapter folder (peft's, e.g. saved by %%echo train) merged into the layers served",
    "api": "true to expose an OpenAI-compatible API from this kernel",
    "port": "API port (default: a free one)",
    "api_key": "bearer token the API requires (required beyond loopback)",
    "host": "API host (default 127.0.0.1)",
}


def parse_serve_config(body: str) -> dict[str, Any]:
    """The ``%%parallax serve`` cell body: ``key: value`` lines, ``#`` comments; raises ``UsageError``."""
    from ..cli import _parse_size

    cfg: dict[str, Any] = {"dtype": "float32"}
    seen: set[str] = set()
    for n, raw in enumerate(body.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if ":" not in line:
            raise UsageError(f"line {n}: expected 'key: value', got {raw.strip()!r}")
        key, value = (s.strip() for s in line.split(":", 1))
        key = key.replace("-", "_")
        if key not in SERVE_KEYS:
            raise UsageError(f"line {n}: unknown setting {key!r}; known: {', '.join(SERVE_KEYS)}")
        if key in seen:
            raise UsageError(f"line {n}: {key!r} is set twice")
        seen.add(key)
        if not value:
            raise UsageError(f"line {n}: {key!r} has no value")
        if key == "model":
            cfg[key] = None if value == "default" else value
        elif key == "dtype":
            if value not in ("float32", "bfloat16", "float16"):
                raise UsageError(f"line {n}: dtype must be float32, bfloat16 or float16, not {value!r}")
            cfg[key] = value
        elif key == "quantization":
            if value not in ("none", "int8", "nf4"):
                raise UsageError(f"line {n}: quantization must be none, int8 or nf4, not {value!r}")
            cfg[key] = None if value == "none" else value
        elif key == "layers":
            if value != "auto":
                cfg[key] = _parse_range(value, f"line {n}: layers")
        elif key == "memory_cap":
            try:
                cfg[key] = _parse_size(value)
            except SystemExit as exc:
                raise UsageError(f"line {n}: {exc}") from None
        elif key == "api":
            if value.lower() not in ("true", "false", "yes", "no"):
                raise UsageError(f"line {n}: api must be true or false, not {value!r}")
            cfg[key] = value.lower() in ("true", "yes")
        elif key == "port":
            if not value.isdigit() or not 0 <= int(value) < 65536:
                raise UsageError(f"line {n}: port must be a number in 0..65535, not {value!r}")
            cfg[key] = int(value)
        else:
            cfg[key] = value
    host = cfg.get("host", "127.0.0.1")
    if cfg.get("api") and host not in ("127.0.0.1", "localhost", "::1") and not cfg.get("api_key"):
        raise UsageError(f"an API on {host} is reachable by others: set api_key")
    if not cfg.get("api") and any(k in cfg for k in ("port", "api_key", "host")):
        raise UsageError("port, api_key and host only apply with 'api: true'")
    return cfg


def _status(text: str) -> str:
    return f"<b>gradient-nb</b>: {text}"


def short_message(exc: BaseException) -> str | None:
    """The one line to show for an expected failure; ``None`` for a bug (its traceback is worth seeing)."""
    if isinstance(exc, (SessionError, UsageError)):
        return str(exc)
    if isinstance(exc, MeshError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc}" if str(exc) else "timed out"
    return None


def _error_html(what: str, exc: BaseException) -> str:
    short = short_message(exc)
    text = short if short is not None else f"{type(exc).__name__}: {exc}"
    return _status(f"<span style='color:#c62828'>{html.escape(what)}: {html.escape(text)}</span>")


def _usage(exc: BaseException) -> UsageError:
    """``exc`` as IPython's one-line error (no traceback in the cell; the traceback goes to the log)."""
    log.info("%s", exc, exc_info=exc)
    return UsageError(short_message(exc) or str(exc))


def _lan_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only picks an interface
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


class AskCell:
    """What ``%%parallax ask`` returns; the cell awaits it (see :class:`AwaitAskCells`).

    Why the cell waits rather than returning at once: a request is the cell's work, and a JupyterLab
    user stops a cell's work with the interrupt button (or Run All stops at a cell that failed). A cell
    that returned while its answer streamed on would leave nothing for the interrupt to reach: ipykernel
    ignores SIGINT between cells. Awaiting keeps the kernel's event loop running (serving, the mesh,
    widgets, the Mesh panel's comm all go on) and makes the cell's await the request's only owner:
    ipykernel cancels an awaiting cell on interrupt, the cancellation reaches the request task through
    the plain ``await`` below, and the token loop's ``finally`` frees the route and the peers' caches.
    """

    def __init__(self, task: asyncio.Task, follow: bool, tokens: Any = None) -> None:
        self.task = task
        self.follow = follow  # False with --background: the cell returns at once
        self.tokens = tokens or (lambda: 0)  # how many tokens arrived (for the interrupt's message)
        self.awaited = False  # True once a cell follows it: that cell shows the request's error

    def __await__(self) -> Generator[Any, None, None]:
        return self._follow().__await__()

    async def _follow(self) -> None:
        if not self.follow:
            return
        self.awaited = True
        try:
            # Not shielded, on purpose: cancelling the cell cancels the request. The text is not
            # returned: the cell's widget shows it already, and a result would be shown a second time.
            await self.task
        except asyncio.CancelledError:
            # The interrupt (ipykernel turns SIGINT into this cell's cancellation). The cell still ends
            # with an error, as the user asked; IPython would print the CancelledError's traceback
            # through its own internals, so the cell ends with one line instead.
            self.task.cancel()
            raise UsageError(f"interrupted: the answer was cancelled after {self.tokens()} tokens "
                             "(it stays above); serving goes on") from None
        except Exception as exc:
            if short_message(exc) is None:
                raise
            raise _usage(exc) from None

    def _ipython_display_(self) -> None:
        # Not awaited (``run_cell_magic`` from code, a terminal IPython): the request goes on in the
        # background as with --background, and its widget is the output; the handle shows nothing.
        pass


def _ask_call(src: str) -> tuple[str, str] | None:
    """(line, body) when ``src`` is exactly IPython's rewrite of one ``%%parallax ask`` cell."""
    if "run_cell_magic" not in src:  # the common case, without parsing
        return None
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return None
    call = tree.body[0].value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and call.func.attr == "run_cell_magic" and isinstance(call.func.value, ast.Call)
            and isinstance(call.func.value.func, ast.Name) and call.func.value.func.id == "get_ipython"
            and not call.keywords and len(call.args) == 3
            and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in call.args)):
        return None
    name, line, body = (a.value for a in call.args)  # type: ignore[attr-defined]
    if name != "parallax" or line.split()[:1] != ["ask"]:
        return None
    return line, body


class AwaitAskCells:
    """An IPython input transformer: a ``%%parallax ask`` cell becomes ``await <the magic>``.

    IPython runs a magic as a plain call, and an ordinary function cannot wait on the event loop it runs
    on. A cell with a top-level ``await``, though, is run by ipykernel as a task that it cancels on
    interrupt, so awaiting the :class:`AskCell` the magic returns makes the cell follow its request.

    Only the cell the kernel was asked to execute is rewritten: ``%%time`` or ``%%capture`` around the
    magic, or ``get_ipython().run_cell(...)``, run it as nested synchronous code, where an ``await``
    would be a syntax error or would need the running loop; there the answer streams in the background.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell

    def __call__(self, lines: list[str]) -> list[str]:
        call = _ask_call("".join(lines))
        if call is None or not self._is_executed_cell(call):
            return lines
        line, body = call
        return [f"await get_ipython().run_cell_magic('parallax', {line!r}, {body!r})\n"]

    def _is_executed_cell(self, call: tuple[str, str]) -> bool:
        shell = self.shell
        if not getattr(shell, "autoawait", False):
            return False  # %autoawait off: a top-level await would be a SyntaxError
        try:
            from IPython.core.async_helpers import _asyncio_runner
        except ImportError:
            return False
        if shell.loop_runner is not _asyncio_runner:
            return False  # %autoawait trio/curio: the request is an asyncio task it could not await
        kernel = getattr(shell, "kernel", None)
        if kernel is None or not hasattr(kernel, "get_parent"):
            return False  # a terminal IPython: no event loop runs between cells
        parent = kernel.get_parent("shell") or {}
        if parent.get("header", {}).get("msg_type") != "execute_request":
            return False
        code = parent.get("content", {}).get("code", "")
        return _ask_call(shell.input_transformer_manager.transform_cell(code)) == call


def _local_mesh_note(s: NotebookSession, ns: argparse.Namespace) -> str:
    """What the join's status line says about a local mesh: who can join it, and how."""
    rv = s.rendezvous
    port = rv.port
    if rv.host in ("127.0.0.1", "localhost", "::1"):
        return ("; a local mesh, on loopback: only this machine can join "
                f"(<code>gradient-nb peer --rendezvous ws://127.0.0.1:{port}</code>). For other machines, "
                "<code>%mesh leave</code> and <code>%mesh join --host 0.0.0.0 --secret S</code>")
    addr = rv.host if rv.host not in ("0.0.0.0", "", "::") else _lan_address()
    url = f"ws://{addr}:{port}" if addr else f"ws://THIS-MACHINE:{port}"
    secret = "" if ns.secret else " (no --secret: anyone who reaches the port can join)"
    return (f"; a local mesh: others join with <code>gradient-nb peer --rendezvous {html.escape(url)}"
            f"{' --secret S' if ns.secret else ''}</code>{secret}")


@magics_class
class GradientMagics(Magics):
    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        if shell is not None and not any(isinstance(t, AwaitAskCells) for t in shell.input_transformers_post):
            shell.input_transformers_post.append(AwaitAskCells(shell))

    @line_magic
    def mesh(self, line: str) -> Any:
        """Join, inspect and leave a mesh (the work runs in the background; the cell returns at once).

        %mesh join [URL] [--mesh NAME] [--name NAME] [--secret S] [--ephemeral]
                   [--stun URL] [--turn URL --turn-user U --turn-password P]
                   [--heartbeat SECONDS] [--peer-timeout SECONDS] [--host ADDRESS]
            Join the mesh introduced by the rendezvous at URL (ws://host:port). Without URL, start a
            local mesh in this kernel (an embedded rendezvous) and join it. It listens on loopback, so
            only this machine can join, unless --host 0.0.0.0 (or an address of this machine) opens it
            to others: then the URL they join with is shown (set --secret too). --ephemeral uses a
            throwaway identity instead of your persistent key.
        %mesh spawn N [--serve MODEL] [--layers S:E,S:E,...] [--memory-cap SIZE] [--adapter PATH] [--name PREFIX]
            Start N headless peers on this machine (`gradient-nb peer` processes) that join this
            kernel's mesh; with --serve they serve MODEL ('default': the bundled model), each holding
            the layers the coordinator gives it (or --layers, one range per peer; --memory-cap makes
            each offer less memory, so that the model is split; --adapter PATH merges a LoRA adapter
            into the layers each serves). They stop with %mesh leave, or when the kernel exits.
        %mesh status      the peers and links of the mesh, as a table
        %mesh watch       live widgets: the topology and the peer table
        %mesh leave       leave the mesh (stops serving and the spawned peers first)

        From Python: `gradient_nb.notebook.session.current()` is this kernel's session
        (`await nb.wait_mesh()`, `nb.mesh.metrics()` for the metrics history as a polars DataFrame).
        """
        try:
            args = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%mesh: {exc}") from None
        if not args:
            raise UsageError(MESH_USAGE)
        cmd, rest = args[0], args[1:]
        s = current()
        if cmd == "join":
            return self._join(s, _join_parser().parse_args(rest))
        if cmd == "spawn":
            return self._spawn(s, _spawn_parser().parse_args(rest))
        if cmd == "status":
            if rest:
                raise UsageError("%mesh status takes no arguments")
            snap = s.snapshot()
            if not snap.get("joined"):
                print("This kernel has not joined a mesh (or is still joining): run %mesh join [URL]")
                return None
            from ..cli import format_peers

            print(f"mesh {snap['mesh']!r} at {snap['rendezvous']}: {len(snap['peers'])} peers")
            print(format_peers(snap))
            for p in s.local_peers:
                state = "running" if p.alive() else f"exited ({p.proc.returncode})"
                print(f"local peer {p.name}: pid {p.pid}, {state}")
            return None
        if cmd == "watch":
            if rest:
                raise UsageError("%mesh watch takes no arguments")
            from .monitor import MeshMonitor

            s.mesh_monitor = MeshMonitor(s).show()
            s.monitors.append(s.mesh_monitor)
            return None
        if cmd == "leave":
            if rest:
                raise UsageError("%mesh leave takes no arguments")
            if s.mesh is None and s._join_task is None:
                raise UsageError("this kernel is not in a mesh")
            out = widgets.HTML(_status("leaving the mesh…"))
            display(out)

            task = s.start_leave(on_error=lambda e: setattr(out, "value", _error_html("leave", e)))
            when_done(task, lambda t: None if t.cancelled() or t.exception() is not None
                      else setattr(out, "value", _status("left the mesh")))
            return None
        raise UsageError(f"unknown %mesh command {cmd!r}\n{MESH_USAGE}")

    def _join(self, s: NotebookSession, ns: argparse.Namespace) -> None:
        from ..mesh.ice import IceConfig

        if ns.turn and not (ns.turn_user and ns.turn_password):
            raise UsageError("--turn needs --turn-user and --turn-password")
        if ns.url is not None and not ns.url.startswith(("ws://", "wss://", "http://", "https://")):
            raise UsageError(f"the rendezvous URL must start with ws:// or wss://, not {ns.url!r}")
        if ns.heartbeat <= 0 or ns.peer_timeout <= ns.heartbeat:
            raise UsageError("--heartbeat must be > 0 and --peer-timeout longer than it")
        if ns.host is not None and ns.url is not None:
            raise UsageError("--host is for a local mesh (no URL): it is where its rendezvous listens")
        ice = IceConfig(stun=ns.stun, turn=ns.turn, turn_username=ns.turn_user, turn_password=ns.turn_password)
        out = widgets.HTML(_status("joining…" if ns.url else "starting a local mesh…"))
        try:
            task = s.start_join(ns.url, mesh=ns.mesh, name=ns.name, secret=ns.secret, ice=ice,
                                ephemeral=ns.ephemeral, heartbeat=ns.heartbeat, peer_timeout=ns.peer_timeout,
                                host=ns.host)
        except SessionError as exc:
            raise UsageError(str(exc)) from None
        display(out)

        def joined(t: Any) -> None:
            if t.cancelled():
                out.value = _status("join cancelled")
            elif t.exception() is not None:
                out.value = _error_html("join failed", t.exception())
            else:
                m = t.result()
                where = _local_mesh_note(s, ns) if s.rendezvous is not None else ""
                out.value = _status(f"joined mesh <code>{html.escape(m.mesh_name)}</code> at "
                                    f"<code>{html.escape(m.url)}</code> as <code>{html.escape(m.name)}</code> "
                                    f"({m.id[:10]}){where}")

        when_done(task, joined)

    def _spawn(self, s: NotebookSession, ns: argparse.Namespace) -> None:
        if not 1 <= ns.count <= 16:
            raise UsageError("%mesh spawn: N must be between 1 and 16")
        layers = None
        if ns.layers:
            if not ns.serve:
                raise UsageError("%mesh spawn: --layers needs --serve")
            layers = [_parse_range(r, "--layers") for r in ns.layers.split(",")]
            if len(layers) != ns.count:
                raise UsageError(f"%mesh spawn: --layers gives {len(layers)} ranges for {ns.count} peers")
        extra: list[str] = []
        if ns.memory_cap:
            from ..cli import _parse_size

            if not ns.serve:
                raise UsageError("%mesh spawn: --memory-cap needs --serve")
            try:
                _parse_size(ns.memory_cap)
            except SystemExit as exc:
                raise UsageError(f"%mesh spawn: {exc}") from None
            extra = ["--memory-cap", ns.memory_cap]
        if ns.adapter:
            from pathlib import Path

            from ..models.adapter import AdapterError, load_adapter

            if not ns.serve:
                raise UsageError("%mesh spawn: --adapter needs --serve")
            try:
                load_adapter(ns.adapter)  # a bad folder is said here, not in a peer's log
            except (OSError, AdapterError) as exc:
                raise UsageError(f"%mesh spawn: adapter {ns.adapter}: {exc}") from None
            extra += ["--adapter", str(Path(ns.adapter).expanduser().resolve())]
        if s.mesh is None and s._join_task is None:
            raise UsageError(NOT_JOINED)
        out = widgets.HTML(_status(f"starting {ns.count} local peer{'s' * (ns.count > 1)}…"))
        display(out)

        async def run() -> None:
            await s.wait_mesh()
            peers = s.spawn_local_peers(ns.count, serve=ns.serve, layers=layers, name=ns.name, extra=extra)
            for p in peers:
                await p.joined
            what = f", serving {html.escape(ns.serve)}" if ns.serve else ""
            out.value = _status("local peers joined: " + ", ".join(
                f"<code>{html.escape(p.name)}</code> ({(p.peer_id or '?')[:10]}, pid {p.pid})" for p in peers) + what)

        s.spawn(run(), "gradient-nb-spawn", on_error=lambda e: setattr(out, "value", _error_html("spawn", e)))

    @line_cell_magic
    def parallax(self, line: str, cell: str | None = None) -> Any:
        """Serve a model split by layers across the mesh, and prompt it.

        %%parallax serve
        model: default          # or a local HF folder / .gguf file
        dtype: float32          # bfloat16, float16
        quantization: none      # int8, nf4 (bitsandbytes)
        layers: auto            # or START:END
        memory_cap: 2G          # offer at most this much memory
        adapter: PATH           # a LoRA adapter folder (e.g. %%echo train's save) merged into the layers
        api: false              # true: an OpenAI-compatible API from this kernel
        port: 8000              # with api: the port (default: a free one)
        api_key: secret         # with api: the bearer token clients must send
            This kernel serves its share of the model in the background (the coordinator assigns the
            layers unless `layers` is given); the cell returns at once and shows live widgets of the
            allocation and of each peer's tokens/s, queue and latency. An empty body serves the bundled
            model. Run again, it replaces the running serve; a config the model cannot take (layers
            beyond its last, an adapter for another model) is refused before the running serve is
            touched. With an adapter, this kernel's requests route only through peers serving the same
            adapter (this kernel, peers started with `gradient-nb peer --serve MODEL --adapter PATH`).

        %%parallax ask [--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--background]
                       [--wait SECONDS]
        What is the capital of France?
            Streams the answer of the served model (greedy unless --temperature) into the cell's output.
            The cell runs until the answer is complete; while the model is still being served (a serve
            starting, peers loading their layers) it waits, saying for what. With no route and nothing
            on its way (layers no live peer holds, a peer that left) it fails at once, saying which
            layers are missing and which peers left; --wait SECONDS waits that long for peers instead.
            Interrupting the kernel cancels this request only (what arrived stays), serving goes on.
            With --background the cell returns at once and other cells run while the answer streams.
            Either way, `await current().answer()` in a later cell waits for it and returns the text.

        %parallax status    the allocation and the route a request would take now
        %parallax cancel    cancel the answers still streaming from --background asks
        """
        try:
            args = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%parallax: {exc}") from None
        if not args:
            raise UsageError(PARALLAX_USAGE)
        cmd, rest = args[0], args[1:]
        s = current()
        if cmd == "serve":
            if cell is None:
                raise UsageError("%%parallax serve is a cell magic: write %%parallax serve, the config below it")
            if rest:
                raise UsageError("%%parallax serve takes no arguments: the cell body is the config")
            return self._serve(s, parse_serve_config(cell))
        if cmd == "ask":
            ns = _ask_parser().parse_args(rest)
            prompt = (cell or "").strip()
            if not prompt:
                raise UsageError("%%parallax ask is a cell magic: the cell body is the prompt")
            if ns.max_tokens < 1 or not 0 <= ns.temperature <= 2 or not 0 < ns.top_p <= 1:
                raise UsageError("need --max-tokens >= 1, --temperature in [0, 2] and --top-p in (0, 1]")
            return self._ask(s, prompt, ns)
        if cmd == "status":
            if rest or cell is not None:
                raise UsageError("%parallax status takes no arguments")
            return self._status(s)
        if cmd == "cancel":
            if rest or cell is not None:
                raise UsageError("%parallax cancel takes no arguments")
            n = s.cancel_asks()
            print(f"cancelled {n} answer{'s' * (n != 1)}" if n else "no answer is streaming")
            return None
        raise UsageError(f"unknown %parallax command {cmd!r}\n{PARALLAX_USAGE}")

    def _serve(self, s: NotebookSession, cfg: dict[str, Any]) -> None:
        if s.mesh is None and s._join_task is None:
            raise UsageError(NOT_JOINED)
        if cfg.get("model") is not None:
            from ..models import resolve_model

            try:
                resolve_model(cfg["model"])
            except (FileNotFoundError, OSError) as exc:
                raise UsageError(str(exc)) from None
        from .monitor import ServingMonitor

        try:
            # Checked before anything that runs is touched: a wrong cell leaves the current serve as it is.
            s.check_serve_config(cfg, quick=True)
        except SessionError as exc:
            raise UsageError(str(exc)) from None
        monitor = ServingMonitor(s)
        previous = s.serving_monitor

        def failed(exc: BaseException) -> None:
            monitor.failed(exc)
            if previous is not None and s.server is not None:  # refused before touching: the old serve runs on
                previous.resume()
                s.serving_monitor = previous

        try:
            s.start_serve(cfg, on_error=failed)
        except SessionError as exc:
            raise UsageError(str(exc)) from None
        if previous is not None:
            previous.replaced()
        s.serving_monitor = monitor.show()
        s.monitors.append(monitor)

    def _ask(self, s: NotebookSession, prompt: str, ns: argparse.Namespace) -> AskCell:
        if s.mesh is None and s._join_task is None:
            raise UsageError(NOT_JOINED)
        if ns.wait is not None and ns.wait < 0:
            raise UsageError("--wait takes a number of seconds >= 0")
        out = widgets.HTML("<i>waiting for the served model…</i>")
        out.add_class("gradient-nb-answer")
        display(out)
        state: dict[str, Any] = {"last": 0.0, "start": None, "n": 0, "text": ""}

        def on_wait(why: str) -> None:
            out.value = f"<i>waiting for a route: {html.escape(why)}</i>"

        def on_text(text: str, n: int) -> None:
            now = time.perf_counter()
            state["n"], state["text"] = n, text
            if state["start"] is None:
                state["start"] = now
            if now - state["last"] >= STREAM_INTERVAL_S:
                state["last"] = now
                out.value = f"<pre style='white-space:pre-wrap'>{html.escape(text)}▌</pre>"

        def finished(t: Any) -> None:
            if t.cancelled():
                # What arrived stays, without the streaming cursor.
                kept = f"<pre style='white-space:pre-wrap'>{html.escape(state['text'])}</pre>" if state["n"] else ""
                out.value = f"{kept}<small>(cancelled after {state['n']} tokens)</small>"
            elif t.exception() is None:
                text = t.result()
                took = time.perf_counter() - (state["start"] or time.perf_counter())
                n = state["n"]
                rate = f", {(n - 1) / took:.1f} tokens/s after the first" if took > 0 and n > 1 else ""
                out.value = (f"<pre style='white-space:pre-wrap'>{html.escape(text)}</pre>"
                             f"<small>{n} tokens{rate}</small>")

        def failed(exc: BaseException) -> None:
            # A cell that follows its request ends with the message itself (AskCell): said once, there.
            shown_below = cell is not None and cell.awaited and short_message(exc) is not None
            out.value = "" if shown_below else _error_html("ask failed", exc)

        follow = not ns.background
        cell: AskCell | None = None
        task = s.start_ask(prompt, on_text=on_text, on_wait=on_wait, max_tokens=ns.max_tokens,
                           temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed, wait=ns.wait,
                           on_error=failed)
        when_done(task, finished)
        cell = AskCell(task, follow=follow, tokens=lambda: state["n"])
        return cell

    def _status(self, s: NotebookSession) -> None:
        from ..serve.coordinator import allocation_of

        if s.mesh is None or s.engine is None:
            print("nothing is served from this kernel's mesh yet: run %%parallax serve")
            return
        names = {p.id: p.name for p in s.mesh.peers()}
        alloc = allocation_of(s.mesh, s.engine.model_name)
        if alloc is None:
            print(f"{s.engine.model_name}: no allocation yet")
            return
        print(f"{s.engine.model_name}: {alloc.num_layers} layers")
        for i, pipe in enumerate(alloc.pipelines):
            print(f"pipeline {i + 1}: " + "  ".join(f"{names.get(st.peer_id, st.peer_id[:8])}[{st.start}:{st.end}]"
                                                  for st in pipe))
        if alloc.spare:
            print("spare: " + ", ".join(names.get(p, p[:8]) for p in alloc.spare))
        from ..serve.pipeline import NoRoute

        try:
            chain = s.engine.current_route()
            print("route: " + " -> ".join(f"{names.get(st.peer_id, st.peer_id[:8])}[{st.start}:{st.end}]"
                                          for st in chain))
        except NoRoute as exc:
            why = s.route_status()
            print(f"no route now: {why.message if why is not None else exc}")
