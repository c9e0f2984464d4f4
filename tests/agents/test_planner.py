"""The planner and the vote over real mesh peers: in-process agents for capacity, parallelism and retries,
real agent processes for an agent killed mid-task."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

from gradient_nb.agents.agent import Agent
from gradient_nb.agents.ledger import Skill
from gradient_nb.agents.requester import Requester
from gradient_nb.agents.vote import Vote, extract_answer, weighted_vote
from gradient_nb.agents.worker import ToolWorker
from gradient_nb.mesh.demo import read_event
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.rendezvous import Rendezvous
from tests.agents.slow_tools import flaky
from tests.agents.slow_tools import server as slow_server
from tests.agents.test_mcp_mesh import spawn_agent
from tests.conftest import HEARTBEAT, PEER_TIMEOUT

ARITH = [Skill("arithmetic", "compute sums, products and differences of numbers exactly")]


async def _join(url: str, name: str):
    return await join(url, name=name, identity=Identity.generate(), heartbeat=HEARTBEAT, peer_timeout=PEER_TIMEOUT,
                      probe_seconds=0.05)


async def _agent(url: str, name: str, server, capacity: int) -> Agent:
    mesh = await _join(url, name)
    agent = Agent(mesh, name=name, skills=ARITH, servers={"tools": server}, capacity=capacity, heartbeat=HEARTBEAT)
    agent.worker = ToolWorker(agent.local).run
    await agent.start()
    return agent


async def _wait_agents(req: Requester, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(set(req.ledger.agents()) - {req.mesh.id}) < n:
        assert time.monotonic() < deadline, "agents never appeared in the ledger"
        await asyncio.sleep(0.1)


def test_extractor_and_weighted_vote() -> None:
    assert extract_answer("12 * 7 = 84, plus 5 is 89.\nAnswer: 89") == "89"
    assert extract_answer("so the answer is 1,250.50 dollars") == "1250.5"
    assert extract_answer("I think it is 41, no, 42") == "42"
    assert extract_answer("no idea") is None
    winner, tally = weighted_vote([Vote("a", "42", 0.9), Vote("b", "41", 0.5), Vote("c", "41", 0.3),
                                   Vote("d", None, 5.0)])
    assert winner == "42" and tally == {"42": 0.9, "41": 0.8}


async def test_parallel_steps_within_capacity_retries_and_votes() -> None:
    async with Rendezvous() as rv:
        agents = [await _agent(rv.url, "one", slow_server, 1), await _agent(rv.url, "two", slow_server, 2)]
        req = Requester(await _join(rv.url, "requester"), planner_options={"backoff": 0.05})
        try:
            await _wait_agents(req, 2)
            # Five independent steps over capacities 1 and 2: parallel, never over capacity.
            out = await req.run("Compute 2*3; compute 4*5; compute 6*7; compute 8*9; compute 10*11", mode="plan")
            assert [s["answer"] for s in out["steps"]] == ["6", "20", "42", "72", "110"]
            caps = {a.mesh.id: a.capacity for a in agents}
            assert all(req.planner.peak[a] <= caps[a] for a in req.planner.peak), req.planner.peak
            assert all(a.peak_load <= a.capacity for a in agents)
            assert sum(req.planner.peak.values()) >= 2  # steps did overlap
            # A step that depends on the one before it gets its answer.
            out = await req.run("Compute 12*7, then add 5 to that", mode="plan")
            assert out["answer"] == "89"
            log = req.runs.runs[out["run_id"]]
            assert log.kinds()[0] == "plan" and log.kinds()[-1] == "final"
            assert {"beacon", "bid", "select", "dispatch", "tool_call", "tool_result"} <= set(log.kinds())
            # Vote over both agents.
            out = await req.run("What is 17 * 23?", mode="vote", k=2)
            assert out["answer"] == "391" and len(out["agents"]) == 2
            assert "vote" in req.runs.runs[out["run_id"]].kinds()
        finally:
            for a in agents:
                await a.stop()
                await a.mesh.leave()
            await req.mesh.leave()


async def test_a_failing_tool_is_retried_with_backoff() -> None:
    async with Rendezvous() as rv:
        agent = await _agent(rv.url, "flaky", flaky(2), 1)
        req = Requester(await _join(rv.url, "requester"), planner_options={"backoff": 0.05, "max_retries": 3})
        try:
            await _wait_agents(req, 1)
            out = await req.run("Compute 6*7", mode="plan")
            assert out["answer"] == "42"
            log = req.runs.runs[out["run_id"]]
            retries = [e.data for e in log.events if e.kind == "retry"]
            assert [r["attempt"] for r in retries] == [1, 2] and "Transient" in retries[0]["error"]
            assert retries[1]["backoff_s"] == 2 * retries[0]["backoff_s"]
            assert req.ledger.history(agent.mesh.id).failures == 2
        finally:
            await agent.stop()
            await agent.mesh.leave()
            await req.mesh.leave()


async def test_concurrent_runs_that_pick_a_busy_agent_go_to_the_next_bidder() -> None:
    """Runs started together rank the same agent first (its load shows in no bid yet); at capacity it
    answers Overloaded, and the task goes to the next bidder instead of ending without an answer."""
    async with Rendezvous() as rv:
        agents = [await _agent(rv.url, f"solo{i}", slow_server, 1) for i in range(2)]
        req = Requester(await _join(rv.url, "requester"))
        try:
            await _wait_agents(req, 2)
            outs = await asyncio.gather(*(req.run(f"Compute {n}*7", mode="tools") for n in (2, 3, 4)))
            assert [o["answer"] for o in outs] == ["14", "21", "28"], outs
            events = [e for o in outs for e in req.runs.runs[o["run_id"]].events]
            assert "error" not in {e.kind for e in events}
            retries = [e.data for e in events if e.kind == "retry"]
            assert retries and all("Overloaded" in r["error"] for r in retries), retries
            assert all(a.peak_load <= a.capacity for a in agents)
            # Busy is not failing: no agent's history holds a failure.
            assert all(req.ledger.history(a.mesh.id).failures == 0 for a in agents)
        finally:
            for a in agents:
                await a.stop()
                await a.mesh.leave()
            await req.mesh.leave()


async def test_an_agent_killed_mid_task_is_replanned(procs) -> None:
    _, url = procs.rendezvous()
    env_delay = {"SLOW_TOOLS_DELAY": "3"}
    os.environ.update(env_delay)  # the agent processes inherit it: their calculator takes 3 s
    try:
        procs_ = [spawn_agent(procs, url, f"slow{i}", "--tools", "tests.agents.slow_tools",
                              "--skill", "arithmetic=compute products of numbers exactly") for i in range(2)]
    finally:
        os.environ.pop("SLOW_TOOLS_DELAY")
    by_id = {}
    for p in procs_:
        by_id[(await read_event(p, timeout=90))["peer_id"]] = p
    req = Requester(await _join(url, "requester"))
    try:
        await _wait_agents(req, 2)
        log = req.runs.new()
        run = asyncio.ensure_future(req.run("Compute 6*7", mode="plan", log=log))
        deadline = time.monotonic() + 30
        while "dispatch" not in log.kinds():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        victim = next(e.data["agent"] for e in log.events if e.kind == "dispatch")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(by_id[victim].pid, signal.SIGKILL)
        out = await asyncio.wait_for(run, 60)
        assert out["answer"] == "42", (out.get("error"), [(e.kind, e.data) for e in log.events])
        replans = [e.data for e in log.events if e.kind == "replan"]
        assert [r["agent"] for r in replans] == [victim]
        finishers = [e.data["agent"] for e in log.events if e.kind == "dispatch"]
        assert finishers[-1] != victim
    finally:
        await req.mesh.leave()
    assert sys.executable
