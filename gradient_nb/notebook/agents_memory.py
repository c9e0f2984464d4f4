"""``%agents memory``: the verifiable shared memory (SEDM) of this kernel's mesh, and its use by runs.

    %agents memory [list]          the entries in the mesh state: id, family, kind, author, replay scores, text
    %agents memory show ID         one entry (an id prefix will do): the item and its signed replay record
    %agents memory verify ID [--llm URL --model NAME --model-hash SHA256]
                                   re-run the entry's replay (default: the bundled model, served in this
                                   kernel on first use) and say whether it reproduces

Every entry listed has passed ``check_entry`` (signature of the slot's owner, content address, scores
re-derived from the answers); ``verify`` is the re-run. ``%%agents run`` with ``memory: true`` puts the
best entry for the task (``Memory.retrieve``: similarity × utility, above a similarity floor) in front of
the task the agents receive, and shows which one it used.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
from typing import Any

from IPython.core.error import UsageError
from IPython.display import HTML, display

USAGE = "usage: %agents memory [list] | show ID | verify ID [--llm URL --model NAME --model-hash SHA256]"
_state: dict[str, Any] = {}


def _shared(mesh: Any) -> Any:
    from ..agents.memory import Memory, SharedMemory

    if _state.get("mesh") is not mesh:
        _state.clear()
        _state.update(mesh=mesh, shared=SharedMemory(mesh), memory=Memory(), solver=None)
    return _state["shared"]


def _find(mesh: Any, prefix: str) -> Any:
    hits = [e for e in _shared(mesh).scan() if e.id.startswith(prefix)]
    if len(hits) != 1:
        raise UsageError(f"{len(hits)} memory entries have an id starting with {prefix!r}")
    return hits[0]


def list_html(mesh: Any) -> str:
    names = {pid: rec.get("name", "") for pid, rec in mesh.state.peers().items()}
    rows = []
    for e in sorted(_shared(mesh).scan(), key=lambda e: (e.item.family, -e.gain)):
        r = e.replay
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            e.id[:12], e.item.family, e.item.kind, names.get(e.author) or e.author[:8],
            f"{r.score_without:.2f} → {r.score_with:.2f} on {len(r.tasks)}", e.item.text[:120])) + "</tr>")
    if not rows:
        return "<i>no memory entries in this mesh yet</i>"
    head = "".join(f"<th>{h}</th>" for h in ("id", "family", "kind", "author", "replay", "text"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def show_text(mesh: Any, prefix: str) -> str:
    e = _find(mesh, prefix)
    return json.dumps({"id": e.id, "author": e.author, "item": e.item.payload(), "replay": e.replay.payload()},
                      indent=1)


async def context_for(mesh: Any, task: str) -> tuple[str, list[str]]:
    """The task with the best memory entry in front of it, and the ids used (for ``memory: true``)."""
    entries = _shared(mesh).scan()  # the state is read on the loop; the embedder runs off it
    memory = _state["memory"]

    def pick() -> list[Any]:
        for e in entries:
            memory.add(e)
        return memory.retrieve(task)

    got = await asyncio.to_thread(pick)
    if not got:
        return task, []
    return "Worked example from memory: " + " ".join(e.item.text for e in got) + "\n\n" + task, [e.id for e in got]


async def _solver(args: argparse.Namespace) -> Any:
    from ..agents.memory import ToolCallSolver

    if args.llm:
        return ToolCallSolver(args.llm, model=args.model, model_hash=args.model_hash)
    if _state.get("solver") is None:
        from ..models import DEFAULT_MODEL
        from ..serve.api import serve_api
        from ..serve.shard import LocalEngine

        engine = await asyncio.to_thread(LocalEngine, DEFAULT_MODEL)  # loading blocks: off the kernel's loop
        engine.model_name = DEFAULT_MODEL
        server = await serve_api(engine)
        _state.update(engine=engine, server=server,
                      solver=ToolCallSolver(server.url, model=DEFAULT_MODEL, model_hash=engine.info.content_hash))
    return _state["solver"]


def memory_command(session: Any, argv: list[str]) -> Any:
    mesh = session.mesh
    sub = argv[0] if argv else "list"
    if sub == "list" and len(argv) <= 1:
        return HTML(list_html(mesh))
    if sub == "show" and len(argv) == 2:
        print(show_text(mesh, argv[1]))
        return None
    if sub == "verify" and len(argv) >= 2:
        p = argparse.ArgumentParser(prog="%agents memory verify", add_help=False)
        p.add_argument("id")
        p.add_argument("--llm", default=None)
        p.add_argument("--model", default="")
        p.add_argument("--model-hash", default="")
        try:
            args = p.parse_args(argv[1:])
        except SystemExit:
            raise UsageError(USAGE) from None
        entry = _find(mesh, args.id)
        handle = display(HTML(f"<i>re-running the replay of {entry.id[:12]}…</i>"), display_id=True)

        async def run() -> None:
            from ..agents.memory import verify_entry

            v = await verify_entry(entry.record, await _solver(args), owner=entry.author)
            handle.update(HTML(f"<b>{'verified' if v.ok else 'refused'}</b> {entry.id[:12]}: {html.escape(v.reason)}"))

        def failed(exc: BaseException) -> None:
            handle.update(HTML(f"<b>memory verify</b>: {html.escape(f'{type(exc).__name__}: {exc}')}"))

        session.spawn(run(), "memory-verify", on_error=failed)
        return None
    raise UsageError(USAGE)
