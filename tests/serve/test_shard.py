"""Shard runtime: pipelines of shards equal plain transformers; batching equals solo runs; cache limits."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from gradient_nb.models import load_full_model, load_shard, load_tokenizer, resolve_model
from gradient_nb.serve.sampling import SamplingParams
from gradient_nb.serve.shard import (
    KVBudgetExceeded,
    LocalEngine,
    PositionMismatch,
    RuntimeClosed,
    SessionEvicted,
    ShardRuntime,
    reference_greedy,
)

# ------------------------------------------------------------------------------------ helpers


async def greedy_pipeline(runtimes: list[ShardRuntime], session: str, prompt: list[int], n: int,
                          eos: set[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding through a chain of shard runtimes, as the mesh does it over links."""
    x = torch.tensor(prompt)
    pos = list(range(len(prompt)))
    out: list[int] = []
    logits_seen: list[torch.Tensor] = []
    for _ in range(n):
        h = x
        for rt in runtimes:
            h = await rt.forward(session, pos, h)
        logits_seen.append(h)
        tok = int(h.argmax())
        if tok in eos:
            break
        out.append(tok)
        x, pos = torch.tensor([tok]), [pos[-1] + 1]
    for rt in runtimes:
        rt.drop(session)
    return out, logits_seen


def margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def tiny_model(tmp: Path, kind: str = "llama", **extra) -> Path:
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**common, **extra), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    out = tmp / kind
    model.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("qwen2", {}),
                                        ("mistral", {"sliding_window": 6})])
async def test_incremental_runtime_equals_full_forward(tmp_path: Path, kind: str, extra: dict) -> None:
    """Prefill then token-by-token decode through 2 stages = the full model's logits at every position
    (Mistral with a 6-token sliding window over 20 tokens checks the window masking)."""
    path = tiny_model(tmp_path, kind, **extra)
    full = load_full_model(path)
    ids = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = full(ids[None]).logits[0]
    rts = [ShardRuntime(load_shard(path, 0, 1)), ShardRuntime(load_shard(path, 1, 4))]
    got = []
    for a, b in [(0, 5), (5, 6), (6, 13), *((i, i + 1) for i in range(13, 20))]:
        h = ids[a:b]
        for rt in rts:
            h = await rt.forward("s", list(range(a, b)), h)
        got.append(h)
    torch.testing.assert_close(torch.stack(got), ref[[4, 5, *range(12, 20)]], rtol=1e-5, atol=1e-5)
    for rt in rts:
        await rt.aclose()


async def test_chunked_prefill_and_batching_on_tiny(tmp_path: Path) -> None:
    path = tiny_model(tmp_path, "qwen2")
    big = ShardRuntime(load_shard(path, 0, 4))
    small = ShardRuntime(load_shard(path, 0, 4), max_batch_tokens=3)  # 11-token prompts take 4 steps
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=gen) for n in (11, 4, 7, 1)]
    solo = [await big.forward(f"a{i}", range(len(p)), p) for i, p in enumerate(prompts)]
    batched = await asyncio.gather(*(small.forward(f"b{i}", range(len(p)), p) for i, p in enumerate(prompts)))
    for s, b in zip(solo, batched, strict=True):
        torch.testing.assert_close(s, b, rtol=1e-5, atol=1e-5)
    assert small.steps >= 8  # 23 tokens at 3 per step
    assert big.session_length("a0") == 11 and small.session_length("b0") == 11
    await big.aclose()
    await small.aclose()


async def test_entering_mid_range_stitches_replicas(tmp_path: Path) -> None:
    """A request entering a shard at a middle layer (phase 2 stitching replicas 0..1 and 0..3 entered at
    1, then 3..4) equals the full model, also batched with requests entering at the first layer, and a
    session keeps its entry layer."""
    path = tiny_model(tmp_path, "mistral", sliding_window=6)
    full = load_full_model(path)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 96, (n,), generator=gen) for n in (9, 4, 13, 1, 6)]
    with torch.inference_mode():
        refs = [full(p[None]).logits[0, -1] for p in prompts]
    head, wide, tail = (ShardRuntime(load_shard(path, a, b)) for a, b in [(0, 1), (0, 3), (3, 4)])

    async def stitched(i: int, p: torch.Tensor) -> torch.Tensor:
        h = await head.forward(f"s{i}", range(len(p)), p)
        h = await wide.forward(f"s{i}", range(len(p)), h, entry=1)
        return await tail.forward(f"s{i}", range(len(p)), h)

    async def through_wide(i: int, p: torch.Tensor) -> torch.Tensor:
        h = await wide.forward(f"w{i}", range(len(p)), p)
        return await tail.forward(f"w{i}", range(len(p)), h)

    # Odd prompts enter `wide` at layer 0, even ones at layer 1: all in flight at once, so steps mix them.
    outs = await asyncio.gather(*((stitched if i % 2 == 0 else through_wide)(i, p) for i, p in enumerate(prompts)))
    for got, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # Decode after a stitched prefill (the stitched session's KV covers layers 1..3 only).
    nxt = torch.tensor([5])
    h = await head.forward("s0", [9], nxt)
    h = await tail.forward("s0", [9], await wide.forward("s0", [9], h, entry=1))
    with torch.inference_mode():
        ref = full(torch.cat([prompts[0], nxt])[None]).logits[0, -1]
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(PositionMismatch, match="entry layer"):
        await wide.forward("s0", [10], torch.zeros(1, 64), entry=2)
    with pytest.raises(ValueError, match="outside"):
        await wide.forward("x", [0], torch.zeros(1, 64), entry=3)
    with pytest.raises(ValueError):
        await wide.forward("y", [0], torch.tensor([1]), entry=1)  # token ids where hidden states enter
    for rt in (head, wide, tail):
        await rt.aclose()


async def test_positions_errors_and_truncation(tmp_path: Path) -> None:
    path = tiny_model(tmp_path)
    rt = ShardRuntime(load_shard(path, 0, 4))
    ids = torch.arange(10)
    await rt.forward("s", range(10), ids)
    with pytest.raises(PositionMismatch, match="skip ahead"):
        await rt.forward("s", [11], torch.tensor([1]))
    with pytest.raises(PositionMismatch, match="must start at position 0"):
        await rt.forward("new", [3, 4], torch.tensor([1, 2]))
    with pytest.raises(PositionMismatch, match="consecutive"):
        await rt.forward("s", [10, 12], torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        await rt.forward("s", [10], torch.zeros(1, 64))  # hidden states to a first stage
    # Replaying from position 6 with other tokens = a fresh session with those tokens.
    other = torch.tensor([7, 8, 9, 10, 11])
    replayed = await rt.forward("s", range(6, 11), other)
    fresh = await rt.forward("f", range(11), torch.cat([ids[:6], other]))
    torch.testing.assert_close(replayed, fresh, rtol=1e-5, atol=1e-5)
    assert rt.session_length("s") == 11
    rt.drop("s")
    assert rt.sessions() == ["f"]
    await rt.aclose()
    with pytest.raises(RuntimeClosed):
        await rt.forward("f", [11], torch.tensor([1]))


async def test_lru_eviction_by_sessions_and_budget(tmp_path: Path) -> None:
    path = tiny_model(tmp_path)
    rt = ShardRuntime(load_shard(path, 0, 4), max_sessions=2)
    ids = torch.arange(8)
    first = await rt.forward("a", range(8), ids)
    await rt.forward("b", range(8), ids)
    await rt.forward("a", [8], torch.tensor([3]))  # "a" is now the most recently used
    await rt.forward("c", range(8), ids)  # evicts "b", the least recently used
    assert sorted(rt.sessions()) == ["a", "c"]
    with pytest.raises(SessionEvicted, match="replay"):
        await rt.forward("b", [8], torch.tensor([3]))
    replay = await rt.forward("b", range(8), ids)  # a replay from 0 is welcome
    torch.testing.assert_close(replay, first)
    await rt.aclose()

    # KV budget: one 128-token block per session, room for two.
    probe = ShardRuntime(load_shard(path, 0, 4))
    await probe.forward("x", range(8), ids)
    block = probe.kv_bytes()
    await probe.aclose()
    rt = ShardRuntime(load_shard(path, 0, 4), kv_budget_bytes=2 * block)
    for s in "pqr":
        await rt.forward(s, range(8), ids)
        assert rt.kv_bytes() <= 2 * block
    assert sorted(rt.sessions()) == ["q", "r"]
    with pytest.raises(SessionEvicted):
        await rt.forward("p", [8], torch.tensor([1]))
    with pytest.raises(KVBudgetExceeded):
        await rt.forward("long", range(300), torch.zeros(300, dtype=torch.int64))
    await rt.aclose()


async def test_cancelled_caller_does_not_break_the_runtime(tmp_path: Path) -> None:
    path = tiny_model(tmp_path)
    rt = ShardRuntime(load_shard(path, 0, 4))
    ids = torch.arange(8)
    task = asyncio.create_task(rt.forward("gone", range(8), ids))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    out = await rt.forward("kept", range(8), ids)
    assert out.shape == (96,)
    await rt.aclose()



async def test_model_work_runs_on_one_thread_of_its_own(tmp_path: Path) -> None:
    """Every step and every ``run`` of a runtime use the same thread, not the event loop's and not a
    pool's; a closed runtime refuses work and its thread ends."""
    import threading

    path = tiny_model(tmp_path)
    rt = ShardRuntime(load_shard(path, 0, 4))
    seen: set[int] = set()
    real_step = rt._step

    def step(items: list) -> list:
        seen.add(threading.get_ident())
        return real_step(items)

    rt._step = step  # type: ignore[method-assign]
    await asyncio.gather(*(rt.forward(f"s{i}", range(4), torch.arange(4)) for i in range(3)))
    await rt.forward("s0", [4], torch.tensor([1]))
    seen.add(await rt.run(threading.get_ident))
    assert len(seen) == 1 and threading.get_ident() not in seen
    (model_thread,) = (t for t in threading.enumerate() if t.ident in seen)
    await rt.aclose()
    with pytest.raises(RuntimeClosed):
        await rt.run(threading.get_ident)
    model_thread.join(5)
    assert not model_thread.is_alive()

# -------------------------------------------------------------------------------- real model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three uses of a paperclip.",
]
LONG_CONTEXT = (
    "Here are my notes from a week of hiking. Monday: we left the village at dawn and followed the river "
    "upstream for eleven kilometres, crossing two wooden bridges and a ford where the water reached our "
    "knees. Lunch was bread, cheese and apples by a waterfall. In the afternoon the trail climbed through "
    "pine forest to a hut at 1800 metres, where the warden served lentil soup. Tuesday: fog until ten, "
    "then a steep ascent over scree to a pass at 2600 metres; we saw ibex and a pair of golden eagles. "
    "The descent was long and hard on the knees, and we reached the lake in the evening, tired but happy. "
    "Wednesday: a rest day by the lake; I read, swam briefly in freezing water and repaired a boot. "
    "Thursday: rain all day, so we walked the lower valley path to the next village, visited a small "
    "museum about cheese making and slept in a guesthouse with a wood stove. Friday: clear skies again, "
    "a ridge walk with views of three glaciers, then a long descent through meadows full of flowers and "
    "cows with bells. Saturday: a bus back to the town, a hot shower and a big dinner of rösti. "
    "Sunday: the train home. Total distance about 95 kilometres and 5200 metres of ascent. "
)
LONG_QUESTION = LONG_CONTEXT + "Question: on which day did we see golden eagles, and what else did we see then?"


@pytest.fixture(scope="module")
def real():
    path = resolve_model()
    tok = load_tokenizer(path)
    full = load_full_model(path)
    return path, tok, full


def chat_ids(tok, question: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def eos_of(tok, full) -> set[int]:
    eos = full.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}


@pytest.mark.slow
async def test_three_shard_pipelines_equal_transformers_generate(real) -> None:
    path, tok, full = real
    eos = eos_of(tok, full)
    prompts = [chat_ids(tok, q) for q in [*QUESTIONS, LONG_QUESTION]]
    assert len(prompts[-1]) > 300
    refs = [reference_greedy(full, tok, p, 24) for p in prompts]
    assert tok.decode(refs[0]) == "The capital of France is Paris."
    for cuts in [(0, 10, 20, 30), (0, 4, 26, 30)]:
        rts = [ShardRuntime(load_shard(path, a, b)) for a, b in itertools.pairwise(cuts)]
        for i, (prompt, ref) in enumerate(zip(prompts, refs, strict=True)):
            got, _ = await greedy_pipeline(rts, f"p{i}", prompt, 24, eos)
            assert got == ref, f"cuts {cuts}, prompt {i}: {tok.decode(got)!r} != {tok.decode(ref)!r}"
        for rt in rts:
            await rt.aclose()


@pytest.mark.slow
async def test_eight_concurrent_sessions_equal_their_solo_runs(real) -> None:
    path, tok, full = real
    eos = eos_of(tok, full)
    questions = [*QUESTIONS, "Who wrote Hamlet?", "Tell me a joke about cats.", "What is 17 times 3?",
                 LONG_CONTEXT + "Summarise Thursday in one sentence."]
    prompts = [chat_ids(tok, q) for q in questions]
    rt = ShardRuntime(load_shard(path, 0, 30))
    solo = [await greedy_pipeline([rt], f"solo{i}", p, 20, eos) for i, p in enumerate(prompts)]
    steps_before = rt.steps
    batched = await asyncio.gather(*(greedy_pipeline([rt], f"bat{i}", p, 20, eos)
                                     for i, p in enumerate(prompts)))
    calls = sum(len(logits) for _, logits in batched)
    assert rt.steps - steps_before < calls / 3, "concurrent sessions were not batched"
    for i, ((s_tok, s_logits), (b_tok, b_logits)) in enumerate(zip(solo, batched, strict=True)):
        if s_tok != b_tok:
            step = next(k for k, (a, b) in enumerate(zip(s_tok, b_tok, strict=False)) if a != b)
            pytest.fail(f"session {i} diverges at step {step}: solo top-1 margin {margin(s_logits[step]):.3g}, "
                        f"max |logit diff| {float((s_logits[step] - b_logits[step]).abs().max()):.3g}")
        diff = max(float((a - b).abs().max()) for a, b in zip(s_logits, b_logits, strict=True))
        assert diff < 1e-2, f"session {i}: logits differ by {diff} between solo and batched"
    assert rt.sessions() == []
    await rt.aclose()


@pytest.mark.slow
async def test_event_loop_stays_responsive_during_a_long_prefill(real) -> None:
    path, tok, _ = real
    rt = ShardRuntime(load_shard(path, 0, 30))
    ids = torch.tensor(chat_ids(tok, LONG_QUESTION * 2))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        await rt.forward("long", range(ids.shape[0]), ids)
    finally:
        t.cancel()
    assert ticks > 1, "the event loop was blocked by the model pass"
    await rt.aclose()


@pytest.mark.slow
async def test_local_engine_throughput_single_and_batch8(real) -> None:
    """Prints tokens/s of plain transformers generate, LocalEngine with 1 stream and with 8 streams."""
    path, tok, full = real
    engine = LocalEngine(path)
    prompts = [chat_ids(tok, q) for q in [*QUESTIONS, "Who wrote Hamlet?", "Tell me a joke about cats.",
                                            "What is 17 times 3?", "Name a large mammal."]]
    params = SamplingParams(temperature=0.0, max_tokens=24)

    async def run(p: list[int]) -> list[int]:
        return [t async for t in engine.generate(p, params)]

    t0 = time.perf_counter()
    refs = [reference_greedy(full, tok, p, 24) for p in prompts[:2]]
    hf_tps = sum(map(len, refs)) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    singles = [await run(p) for p in prompts[:2]]
    single_tps = sum(map(len, singles)) / (time.perf_counter() - t0)
    assert singles == refs
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(run(p) for p in prompts))
    batch_tps = sum(map(len, outs)) / (time.perf_counter() - t0)
    assert outs[:2] == refs
    assert tok.decode(outs[0]) == "The capital of France is Paris."
    # stop strings end the stream after the token that completes them; seeded sampling repeats
    stopped = [t async for t in engine.generate(prompts[0], SamplingParams(temperature=0, stop=["Paris"]))]
    assert tok.decode(stopped).endswith("Paris") and len(stopped) < len(outs[0])
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=8)
    a = [t async for t in engine.generate(prompts[1], seeded)]
    b = [t async for t in engine.generate(prompts[1], seeded)]
    assert a == b and len(a) == 8
    assert engine.runtime.sessions() == []
    print(json.dumps({"hf_generate_tps": round(hf_tps, 1), "engine_single_tps": round(single_tps, 1),
                      "engine_batch8_tps": round(batch_tps, 1),
                      "single_vs_hf": round(single_tps / hf_tps, 2), "batch8_vs_hf": round(batch_tps / hf_tps, 2)}))
    await engine.aclose()
