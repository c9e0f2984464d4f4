"""IPython magics: ``%mesh`` and ``%%parallax``. Load them with ``%load_ext gradient_nb``.

Each magic parses and checks its arguments in the cell (bad input is a clear ``UsageError`` at once),
then hands the work to the kernel's :class:`NotebookSession`, which runs it on the kernel's event loop:
the cell returns immediately, its output keeps updating, and other cells run meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import shlex
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.display import HTML, display

from .session import current


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
    return p


SERVE_KEYS = {
    "model": "model name or local folder (default: the bundled SmolLM2-135M-Instruct)",
    "dtype": "float32 | bfloat16 | float16 (default float32)",
    "quantization": "none | int8 | nf4",
    "layers": "auto (the coordinator decides) or START:END",
    "memory_cap": "offer at most this much memory, e.g. 2G",
    "api": "true to expose an OpenAI-compatible API from this kernel",
    "port": "API port (default: a free one)",
    "api_key": "bearer token the API requires (required beyond loopback)",
    "host": "API host (default 127.0.0.1)",
}


def parse_serve_config(body: str) -> dict[str, Any]:
    """The ``%%parallax serve`` cell body: ``key: value`` lines, ``#`` comments."""
    from ..cli import _parse_size

    cfg: dict[str, Any] = {"dtype": "float32"}
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
        if key == "dtype" and value not in ("float32", "bfloat16", "float16"):
            raise UsageError(f"line {n}: dtype must be float32, bfloat16 or float16")
        if key == "quantization":
            if value not in ("none", "int8", "nf4"):
                raise UsageError(f"line {n}: quantization must be none, int8 or nf4")
            cfg[key] = None if value == "none" else value
        elif key == "layers":
            if value != "auto":
                try:
                    s, e = (int(v) for v in value.split(":"))
                except ValueError:
                    raise UsageError(f"line {n}: layers must be auto or START:END") from None
                cfg[key] = (s, e)
        elif key == "memory_cap":
            try:
                cfg[key] = _parse_size(value)
            except SystemExit as exc:
                raise UsageError(f"line {n}: {exc}") from None
        elif key == "api":
            if value.lower() not in ("true", "false", "yes", "no"):
                raise UsageError(f"line {n}: api must be true or false")
            cfg[key] = value.lower() in ("true", "yes")
        elif key == "port":
            if not value.isdigit():
                raise UsageError(f"line {n}: port must be a number")
            cfg[key] = int(value)
        else:
            cfg[key] = value
    return cfg


@magics_class
class GradientMagics(Magics):
    @line_magic
    def mesh(self, line: str) -> Any:
        """Join, inspect and leave a mesh.

        %mesh join [URL] [--mesh NAME] [--name NAME] [--secret S] [--stun URL] [--turn URL
                   --turn-user U --turn-password P] [--ephemeral]
            Join the mesh introduced by the rendezvous at URL (ws://host:port). Without URL, start a
            local mesh in this kernel (an embedded rendezvous) and join it; its URL is printed so that
            other machines can join with `gradient-nb peer --rendezvous URL`.
        %mesh status      the peers and links of the mesh, as a table
        %mesh watch       live widgets: the topology and the peer table
        %mesh leave       leave the mesh (stops serving first)
        """
        args = shlex.split(line)
        if not args:
            raise UsageError("usage: %mesh join [URL] | status | watch | leave  (see %mesh?)")
        cmd, rest = args[0], args[1:]
        s = current()
        if cmd == "join":
            ns = _join_parser().parse_args(rest)
            from ..mesh.ice import IceConfig

            if ns.turn and not (ns.turn_user and ns.turn_password):
                raise UsageError("--turn needs --turn-user and --turn-password")
            ice = IceConfig(stun=ns.stun, turn=ns.turn, turn_username=ns.turn_user,
                            turn_password=ns.turn_password)
            try:
                task = s.start_join(ns.url, mesh=ns.mesh, name=ns.name, secret=ns.secret, ice=ice,
                                    ephemeral=ns.ephemeral)
            except RuntimeError as exc:
                raise UsageError(str(exc)) from None
            handle = display(HTML("<b>gradient-nb</b>: joining…"), display_id=True)

            def joined(t: asyncio.Task) -> None:
                if t.cancelled():
                    handle.update(HTML("<b>gradient-nb</b>: join cancelled"))
                elif t.exception() is not None:
                    handle.update(HTML(f"<b>gradient-nb</b>: join failed: {html.escape(str(t.exception()))}"))
                else:
                    m = t.result()
                    where = f" (local mesh: others join with <code>gradient-nb peer --rendezvous {m.url}</code>)" \
                        if s.rendezvous is not None else ""
                    handle.update(HTML(f"<b>gradient-nb</b>: joined mesh <code>{html.escape(m.mesh_name)}</code> "
                                       f"as <code>{html.escape(m.name)}</code> ({m.id[:10]}){where}"))

            task.add_done_callback(joined)
            return None
        if cmd == "status":
            if rest:
                raise UsageError("%mesh status takes no arguments")
            snap = s.snapshot()
            if not snap.get("joined"):
                print("This kernel has not joined a mesh: run %mesh join [URL]")
                return None
            from ..cli import format_peers

            print(f"mesh {snap['mesh']!r} at {snap['rendezvous']}: {len(snap['peers'])} peers")
            print(format_peers(snap))
            return None
        if cmd == "watch":
            from .monitor import MeshMonitor

            return MeshMonitor(s).show()
        if cmd == "leave":
            if s.mesh is None and s._join_task is None:
                raise UsageError("this kernel is not in a mesh")
            s.spawn(s.leave(), "gradient-nb-leave")
            print("leaving the mesh")
            return None
        raise UsageError(f"unknown %mesh command {cmd!r}: join, status, watch or leave")

    @line_cell_magic
    def parallax(self, line: str, cell: str | None = None) -> Any:
        """Serve a model split across the mesh, and prompt it.

        %%parallax serve
        model: default          # or a local HF folder / .gguf file
        dtype: float32          # bfloat16, float16
        quantization: none      # int8, nf4 (bitsandbytes)
        layers: auto            # or START:END
        memory_cap: 2G
        api: false              # true: OpenAI-compatible API from this kernel
            This kernel serves its share of the model in the background; the cell shows a live widget
            of the allocation and the speed.

        %%parallax ask [--max-tokens N] [--temperature T] [--seed S]
        What is the capital of France?
            Streams the answer of the served model into the cell's output.

        %parallax status    the allocation and the route a request would take now
        """
        args = shlex.split(line)
        if not args:
            raise UsageError("usage: %%parallax serve | %%parallax ask | %parallax status (see %parallax?)")
        cmd, rest = args[0], args[1:]
        s = current()
        if cmd == "serve":
            if cell is None:
                raise UsageError("%%parallax serve is a cell magic: the cell body is the config")
            cfg = parse_serve_config(cell)
            handle = display(HTML("<b>parallax</b>: starting to serve…"), display_id=True)

            def failed(exc: BaseException) -> None:
                handle.update(HTML(f"<b>parallax</b>: serving failed: {html.escape(str(exc))}"))

            async def run() -> None:
                await s.serve(cfg)
                from .monitor import ServingMonitor

                handle.update(HTML(f"<b>parallax</b>: serving {html.escape(s.server.model_id)}"
                                   + (f"; API at <code>{s.api.url}/v1</code>" if s.api is not None else "")))
                ServingMonitor(s).show()

            s.spawn(run(), "parallax-serve", on_error=failed)
            return None
        if cmd == "ask":
            p = _Parser(prog="%%parallax ask", add_help=False)
            p.add_argument("--max-tokens", type=int, default=128)
            p.add_argument("--temperature", type=float, default=0.0)
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--seed", type=int, default=None)
            ns = p.parse_args(rest)
            prompt = (cell or "").strip()
            if not prompt:
                raise UsageError("%%parallax ask: the cell body is the prompt")
            if ns.max_tokens < 1 or not 0 <= ns.temperature <= 2:
                raise UsageError("--max-tokens must be >= 1 and --temperature in [0, 2]")
            return self._ask(prompt, ns)
        if cmd == "status":
            return self._status()
        raise UsageError(f"unknown %parallax command {cmd!r}: serve, ask or status")

    def _ask(self, prompt: str, ns: argparse.Namespace) -> None:
        from ..serve.sampling import SamplingParams

        s = current()
        handle = display(HTML("<i>waiting for the served model…</i>"), display_id=True)
        params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, max_tokens=ns.max_tokens,
                                seed=ns.seed)

        async def run() -> None:
            engine = await s.wait_engine()
            ids = engine.encode([{"role": "user", "content": prompt}])
            out: list[int] = []
            start, last = time.perf_counter(), 0.0
            async for tok in engine.generate(ids, params):
                if tok in engine.eos_ids:
                    break
                out.append(tok)
                now = time.perf_counter()
                if now - last > 0.1:  # stream, but don't flood the front-end with one message per token
                    last = now
                    handle.update(HTML(f"<pre>{html.escape(engine.tokenizer.decode(out))}</pre>"))
            rate = len(out) / max(time.perf_counter() - start, 1e-9)
            text = engine.tokenizer.decode(out, skip_special_tokens=True)
            handle.update(HTML(f"<pre>{html.escape(text)}</pre><small>{len(out)} tokens, {rate:.1f} tokens/s"
                               "</small>"))
            s.last_answer = text

        def failed(exc: BaseException) -> None:
            handle.update(HTML(f"<b>parallax</b>: {html.escape(type(exc).__name__)}: {html.escape(str(exc))}"))

        s.spawn(run(), "parallax-ask", on_error=failed)

    def _status(self) -> None:
        from ..serve.coordinator import allocation_of

        s = current()
        if s.mesh is None or s.engine is None:
            print("nothing is served from this kernel's mesh yet: run %%parallax serve")
            return
        names = {p.id: p.name for p in s.mesh.peers()}
        alloc = allocation_of(s.mesh, s.engine.model_name)
        if alloc is None:
            print("no allocation yet")
            return
        for i, pipe in enumerate(alloc.pipelines):
            print(f"pipeline {i + 1}: " + "  ".join(f"{names.get(st.peer_id, st.peer_id[:8])}[{st.start}:{st.end}]"
                                                  for st in pipe))
        try:
            chain = s.engine.current_route()
            print("route: " + " -> ".join(f"{names.get(st.peer_id, st.peer_id[:8])}[{st.start}:{st.end}]"
                                          for st in chain))
        except Exception as exc:
            print(f"no route now: {exc}")
