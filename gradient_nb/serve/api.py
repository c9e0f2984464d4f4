"""OpenAI-compatible HTTP API (chat and text completions, streamed or not) over any engine.

The engine does the model work; this layer turns OpenAI requests into prompt token ids and
`SamplingParams`, cuts the text at stop strings, counts usage and speaks OpenAI's wire format,
including its error objects. ``n`` > 1 runs n generations of the prompt concurrently (the engine
batches them; choice i is seeded ``seed + i``), and ``logprobs`` reports each token's log-probability
under the distribution it was drawn from (``generate_steps``), so RL tools can sample from the mesh.
A bad request gets a clear error and the server carries on; a client that goes away mid-stream
cancels its generation at once (the engine's generator is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..mesh.tasks import cancel_and_wait
from .grammar import RequestError, StructuredOutput
from .sampling import MAX_LOGPROBS, SamplingParams, StopDetector

__all__ = ["ApiError", "ApiServer", "Engine", "create_app", "serve_api"]


class Engine(Protocol):
    model_name: str
    tokenizer: Any

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]: ...


MAX_N = 16  # choices per request


class ApiError(Exception):
    """An error the client caused (or may retry), sent as OpenAI's ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def _model_name(engine: Any) -> str:
    name = getattr(engine, "model_name", None)
    if not name and getattr(engine, "info", None) is not None:
        name = getattr(engine.info, "name", None)
    if not name and getattr(engine, "path", None) is not None:
        name = Path(engine.path).name
    if not name:
        raise ValueError("the engine has no model_name; pass model_name= to create_app")
    return str(name)


def _context_length(engine: Any) -> int | None:
    n = getattr(engine, "context_length", None)
    if n:
        return int(n)
    path = getattr(engine, "path", None)
    if path is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            cfg = json.loads((Path(path) / "config.json").read_text())
            if cfg.get("max_position_embeddings"):
                return int(cfg["max_position_embeddings"])
    limit = getattr(getattr(engine, "tokenizer", None), "model_max_length", None)
    # HF uses a huge sentinel when the tokenizer does not know its model's window.
    return int(limit) if isinstance(limit, int) and limit < 10**7 else None


# ------------------------------------------------------------------------------- request parsing


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    structured: StructuredOutput | None = None  # tools / response_format: decoded under a grammar
    constraint: Any = None  # the grammar's per-step token mask for this one generation
    n: int = 1  # choices, each its own generation (choice i samples with seed + i when a seed is given)
    logprobs: int | None = None  # None: no log-probabilities; k: each token's and its top k alternatives


def _field(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python, but `"max_tokens": true` is a client bug worth naming.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{name}' has the wrong type", param=name)
    if not isinstance(value, types):
        raise ApiError(400, f"'{name}' has the wrong type", param=name)
    return value


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text can reach a text-only model
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


class _App:
    def __init__(self, engine: Any, api_key: str | None, max_tokens_limit: int, model_name: str | None,
                 context_length: int | None) -> None:
        self.engine = engine
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.model_name = model_name or _model_name(engine)
        self.context_length = context_length if context_length is not None else _context_length(engine)
        self.created = int(time.time())

    # --------------------------------------------------------------------------- checks

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required", param="model")
        if model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        return body

    def _job(self, body: dict[str, Any], prompt_ids: list[int], default_max: int | None) -> _Job:
        n = _field(body, "n", int, 1)
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"'n' must be in [1, {MAX_N}]", param="n")
        if body.get("echo") or body.get("best_of") not in (None, 1):
            raise ApiError(400, "echo and best_of are not supported", param="echo")
        logprobs = self._logprobs(body, default_max is None)
        stream = _field(body, "stream", bool, False)
        opts = _field(body, "stream_options", dict, {})
        include_usage = bool(opts.get("include_usage")) if stream else False
        temperature = float(_field(body, "temperature", (int, float), 1.0))
        top_p = float(_field(body, "top_p", (int, float), 1.0))
        seed = _field(body, "seed", int)
        if seed is not None and not 0 <= seed < 2**63:
            raise ApiError(400, "'seed' must be in [0, 2**63)", param="seed")
        stop = _field(body, "stop", (str, list), [])
        if isinstance(stop, str):
            stop = [stop]
        if len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
            raise ApiError(400, "'stop' takes a string or up to 4 non-empty strings", param="stop")
        if not 0.0 <= temperature <= 2.0:
            raise ApiError(400, f"'temperature' must be in [0, 2], not {temperature}", param="temperature")
        if not 0.0 < top_p <= 1.0:
            raise ApiError(400, f"'top_p' must be in (0, 1], not {top_p}", param="top_p")

        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(body, param, int)
        room = None if self.context_length is None else self.context_length - len(prompt_ids)
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is "
                                f"{self.context_length}", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(x for x in (default_max, room, self.max_tokens_limit) if x is not None)
        if max_tokens < 1:
            raise ApiError(400, f"'{param}' must be at least 1", param=param)
        if max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"'{param}' is {max_tokens}; this server allows at most {self.max_tokens_limit}",
                           param=param)
        if room is not None and max_tokens > room:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) plus {param} ({max_tokens}) exceeds "
                                f"the model's context of {self.context_length} tokens", param=param,
                           code="context_length_exceeded")
        try:
            params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                    stop=list(stop))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return _Job(prompt_ids, params, stream, include_usage, n=n, logprobs=logprobs)

    def _logprobs(self, body: dict[str, Any], chat: bool) -> int | None:
        """How many alternatives each token reports (None: no logprobs). Chat: ``logprobs: true`` with
        ``top_logprobs`` 0..20; completions: ``logprobs`` 0..5 (OpenAI's legacy limit)."""
        if chat:
            on = _field(body, "logprobs", bool, False)
            top = _field(body, "top_logprobs", int)
            if top is not None and not on:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            if top is not None and not 0 <= top <= MAX_LOGPROBS:
                raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}]", param="top_logprobs")
            return (top or 0) if on else None
        k = _field(body, "logprobs", int)
        if k is not None and not 0 <= k <= 5:
            raise ApiError(400, "'logprobs' must be in [0, 5]", param="logprobs")
        return k

    # --------------------------------------------------------------------------- generation

    async def _generate(self, job: _Job, state: dict[str, Any]) -> AsyncIterator[str]:
        """Text deltas; sets state['finish_reason'] and state['completion_tokens'] as it goes."""
        detector = StopDetector(self.engine.tokenizer, job.params.stop)
        tokens = self._tokens(job, state)
        state["completion_tokens"] = 0
        try:
            async for tok in tokens:
                state["completion_tokens"] += 1
                delta = detector.push(tok)
                if delta:
                    yield delta
                if detector.stopped:
                    state["finish_reason"] = "stop"
                    return
                if state["completion_tokens"] >= job.params.max_tokens:
                    break
            tail = detector.flush()
            if tail:
                yield tail
            state["finish_reason"] = "length" if state["completion_tokens"] >= job.params.max_tokens else "stop"
        finally:
            # Closing runs the engine's own cleanup (KV cache freed) whether we finished, hit a
            # stop string, or the client went away.
            await tokens.aclose()  # type: ignore[attr-defined]

    def _tokens(self, job: _Job, state: dict[str, Any]) -> AsyncIterator[int]:
        if job.constraint is None and job.logprobs is None:
            return self.engine.generate(job.prompt_ids, job.params)
        if not hasattr(self.engine, "generate_steps"):
            raise ApiError(400, "this engine cannot report log-probabilities", param="logprobs")
        params = job.params if job.logprobs is None else replace(job.params, logprobs=job.logprobs)
        return _step_tokens(self.engine.generate_steps(job.prompt_ids, params, constraint=job.constraint),
                            state.setdefault("steps", []))

    def _constrain(self, job: _Job, structured: StructuredOutput) -> None:
        if not hasattr(self.engine, "generate_steps"):
            raise ApiError(400, "this engine cannot constrain decoding (tools, response_format)", param="tools")
        info = getattr(self.engine, "info", None)
        vocab = int(getattr(info, "vocab_size", 0) or len(self.engine.tokenizer))
        try:
            job.constraint = structured.constraint(self.engine.tokenizer, vocab,
                                                   set(getattr(self.engine, "eos_ids", ())))
        except RequestError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        job.structured = structured

    def _usage(self, job: _Job, state: dict[str, Any]) -> dict[str, int]:
        p, c = len(job.prompt_ids), state.get("completion_tokens", 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def _choices(job: _Job, state: dict[str, Any]) -> tuple[list[_Job], list[dict[str, Any]]]:
        """n choices are n concurrent generations of the same prompt (the engine batches them); choice i
        is seeded ``seed + i``."""
        jobs = [job if i == 0 else replace(job, params=replace(
            job.params, seed=None if job.params.seed is None else (job.params.seed + i) % 2**63))
            for i in range(job.n)]
        return jobs, [state] + [{} for _ in range(job.n - 1)]

    async def _respond(self, request: Request, job: _Job, chat: bool) -> Response:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        state: dict[str, Any] = {}
        if not job.stream:
            jobs, states = self._choices(job, state)
            collect = asyncio.ensure_future(asyncio.gather(*(_collect(self._generate(j, st))
                                                             for j, st in zip(jobs, states, strict=True))))
            listener = asyncio.ensure_future(_until_disconnect(request))
            try:
                await asyncio.wait({collect, listener}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                listener.cancel()
                if not collect.done():  # the client left: stop generating for nobody
                    collect.cancel()
                await asyncio.gather(collect, listener, return_exceptions=True)
            if collect.cancelled():
                return Response(status_code=499)
            choices = []
            for i, (text, st) in enumerate(zip(collect.result(), states, strict=True)):
                choice: dict[str, Any] = {"index": i, "finish_reason": st["finish_reason"], "logprobs": None}
                if job.logprobs is not None:
                    choice["logprobs"] = _logprobs_object(self.engine.tokenizer, st.get("steps", []),
                                                          st["completion_tokens"], chat)
                if chat and job.structured is not None:
                    choice["message"], finish = job.structured.message(text)
                    choice["finish_reason"] = finish or st["finish_reason"]
                elif chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                choices.append(choice)
            usage = self._usage(job, {"completion_tokens": sum(st["completion_tokens"] for st in states)})
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                 "choices": choices, "usage": usage})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        jobs, states = self._choices(job, state)
        offsets = [0] * job.n  # legacy completions' text_offset runs on through a choice's chunks
        reported = [0] * job.n  # steps already reported per choice: each chunk carries the new ones

        def chunk(i: int, delta: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            logprobs = None
            if job.logprobs is not None:
                st = states[i]
                new = st.get("steps", [])[reported[i]:st.get("completion_tokens", 0)]
                reported[i] += len(new)
                if new:  # a chunk whose text was held back (a possible stop string) reports them later
                    logprobs = _logprobs_object(self.engine.tokenizer, new, len(new), chat, offsets[i])
                    if not chat:
                        offsets[i] += sum(len(t) for t in logprobs["tokens"])
            if chat:
                d: dict[str, Any] = {}
                if first:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                c: dict[str, Any] = {"index": i, "delta": d, "finish_reason": finish, "logprobs": logprobs}
            else:
                c = {"index": i, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}
            out: dict[str, Any] = {"id": rid, "object": chunk_obj, "created": created, "model": self.model_name,
                                   "choices": [c]}
            if job.include_usage:
                out["usage"] = None
            return out

        async def events() -> AsyncIterator[bytes]:
            # The n choices generate concurrently (the engine batches them); their chunks interleave,
            # each naming its choice by index, as OpenAI streams n > 1.
            merged: asyncio.Queue[tuple[int, str | BaseException | None]] = asyncio.Queue()

            async def pump(i: int) -> None:
                gen = self._generate(jobs[i], states[i])
                try:
                    async for delta in gen:
                        merged.put_nowait((i, delta))
                    merged.put_nowait((i, None))
                except Exception as exc:  # reported in-band below
                    merged.put_nowait((i, exc))
                finally:
                    await gen.aclose()

            pumps = [asyncio.ensure_future(pump(i)) for i in range(job.n)]
            try:
                if chat:
                    for i in range(job.n):
                        yield _sse(chunk(i, "", None, first=True))
                left = job.n
                while left:
                    i, item = await merged.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        left -= 1
                        yield _sse(chunk(i, None if chat else "", states[i]["finish_reason"]))
                    else:
                        yield _sse(chunk(i, item, None))
                if job.include_usage:
                    usage = self._usage(job, {"completion_tokens": sum(st["completion_tokens"] for st in states)})
                    yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": self.model_name,
                                "choices": [], "usage": usage})
            except Exception as exc:  # headers are gone: report in-band, as OpenAI does
                yield _sse({"error": {"message": f"generation failed: {exc}", "type": "server_error",
                                      "param": None, "code": None}})
            finally:
                for p in pumps:  # a client that left, or a failed choice: the others stop too
                    await cancel_and_wait(p)
            yield b"data: [DONE]\n\n"

        return _EventStream(events())

    # --------------------------------------------------------------------------- endpoints

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gradient-nb"}]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["model"]
        if name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse({"id": self.model_name, "object": "model", "created": self.created,
                             "owned_by": "gradient-nb"})

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        try:
            structured = StructuredOutput.from_request(body)
        except RequestError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        conv = _conversation(messages)
        if structured is not None:
            if body.get("stream") and structured.kind == "tool_call":
                raise ApiError(400, "streaming tool calls is not supported; send stream=false", param="stream")
            if conv[0]["role"] == "system":
                conv[0] = {"role": "system", "content": conv[0]["content"] + "\n\n" + structured.system_prompt()}
            else:
                conv.insert(0, {"role": "system", "content": structured.system_prompt()})
        tok = self.engine.tokenizer
        try:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may reject a conversation shape (e.g. two system turns)
            raise ApiError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        job = self._job(body, ids, None)
        if structured is not None:
            self._constrain(job, structured)
        return await self._respond(request, job, chat=True)

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = list(self.engine.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            vocab = len(self.engine.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list of one of those "
                                "(batches are not supported)", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return await self._respond(request, self._job(body, ids, 16), chat=False)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name})


def _conversation(messages: list[Any]) -> list[dict[str, str]]:
    """OpenAI messages as the chat template's turns. A tool result becomes a user turn that says so, and
    an assistant's tool calls their JSON (small models' templates know no tool role)."""
    conv = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user, assistant or tool", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role == "assistant" and m.get("tool_calls") and not m.get("content"):
            # Each call as the grammar makes the model write one ({"name", "arguments": {...}}, one per
            # line), so a conversation's earlier calls show the model the form of its next one.
            calls = [c.get("function", {}) for c in m["tool_calls"] if isinstance(c, dict)]
            text = "\n".join(json.dumps({"name": c.get("name"), "arguments": _arguments(c.get("arguments"))},
                                         separators=(",", ":")) for c in calls)
        else:
            text = _message_text(m.get("content"), i)
        if role == "tool":
            role, text = "user", f"[tool result] {text}"
        conv.append({"role": role, "content": text})
    return conv


def _arguments(raw: Any) -> Any:
    """A tool call's arguments as a JSON value (OpenAI sends them as a JSON string)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


async def _step_tokens(steps: AsyncIterator[Any], record: list[Any] | None = None) -> AsyncIterator[int]:
    try:
        async for step in steps:
            if record is not None:
                record.append(step)
            yield step.token
    finally:
        await steps.aclose()  # type: ignore[attr-defined]


def _logprobs_object(tokenizer: Any, steps: list[Any], count: int, chat: bool, offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs of a choice from the engine's steps (each token's log-probability under the
    distribution it was drawn from, and its top alternatives), for the ``count`` tokens of the answer
    (of a streamed chunk: its new tokens, ``offset`` the text already sent)."""
    steps = steps[:count]

    def text(t: int) -> str:
        return tokenizer.decode([t])

    if chat:
        return {"content": [{"token": text(s.token), "logprob": s.logprob, "bytes": list(text(s.token).encode()),
                             "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                                              for t, lp in s.top]} for s in steps], "refusal": None}
    offsets, at = [], offset
    for s in steps:
        offsets.append(at)
        at += len(text(s.token))
    return {"tokens": [text(s.token) for s in steps], "token_logprobs": [s.logprob for s in steps],
            "top_logprobs": [{text(t): lp for t, lp in s.top} for s in steps], "text_offset": offsets}


async def _collect(deltas: AsyncIterator[str]) -> str:
    try:
        return "".join([d async for d in deltas])
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]


async def _until_disconnect(request: Request) -> None:
    # The body has been read, so the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _EventStream(Response):
    """Server-sent events that stop the generator as soon as the client disconnects.

    Starlette's StreamingResponse only notices a gone client on its next write (or not at all,
    depending on the server's ASGI version), and leaves the iterator to the garbage collector; a
    long prefill would run to the end for nobody. Here a listener races the writer, and the
    generator is always closed.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def write() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        writer = asyncio.ensure_future(write())
        listener = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (writer, listener):
                t.cancel()
            results = await asyncio.gather(writer, listener, return_exceptions=True)
            await self.events.aclose()  # type: ignore[attr-defined]
        err = results[0]
        if isinstance(err, BaseException) and not isinstance(err, asyncio.CancelledError | OSError):
            raise err


def create_app(engine: Any, *, api_key: str | None, max_tokens_limit: int = 4096, model_name: str | None = None,
               context_length: int | None = None) -> Starlette:
    """The ASGI app serving ``engine``. ``api_key=None`` turns authentication off (loopback use only)."""
    app = _App(engine, api_key, max_tokens_limit, model_name, context_length)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None).response()

    async def on_crash(request: Request, exc: Exception) -> Response:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    routes = [
        Route("/v1/models", app.models, methods=["GET"]),
        Route("/v1/models/{model:path}", app.model, methods=["GET"]),
        Route("/v1/chat/completions", app.chat, methods=["POST"]),
        Route("/v1/completions", app.completions, methods=["POST"]),
        Route("/health", app.health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={
        ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash})


# ------------------------------------------------------------------------------- server


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiServer:
    """A running server: ``url`` (ending in /v1, ready for an OpenAI client) and ``stop()``."""

    def __init__(self, server: Any, task: asyncio.Task[None], host: str, port: int) -> None:
        self._server, self._task = server, task
        self.host, self.port = host, port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/v1"

    async def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def __aenter__(self) -> ApiServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _uvicorn_server(config: Any) -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        # A server inside a notebook kernel or a peer must not take over SIGINT/SIGTERM.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return _Server(config)


async def serve_api(engine: Any, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None, *,
                    max_tokens_limit: int = 4096, model_name: str | None = None,
                    context_length: int | None = None, startup_timeout: float = 10.0) -> ApiServer:
    """Start serving ``engine`` on this event loop; returns once the socket listens."""
    import uvicorn

    if api_key is None and not _is_loopback(host):
        raise ValueError(f"refusing to serve on {host!r} without an api_key: anyone who can reach it could "
                         f"use the model; pass api_key=..., or bind 127.0.0.1")
    app = create_app(engine, api_key=api_key, max_tokens_limit=max_tokens_limit, model_name=model_name,
                     context_length=context_length)
    # Bind here, not in uvicorn: a taken port raises OSError to the caller instead of sys.exit(1).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2,
                            access_log=False)
    server = _uvicorn_server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if task.done():
            sock.close()
            task.result()
            raise RuntimeError("the API server stopped during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            task.cancel()
            sock.close()
            raise TimeoutError("the API server did not start in time")
        await asyncio.sleep(0.01)
    return ApiServer(server, task, host, bound_port)
