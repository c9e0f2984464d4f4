"""The requester's side of a run: one agent (``single``/``tools``), Symphony's weighted vote, or the planner.

``Requester(mesh)`` holds this peer's ledger view, its bandit and its run logs; ``await r.run(task,
mode=..., k=...)`` returns ``{"answer", "run_id", ...}`` and every run streams its events (see
``events``). Modes:

- ``single``: beacon, one agent answers with chain of thought;
- ``tools``: beacon, one agent answers in its ReAct loop with its MCP tools;
- ``vote``: beacon for k agents, each answers independently (different seeds), weighted vote;
- ``plan``: the planner (``planner.Planner``): the model chooses each action (tool call, dispatch to
  agents, final answer) when the requester has a model endpoint (``llm=``), else rule-based planning.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..mesh.errors import MeshError, RemoteError
from ..mesh.frames import Message
from .beacon import Beacon, Selector
from .events import RunLog, Runs
from .ledger import Ledger
from .planner import Planner
from .react import LlmPlanner
from .vote import votes_from, weighted_vote

MODES = ("single", "tools", "vote", "plan")
# An agent at capacity refuses a task with Overloaded: busy, not failing. The task goes to the next bidder
# not asked yet, or (none left) to the same agent after a backoff, this many times at most.
BUSY_RETRIES = 3
BUSY_BACKOFF_S = 0.5


class Requester:
    def __init__(self, mesh: Any, *, ledger: Ledger | None = None, task_timeout: float = 120.0,
                 planner_options: dict[str, Any] | None = None, llm: LlmPlanner | None = None) -> None:
        """``llm`` (a ``react.LlmPlanner``): the model the planner asks for each action; without one it plans
        by rules."""
        self.mesh = mesh
        self.ledger = ledger or Ledger(mesh.state, mesh.identity)
        self.selector = Selector(self.ledger)
        self.runs = Runs()
        self.task_timeout = task_timeout
        self.planner = Planner(mesh, self.ledger, self.selector, llm=llm, **(planner_options or {}))

    async def run(self, task: str, *, mode: str = "single", k: int = 3, log: RunLog | None = None,
                  exclude: set[str] = frozenset()) -> dict[str, Any]:
        """Run ``task`` in ``mode``; agents in ``exclude`` (peer ids) are not asked."""
        if mode not in MODES:
            raise ValueError(f"mode is one of {', '.join(MODES)}, not {mode!r}")
        log = log or self.runs.new()
        if mode == "plan":
            out = await self.planner.run(task, log, mode="tools", exclude=exclude)
        else:
            out = await self._ask(task, mode, k if mode == "vote" else 1, log, exclude)
        return {**out, "run_id": log.run_id, "mode": mode}

    async def _ask(self, task: str, mode: str, k: int, log: RunLog, exclude: set[str]) -> dict[str, Any]:
        beacon = await asyncio.to_thread(Beacon.for_task, task, k=k)  # the embedder, off the event loop
        log.emit("beacon", beacon=beacon.id, task=task, k=k)
        bids = await self.selector.collect_bids(self.mesh, beacon, exclude=exclude)
        for b in bids:
            log.emit("bid", agent=b["agent"], score=round(float(b["score"]), 4))
        ranked = self.selector.rank(beacon, bids)
        chosen, spares = ranked[:beacon.k], ranked[beacon.k:]
        if not chosen:
            log.emit("final", answer=None, error="no agent bid")
            return {"answer": None, "error": "no agent bid"}
        for c in chosen:
            log.emit("select", agent=c["agent"], name=c.get("name"), value=round(float(c["value"]), 4))
        worker_mode = "tools" if mode == "tools" else "single"

        async def one(i: int, agent: str) -> dict[str, Any] | None:
            header = {"task": task, "mode": worker_mode, "temperature": 0.7 if mode == "vote" else 0.0, "seed": i}
            for attempt in range(BUSY_RETRIES + 1):
                log.emit("dispatch", agent=agent, mode=worker_mode)
                t0 = time.perf_counter()
                try:
                    reply = await self.mesh.call(agent, "agent.task", Message(header), timeout=self.task_timeout)
                    break
                except RemoteError as exc:
                    if exc.code != "Overloaded" or attempt == BUSY_RETRIES:
                        return self._failed(beacon, agent, exc, t0, log)
                    # Concurrent runs can choose the same agent before its load shows in a bid.
                    nxt = spares.pop(0)["agent"] if spares else agent
                    delay = BUSY_BACKOFF_S * 2 ** attempt if nxt == agent else 0.0
                    log.emit("retry", agent=agent, error=f"{exc.code}: {exc.remote_message}", attempt=attempt + 1,
                             backoff_s=delay, next=nxt)
                    await asyncio.sleep(delay)
                    agent = nxt
                except MeshError as exc:
                    return self._failed(beacon, agent, exc, t0, log)
            for call in reply.header.get("tool_calls") or []:
                log.emit("tool_call", agent=agent, tool=call.get("tool"), arguments=call.get("arguments"))
                log.emit("tool_result", agent=agent, tool=call.get("tool"), result=call.get("result"),
                         error=call.get("error"))
            return {**reply.header, "agent": agent, "seconds": time.perf_counter() - t0}

        replies = [r for r in await asyncio.gather(*(one(i, c["agent"]) for i, c in enumerate(chosen))) if r]
        tokens = sum(int(r.get("tokens") or 0) for r in replies)
        if mode != "vote":
            r = replies[0] if replies else None
            if r is not None:
                self._outcome(beacon, r["agent"], r.get("answer") is not None, time.perf_counter() - r["seconds"])
            answer = None if r is None else r.get("answer")
            log.emit("final", answer=answer, agent=None if r is None else r["agent"])
            return {"answer": answer, "tokens": tokens, "agents": [x["agent"] for x in replies]}
        votes = votes_from(replies, self.ledger.reputation)
        winner, tally = weighted_vote(votes)
        log.emit("vote", tally=tally, votes=[{"agent": v.agent, "answer": v.answer, "weight": round(v.weight, 4)}
                                             for v in votes])
        for v, r in zip(votes, replies, strict=True):
            self._outcome(beacon, v.agent, winner is not None and v.answer == winner,
                          time.perf_counter() - r["seconds"])
        log.emit("final", answer=winner)
        return {"answer": winner, "tally": tally, "tokens": tokens, "agents": [v.agent for v in votes]}

    def _failed(self, beacon: Beacon, agent: str, exc: MeshError, t0: float, log: RunLog) -> None:
        self._outcome(beacon, agent, False, t0)
        log.emit("error", agent=agent, error=f"{type(exc).__name__}: {exc}")

    def _outcome(self, beacon: Beacon, agent: str, ok: bool, t0: float) -> None:
        self.selector.learn(beacon, agent, ok)
        self.ledger.record_outcome(agent, f"{beacon.id}-{agent[:8]}", success=ok,
                                   latency_ms=(time.perf_counter() - t0) * 1000)
