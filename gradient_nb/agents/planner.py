"""The planner (Gradientsys): decompose a task, dispatch the steps to agents, retry, replan, finish.

1. **Decompose** (``decompose``) the task into steps: one per sentence or clause (split at ``;``,
   ``then``, sentence ends). A step that refers back ("that", "it", "the result") depends on the step
   before it and receives its answer in place of the reference. Steps without dependencies between
   them run in parallel.
2. **Dispatch** each ready step: a beacon to the mesh, bids, a selection (``Selector``: recomputed match
   + LinUCB), then ``agent.task`` on the chosen agent. The planner counts the steps it has in flight on
   each agent and never sends an agent more than the ``capacity`` of its signed capability record; a
   step that finds every matching agent full waits for a slot (the agents refuse over-capacity work
   themselves too).
3. **Retry and replan.** A step whose agent answers with an error (a failing tool, an overloaded
   agent) is retried after an exponential backoff (``backoff · 2^attempt``), up to ``max_retries``
   times; a step whose agent vanished (the link dropped, the call timed out, the agent left the ledger)
   is **replanned**: it goes back to the beacon with that agent excluded, without spending a retry.
4. **Budget.** At most ``max_steps`` dispatches in all, and a deadline for the whole run; past either,
   the run ends with the steps done so far and an error.

Every decision is an event in the run's log (``plan``, ``beacon``, ``bid``, ``select``, ``dispatch``,
``tool_call``, ``tool_result``, ``retry``, ``replan``, ``final``), which ``events.EventServer`` streams.
Outcomes are recorded in the ledger (signed by this requester) and fed to the bandit.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..mesh.errors import CallTimeout, MeshError, PeerUnreachable, RemoteError
from ..mesh.frames import Message
from .beacon import Beacon, Selector
from .events import RunLog
from .ledger import Ledger

_SPLIT = re.compile(r"(?:;|\.\s+|\?\s+|,?\s+then\s+|\s+and then\s+)", re.I)
_REF = re.compile(r"\b(that|it|the result|this)\b", re.I)


@dataclass
class Step:
    id: str
    task: str
    deps: list[str] = field(default_factory=list)
    answer: str | None = None
    agent: str | None = None
    attempts: int = 0
    error: str | None = None


def decompose(task: str) -> list[Step]:
    """The task's steps: one per clause; a clause that refers back depends on the one before."""
    parts = [p.strip(" .?") for p in _SPLIT.split(task) if p and p.strip(" .?")]
    steps: list[Step] = []
    for i, text in enumerate(parts or [task]):
        sid = f"s{i + 1}"
        if steps and _REF.search(text):
            text = _REF.sub("{" + steps[-1].id + "}", text, count=1)
            steps.append(Step(sid, text, [steps[-1].id]))
        else:
            steps.append(Step(sid, text))
    return steps


class PlanFailed(Exception):
    """The plan ran out of its step budget, deadline or retries."""


class Planner:
    def __init__(self, mesh: Any, ledger: Ledger, selector: Selector | None = None, *, max_steps: int = 20,
                 deadline_s: float = 120.0, max_retries: int = 2, backoff: float = 0.2,
                 step_timeout: float = 60.0) -> None:
        self.mesh, self.ledger = mesh, ledger
        self.selector = selector or Selector(ledger)
        self.max_steps, self.deadline_s, self.max_retries = max_steps, deadline_s, max_retries
        self.backoff, self.step_timeout = backoff, step_timeout
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}  # the most steps this planner ever had on each agent at once
        self._freed = asyncio.Event()

    async def run(self, task: str, log: RunLog, *, mode: str = "tools") -> dict[str, Any]:
        steps = decompose(task)
        log.emit("plan", steps=[{"id": s.id, "task": s.task, "deps": s.deps} for s in steps])
        self._dispatches = 0
        self._deadline = time.monotonic() + self.deadline_s
        done: dict[str, Step] = {}
        running: dict[asyncio.Task, Step] = {}
        try:
            while len(done) < len(steps):
                for s in steps:
                    if s.id not in done and s not in running.values() and all(d in done for d in s.deps):
                        text = s.task.format(**{d: done[d].answer for d in s.deps})
                        running[asyncio.ensure_future(self._run_step(s, text, mode, log))] = s
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise PlanFailed(f"the deadline of {self.deadline_s:g} s passed")
                finished, _ = await asyncio.wait(running, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for t in finished:
                    s = running.pop(t)
                    t.result()  # a step's PlanFailed ends the plan
                    done[s.id] = s
        except BaseException as exc:
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            if isinstance(exc, PlanFailed | MeshError):
                log.emit("final", answer=None, error=str(exc), steps=len(done))
                return {"answer": None, "error": str(exc), "steps": [vars(s) for s in steps]}
            raise
        answer = steps[-1].answer
        log.emit("final", answer=answer, steps=len(steps), dispatches=self._dispatches)
        return {"answer": answer, "steps": [vars(s) for s in steps], "dispatches": self._dispatches}

    def _capacity(self, agent: str) -> int:
        cap = self.ledger.agents().get(agent)
        return cap.capacity if cap is not None else 0

    async def _run_step(self, step: Step, text: str, mode: str, log: RunLog) -> None:
        excluded: set[str] = set()
        while True:
            if self._dispatches >= self.max_steps:
                raise PlanFailed(f"the step budget of {self.max_steps} dispatches is spent")
            if time.monotonic() > self._deadline:
                raise PlanFailed(f"the deadline of {self.deadline_s:g} s passed")
            beacon = Beacon.for_task(text, k=1, deadline_s=2.0)
            log.emit("beacon", step=step.id, beacon=beacon.id, task=text)
            bids = await self.selector.collect_bids(self.mesh, beacon, exclude=excluded)
            for b in bids:
                log.emit("bid", step=step.id, agent=b["agent"], score=round(float(b["score"]), 4))
            free = [b for b in bids if self.in_flight.get(b["agent"], 0) < self._capacity(b["agent"])]
            chosen = self.selector.choose(beacon, free)
            if not chosen:
                if not bids and not self.ledger.agents().keys() - excluded - {self.mesh.id}:
                    raise PlanFailed(f"no agent is left for step {step.id}")
                # Every agent that bid is busy (or none bid yet): wait for a slot, then ask again.
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), 1.0)
                except TimeoutError:
                    pass
                continue
            agent = chosen[0]["agent"]
            log.emit("select", step=step.id, agent=agent, name=chosen[0].get("name"),
                     value=round(float(chosen[0]["value"]), 4))
            self.in_flight[agent] = self.in_flight.get(agent, 0) + 1
            self.peak[agent] = max(self.peak.get(agent, 0), self.in_flight[agent])
            self._dispatches += 1
            step.agent = agent
            log.emit("dispatch", step=step.id, agent=agent, task=text)
            t0 = time.perf_counter()
            try:
                reply = await self.mesh.call(agent, "agent.task", Message({"task": text, "mode": mode}),
                                             timeout=min(self.step_timeout, max(0.1, self._deadline - time.monotonic())))
            except (PeerUnreachable, CallTimeout) as exc:
                # The agent vanished (or went silent): place the step elsewhere, no retry spent.
                self._outcome(beacon, agent, False, t0)
                excluded.add(agent)
                log.emit("replan", step=step.id, agent=agent, reason=type(exc).__name__)
                continue
            except RemoteError as exc:
                self._outcome(beacon, agent, False, t0)
                step.attempts += 1
                step.error = f"{exc.code}: {exc.remote_message}"
                if step.attempts > self.max_retries:
                    raise PlanFailed(f"step {step.id} failed {step.attempts} times: {step.error}") from None
                delay = self.backoff * 2 ** (step.attempts - 1)
                log.emit("retry", step=step.id, agent=agent, error=step.error, attempt=step.attempts,
                         backoff_s=delay)
                await asyncio.sleep(delay)
                continue
            finally:
                self.in_flight[agent] -= 1
                self._freed.set()
            self._outcome(beacon, agent, True, t0)
            for call in reply.header.get("tool_calls") or []:
                log.emit("tool_call", step=step.id, agent=agent, tool=call.get("tool"), arguments=call.get("arguments"))
                log.emit("tool_result", step=step.id, agent=agent, tool=call.get("tool"),
                         result=call.get("result"), error=call.get("error"))
            step.answer = reply.header.get("answer")
            step.error = None
            return

    def _outcome(self, beacon: Beacon, agent: str, ok: bool, t0: float) -> None:
        self.selector.learn(beacon, agent, ok)
        self.ledger.record_outcome(agent, f"{beacon.id}-{agent[:8]}", success=ok,
                                   latency_ms=(time.perf_counter() - t0) * 1000)
