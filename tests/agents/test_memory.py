"""SEDM's verifiable memory: admission by replay on the real bundled model, forged and altered records
refused (signature, content address, re-run), the controller's budget, and a second mesh peer that finds
an entry through the DHT and re-verifies it by re-running the replay on its own solver."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from IPython.core.error import UsageError

from gradient_nb.agents.memory.admission import ToolCallSolver, Verdict, abstract, admit, verify_entry
from gradient_nb.agents.memory.controller import Memory
from gradient_nb.agents.memory.records import Item, Replay, check_entry, entry_record
from gradient_nb.agents.memory.shared import SharedMemory
from gradient_nb.mesh.errors import SignatureInvalid
from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.rendezvous import Rendezvous
from gradient_nb.models import DEFAULT_MODEL
from gradient_nb.notebook import agents_memory
from gradient_nb.notebook.agents_magic import parse_run
from gradient_nb.serve.api import serve_api
from gradient_nb.serve.shard import LocalEngine
from tests.conftest import HEARTBEAT, PEER_TIMEOUT

MAX_TOKENS = 32
# The origin task and one held-back neighbour; without memory the 135M model calls calculate("43*6,"),
# which forgets the second step.
TASKS = [{"task": "Compute 43*6, then add 33 to that.", "truth": "291"},
         {"task": "Compute 73*3, then add 26 to that.", "truth": "245"}]
HELPFUL = Item("example", "compute", 'Task: Compute 31*7, then add 12 to that. Call: calculate(expression="31*7+12")',
               origin="Compute 31*7, then add 12 to that.")
USELESS = Item("example", "compute", "Task: Name the capital of France. Answer: Paris.")
AUTHOR = Identity.generate()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served() -> AsyncIterator[tuple[str, str]]:
    engine = LocalEngine(DEFAULT_MODEL)
    engine.model_name = DEFAULT_MODEL
    server = await serve_api(engine)
    yield server.url, engine.info.content_hash
    await server.stop()
    await engine.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solver(served: tuple[str, str]) -> AsyncIterator[ToolCallSolver]:
    s = ToolCallSolver(served[0], model=DEFAULT_MODEL, model_hash=served[1], max_tokens=MAX_TOKENS)
    yield s
    await s.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def admitted(solver: ToolCallSolver) -> Verdict:
    return await admit(solver, AUTHOR, HELPFUL, TASKS)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_an_item_that_helps_is_admitted_one_that_does_not_is_refused(solver, admitted) -> None:
    assert admitted.admitted, admitted.replay
    assert admitted.replay.score_with > admitted.replay.score_without
    entry = check_entry(admitted.record, AUTHOR.peer_id, name=HELPFUL.id)
    assert entry.item == HELPFUL and entry.replay.model_hash == solver.model_hash
    assert entry.replay.tasks == TASKS and entry.replay.decoding == "greedy"

    refused = await admit(solver, AUTHOR, USELESS, TASKS)
    assert not refused.admitted and refused.record is None
    assert refused.replay.score_with <= refused.replay.score_without, refused.replay
    # the same rule refuses an item that ties: a gain must be strictly positive
    tie = await admit(solver, AUTHOR, HELPFUL, TASKS, min_gain=admitted.gain)
    assert not tie.admitted


def _resign(record: dict[str, Any], identity: Identity, **changes: Any) -> dict[str, Any]:
    payload = {**record["payload"], **changes}
    return sign_record(identity, payload)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_forged_or_altered_replay_records_are_refused(solver, admitted) -> None:
    good = admitted.record
    ok = await verify_entry(good, solver, owner=AUTHOR.peer_id)
    assert ok.ok, ok.reason

    # altered after signing: the signature no longer covers it
    altered = {**good, "payload": {**good["payload"], "replay": {**good["payload"]["replay"], "score_without": 0.5}}}
    assert "record:" in (await verify_entry(altered, solver)).reason
    # signed by another key than the slot's owner (or than the author it names)
    other = Identity.generate()
    assert not (await verify_entry(_resign(good, other), solver, owner=AUTHOR.peer_id)).ok
    assert not (await verify_entry(_resign(good, other, peer_id=other.peer_id), solver, owner=AUTHOR.peer_id)).ok
    # an item swapped under the old id: the content address no longer matches
    swapped = _resign(good, AUTHOR, item=USELESS.payload())
    with pytest.raises(SignatureInvalid, match="hash of its item"):
        check_entry(swapped, AUTHOR.peer_id)
    # the author itself forges: the useless item with the helpful item's winning answers, consistently
    # scored and validly signed. Only the re-run can tell, and it does.
    forged = _resign(good, AUTHOR, item=USELESS.payload(), id=USELESS.id)
    check_entry(forged, AUTHOR.peer_id)  # every check without a model passes
    v = await verify_entry(forged, solver, owner=AUTHOR.peer_id)
    assert not v.ok and v.reason.startswith("re-run"), v.reason
    # scores that the recorded answers do not give
    rep = dict(good["payload"]["replay"])
    rep["answers_with"] = [None] * len(TASKS)
    v = await verify_entry(_resign(good, AUTHOR, replay=rep), solver)
    assert not v.ok and "scores" in v.reason
    # a verifier with other weights cannot re-run it, and says so rather than accepting it
    other_model = ToolCallSolver(solver.base_url, model=DEFAULT_MODEL, model_hash="f" * 64, max_tokens=MAX_TOKENS)
    v = await verify_entry(good, other_model)
    assert not v.ok and v.reason.startswith("model") and other_model.calls == 0


def test_a_run_spec_takes_memory() -> None:
    assert parse_run("task: What is 2+2?\nmemory: true")["memory"] is True
    assert "memory" not in parse_run("task: What is 2+2?")
    for body in ("task: x\nmemory: yes please", "task: x\nmode: plan\nmemory: true"):
        with pytest.raises(UsageError, match="memory is"):
            parse_run(body)


def _entry(identity: Identity, family: str, text: str, origin: str = "") -> Any:
    tasks = [{"task": f"t{i}", "truth": str(i)} for i in range(2)]
    rep = Replay({"name": "x"}, "m", "0" * 64, 0, tasks, [None, None], ["0", "1"], 0.0, 1.0)
    return check_entry(entry_record(identity, Item("example", family, text, origin=origin), rep), identity.peer_id)


def test_consolidation_keeps_the_budget_merges_and_follows_utility() -> None:
    me = Identity.generate()
    mem = Memory(budget=4, k=1, min_similarity=0.3, merge_similarity=0.97, decay=0.5)
    texts = ["Task: Convert 5 km to mi. Call: convert_units(value=5, from_unit=km, to_unit=mi)",
             "Task: A box holds 24 pencils. How many pencils are in 5 boxes? Call: calculate(expression=24*5)",
             "Task: Compute 31*7, then add 12 to that. Call: calculate(expression=31*7+12)",
             "Task: Sam had 40 marbles and won 3 more. Call: calculate(expression=40+3)",
             "Task: A tank holds 90 liters and 7 leak out. Call: calculate(expression=90-7)",
             "Task: Convert 12 kg to lb. Call: convert_units(value=12, from_unit=kg, to_unit=lb)"]
    entries = [_entry(me, "mixed", t) for t in texts]
    for e in entries:
        mem.add(e)
        assert len(mem) <= 4
    # all equally useful and never retrieved: the oldest go first
    assert len(mem) == 4 and mem.evicted == [entries[0].id, entries[1].id]
    # a near-duplicate (same text, another origin: another id) is merged into the entry it repeats
    dup = _entry(me, "mixed", texts[2], origin="again")
    assert dup.id != entries[2].id
    assert mem.add(dup) == [] and len(mem) == 4
    assert dup.id not in mem.slots and dup.id in mem.slots[entries[2].id].merged and dup.id in mem
    # utility follows outcomes: the entry that fails loses its rank to the one that succeeds
    query = "Compute 12*15, then add 45 to that."
    got = mem.retrieve(query, k=2)
    assert len(got) == 2
    a, b = got
    for _ in range(6):
        mem.feedback([a.id], False)
        mem.feedback([b.id], True)
    assert mem.utility(b.id) > mem.utility(a.id)
    ranked = [e.id for e in mem.retrieve(query, k=4)]
    assert len(ranked) == 4 and ranked[0] == b.id and ranked[-1] == a.id
    before = mem.slots[b.id].wins
    assert mem.consolidate() == [] and mem.slots[b.id].wins == before * 0.5 and len(mem) == 4
    # nothing dissimilar is offered: the similarity floor holds
    assert mem.retrieve("Translate 'good morning' into French.", k=4) == []
    # diffusion keeps the shape and drops the numbers, and names its parent
    insight = abstract(entries[2].item, "word")
    assert insight.kind == "insight" and insight.parent == entries[2].id and "31" not in insight.text
    assert "calculate(expression=A*B+C)" in insight.text


async def _join(url: str, name: str) -> Any:
    return await join(url, name=name, identity=Identity.generate(), heartbeat=HEARTBEAT, peer_timeout=PEER_TIMEOUT,
                      probe_seconds=0.05)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_second_peer_finds_an_entry_through_the_dht_and_reverifies_it(served, admitted) -> None:
    async with Rendezvous() as rv:
        a = await _join(rv.url, "memory-author")
        b = await _join(rv.url, "memory-reader")
        # the author's peer signs the entry with its own key (its slot, its signature)
        record = entry_record(a.identity, admitted.item, admitted.replay)
        fresh = ToolCallSolver(served[0], model=DEFAULT_MODEL, model_hash=served[1], max_tokens=MAX_TOKENS)
        try:
            author = SharedMemory(a)
            await author.publish(record)
            reader = SharedMemory(b)
            deadline = time.monotonic() + 30
            while not (found := await reader.discover("compute", timeout=5)):
                assert time.monotonic() < deadline, "the entry never became findable through the DHT"
                await asyncio.sleep(0.2)
            assert [e.id for e in found] == [HELPFUL.id] and found[0].author == a.id
            v = await verify_entry(found[0].record, fresh, owner=a.id)
            assert v.ok, v.reason
            assert fresh.calls == 2 * len(TASKS)  # a real re-run on the reader's side, not a cache hit
            mem = Memory()
            mem.add(v.entry)
            assert [e.id for e in mem.retrieve("Compute 12*15, then add 45 to that.")] == [HELPFUL.id]
            # the notebook's %agents memory list / show, and the context a `memory: true` run gets
            agents_memory._state.clear()
            assert HELPFUL.id[:12] in agents_memory.list_html(b)
            assert json.loads(agents_memory.show_text(b, HELPFUL.id[:8]))["replay"]["score_with"] == admitted.replay.score_with
            task, used = await agents_memory.context_for(b, "Compute 12*15, then add 45 to that.")
            assert used == [HELPFUL.id] and HELPFUL.text in task and task.endswith("add 45 to that.")
            # the author evicts it: the reader stops finding it
            await author.withdraw([HELPFUL.id])
            deadline = time.monotonic() + 30
            while await reader.discover("compute", timeout=5):
                assert time.monotonic() < deadline, "a withdrawn entry is still found"
                await asyncio.sleep(0.2)
        finally:
            await fresh.aclose()
            await a.leave()
            await b.leave()
