"""``gradient-nb bench agents``: one agent alone vs tools, Symphony's vote and the planner, same model, same run.

Prints one JSON object. The task set is generated (seeded): arithmetic word problems, two-step
instructions and unit conversions, each with its exact answer (computed by this package's exact
calculator and converter). The bundled model is served by the mesh: ``--serving-peers`` serving peer
processes (``gradient-nb peer --serve``, as volunteers run) behind an entry peer with the OpenAI API
(``serve.cluster.start_local_cluster``); ``--llm URL`` uses any other OpenAI-compatible endpoint
instead. Five agents join that mesh, each answering with the served model and hosting the builtin MCP
tools; a requester peer runs every task in each mode:

- ``accuracy_single``: one agent (beacon-selected), chain of thought, no tools — the baseline;
- ``accuracy_tools``: one agent in its ReAct loop with MCP tools (constrained tool calls);
- ``accuracy_vote``: k agents (k = 3 and 5) answer independently, weighted vote (``accuracy_vote`` is
  k = 3; ``accuracy_vote_k5`` is k = 5);
- ``accuracy_plan``: the planner with LLM planning (the served model chooses each action: a mesh tool,
  dispatch to tool-using agents, or the final answer); ``accuracy_plan_rules``: the same planner with
  rule-based decomposition (its mode without a model endpoint).

With tokens and seconds per task for each mode, and ``plan_vs_single_accuracy`` = accuracy_plan /
accuracy_single (a single-agent accuracy of 0 counts as one right answer, so the ratio stays finite
and is, if anything, understated).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from fractions import Fraction
from typing import Any

WORD = [
    ("A box holds {a} pencils. How many pencils are in {b} boxes?", lambda a, b: a * b),
    ("Sam had {a} marbles and won {b} more. How many marbles does Sam have now?", lambda a, b: a + b),
    ("A tank holds {a} liters and {b} liters leak out. How many liters are left?", lambda a, b: a - b),
    ("A farmer plants {b} rows of {a} trees. How many trees does he plant?", lambda a, b: a * b),
]
MODES = ("single", "tools", "vote", "vote_k5", "plan", "plan_rules")
UNITS = [("km", "mi"), ("kg", "lb"), ("c", "f"), ("mi", "km"), ("lb", "kg"), ("ft", "m")]


def tasks(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (task, exact answer) pairs: word problems, two-step instructions, unit conversions."""
    from ..agents.tools import calculate, convert_units
    from ..agents.vote import normalize

    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            text, f = WORD[rng.randrange(len(WORD))]
            a, b = rng.randint(12, 99), rng.randint(2, 11)
            out.append((text.format(a=a, b=b), str(f(a, b))))
        elif kind == 1:
            a, b, c = rng.randint(11, 99), rng.randint(3, 19), rng.randint(2, 50)
            out.append((f"Compute {a}*{b}, then add {c} to that.", calculate(f"{a}*{b}+{c}")))
        else:
            src, dst = UNITS[rng.randrange(len(UNITS))]
            v = rng.randint(1, 200)
            out.append((f"Convert {v} {src} to {dst}.", normalize(str(convert_units(v, src, dst)))))
    return out


def correct(answer: Any, truth: str) -> bool:
    if answer is None:
        return False
    try:
        a, t = Fraction(str(answer)), Fraction(truth)
    except (ValueError, ZeroDivisionError):
        return str(answer).strip() == truth
    return abs(a - t) <= abs(t) * Fraction(1, 1000) + Fraction(1, 100)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from ..agents.agent import Agent
    from ..agents.ledger import Skill
    from ..agents.react import LlmPlanner
    from ..agents.requester import Requester
    from ..agents.tools import builtin_tools
    from ..agents.worker import LlmWorker
    from ..mesh.identity import Identity
    from ..mesh.peer import join
    from ..mesh.rendezvous import Rendezvous

    cluster = None
    url, model = args.llm, args.llm_model
    if url is None:  # the bundled model, served by peer processes of the mesh the agents join
        from ..serve.cluster import start_local_cluster

        cluster = await start_local_cluster(args.serving_peers, api=True)
        url, model = cluster.api.url, cluster.engine.model_name
    task_set = tasks(args.tasks, args.seed)
    skills = [Skill("arithmetic", "solve arithmetic word problems and compute numbers exactly"),
              Skill("unit conversion", "convert between units of length, mass and temperature")]
    async with contextlib.AsyncExitStack() as stack:
        if cluster is not None:
            stack.push_async_callback(cluster.stop)
            rv_url = cluster.rendezvous.url
        else:
            rv_url = (await stack.enter_async_context(Rendezvous())).url

        async def peer(name: str) -> Any:
            return await join(rv_url, name=name, identity=Identity.generate(), heartbeat=1.0, probe_seconds=0.05)

        agents = []
        for i in range(5):
            a = Agent(await peer(f"agent{i}"), name=f"agent{i}", skills=skills, servers={"tools": builtin_tools()},
                      capacity=args.concurrency, heartbeat=1.0, model=model)
            a.worker = LlmWorker(url, model=model, toolbox=a.local, max_tokens=args.max_tokens, timeout=600.0).run
            await a.start()
            agents.append(a)
        options = {"deadline_s": 600.0, "step_timeout": 600.0}
        req = Requester(await peer("requester"), task_timeout=600.0,
                        planner_options={**options, "max_steps": args.plan_turns},
                        llm=LlmPlanner(url, model=model, timeout=600.0))
        rules = Requester(req.mesh, ledger=req.ledger, task_timeout=600.0, planner_options=options)
        try:
            for _ in range(300):  # the agents' capability records reach the requester within a heartbeat or two
                if len(req.ledger.agents()) >= 5:
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the agents never appeared in the requester's ledger")
            result: dict[str, Any] = {"tasks": len(task_set), "model": model,
                                      "served_by": f"{args.serving_peers} mesh serving peer(s)" if cluster else url}
            modes = [("single", "single", 1, req), ("tools", "tools", 1, req), ("vote", "vote", 3, req),
                     ("vote_k5", "vote", 5, req), ("plan", "plan", 1, req), ("plan_rules", "plan", 1, rules)]
            modes = [m for m in modes if m[0] in args.modes]
            limit = asyncio.Semaphore(args.concurrency)
            for key, mode, k, who in modes:
                async def one(task: str, truth: str, mode: str = mode, k: int = k, who: Any = who) -> tuple[bool, int]:
                    async with limit:
                        out = await who.run(task, mode=mode, k=k)
                    return correct(out.get("answer"), truth), int(out.get("tokens") or 0)

                t0 = time.perf_counter()
                outs = await asyncio.gather(*(one(t, a) for t, a in task_set))
                secs = time.perf_counter() - t0
                result[f"accuracy_{key}"] = sum(ok for ok, _ in outs) / len(outs)
                result[f"tokens_per_task_{key}"] = sum(n for _, n in outs) / len(outs)
                result[f"seconds_per_task_{key}"] = secs / len(outs)
            floor = 1 / len(task_set)
            if "accuracy_plan" in result and "accuracy_single" in result:
                result["plan_vs_single_accuracy"] = result["accuracy_plan"] / max(result["accuracy_single"], floor)
            return result
        finally:
            for a in agents:
                await a.stop()
                await a.mesh.leave()
            await req.mesh.leave()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradient-nb bench agents", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=100, help="generated tasks (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=160, help="chain-of-thought tokens per answer")
    p.add_argument("--concurrency", type=int, default=8, help="tasks in flight at once (batched by the engine)")
    p.add_argument("--plan-turns", type=int, default=4,
                   help="the LLM planner's budget: turns, and tool calls plus dispatches (default: %(default)s)")
    p.add_argument("--serving-peers", type=int, default=1,
                   help="peer processes that serve the bundled model for the mesh (default: %(default)s)")
    p.add_argument("--llm", default=None, help="OpenAI-compatible base URL (default: the bundled model served by "
                   "--serving-peers mesh peers)")
    p.add_argument("--llm-model", default="", help="model name at --llm")
    p.add_argument("--modes", default=",".join(MODES), help="modes to run, comma-separated (default: all: %(default)s)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes takes some of {', '.join(MODES)}")
    if args.tasks < 1:
        p.error("--tasks must be at least 1")
    print(json.dumps(asyncio.run(_run(args))))
    return 0
