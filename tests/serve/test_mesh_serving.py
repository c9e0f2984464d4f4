"""The real bundled model served by peer processes: same greedy tokens as one process, batching, failover, API.

Each cluster is a real local mesh: an embedded rendezvous, `gradient-nb peer --serve` processes linked by
aiortc, and this process as the entry peer.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
import pytest_asyncio
import torch

from gradient_nb.mesh.errors import RemoteError
from gradient_nb.mesh.frames import Message
from gradient_nb.models import load_full_model, load_tokenizer, resolve_model
from gradient_nb.serve.cluster import start_local_cluster
from gradient_nb.serve.coordinator import allocation_of
from gradient_nb.serve.sampling import SamplingParams
from gradient_nb.serve.shard import reference_greedy

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

NEW_TOKENS = 20
LONG_TEXT = " ".join(
    f"Paragraph {i}: the river flows past the old mill, where the miller counts sacks of grain and "
    f"tells stories about the winter of year {1900 + i}." for i in range(14))
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the moon.",
    "Explain what a hash table is.",
    "List three colours of the rainbow.",
    f"Summarise this text in one sentence: {LONG_TEXT}",
    "How do I boil an egg?",
    "What is 12 times 12?",
    "Name a planet in the solar system.",
]


@pytest.fixture(scope="module")
def reference() -> dict:
    """Greedy tokens of plain transformers in this process: the answers every split must give."""
    path = resolve_model()
    tok = load_tokenizer(path)
    model = load_full_model(path)
    ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]) for p in PROMPTS]
    assert max(len(i) for i in ids) > 300
    return {"ids": ids, "tokens": [reference_greedy(model, tok, i, NEW_TOKENS) for i in ids], "tokenizer": tok}


async def _generate(engine, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    return [t async for t in engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=n))]


async def _generate_killing_first_stage(cluster, ids: list[int], after: int) -> tuple[list[int], str]:
    """Greedy generation that SIGKILLs the first peer of the request's chain after ``after`` tokens."""
    engine, got, victim = cluster.engine, [], None
    async for tok in engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)):
        got.append(tok)
        if len(got) == after:
            victim = engine.traces[-1].routes[-1][0][0]
            cluster.processes[cluster.peer_ids.index(victim)].send_signal(signal.SIGKILL)
    assert victim is not None
    return got, victim


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def even_split(reference):
    # `reference` first: computing it blocks this process, which must not happen while it is a peer.
    cluster = await start_local_cluster(3, layers=[(0, 10), (10, 20), (20, 30)], api=True, api_key="test-key")
    try:
        yield cluster
    finally:
        await cluster.stop()


async def test_even_split_matches_one_process(even_split, reference) -> None:
    """Stage to stage (the default: each stage calls the next, the last answers the entry) and the star
    (the entry calls each stage) give one process's greedy tokens."""
    engine = even_split.engine
    chain = engine.current_route()
    assert [(s.start, s.end) for s in chain] == [(0, 10), (10, 20), (20, 30)]
    assert len({s.peer_id for s in chain}) == 3 and engine.forwards(chain)
    before = dict(engine.step_calls)
    for ids, want in zip(reference["ids"][:5], reference["tokens"][:5], strict=True):
        assert await _generate(engine, ids) == want
    steps = sum(len(t) for t in reference["tokens"][:5])
    assert engine.step_calls["chain"] - before["chain"] >= steps and engine.step_calls["star"] == before["star"]
    text = reference["tokenizer"].decode(reference["tokens"][0], skip_special_tokens=True)
    assert text.startswith("The capital of France is Paris.")
    engine.forwarding = False
    try:
        for i in (0, 4):
            assert await _generate(engine, reference["ids"][i]) == reference["tokens"][i]
    finally:
        engine.forwarding = True
    assert engine.step_calls["star"] - before["star"] >= len(reference["tokens"][0]) + len(reference["tokens"][4])


async def test_concurrent_requests_match_solo_runs(even_split, reference) -> None:
    engine = even_split.engine
    engine.batch_sizes.clear()
    results = await asyncio.gather(*(_generate(engine, ids) for ids in reference["ids"]))
    for got, want, prompt in zip(results, reference["tokens"], PROMPTS, strict=True):
        assert got == want, f"batched answer differs for {prompt[:40]!r}"
    # They travelled together: one call per stage carried several requests' steps (8 at most).
    assert max(engine.batch_sizes) >= 4, list(engine.batch_sizes)
    assert len(engine.batch_sizes) < len(PROMPTS) * NEW_TOKENS / 2, len(engine.batch_sizes)


async def test_seeded_sampling_is_drawn_by_the_last_stage_like_one_process(even_split, reference) -> None:
    """The last stage draws sampled tokens from the per-step seed: the same tokens as one process
    sampling the same logits with the same seed, and again on a second run."""
    from gradient_nb.serve.sampling import Sampler, sample_with

    ids = reference["ids"][0]
    params = SamplingParams(temperature=1.3, top_p=0.9, max_tokens=12, seed=11)
    got = [t async for t in even_split.engine.generate(ids, params)]
    again = [t async for t in even_split.engine.generate(ids, params)]
    assert got == again and got

    def one_process() -> list[int]:
        model = load_full_model(resolve_model())
        sampler, seq, want = Sampler(params), list(ids), []
        with torch.inference_mode():
            for _ in got:
                token = sample_with(model(torch.tensor([seq])).logits[0, -1], sampler.spec(len(want)))
                want.append(token)
                seq.append(token)
        return want

    assert got == await asyncio.to_thread(one_process)


class _OnlyThese:
    """A constraint that allows a fixed set of tokens at every step and records what it was told."""

    def __init__(self, vocab: int, tokens: list[int]) -> None:
        self.mask = torch.zeros(vocab, dtype=torch.bool)
        self.mask[tokens] = True
        self.accepted: list[int] = []

    def allowed(self) -> torch.Tensor:
        return self.mask

    def accept(self, token: int) -> None:
        self.accepted.append(token)


async def test_logprobs_and_token_masks_through_the_mesh(even_split, reference) -> None:
    """The last stage returns each drawn token's log-probability: at float32, within 1e-3 of the
    log-softmax of one process's logits (full-sequence forward vs the mesh's cached steps), and the
    top alternatives in order; a constraint's mask restricts the draws."""
    from gradient_nb.serve.sampling import distribution, pack_mask

    engine, ids = even_split.engine, reference["ids"][0]
    greedy = [s async for s in engine.generate_steps(ids, SamplingParams(temperature=0.0, max_tokens=6, logprobs=3))]
    assert [s.token for s in greedy] == reference["tokens"][0][:6]
    only = _OnlyThese(engine.info.vocab_size, [int(t) for t in torch.randperm(engine.info.vocab_size)[:40]])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=6, logprobs=2)
    masked = [s async for s in engine.generate_steps(ids, params, constraint=only)]
    assert masked and all(bool(only.mask[s.token]) for s in masked)
    assert only.accepted == [s.token for s in masked]

    def one_process() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = load_full_model(resolve_model())
        out = []
        for steps in (greedy, masked):
            rows, seq = [], list(ids)
            with torch.inference_mode():
                for s in steps:
                    rows.append(model(torch.tensor([seq])).logits[0, -1].float())
                    seq.append(s.token)
            out.append(rows)
        return out[0], out[1]

    greedy_logits, masked_logits = await asyncio.to_thread(one_process)
    for s, row in zip(greedy, greedy_logits, strict=True):
        want = torch.log_softmax(row, dim=-1)
        assert abs(s.logprob - float(want[s.token])) < 1e-3
        assert [t for t, _ in s.top] == torch.topk(want, 3).indices.tolist()
    for i, (s, row) in enumerate(zip(masked, masked_logits, strict=True)):
        spec = {"temperature": 1.0, "top_p": 0.9, "seed": 5, "step": i,
                "mask": pack_mask(only.mask, engine.info.vocab_size)}
        assert abs(s.logprob - float(distribution(row, spec)[s.token])) < 1e-3 and len(s.top) == 2


async def test_malformed_forward_calls_get_errors_and_the_peer_keeps_serving(even_split, reference) -> None:
    engine, mesh = even_split.engine, even_split.engine.mesh
    first, _, last = engine.current_route()
    head = {"model": engine.model_name, "start": 0, "end": 10}

    async def forward(stage, header, x):
        return await mesh.call(stage.peer_id, "shard.forward", Message(header, {"x": x}), timeout=30)

    ids = torch.tensor(reference["ids"][3])
    for items in (None, [], "x", [{"session": "a", "pos": -1, "n": len(ids)}], [{"session": "a", "pos": 0}],
                  [{"session": "a", "pos": 0, "n": 2}, {"session": "a", "pos": 2, "n": len(ids) - 2}],
                  [{"session": "a", "pos": 0, "n": len(ids) + 1}]):
        with pytest.raises(RemoteError) as err:
            await forward(first, {**head, "items": items}, ids)
        assert err.value.code == "BadForward"
    with pytest.raises(RemoteError, match="only the last stage samples"):
        await forward(first, {**head, "items": [{"session": "a", "pos": 0, "n": len(ids),
                                                 "sample": {"temperature": 0.0}}]}, ids)
    hidden = torch.zeros(1, engine.info.hidden_size)
    for spec in ({"temperature": 5.0, "top_p": 1.0, "seed": 1, "step": 0}, {"temperature": 0.0},
                 {"temperature": 0.5, "top_p": 0.0, "seed": 1, "step": 0}, "greedy",
                 {"temperature": 0.5, "top_p": 1.0, "seed": -1, "step": 0},
                 {"temperature": 0.0, "top_p": 1.0, "seed": 1, "step": 0, "mask": b"\xff"},
                 {"temperature": 0.0, "top_p": 1.0, "seed": 1, "step": 0, "logprobs": 99}):
        with pytest.raises(RemoteError, match="bad sampling spec"):
            await forward(last, {"model": engine.model_name, "start": last.start, "end": last.end,
                                 "items": [{"session": "b", "pos": 0, "n": 1, "sample": spec}]}, hidden)
    # One request's own problem fails its item only; the other item of the call is served.
    reply = await forward(first, {**head, "items": [{"session": "c", "pos": 0, "n": len(ids)},
                                                    {"session": "d", "pos": 7, "n": 1}]},
                          torch.cat([ids, ids[:1]]))
    answers = reply.header["items"]
    assert "error" not in answers[0] and answers[1]["error"] == "PositionMismatch"
    assert reply.tensors["y"].shape == (len(ids), engine.info.hidden_size)
    for session in ("a", "b", "c", "d"):
        for stage in (first, last):
            await mesh.call(stage.peer_id, "shard.drop", Message({"session": session}), timeout=10)
    assert await _generate(engine, reference["ids"][0]) == reference["tokens"][0]


async def test_closing_an_engine_ends_its_requests_and_its_tasks(even_split, reference) -> None:
    from gradient_nb.serve.pipeline import EngineClosed, MeshEngine

    engine = await asyncio.to_thread(MeshEngine, even_split.mesh)
    got: list[int] = []
    generating = asyncio.Event()

    async def run() -> None:
        async for token in engine.generate(reference["ids"][1], SamplingParams(temperature=0.0, max_tokens=500)):
            got.append(token)
            if len(got) >= 6:
                generating.set()

    tasks = [asyncio.ensure_future(run()) for _ in range(3)]
    await asyncio.wait_for(generating.wait(), 120)
    batchers = [b.task for b in engine._batchers.values()]
    await asyncio.wait_for(engine.aclose(), 30)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert all(isinstance(r, EngineClosed) for r in results), results
    assert batchers and all(t.done() for t in batchers)
    assert not engine._batchers and not engine._background
    with pytest.raises(EngineClosed):
        await _generate(engine, reference["ids"][1])
    # The peers still serve the cluster's own engine.
    assert await _generate(even_split.engine, reference["ids"][2]) == reference["tokens"][2]


async def test_openai_client_through_the_mesh(even_split) -> None:
    from openai import AsyncOpenAI, AuthenticationError

    client = AsyncOpenAI(base_url=even_split.api.url, api_key="test-key")
    reply = await client.chat.completions.create(
        model=even_split.engine.model_name, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content.startswith("The capital of France is Paris.")
    chunks = [c async for c in await client.chat.completions.create(
        model=even_split.engine.model_name, temperature=0, max_tokens=8, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}])]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("The capital")
    with pytest.raises(AuthenticationError):
        await AsyncOpenAI(base_url=even_split.api.url, api_key="wrong").models.list()


async def test_uneven_split_matches_one_process_and_survives_a_killed_middle_stage(reference) -> None:
    """An uneven split 0..4 / 4..26 / 26..30 (and a replica of 4..26) gives one process's tokens, stage to
    stage; the middle stage of the request's chain is killed while tokens flow: the stage before it
    reports it, the request replays on the replica and finishes with the same tokens."""
    cluster = await start_local_cluster(4, layers=[(0, 4), (4, 26), (26, 30), (4, 26)],
                                        peer_args=["--heartbeat", "0.5", "--peer-timeout", "3"])
    try:
        engine = cluster.engine
        assert [(s.start, s.end) for s in engine.current_route()] == [(0, 4), (4, 26), (26, 30)]
        for i in (0, 2):
            assert await _generate(engine, reference["ids"][i]) == reference["tokens"][i]
        got, victim = [], None
        async for tok in engine.generate(reference["ids"][4], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)):
            got.append(tok)
            if len(got) == 4:
                victim = engine.traces[-1].routes[-1][1][0]
                cluster.processes[cluster.peer_ids.index(victim)].send_signal(signal.SIGKILL)
        assert got == reference["tokens"][4]
        trace = engine.traces[-1]
        assert trace.failovers >= 1 and all(victim not in [s[0] for s in r] for r in trace.routes[1:])
        assert engine.forwards(engine.current_route())
    finally:
        await cluster.stop()


async def test_peer_killed_mid_generation(reference) -> None:
    """Three peers, allocated by the scheduler. The peer serving a request is killed after a few tokens:
    the request re-routes, replays its tokens and finishes with the same output; the allocation heals."""
    cluster = await start_local_cluster(3, peer_args=["--heartbeat", "0.5", "--peer-timeout", "3"])
    try:
        engine = cluster.engine
        before = allocation_of(cluster.mesh, engine.model_name)
        got, victim = await _generate_killing_first_stage(cluster, reference["ids"][1], after=5)
        assert got == reference["tokens"][1]
        trace = engine.traces[-1]
        assert trace.failovers >= 1 and all(victim not in [s[0] for s in r] for r in trace.routes[1:])
        # The coordinator (maybe a new one) re-plans without the dead peer.
        for _ in range(100):
            after = allocation_of(cluster.mesh, engine.model_name)
            if after is not None and victim not in {s.peer_id for s in after.stages()}:
                break
            await asyncio.sleep(0.2)
        assert victim in {s.peer_id for s in before.stages()}
        assert victim not in {s.peer_id for s in after.stages()}
        assert await _generate(engine, reference["ids"][0]) == reference["tokens"][0]
    finally:
        await cluster.stop()


async def test_replicas_stitch_and_cover_a_lost_peer_without_a_replan(reference) -> None:
    """Fixed ranges 0..10 + 10..30 form a pipeline and 0..20 is an extra stage, so phase 2 has two chains:
    0..10 -> 10..30, and 0..20 -> 10..30 entered at layer 20 (stitching). Greedy output equals one process
    on either; when the first peer of the chain in use is killed mid-generation, the request finishes on the
    other chain with the same tokens (both chains were in the allocation: nothing had to be re-planned)."""
    cluster = await start_local_cluster(3, layers=[(0, 10), (10, 30), (0, 20)],
                                        peer_args=["--heartbeat", "0.5", "--peer-timeout", "3"])
    try:
        engine = cluster.engine
        head, tail, wide = cluster.peer_ids
        chains = {head: [(head, 0, 10), (tail, 10, 30)], wide: [(wide, 0, 20), (tail, 20, 30)]}
        for _ in range(150):  # the coordinator may have planned before the third peer announced itself
            alloc = allocation_of(cluster.mesh, engine.model_name)
            if alloc is not None and alloc.extra:
                break
            await asyncio.sleep(0.2)
        assert [(s.peer_id, s.start, s.end) for s in alloc.extra] == [(wide, 0, 20)]
        engine.current_route()  # and the engine sees all three ready
        assert await _generate(engine, reference["ids"][2]) == reference["tokens"][2]
        # Which chain phase 2 picks depends on the measured compute: kill the first peer of it.
        got, victim = await _generate_killing_first_stage(cluster, reference["ids"][0], after=3)
        assert got == reference["tokens"][0]
        trace = engine.traces[-1]
        survivor = wide if victim == head else head
        assert trace.failovers >= 1 and trace.routes[-1] == chains[survivor]
        assert any((tail, 20, 30) in r for r in trace.routes)  # a chain entered the 10..30 peer mid-range
    finally:
        await cluster.stop()
