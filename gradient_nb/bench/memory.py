"""``gradient-nb bench memory``: no memory vs a store of every trajectory vs SEDM, same model, same run.

Prints one JSON object. Task families are the agents bench's generated ones (``bench.agents.tasks``):
``word`` (arithmetic word problems), ``compute`` (two-step instructions), ``convert`` (unit
conversions), each task with its exact answer. Every family's tasks are split three ways, disjoint:
*train* (the agent's experience), *held* (held-back neighbours for admission tests) and *test*.
The bundled model is served in this process behind the OpenAI API; the solver is the memory layer's
replay solver (one constrained tool call, greedy, seed 0; ``agents.memory.admission``).

1. Experience, two trajectories per train task: the solver's own answer without memory, and a run of
   the agents' planner (``mode="plan"``) over a tool-using agent of a local mesh (``ToolWorker``: the
   exact tools, no model), whose steps' tool calls are the trajectory.
2. ``naive``: every trajectory with a tool call becomes an entry of the store, right or wrong (a worked
   example of the solver's call, or the planner's calls folded into one, ``distill_plan``); a task gets
   the top ``--k`` by embedding similarity in its prompt.
3. ``sedm``: each *successful* trajectory's item is a candidate, admitted only if the A/B replay on its
   task and the ``--neighbours`` most similar held tasks scores higher with it (signed replay record);
   admitted entries go to the controller (``Memory``: k = 1, similarity floor, utility × similarity,
   budget); on test tasks the controller retrieves, and learns from each outcome.
4. Transfer: every entry admitted on ``--transfer-from`` is abstracted into a general insight for
   ``--transfer-to`` and must pass its own admission test there; the target family's test tasks are
   answered with the insights that passed (``transfer_accuracy_sedm``) and without (``transfer_accuracy_none``).
5. Re-verification: ``--verify`` admitted entries are re-checked by a fresh solver (empty cache), as a
   second peer would (``verified``).

Keys: ``accuracy_none``, ``accuracy_naive``, ``accuracy_sedm``, ``tokens_none``, ``tokens_naive``,
``tokens_sedm`` (prompt + completion tokens per test task), ``sedm_vs_naive_accuracy``,
``sedm_vs_naive_tokens`` (ratios in this run), per-family accuracies, admission counts, and the transfer
figures. The paper's claim: ``accuracy_sedm >= accuracy_naive`` with ``tokens_sedm < tokens_naive``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import numpy as np

FAMILIES = ("word", "compute", "convert")


def family_tasks(per_family: int, seed: int) -> dict[str, list[dict[str, str]]]:
    """``per_family`` distinct (task, truth) pairs of each family, generated (seeded)."""
    from .agents import tasks

    out: dict[str, list[dict[str, str]]] = {f: [] for f in FAMILIES}
    seen: set[str] = set()
    n, s = 3 * per_family * 2, seed
    while min(len(v) for v in out.values()) < per_family:
        for i, (t, a) in enumerate(tasks(n, s)):
            fam = FAMILIES[i % 3]
            if t not in seen and len(out[fam]) < per_family:
                seen.add(t)
                out[fam].append({"task": t, "truth": a})
        s += 1000
    return out


async def plan_trajectories(train: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict, list[dict], bool]]:
    """Run each (family, task) through the agents' planner on a local mesh with one tool agent; each
    trajectory is (family, task, the tool calls with their results, success)."""
    from ..agents.agent import Agent
    from ..agents.ledger import Skill
    from ..agents.memory.records import matches
    from ..agents.requester import Requester
    from ..agents.tools import builtin_tools
    from ..agents.worker import ToolWorker
    from ..mesh.identity import Identity
    from ..mesh.peer import join
    from ..mesh.rendezvous import Rendezvous

    skills = [Skill("arithmetic", "solve arithmetic word problems and compute numbers exactly"),
              Skill("unit conversion", "convert between units of length, mass and temperature")]
    out = []
    async with Rendezvous() as rv:
        async def peer(name: str) -> Any:
            return await join(rv.url, name=name, identity=Identity.generate(), heartbeat=1.0, probe_seconds=0.05)

        agent = Agent(await peer("tool-agent"), name="tool-agent", skills=skills, servers={"tools": builtin_tools()},
                      capacity=2, heartbeat=1.0)
        agent.worker = ToolWorker(agent.local).run
        await agent.start()
        req = Requester(await peer("planner"), planner_options={"backoff": 0.05, "max_retries": 1})
        try:
            for _ in range(300):
                if agent.mesh.id in req.ledger.agents():
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the tool agent never appeared in the planner's ledger")
            for fam, t in train:
                res = await req.run(t["task"], mode="plan")
                calls, pending = [], None
                for ev in req.runs.runs[res["run_id"]].events:
                    if ev.kind == "tool_call":
                        pending = ev.data
                    elif ev.kind == "tool_result" and pending is not None and ev.data.get("error") is None:
                        calls.append({"tool": ev.data["tool"], "arguments": pending["arguments"],
                                      "result": ev.data["result"]})
                ok = matches(res.get("answer"), t["truth"])
                out.append((fam, t, calls if res.get("answer") is not None else [], ok))
        finally:
            await agent.stop()
            await agent.mesh.leave()
            await req.mesh.leave()
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from ..agents.beacon import embed
    from ..agents.memory.admission import ToolCallSolver, abstract, admit, distill, distill_plan, verify_entry
    from ..agents.memory.controller import Memory
    from ..agents.memory.records import check_entry, matches
    from ..mesh.identity import Identity

    families = [f for f in args.families.split(",") if f]
    if not set(families) <= set(FAMILIES) or args.transfer_to not in FAMILIES or args.transfer_from not in families:
        raise SystemExit(f"families are among {FAMILIES}; --transfer-from is one of --families")
    per = args.train + args.held + args.test
    pool = family_tasks(per, args.seed)
    split = {f: (pool[f][:args.train], pool[f][args.train:args.train + args.held], pool[f][args.train + args.held:])
             for f in FAMILIES}

    engine = server = None
    url, model, model_hash = args.llm, args.llm_model, args.model_hash
    if url is None:
        from ..models import DEFAULT_MODEL
        from ..serve.api import serve_api
        from ..serve.shard import LocalEngine

        engine = LocalEngine(DEFAULT_MODEL)
        engine.model_name = model = DEFAULT_MODEL
        model_hash = engine.info.content_hash
        server = await serve_api(engine)
        url = server.url
    solver = ToolCallSolver(url, model=model, model_hash=model_hash, max_tokens=args.max_tokens)
    identity = Identity.generate()
    t_start = time.perf_counter()
    try:
        # 1. experience: the solver's own attempt and the planner's run of every train task
        experience = []  # (family, task, item or None, success)
        for fam in families:
            for t in split[fam][0]:
                a = await solver.solve(t["task"])
                experience.append((fam, t, distill(fam, t["task"], a), matches(a.answer, t["truth"])))
        planned = await plan_trajectories([(fam, t) for fam in families for t in split[fam][0]])
        experience += [(fam, t, distill_plan(fam, t["task"], calls), ok) for fam, t, calls, ok in planned]
        # 2. naive: every trajectory with a call, right or wrong
        naive = [(it.text, embed(it.key)) for _, _, it, _ in experience if it is not None]

        def nearest(fam: str, task: str, n: int) -> list[dict[str, str]]:
            held = split[fam][1]
            q = embed(task)
            return sorted(held, key=lambda h: -float(np.dot(q, embed(h["task"]))))[:n]

        # 3. sedm: the successful trajectories' items, admitted by replay
        memory = Memory(budget=args.budget, k=1, min_similarity=args.min_similarity)
        admitted, candidates, entries = 0, 0, []
        for fam, t, item, ok in experience:
            if item is None or not ok:
                continue
            candidates += 1
            verdict = await admit(solver, identity, item, [t, *nearest(fam, t["task"], args.neighbours)])
            if verdict.admitted:
                admitted += 1
                entry = check_entry(verdict.record, identity.peer_id)
                entries.append(entry)
                memory.add(entry)

        async def evaluate(fam: str, mode: str, mem: Memory | None = None) -> list[tuple[bool, int]]:
            outs = []
            for i, t in enumerate(split[fam][2]):
                if mode == "none":
                    texts, ids = [], []
                elif mode == "naive":
                    q = embed(t["task"])
                    texts = [x for x, _ in sorted(naive, key=lambda n: -float(np.dot(q, n[1])))[:args.k]]
                    ids = []
                else:
                    assert mem is not None
                    got = mem.retrieve(t["task"])
                    texts, ids = [e.item.text for e in got], [e.id for e in got]
                a = await solver.solve(t["task"], texts)
                ok = matches(a.answer, t["truth"])
                if mem is not None:
                    mem.feedback(ids, ok)
                    if (i + 1) % 4 == 0:
                        mem.consolidate()
                outs.append((ok, a.tokens))
            return outs

        result: dict[str, Any] = {"model": model, "families": families, "train_per_family": args.train,
                                  "held_per_family": args.held, "test_per_family": args.test, "k_naive": args.k,
                                  "max_tokens": args.max_tokens, "seed": args.seed, "by_family": {}}
        totals: dict[str, list[tuple[bool, int]]] = {"none": [], "naive": [], "sedm": []}
        for fam in families:
            row = {}
            for mode in ("none", "naive", "sedm"):
                outs = await evaluate(fam, mode, memory if mode == "sedm" else None)
                totals[mode] += outs
                row[mode] = sum(ok for ok, _ in outs) / len(outs)
            result["by_family"][fam] = row
        for mode, outs in totals.items():
            result[f"accuracy_{mode}"] = sum(ok for ok, _ in outs) / len(outs)
            result[f"tokens_{mode}"] = sum(n for _, n in outs) / len(outs)
        floor = 1 / len(totals["none"])
        result["sedm_vs_naive_accuracy"] = result["accuracy_sedm"] / max(result["accuracy_naive"], floor)
        result["sedm_vs_naive_tokens"] = result["tokens_sedm"] / result["tokens_naive"]
        result.update(trajectories=len(experience), successful=sum(ok for *_, ok in experience),
                      candidates=candidates, admitted=admitted, store_naive=len(naive), store_sedm=len(memory),
                      entries_retrieved=sum(s.retrieved for s in memory.slots.values()))

        # 4. transfer
        src, dst = args.transfer_from, args.transfer_to
        moved = Memory(budget=args.budget, k=1, min_similarity=args.min_similarity)
        t_cand = t_adm = 0
        for e in [e for e in entries if e.item.family == src]:
            insight = abstract(e.item, dst)
            t_cand += 1
            probe = nearest(dst, insight.text, args.neighbours + 1)
            verdict = await admit(solver, identity, insight, probe)
            if verdict.admitted:
                t_adm += 1
                moved.add(check_entry(verdict.record, identity.peer_id))
        none_dst = await evaluate(dst, "none")
        moved_dst = await evaluate(dst, "sedm", moved)
        result.update(transfer_from=src, transfer_to=dst, transfer_candidates=t_cand, transfer_admitted=t_adm,
                      transfer_accuracy_none=sum(ok for ok, _ in none_dst) / len(none_dst),
                      transfer_accuracy_sedm=sum(ok for ok, _ in moved_dst) / len(moved_dst))

        # 5. a second solver (empty cache) re-runs admitted entries' replays
        fresh = ToolCallSolver(url, model=model, model_hash=model_hash, max_tokens=args.max_tokens)
        try:
            checks = [await verify_entry(e.record, fresh) for e in entries[:args.verify]]
        finally:
            await fresh.aclose()
        result["verified"] = f"{sum(c.ok for c in checks)}/{len(checks)}"
        result["completions"] = solver.calls + fresh.calls
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        return result
    finally:
        await solver.aclose()
        if server is not None:
            await server.stop()
        if engine is not None:
            await engine.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradient-nb bench memory", description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: %(default)s)")
    p.add_argument("--train", type=int, default=4, help="experience tasks per family (default: %(default)s)")
    p.add_argument("--held", type=int, default=4, help="held-back neighbour pool per family")
    p.add_argument("--test", type=int, default=6, help="test tasks per family")
    p.add_argument("--neighbours", type=int, default=2, help="held-back neighbours in each admission test")
    p.add_argument("--k", type=int, default=3, help="entries the naive store puts in a prompt")
    p.add_argument("--budget", type=int, default=32, help="the SEDM controller's size budget")
    p.add_argument("--min-similarity", type=float, default=0.5)
    p.add_argument("--transfer-from", default="compute")
    p.add_argument("--transfer-to", default="word")
    p.add_argument("--verify", type=int, default=1, help="admitted entries re-verified by a fresh solver")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm", default=None, help="OpenAI-compatible base URL (default: serve the bundled model here)")
    p.add_argument("--llm-model", default="")
    p.add_argument("--model-hash", default="0" * 64, help="sha256 of the weights at --llm (for the replay record)")
    args = p.parse_args(argv)
    if min(args.train, args.held, args.test) < 1 or args.neighbours > args.held:
        p.error("--train, --held, --test are at least 1 and --neighbours at most --held")
    print(json.dumps(asyncio.run(_run(args))))
    return 0
