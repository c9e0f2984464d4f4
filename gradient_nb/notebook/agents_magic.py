"""``%agents`` / ``%%agents``: the agents of this kernel's mesh — their ledger, their tools, and runs.

    %agents ledger        the live agents: skills, tools, capacity, load, latency, reputation, history
    %agents tools         every MCP tool the agents host, with its arguments
    %%agents run          a YAML body: task, mode (single | tools | vote | plan), k, tools
                          (only agents hosting all of these tools bid), memory (true: the best entry
                          of the mesh's verifiable memory goes in front of the task)
    %agents memory        list | show ID | verify ID: the mesh's verifiable memory (see agents_memory)

A run shows its events as a live timeline widget in the cell's output (the cell returns at once; the
run goes on in the kernel's event loop), with the URL of its Server-Sent Events stream; ``await
finished()`` waits for this kernel's runs and returns their results. The kernel's requester has no
model endpoint, so ``mode: plan`` plans by rules (``agents.planner``).
"""

from __future__ import annotations

import asyncio
import html
import shlex
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import HTML, display

from .session import NOT_JOINED, current

USAGE = "usage: %agents ledger | %agents tools | %agents memory ...   or   %%agents run + a YAML body (see %agents?)"
_state: dict[str, Any] = {}  # this kernel's requester and event server, made on first use


def parse_run(body: str) -> dict[str, Any]:
    """The ``%%agents run`` body: ``{"task", "mode", "k", "tools"}``, checked (UsageError says what is wrong)."""
    import yaml

    try:
        spec = yaml.safe_load(body or "")
    except yaml.YAMLError as exc:
        raise UsageError(f"the cell is not YAML: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), str) or not spec["task"].strip():
        raise UsageError("%%agents run needs a YAML body with at least 'task: ...'")
    unknown = set(spec) - {"task", "mode", "k", "tools", "memory"}
    if unknown:
        raise UsageError(f"unknown keys {sorted(unknown)}: task, mode, k, tools, memory")
    mode = spec.get("mode", "single")
    if mode not in ("single", "tools", "vote", "plan"):
        raise UsageError("mode is single, tools, vote or plan")
    k = spec.get("k", 3)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
        raise UsageError("k is an integer from 1 to 16")
    tools = spec.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise UsageError("tools is a list of tool names")
    memory = spec.get("memory", False)
    if not isinstance(memory, bool) or (memory and mode == "plan"):
        raise UsageError("memory is true or false, and works with single, tools and vote (a plan would split it)")
    out = {"task": spec["task"].strip(), "mode": mode, "k": k, "tools": tools}
    return {**out, "memory": True} if memory else out


def ledger_html(ledger: Any, self_id: str) -> str:
    rows = []
    for cap in sorted(ledger.agents().values(), key=lambda c: c.name):
        if cap.agent == self_id and not cap.skills:
            continue
        h = ledger.history(cap.agent)
        lat = "" if cap.latency_ms is None else f"{cap.latency_ms:.0f} ms"
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            cap.name, cap.agent[:8], ", ".join(s.name for s in cap.skills),
            ", ".join(f"{t.get('server')}.{t['name']}" for t in cap.tools), f"{cap.load}/{cap.capacity}", lat,
            f"{h.reputation():.2f}", f"{h.successes}✓ {h.failures}✗")) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("agent", "id", "skills", "tools", "load", "latency", "reputation",
                                              "history"))
    if not rows:
        return "<i>no agents in this mesh yet (start one: gradient-nb agent --rendezvous URL)</i>"
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def timeline_html(log: Any, url: str | None) -> str:
    rows = []
    for ev in log.events:
        detail = ", ".join(f"{k}={v}" for k, v in ev.data.items() if k not in ("steps",))
        rows.append(f"<tr><td>{ev.id}</td><td><b>{ev.kind}</b></td><td>{html.escape(detail[:200])}</td></tr>")
    link = f"<div>events: <code>{html.escape(url)}</code></div>" if url else ""
    return f"{link}<table>{''.join(rows)}</table>"


async def finished(timeout: float = 300.0) -> list[dict[str, Any]]:
    """Wait until every ``%%agents run`` of this kernel has ended; their results in the order they started
    (``answer``, ``mode``, ``run_id``, ``events``: the kinds of the run's events; ``error`` when it failed)."""
    deadline = time.monotonic() + timeout
    results = _state.get("results", {})
    while any(r is None for r in results.values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"agents runs still going after {timeout:.0f} s")
        await asyncio.sleep(0.1)
    return list(results.values())


@magics_class
class AgentsMagics(Magics):
    @line_cell_magic
    def agents(self, line: str, cell: str | None = None) -> Any:
        """Agents on the mesh (Symphony's ledger and vote, Gradientsys' planner over MCP tools).

        %agents ledger                  the live agents and their history
        %agents tools                   the MCP tools the agents host
        %%agents run
        task: What is 17 * 23?
        mode: vote                      single | tools | vote | plan
        k: 3                            agents that vote
        tools: [calculate]              only agents hosting these tools bid
        """
        args = shlex.split(line)
        if not args:
            raise UsageError(USAGE)
        s = current()
        if s.mesh is None:
            raise UsageError(NOT_JOINED)
        req = self._requester(s.mesh)
        if args[0] == "ledger" and cell is None:
            return HTML(ledger_html(req.ledger, s.mesh.id))
        if args[0] == "tools" and cell is None:
            lines = []
            for cap in req.ledger.agents().values():
                for t in cap.tools:
                    props = (t.get("input_schema") or {}).get("properties") or {}
                    lines.append(f"{cap.name:12} {t.get('server')}.{t['name']}({', '.join(props)})  "
                                 f"{t.get('description', '')}")
            print("\n".join(sorted(lines)) or "no tools in this mesh yet")
            return None
        if args[0] == "memory" and cell is None:
            from .agents_memory import memory_command

            return memory_command(s, args[1:])
        if args[0] == "run" and cell is not None:
            return self._run(req, parse_run(cell))
        raise UsageError(USAGE)

    @staticmethod
    def _requester(mesh: Any) -> Any:
        from ..agents.requester import Requester

        if _state.get("mesh") is not mesh:
            _state.clear()
            _state.update(mesh=mesh, requester=Requester(mesh), server=None)
        return _state["requester"]

    def _run(self, req: Any, spec: dict[str, Any]) -> None:
        import ipywidgets as widgets

        s = current()
        log = req.runs.new()
        view = widgets.HTML("<i>starting…</i>")  # the timeline: a widget, so it updates after the cell returns
        display(view)
        results = _state.setdefault("results", {})
        results[log.run_id] = None

        async def run() -> None:
            from ..agents.events import EventServer

            async with _state.setdefault("server_lock", asyncio.Lock()):  # one server for runs started together
                if _state.get("server") is None:
                    _state["server"] = await EventServer(req.runs).start()
            url = _state["server"].url(log)
            exclude = {a for a, cap in req.ledger.agents().items()
                       if not set(spec["tools"]) <= {t["name"] for t in cap.tools}}

            async def show() -> None:
                async for _ in log.follow():
                    view.value = timeline_html(log, url)

            task, used = spec["task"], []
            if spec.get("memory"):
                from .agents_memory import context_for

                task, used = await context_for(s.mesh, task)
            watcher = s.spawn(show(), "agents-timeline")
            try:
                out = await req.run(task, mode=spec["mode"], k=spec["k"], log=log, exclude=exclude)
            finally:
                watcher.cancel()
            mem = f" (memory: {', '.join(i[:12] for i in used) or 'no entry close enough'})" if spec.get("memory") else ""
            view.value = f"<b>answer</b>: {html.escape(str(out.get('answer')))}{mem}" + timeline_html(log, url)
            results[log.run_id] = {**out, "events": log.kinds()}

        def failed(exc: BaseException) -> None:
            view.value = f"<b>agents</b>: {html.escape(f'{type(exc).__name__}: {exc}')}" + timeline_html(log, None)
            results[log.run_id] = {"run_id": log.run_id, "answer": None, "error": f"{type(exc).__name__}: {exc}",
                                   "events": log.kinds()}

        s.spawn(run(), "agents-run", on_error=failed)
