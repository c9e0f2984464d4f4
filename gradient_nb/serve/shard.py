"""Run one shard (a layer range) for many sessions, with a KV cache per session and continuous batching.

Batching scheme: every step, the batcher takes the pending work of several sessions (prefill chunks
and single decode tokens, mixed) and concatenates all their new tokens into ONE sequence
``[1, N, hidden]``. Each token carries its own session's position id (rotary embedding), and the
attention mask is block-diagonal: a token sees only its own session's cached and new keys, causally
(and within the sliding window where a layer has one). The K/V of each session live in that session's
own preallocated buffers; a small cache adapter handed to transformers' decoder layers splits the
new keys per session, writes them into each session's buffers and returns the concatenation of every
session's keys, in the same order as the mask. So every Linear/MLP runs once over all N tokens (that
is where batching pays on CPU and GPU), the attention math is transformers' own (sdpa), and there is
no padding. Attention over the concatenation costs N x (sum of the sessions' lengths), masked
cross-session blocks included, which is fine at the sequence counts a shard serves here.

A request may enter the shard at any of its layers, not only the first (phase 2 of the scheduler
stitches replicas whose ranges overlap: one peer's layers 0..12, another's 12..18 of its 0..18). A
session keeps its entry layer and holds KV only for the layers it runs. In a step, sessions are
ordered by entry layer, and each joins the concatenated sequence when the pass reaches its entry, so
the usual case (everyone enters at the first layer) is exactly the scheme above.

A session alone in a step whose mask would be plain causal (a fresh prefill, or one decode token)
runs without a mask, exactly as transformers' ``generate`` does, so a one-session pipeline gives
the same floats as the plain model, not merely the same tokens.

The model work runs in the runtime's own single worker thread (torch releases the GIL), so the event
loop stays responsive while a step computes. One thread, always the same one: torch's CPU kernels
parallelise through an OpenMP team that belongs to the calling thread, so a shared pool would grow a
team per pool thread that happened to run a step. A serving peer's other torch work (sampling,
commitments) goes through ``run`` too, keeping the event loop's thread for the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..models.loader import DEFAULT_MODEL, ShardModel, load_shard, load_tokenizer, model_info, resolve_model
from .sampling import Sampler, SamplingParams, StopDetector, TokenStep, pack_mask

log = logging.getLogger(__name__)
T = TypeVar("T")

_KV_BLOCK = 128  # tokens of KV capacity added at a time: bounds waste and the copies on growth
_MAX_EVICTED_REMEMBERED = 65536


class ShardError(RuntimeError):
    """Base of the errors a shard reports to its caller."""


class SessionEvicted(ShardError):
    """The session's KV cache was evicted (limits / LRU): replay it from position 0."""


class PositionMismatch(ShardError, ValueError):
    """The positions sent do not continue the session's cache."""


class KVBudgetExceeded(ShardError):
    """One session alone needs more KV memory than the shard's budget."""


class RuntimeClosed(ShardError):
    pass


@dataclass
class _Session:
    id: str
    entry: int  # global index of the first layer this session runs (its KV covers entry..end)
    length: int = 0
    capacity: int = 0
    k: list[torch.Tensor] = field(default_factory=list)  # per local layer: [1, kv_heads, capacity, head_dim]
    v: list[torch.Tensor] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@dataclass
class _Request:
    session: str
    start: int  # position of inputs[0]
    inputs: torch.Tensor
    future: asyncio.Future
    entry: int  # the layer this request enters the shard at
    offset: int = 0  # tokens already run (a long prefill runs in chunks over several steps)
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.inputs.shape[0] - self.offset


@dataclass
class _Item:
    req: _Request
    session: _Session
    take: int  # tokens of this request in this step


class _BatchKV:
    """The cache object the decoder layers see for one step (duck-types transformers' Cache.update)."""

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.counts = [it.take for it in items]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = [], []
        for it, k_new, v_new in zip(self.items, key_states.split(self.counts, dim=2),
                                    value_states.split(self.counts, dim=2), strict=True):
            s, a, b = it.session, it.session.length, it.session.length + it.take
            li = layer_idx - s.entry
            s.k[li][:, :, a:b] = k_new
            s.v[li][:, :, a:b] = v_new
            ks.append(s.k[li][:, :, :b])
            vs.append(s.v[li][:, :, :b])
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


class ShardRuntime:
    """Serves ``forward`` calls of many sessions on one shard, batching concurrent calls into one pass."""

    def __init__(self, shard: ShardModel, *, max_batch_tokens: int = 1024, max_sessions: int = 64,
                 kv_budget_bytes: int = 2 << 30, torch_threads: int | None = None) -> None:
        if max_batch_tokens < 1 or max_sessions < 1 or kv_budget_bytes < 1:
            raise ValueError("max_batch_tokens, max_sessions and kv_budget_bytes must be positive")
        self.shard = shard
        self.max_batch_tokens = max_batch_tokens
        self.max_sessions = max_sessions
        self.kv_budget_bytes = kv_budget_bytes
        if torch_threads is not None:  # process-wide in torch; only set when the caller asks
            torch.set_num_threads(torch_threads)
        cfg = shard.config
        self._kv_heads = cfg.num_key_value_heads
        self._head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._kv_dtype = shard.dtype
        self._windows = [shard.window_of(layer) for layer in shard.layers]
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # LRU order: oldest first
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._queue: list[_Request] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: set[str] = set()  # sessions inside the step now computing
        self._pending_drops: set[str] = set()
        self._closed = False
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-model")
        self.steps = 0
        self.batched_tokens = 0

    # ----------------------------------------------------------------------------- public API

    @property
    def is_first(self) -> bool:
        return self.shard.is_first

    @property
    def is_last(self) -> bool:
        return self.shard.is_last

    @property
    def start(self) -> int:
        return self.shard.start

    @property
    def end(self) -> int:
        return self.shard.end

    async def forward(self, session_id: str, positions: Sequence[int] | torch.Tensor,
                      inputs: torch.Tensor, entry: int | None = None) -> torch.Tensor:
        """Run this shard's layers ``entry``..end (default: all of them) on a session's new tokens.

        Entering at layer 0: ``inputs`` are token ids [T] (int64); else hidden states [T, hidden].
        A session keeps the entry layer it started with.
        Returns the logits of the last position [vocab] (float32) on the last stage, else the hidden
        states [T, hidden]. ``positions`` must be consecutive and start at the session's length; a
        start below it truncates the cache (replay after a failover).
        """
        if self._closed:
            raise RuntimeClosed("the shard runtime is closed")
        pos = positions.tolist() if isinstance(positions, torch.Tensor) else [int(p) for p in positions]
        n = inputs.shape[0] if inputs.dim() > 0 else 0
        if n == 0 or len(pos) != n:
            raise ValueError(f"need one position per input token, got {len(pos)} positions for {n} tokens")
        if pos != list(range(pos[0], pos[0] + n)) or pos[0] < 0:
            raise PositionMismatch(f"positions must be consecutive and non-negative, got {pos[:4]}...")
        entry = self.start if entry is None else int(entry)
        if not self.start <= entry < self.end:
            raise ValueError(f"entry layer {entry} is outside this shard's layers {self.start}..{self.end}")
        if entry == 0:
            if inputs.dim() != 1 or inputs.dtype not in (torch.int64, torch.int32):
                raise ValueError("the first stage takes a 1-d tensor of token ids")
            inputs = inputs.to(torch.int64)
        else:
            hidden = self.shard.config.hidden_size
            if inputs.dim() != 2 or inputs.shape[1] != hidden or not inputs.is_floating_point():
                raise ValueError(f"this stage takes hidden states [tokens, {hidden}]")
            inputs = inputs.to(self._kv_dtype)
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(session_id, pos[0], inputs, fut, entry))
        self._ensure_batcher()
        self._wake.set()
        return await fut

    def drop(self, session_id: str) -> None:
        """Forget a session's cache (the request ended)."""
        self._evicted.pop(session_id, None)
        if session_id in self._running:
            self._pending_drops.add(session_id)
        else:
            self._sessions.pop(session_id, None)

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def session_length(self, session_id: str) -> int | None:
        s = self._sessions.get(session_id)
        return None if s is None else s.length

    def kv_bytes(self) -> int:
        """Bytes of KV buffers held (allocated capacity, which is what memory pays for)."""
        return sum(s.nbytes() for s in self._sessions.values())

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the model thread, after the work queued there (see the module doc)."""
        if self._closed:
            raise RuntimeClosed("the shard runtime is closed")
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    async def aclose(self) -> None:
        """Stop the batcher and the model thread; pending calls fail with RuntimeClosed."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_pending(RuntimeClosed("the shard runtime was closed"))
        self._model_thread.shutdown(wait=False)  # what is queued there still runs, then the thread ends

    # ------------------------------------------------------------------------------ batcher

    def _ensure_batcher(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._batcher(), name="shard-batcher")

    def _fail_pending(self, exc: BaseException) -> None:
        for r in self._queue:
            if not r.future.done():
                r.future.set_exception(exc)
        self._queue.clear()

    async def _batcher(self) -> None:
        try:
            while True:
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                try:
                    items = self._schedule()
                except Exception as exc:  # a scheduling bug must not leave callers waiting forever
                    log.exception("shard scheduling failed")
                    self._fail_pending(exc)
                    continue
                if not items:
                    await asyncio.sleep(0)
                    continue
                self._running = {it.session.id for it in items}
                try:
                    results = await self.run(self._step, items)
                except Exception as exc:  # a failed pass fails its requests, not the runtime
                    log.exception("shard step failed")
                    for it in items:
                        self._finish(it.req, exc=exc)
                else:
                    for it, out in zip(items, results, strict=True):
                        self._advance(it, out)
                finally:
                    self._running = set()
                    for sid in self._pending_drops:
                        self._sessions.pop(sid, None)
                    self._pending_drops.clear()
                # Let the callers just answered submit their next token, so they join the next step
                # instead of trailing one step behind.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._fail_pending(RuntimeClosed("the shard runtime was closed"))
            raise

    def _finish(self, req: _Request, result: torch.Tensor | None = None, exc: BaseException | None = None
                ) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(req)
        if req.future.done():
            return
        if exc is not None:
            req.future.set_exception(exc)
        else:
            req.future.set_result(result)

    def _advance(self, it: _Item, out: torch.Tensor | None) -> None:
        req = it.req
        req.offset += it.take
        if out is not None and not self.is_last:
            req.outputs.append(out)
        if req.remaining == 0:
            if self.is_last:
                self._finish(req, out)
            else:
                self._finish(req, req.outputs[0] if len(req.outputs) == 1 else torch.cat(req.outputs))

    def _schedule(self) -> list[_Item]:
        """Pick this step's work: FIFO, one request per session, at most max_batch_tokens tokens."""
        budget = self.max_batch_tokens
        items: list[_Item] = []
        taken: set[str] = set()
        for req in list(self._queue):
            if budget == 0:
                break
            if req.future.done():  # the caller gave up (cancelled)
                self._queue.remove(req)
                continue
            if req.session in taken:
                continue  # its earlier request goes first
            taken.add(req.session)
            try:
                s = self._session_for(req, taken)
            except ShardError as exc:
                self._finish(req, exc=exc)
                continue
            if s is None:
                continue  # no room this step
            total = self._bytes_for(s.length + req.remaining, s.entry)
            if total > self.kv_budget_bytes:  # could never fit: fail before evicting anyone for it
                if s.length == 0:
                    self._sessions.pop(s.id, None)
                self._finish(req, exc=KVBudgetExceeded(
                    f"session {req.session!r} needs {total} bytes of KV cache on layers "
                    f"{self.start}..{self.end}, over the shard's budget of {self.kv_budget_bytes}"))
                continue
            take = min(req.remaining, budget)
            if not self._reserve(s, take, items):
                continue  # the sessions of this step hold the memory: it waits for a later step
            self._sessions.move_to_end(s.id)
            items.append(_Item(req, s, take))
            budget -= take
        return items

    def _session_for(self, req: _Request, protected: set[str]) -> _Session | None:
        s = self._sessions.get(req.session)
        pos = req.start + req.offset
        if req.offset > 0:  # a later chunk of a long prefill
            if s is None:
                raise SessionEvicted(f"session {req.session!r} was evicted mid-prefill; replay it from 0")
            return s
        if s is not None and s.entry != req.entry:
            if pos != 0:
                raise PositionMismatch(f"session {req.session!r} entered at layer {s.entry}, not {req.entry}; "
                                       "a session keeps its entry layer (replay from position 0 to change it)")
            if s.id in self._running:
                return None
            del self._sessions[s.id]  # a replay from 0 entering elsewhere: a fresh cache
            s = None
        if s is None:
            if pos != 0:
                if req.session in self._evicted:
                    raise SessionEvicted(f"session {req.session!r} was evicted from this shard "
                                         f"(layers {self.start}..{self.end}); replay it from position 0")
                raise PositionMismatch(f"unknown session {req.session!r} must start at position 0, not {pos}")
            while len(self._sessions) >= self.max_sessions:
                if not self._evict_one(protected):
                    return None
            self._evicted.pop(req.session, None)
            s = self._sessions[req.session] = _Session(req.session, req.entry)
            return s
        if pos > s.length:
            raise PositionMismatch(f"session {req.session!r} holds {s.length} positions; "
                                   f"got position {pos} (positions cannot skip ahead)")
        s.length = pos  # pos < length: the caller replays from pos, the cache after it is stale
        return s

    def _evict_one(self, protected: set[str]) -> bool:
        for sid in self._sessions:  # oldest first
            if sid not in protected and sid not in self._running:
                del self._sessions[sid]
                self._evicted[sid] = None
                while len(self._evicted) > _MAX_EVICTED_REMEMBERED:
                    self._evicted.popitem(last=False)
                log.info("evicted session %s from layers %d..%d", sid, self.start, self.end)
                return True
        return False

    def _bytes_for(self, tokens: int, entry: int) -> int:
        cap = -(-tokens // _KV_BLOCK) * _KV_BLOCK
        per_token = 2 * (self.end - entry) * self._kv_heads * self._head_dim * self._kv_dtype.itemsize
        return cap * per_token

    def _reserve(self, s: _Session, take: int, items: list[_Item]) -> bool:
        """Make room under the KV budget for ``s`` to grow by ``take`` tokens, evicting LRU sessions."""
        need = self._bytes_for(s.length + take, s.entry) - s.nbytes()
        if need <= 0:
            return True
        protected = {it.session.id for it in items} | {s.id}
        while self.kv_bytes() + need > self.kv_budget_bytes:
            if not self._evict_one(protected):
                return False
        return True

    # --------------------------------------------------------------------------- model pass

    def _grow(self, s: _Session, tokens: int) -> None:
        if tokens <= s.capacity:
            return
        cap = -(-tokens // _KV_BLOCK) * _KV_BLOCK
        dev = self.shard.device

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            t = torch.empty(1, self._kv_heads, cap, self._head_dim, dtype=self._kv_dtype, device=dev)
            if old is not None and s.length:
                t[:, :, : s.length] = old[:, :, : s.length]
            return t

        n = self.end - s.entry
        s.k = [grown(s.k[i] if s.k else None) for i in range(n)]
        s.v = [grown(s.v[i] if s.v else None) for i in range(n)]
        s.capacity = cap

    def _masks(self, items: list[_Item]) -> dict[int | None, torch.Tensor | None]:
        dev = self.shard.device
        out: dict[int | None, torch.Tensor | None] = {}
        for window in set(self._windows):
            if len(items) == 1:
                it = items[0]
                kv_len = it.session.length + it.take
                # What transformers itself does: plain causal attention needs no mask (sdpa is_causal)
                if (it.session.length == 0 or it.take == 1) and (window is None or kv_len <= window):
                    out[window] = None
                    continue
            q_seg, q_pos, k_seg, k_pos = [], [], [], []
            for i, it in enumerate(items):
                a = it.session.length
                q_seg.append(torch.full((it.take,), i, device=dev))
                q_pos.append(torch.arange(a, a + it.take, device=dev))
                k_seg.append(torch.full((a + it.take,), i, device=dev))
                k_pos.append(torch.arange(a + it.take, device=dev))
            qs, qp, ks, kp = (torch.cat(x) for x in (q_seg, q_pos, k_seg, k_pos))
            allowed = (qs[:, None] == ks[None, :]) & (kp[None, :] <= qp[:, None])
            if window is not None:
                allowed &= (qp[:, None] - kp[None, :]) < window
            out[window] = allowed[None, None]
        return out

    def _step(self, items: list[_Item]) -> list[torch.Tensor | None]:
        shard = self.shard
        dev = shard.device
        with torch.inference_mode():
            for it in items:
                self._grow(it.session, it.session.length + it.take)
            # Sessions join the sequence at their entry layer; sorting keeps each joiner a suffix.
            order = sorted(range(len(items)), key=lambda i: items[i].session.entry)
            active: list[_Item] = []
            h: torch.Tensor | None = None
            masks: dict[int | None, torch.Tensor | None] = {}
            rope = pos = cache = None
            for li, (layer, window) in enumerate(zip(shard.layers, self._windows, strict=True)):
                layer_idx = shard.start + li
                joining = [items[i] for i in order if items[i].session.entry == layer_idx]
                if joining:
                    x = torch.cat([it.req.inputs[it.req.offset: it.req.offset + it.take] for it in joining]).to(dev)
                    new = (shard.embed_tokens(x) if layer_idx == 0 else x)[None]
                    h = new if h is None else torch.cat([h, new], dim=1)
                    active += joining
                    pos = torch.cat([torch.arange(it.session.length, it.session.length + it.take)
                                     for it in active])[None].to(dev)
                    rope = shard.rotary_emb(h, pos)
                    masks = self._masks(active)
                    cache = _BatchKV(active)
                if h is None:
                    continue
                h = layer(h, attention_mask=masks[window], position_ids=pos, cache=cache,
                          use_cache=True, position_embeddings=rope)
            assert h is not None and len(active) == len(items)
            h = h[0]
            for it in items:
                it.session.length += it.take
            self.steps += 1
            self.batched_tokens += h.shape[0]
            results: list[torch.Tensor | None] = [None] * len(items)
            ends = torch.tensor([it.take for it in active]).cumsum(0).tolist()
            if not self.is_last:
                a = 0
                for i, b in zip(order, ends, strict=True):
                    results[i] = h[a:b].cpu()
                    a = b
                return results
            finals = [(i, b) for i, b in zip(order, ends, strict=True) if items[i].req.remaining == items[i].take]
            if finals:
                rows = h[[b - 1 for _, b in finals]]
                logits = shard.lm_head(shard.norm(rows[:, None]))[:, 0].float().cpu()
                for j, (i, _) in enumerate(finals):
                    results[i] = logits[j]
            return results


# ------------------------------------------------------------------------- one-process engine


class LocalEngine:
    """The whole model as ONE shard in this process: a baseline, and batching without a mesh."""

    def __init__(self, path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, *,
                 quantization: str | None = None, **runtime_kwargs: Any) -> None:
        self.path = resolve_model(path)
        self.info = model_info(self.path)
        self.tokenizer = load_tokenizer(self.path)
        shard = load_shard(self.path, 0, self.info.num_layers, dtype=dtype, quantization=quantization)
        self.runtime = ShardRuntime(shard, **runtime_kwargs)
        self.eos_ids = _eos_ids(self.path, self.tokenizer)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[int]:
        """Yield generated token ids; stops at EOS (not yielded), max_tokens, or after the token that
        completes a stop string (the caller trims the text with StopDetector, as this does to decide)."""
        async for step in self.generate_steps(prompt_ids, params):
            yield step.token

    async def generate_steps(self, prompt_ids: Sequence[int], params: SamplingParams,
                             constraint: Any = None) -> AsyncIterator[TokenStep]:
        """``generate`` with each token's log-probabilities, under an optional ``constraint`` (as
        ``MeshEngine.generate_steps``)."""
        sid = uuid.uuid4().hex
        sampler = Sampler(params)
        stops = StopDetector(self.tokenizer, params.stop) if params.stop else None
        ids = torch.tensor(list(prompt_ids), dtype=torch.int64)
        vocab = self.info.vocab_size
        try:
            logits = await self.runtime.forward(sid, range(ids.shape[0]), ids)
            pos = ids.shape[0]
            for i in range(params.max_tokens):
                allowed = constraint.allowed() if constraint is not None else None
                step = sampler.next_step(logits[:vocab], None if allowed is None else pack_mask(allowed, vocab))
                tok = step.token
                if tok in self.eos_ids:
                    return
                if constraint is not None:
                    constraint.accept(tok)
                yield step
                if stops is not None:
                    stops.push(tok)
                    if stops.stopped:
                        return
                if i + 1 == params.max_tokens:
                    return
                logits = await self.runtime.forward(sid, [pos], torch.tensor([tok]))
                pos += 1
        finally:
            self.runtime.drop(sid)

    async def aclose(self) -> None:
        await self.runtime.aclose()


def _eos_ids(path: Any, tokenizer: Any) -> set[int]:
    from transformers import GenerationConfig

    ids: set[int] = set()
    with contextlib.suppress(OSError):
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def reference_greedy(model: Any, tokenizer: Any, prompt_ids: Sequence[int], n: int) -> list[int]:
    """Plain transformers greedy decoding: up to ``n`` new tokens, EOS excluded (as LocalEngine)."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.int64)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    for i, t in enumerate(new):
        if t in eos_ids:
            return new[:i]
    return new
