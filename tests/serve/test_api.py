"""The OpenAI-compatible API, called with the official `openai` client, over the real bundled model.

One engine and one server serve the whole module (loading is the slow part); every bad request is
followed by a good one to show that the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import torch

from gradient_nb.models import DEFAULT_MODEL, load_full_model, resolve_model
from gradient_nb.serve.api import create_app, serve_api
from gradient_nb.serve.sampling import SamplingParams
from gradient_nb.serve.shard import LocalEngine, reference_greedy

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

KEY = "sk-test-key"
LIMIT = 1000
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class TrackedEngine:
    """The real engine, with a record of how each generation ended (to see cancellation)."""

    def __init__(self, inner: LocalEngine) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.path = inner.path
        self.model_name = DEFAULT_MODEL
        self.finished: list[int] = []  # tokens yielded by each generation that has ended
        self.ended = asyncio.Event()

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[int]:
        n = 0
        tokens = self.inner.generate(prompt_ids, params)
        try:
            async for tok in tokens:
                n += 1
                yield tok
        finally:
            await tokens.aclose()  # the engine frees its KV cache here
            self.finished.append(n)
            self.ended.set()

    def generate_steps(self, prompt_ids: Sequence[int], params: SamplingParams, constraint: Any = None) -> Any:
        return self.inner.generate_steps(prompt_ids, params, constraint)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[TrackedEngine]:
    inner = LocalEngine(DEFAULT_MODEL)
    yield TrackedEngine(inner)
    await inner.aclose()


@pytest.fixture(scope="module")
def reference() -> Any:
    """Plain transformers, same weights: what greedy answers must be."""
    return load_full_model(resolve_model(DEFAULT_MODEL))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine: TrackedEngine) -> AsyncIterator[Any]:
    srv = await serve_api(engine, api_key=KEY, max_tokens_limit=LIMIT)
    yield srv
    await srv.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def client(server: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
    yield c
    await c.close()


def chat_ids(engine: TrackedEngine, messages: list[dict[str, str]]) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


async def still_serving(client: openai.AsyncOpenAI) -> None:
    out = await client.completions.create(model=DEFAULT_MODEL, prompt="Hello", max_tokens=1, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens == 1


# ------------------------------------------------------------------------------- good requests


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [DEFAULT_MODEL]
    assert (await client.models.retrieve(DEFAULT_MODEL)).id == DEFAULT_MODEL


async def test_chat_greedy_matches_plain_transformers(client: openai.AsyncOpenAI, engine: TrackedEngine,
                                                      reference: Any) -> None:
    out = await client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0,
                                               max_tokens=40)
    assert out.choices[0].message.content == "The capital of France is Paris."
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop"
    ids = chat_ids(engine, QUESTION)
    ref = reference_greedy(reference, engine.tokenizer, ids, 40)
    assert engine.tokenizer.decode(ref, skip_special_tokens=True) == out.choices[0].message.content
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(ref))
    assert out.usage.total_tokens == len(ids) + len(ref)
    assert out.model == DEFAULT_MODEL and out.object == "chat.completion"


async def test_n_choices_and_logprobs(client: openai.AsyncOpenAI, engine: TrackedEngine, reference: Any) -> None:
    # Greedy with logprobs: each token's log-probability is plain transformers' log-softmax, and the drawn
    # token is the top alternative.
    out = await client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0,
                                               max_tokens=8, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    ids = chat_ids(engine, QUESTION)
    answer = reference_greedy(reference, engine.tokenizer, ids, 8)
    assert len(content) == out.usage.completion_tokens == len(answer) > 0
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([ids + answer])).logits[0].float(), -1)
    for j, (c, tok) in enumerate(zip(content, answer, strict=True)):
        assert c.token == engine.tokenizer.decode([tok]) and len(c.top_logprobs) == 3
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob
        assert abs(c.logprob - float(logp[len(ids) - 1 + j, tok])) < 1e-4
    # n choices: n generations of one prompt, each seeded on its own, repeatable.
    kw = dict(model=DEFAULT_MODEL, messages=QUESTION, temperature=1.0, max_tokens=6, n=3, seed=11)
    a = await client.chat.completions.create(**kw)
    b = await client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    second = await client.chat.completions.create(**{**kw, "n": 1, "seed": 12})  # choice 1 is seeded 11 + 1
    assert second.choices[0].message.content == texts[1]
    assert 3 <= a.usage.completion_tokens <= 3 * 6 and a.usage.prompt_tokens == len(ids)
    legacy = await client.completions.create(model=DEFAULT_MODEL, prompt="Paris is", max_tokens=4, temperature=0,
                                             logprobs=2, n=2)
    assert len(legacy.choices) == 2 and legacy.choices[0].text == legacy.choices[1].text
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


async def test_chat_streaming(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0,
                                                  max_tokens=40, stream=True,
                                                  stream_options={"include_usage": True})
    deltas, finishes, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert "".join(deltas) == "The capital of France is Paris."
    assert len(deltas) > 3  # really streamed, token by token
    assert finishes == ["stop"]
    assert usage is not None and usage.completion_tokens > 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_streaming_n_choices_with_logprobs(client: openai.AsyncOpenAI) -> None:
    """n > 1 and logprobs streamed: each choice's chunks (interleaved, named by index) add up to the same
    text and the same per-token logprobs as the request without stream."""
    kw = dict(model=DEFAULT_MODEL, messages=QUESTION, temperature=1.0, max_tokens=10, n=2, seed=5,
              logprobs=True, top_logprobs=2, stop=" Paris")
    whole = await client.chat.completions.create(**kw)
    stream = await client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    text, logprobs, finish, usage = ["", ""], [[], []], [None, None], None
    async for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
            if c.logprobs is not None:
                logprobs[c.index] += [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in c.logprobs.content]
    # The logprobs agree to float noise: a step's batch (which choices ran together) changes the last bits.
    for i, choice in enumerate(whole.choices):
        assert text[i] == choice.message.content and finish[i] == choice.finish_reason
        want = [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in choice.logprobs.content]
        assert [(t, top) for t, _, top in logprobs[i]] == [(t, top) for t, _, top in want]
        assert max(abs(a[1] - b[1]) for a, b in zip(logprobs[i], want, strict=True)) < 1e-4
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.completion_tokens == sum(len(lp) for lp in logprobs)
    # Legacy completions: the offsets run on across chunks.
    legacy = dict(model=DEFAULT_MODEL, prompt="Paris is", max_tokens=5, temperature=0, logprobs=2, n=2)
    ref = (await client.completions.create(**legacy)).choices[0].logprobs
    parts: dict[int, list[Any]] = {0: [], 1: []}
    async for chunk in await client.completions.create(**legacy, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                parts[c.index] += list(zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.text_offset,
                                           strict=True))
    for part in parts.values():
        assert [(t, o) for t, _, o in part] == list(zip(ref.tokens, ref.text_offset, strict=True))
        assert max(abs(lp - r) for (_, lp, _), r in zip(part, ref.token_logprobs, strict=True)) < 1e-4


async def test_completions_length_and_stream(client: openai.AsyncOpenAI, engine: TrackedEngine,
                                             reference: Any) -> None:
    prompt = "The three primary colors are"
    ids = list(engine.tokenizer(prompt)["input_ids"])
    ref = reference_greedy(reference, engine.tokenizer, ids, 8)
    assert len(ref) == 8
    out = await client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == engine.tokenizer.decode(ref, skip_special_tokens=True)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 8)
    stream = await client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                             stream=True)
    text, finish = "", None
    async for chunk in stream:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert text == out.choices[0].text and finish == "length"
    # Token ids are a prompt too.
    by_ids = await client.completions.create(model=DEFAULT_MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text


async def test_stop_strings(client: openai.AsyncOpenAI) -> None:
    out = await client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0,
                                               max_tokens=40, stop=[" Paris", "zzz"])
    assert out.choices[0].message.content == "The capital of France is"
    assert out.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0,
                                                  max_tokens=40, stop="France", stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "The capital of "


async def test_seeded_sampling_repeats(client: openai.AsyncOpenAI) -> None:
    kw: dict[str, Any] = dict(model=DEFAULT_MODEL, messages=QUESTION, temperature=1.0, top_p=0.9, max_tokens=12)
    a = await client.chat.completions.create(seed=7, **kw)
    b = await client.chat.completions.create(seed=7, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content


async def test_concurrent_requests_get_their_own_answers(client: openai.AsyncOpenAI) -> None:
    outs = await asyncio.gather(*(client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                                                 temperature=0, max_tokens=40) for _ in range(3)))
    assert [o.choices[0].message.content for o in outs] == ["The capital of France is Paris."] * 3


# ------------------------------------------------------------------------------- bad requests


async def test_malformed_json(server: Any, client: openai.AsyncOpenAI) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        for path in ("/chat/completions", "/completions"):
            r = await http.post(server.url + path, content=b'{"model": "x", "messages": [',
                                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            assert r.status_code == 400
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "invalid_request_error" and "JSON" in err["message"]
        r = await http.post(server.url + "/chat/completions", json=[1, 2],
                            headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and "object" in r.json()["error"]["message"]
        r = await http.get(server.url + "/nope", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 404 and "error" in r.json()
    await still_serving(client)


async def test_unknown_model(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-7", messages=QUESTION, max_tokens=4)
    assert info.value.code == "model_not_found" and "gpt-7" in info.value.message
    await still_serving(client)


async def test_huge_max_tokens_and_other_bad_params(client: openai.AsyncOpenAI) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"temperature": 3.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ]
    for kw, param in bad:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, **kw)
        assert info.value.param == param, kw
        await still_serving(client)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=DEFAULT_MODEL, prompt=["one", "two"], max_tokens=2)
    await still_serving(client)


async def test_bad_or_missing_token(server: Any, client: openai.AsyncOpenAI) -> None:
    wrong = openai.AsyncOpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        await wrong.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=2)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await wrong.models.list()
    await wrong.close()
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(server.url + "/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await http.get(server.url.removesuffix("/v1") + "/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
    await still_serving(client)


async def test_prompt_plus_max_tokens_over_context(engine: TrackedEngine) -> None:
    srv = await serve_api(engine, context_length=64, max_tokens_limit=10**6)
    c = openai.AsyncOpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
    try:
        n = len(chat_ids(engine, QUESTION))
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=64 - n + 1)
        assert info.value.code == "context_length_exceeded"
        ok = await c.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=64 - n,
                                             temperature=0)
        assert ok.choices[0].message.content == "The capital of France is Paris."
    finally:
        await c.close()
        await srv.stop()


async def test_refuses_open_host_without_key(engine: TrackedEngine) -> None:
    with pytest.raises(ValueError, match="api_key"):
        await serve_api(engine, host="0.0.0.0")
    with pytest.raises(ValueError, match="api_key"):
        await serve_api(engine, host="192.168.1.10")
    assert create_app(engine, api_key=None) is not None  # an app alone may be mounted anywhere


async def test_client_disconnect_cancels_generation(server: Any, engine: TrackedEngine,
                                                    client: openai.AsyncOpenAI) -> None:
    engine.finished.clear()
    engine.ended.clear()
    body = {"model": DEFAULT_MODEL, "prompt": "Once upon a time", "max_tokens": LIMIT, "temperature": 0,
            "stream": True}
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", server.url + "/completions", json=body,
                               headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    assert "text" in json.loads(line[6:])["choices"][0]
                    seen += 1
                    if seen == 3:
                        break
    # The generation must end soon after, far short of LIMIT tokens (a timeout only guards a hang).
    await asyncio.wait_for(engine.ended.wait(), timeout=60)
    assert len(engine.finished) == 1 and engine.finished[0] < LIMIT // 2
    # Its KV cache is freed (after the batch step in flight, if any, as the runtime defers drops).
    for _ in range(1200):  # a bound against a hang, not a timing claim
        if not engine.inner.runtime.sessions():
            break
        await asyncio.sleep(0.05)
    assert engine.inner.runtime.sessions() == []
    await still_serving(client)
