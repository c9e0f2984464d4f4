"""Generation across the mesh: phase 2 of the scheduler, the token loop, and failover.

The entry peer (the one a user talks to) drives every request: for each step it sends the new tokens
through the chain of stages chosen for the request, and the last stage draws the next token (from a
per-step seed the entry gives it, so only a token id comes back, not the vocabulary's logits). Each
stage keeps the request's KV cache, so a decode step moves one token's hidden state per hop.
Concurrent requests on the same chain travel together: one call per stage carries all their steps,
and the stage runs them as one batched model pass.

Forwarding (the default, ``MeshEngine.forwarding``): the entry sends a step's tokens to the first stage
only; each stage calls the next with its hidden states, and the last stage draws the tokens and calls
the entry back (``serve.chain_result``) with every stage's answers: N + 1 messages on a step's path
instead of the star's 2N (the entry calling each stage in turn). The entry still holds the tokens, so
failover replays them as before. A chain whose stages cannot link to each other (a stage answers
``NoLinkToNext``) is served as a star for ``STAR_FALLBACK_S``.

When a stage fails (its peer vanished, timed out or lost its layers), the request re-routes over the
peers that now cover the layers (waiting for the coordinator to re-plan if nobody does), and replays
the tokens so far as one prefill on the new chain, which rebuilds every cache. Greedy decoding then
continues with exactly the tokens it would have produced: the user sees a slower token, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..mesh.errors import MeshError, RemoteError, remote_error
from ..mesh.frames import Message
from ..mesh.peer import Mesh
from ..mesh.tasks import cancel_and_wait
from ..models import load_tokenizer, model_info, resolve_model
from .coordinator import allocation_of, model_cost, serving_peers
from .node import MAX_NEW_TOKENS_PER_CALL, BadReply, forward_items, token_step
from .observers import RequestObserver
from .sampling import Sampler, SamplingParams, TokenStep, mask_nbytes, pack_mask
from .scheduler import Stage, route

log = logging.getLogger(__name__)

STAGE_TIMEOUT = 60.0
# Per-hop overhead assumed until measured: about what a loopback hop of this project's RPC costs on a
# 2-core CPU (framing, data channel, event loops), i.e. 2 layers of the default model's compute.
INITIAL_HOP_OVERHEAD_S = 0.002
REROUTE_TIMEOUT = 120.0
# How long a batch waits for the chain's other requests to submit their step: about one hop's overhead,
# small against a step, long enough for requests woken by the previous batch to catch up.
GATHER_WAIT_S = 0.002
MAX_BATCH_TOKENS = MAX_NEW_TOKENS_PER_CALL
# Token masks ride in the call's header, which frames bound (1 MiB): a batch carries at most this many
# bytes of them.
MAX_BATCH_MASK_BYTES = 512 << 10
# Pipelining pays where a hop costs more than this beyond compute (network delay between machines); on
# one host (hops of 1-3 ms of CPU work) extra groups in flight only add that work (measured).
PIPELINE_MIN_HOP_S = 0.008
STAR_FALLBACK_S = 300.0  # how long a chain whose stages could not link is served as a star


class Constraint(Protocol):
    """Restricts the tokens of a generation step by step (constrained decoding, e.g. a grammar)."""

    def allowed(self) -> torch.Tensor | None:
        """A bool mask over the vocabulary of the tokens the next step may draw (None: any)."""
        ...

    def accept(self, token: int) -> None:
        """The token drawn at this step (not called for the end-of-sequence token that ends generation)."""
        ...


class NoRoute(MeshError):
    """No chain of live peers covers every layer of the model."""


class EngineClosed(MeshError):
    """The engine was closed while the request was generating."""


class ChainUnlinked(MeshError):
    """A stage of a forwarding chain could not link to the next one: the step is replayed on the star."""


class StageFailed(MeshError):
    """A stage of a forwarding chain failed (as reported by the stage before it)."""

    def __init__(self, message: str, peer_id: str) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class _ChainResults:
    """The entry's end of forwarding: ``serve.chain_result`` calls from the chains' last stages, handed to
    the batches that wait for them. One per mesh (several engines may share a mesh)."""

    def __init__(self, mesh: Mesh) -> None:
        self.waiting: dict[str, tuple[asyncio.Future, set[str]]] = {}
        mesh.offer("serve.chain_result", self._on_result)

    def expect(self, cid: str, stages: set[str]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[cid] = (fut, stages)
        return fut

    async def _on_result(self, msg: Message, ctx: Any) -> Message:
        cid = msg.header.get("id")
        waiting = self.waiting.get(cid) if isinstance(cid, str) else None
        if waiting is None:
            raise LookupError("no step waits for this chain result (it timed out or was answered)")
        fut, stages = waiting
        if ctx.peer_id not in stages:
            raise PermissionError("only a stage of the chain answers for it")
        if not fut.done():
            fut.set_result((ctx.peer_id, msg))
        return Message({"ok": True})


_CHAIN_RESULTS: weakref.WeakKeyDictionary[Mesh, _ChainResults] = weakref.WeakKeyDictionary()


def _chain_results(mesh: Mesh) -> _ChainResults:
    found = _CHAIN_RESULTS.get(mesh)
    if found is None:
        found = _CHAIN_RESULTS[mesh] = _ChainResults(mesh)
    return found


@dataclass
class RequestTrace:
    """What happened to one request: the chains it used and how long things took."""

    routes: list[list[tuple[str, int, int]]] = field(default_factory=list)
    failovers: int = 0
    first_token_s: float | None = None
    tokens: int = 0
    observed: dict[str, Any] = field(default_factory=dict)  # each observer's record, by its name


class MeshEngine:
    """Generates with a model served by the mesh; the OpenAI API and the notebook use this.
    ``observers`` watch every request (``gradient_nb.verify.attach_verification`` adds verification)."""

    def __init__(self, mesh: Mesh, model: str | None = None, *,
                 observers: Sequence[RequestObserver] = ()) -> None:
        self.mesh = mesh
        self.path = resolve_model(model) if model is not None else resolve_model()
        self.info = model_info(self.path)
        self.model_name = self.info.name
        self.tokenizer = load_tokenizer(self.path)
        self.eos_ids = _eos_ids(self.tokenizer, self.path)
        self.cost = model_cost(self.path)
        self.traces: list[RequestTrace] = []
        self._inflight: dict[str, int] = {}  # peer id -> requests routed through it by this entry
        self._background: set[asyncio.Task] = set()
        self.hop_overhead_s = INITIAL_HOP_OVERHEAD_S  # measured: call wall time minus the shard's compute
        self.observers: list[RequestObserver] = list(observers)
        self._batchers: dict[tuple, _ChainBatcher] = {}
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # requests per chain pass, newest last
        self._active: dict[tuple, int] = {}  # chain -> requests generating on it now
        self._closed = False
        self.forwarding = True  # stage to stage (N + 1 messages a step); False: the star (2N)
        self.micro_batches: int | None = None  # pipelining; None: micro_batches_for decides
        self._star_until: dict[tuple, float] = {}  # chains whose stages could not link: star until then
        # Those chains (peer, start, end per stage) while they are served as a star: why, as the stage said.
        self.unlinked: dict[tuple, str] = {}
        self.step_calls = {"chain": 0, "star": 0}  # batches sent each way
        # Per stage (peer, start, end): its compute per decode step, ms (moving average), as it reports it.
        self.stage_compute_ms: dict[tuple[str, int, int], float] = {}
        self.last_compute_ms: dict[tuple[str, int, int], float] = {}  # the same, of the latest step only

    # -- routing -------------------------------------------------------------------------------
    def current_route(self, prompt_tokens: int = 1, exclude: set[str] = frozenset()) -> list[Stage]:
        alloc = allocation_of(self.mesh, self.model_name)
        live = serving_peers(self.mesh, self.model_name)
        if alloc is None:
            raise NoRoute(f"no allocation for {self.model_name} yet")
        # Only peers that are alive, have loaded the layers they were given, and did not just fail us.
        ready = {}
        exclude = set(exclude).union(*(obs.avoided_peers() for obs in self.observers))
        for pid, rec in live.items():
            held = alloc.layers_of(pid)
            if pid not in exclude and held is not None and rec["serving"].get("ready") and \
                    rec["serving"].get("layers") == [held.start, held.stop]:
                ready[pid] = rec
        load = {pid: self._inflight.get(pid, 0) for pid in ready}
        try:
            # Chains may enter a peer at any layer it holds (it runs to the end of its range), so
            # replicas stitch: around a loaded peer, or around a lost one before any re-plan.
            return route(alloc, self.info.num_layers, peers=_resources(ready), links=_link_rtts(self.mesh, ready),
                         load=load, model_cost=self.cost, prompt_tokens=prompt_tokens,
                         hop_overhead_s=self.hop_overhead_s)
        except RuntimeError as exc:
            raise NoRoute(f"the live peers do not cover all {self.info.num_layers} layers of "
                          f"{self.model_name}: {exc}") from None

    async def _wait_route(self, prompt_tokens: int, exclude: set[str], timeout: float) -> list[Stage]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.current_route(prompt_tokens, exclude)
            except NoRoute:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    # -- one step ------------------------------------------------------------------------------
    async def _step(self, chain: list[Stage], session: str, pos: int, tokens: list[int], trace: RequestTrace,
                    sample: dict[str, Any]) -> TokenStep:
        """Run a request's new tokens through ``chain``; the last stage draws the next token."""
        if self._closed:
            raise EngineClosed("the engine was closed")
        key = _chain_key(chain)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = self._batchers[key] = _ChainBatcher(self, chain)
        return await batcher.submit(_Pending(session, pos, torch.tensor(tokens, dtype=torch.int64), sample, trace))

    def micro_batches_for(self, chain: list[Stage]) -> int:
        """Groups of requests in flight along ``chain`` at once (pipelining): ``micro_batches`` when set,
        else 2 where the network dominates a hop (measured overhead over ``PIPELINE_MIN_HOP_S``, stages
        on other machines), 1 where it does not (on one host extra groups only add overhead)."""
        if self.micro_batches is not None:
            return max(1, int(self.micro_batches))
        return 2 if self.forwards(chain) and self.hop_overhead_s > PIPELINE_MIN_HOP_S else 1

    def forwards(self, chain: list[Stage]) -> bool:
        """Whether a step on ``chain`` goes stage to stage (else the entry calls each stage: the star)."""
        key = _chain_key(chain)
        if key in self._star_until and self._star_until[key] < time.monotonic():  # its star time is over
            del self._star_until[key]
            self.unlinked.pop(key, None)
        return self.forwarding and len(chain) > 1 and key not in self._star_until

    async def _run_batch(self, chain: list[Stage], batch: list[_Pending]) -> None:
        """One step of every request in ``batch`` through ``chain``: one call per stage carries them all,
        so each stage runs them as one model pass. A request's own error fails only that request."""
        if self.forwards(chain):
            self.step_calls["chain"] += 1
            return await self._run_chain(chain, batch)
        self.step_calls["star"] += 1
        inputs = {id(p): p.x for p in batch}
        live = batch
        for i, stage in enumerate(chain):
            last = i == len(chain) - 1
            live = [p for p in live if not p.future.done()]  # a cancelled request stops here
            if not live:
                return
            items = [{"session": p.session, "pos": p.pos, "n": int(p.x.shape[0]),
                      **({"sample": p.sample} if last else {})} for p in live]
            t0 = time.perf_counter()
            reply = await self.mesh.call(stage.peer_id, "shard.forward", Message(
                {"model": self.model_name, "start": stage.start, "end": stage.end, "items": items},
                {"x": torch.cat([inputs[id(p)] for p in live])}), timeout=STAGE_TIMEOUT)
            compute = reply.header.get("compute_ms")
            if isinstance(compute, int | float) and 0 <= compute:
                self._note_compute(stage, compute, live)
                overhead = max(0.0, time.perf_counter() - t0 - compute / 1000)
                self.hop_overhead_s = 0.9 * self.hop_overhead_s + 0.1 * min(overhead, 1.0)
            try:
                answers = forward_items(reply, len(live))
                ok = [(p, a) for p, a in zip(live, answers, strict=True) if "error" not in a]
                if last:
                    steps = {id(p): token_step(a, p.sample, self.info.vocab_size) for p, a in ok}
                else:
                    y = reply.tensors.get("y")
                    rows = sum(int(p.x.shape[0]) for p, _ in ok)
                    if ok and (y is None or y.dim() != 2 or y.shape != (rows, self.info.hidden_size)
                               or not y.is_floating_point()):
                        raise BadReply(f"the stage returned hidden states of shape "
                                       f"{None if y is None else tuple(y.shape)} for {rows} tokens")
            except BadReply as exc:
                exc.peer_id = stage.peer_id
                raise
            offset = 0
            for p, a in zip(live, answers, strict=True):
                if "error" in a:
                    p.fail(remote_error(str(a["error"]), str(a.get("message", ""))))
                    continue
                seen = {**a, "sample": p.sample} if last else a  # what the last stage was asked to draw
                for obs in self.observers:
                    obs.on_call(p.trace.observed[obs.name], stage.peer_id, stage.start, stage.end, p.session,
                                p.pos, inputs[id(p)], seen)
                if last:
                    p.done(steps[id(p)])
                else:
                    n = int(p.x.shape[0])
                    inputs[id(p)] = y[offset: offset + n]
                    offset += n
            live = [p for p, _ in ok]

    async def _run_chain(self, chain: list[Stage], batch: list[_Pending]) -> None:
        """``_run_batch`` by forwarding: one call to the first stage, the answer from the last."""
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        cid, results = secrets.token_hex(8), _chain_results(self.mesh)
        fut = results.expect(cid, {s.peer_id for s in chain})
        header = {"model": self.model_name, "start": chain[0].start, "end": chain[0].end,
                  "items": [{"session": p.session, "pos": p.pos, "n": int(p.x.shape[0]), "sample": p.sample}
                            for p in live],
                  "chain": {"id": cid, "origin": self.mesh.id, "stages": [], "inputs": bool(self.observers),
                            "next": [[s.peer_id, s.start, s.end] for s in chain[1:]]}}
        t0 = time.perf_counter()
        call = asyncio.ensure_future(self.mesh.call(chain[0].peer_id, "shard.forward", Message(
            header, {"x": torch.cat([p.x for p in live])}), timeout=STAGE_TIMEOUT))
        try:
            # A little longer than the call: a stage whose next one hangs reports it before the call expires.
            await asyncio.wait({call, fut}, timeout=STAGE_TIMEOUT + 5, return_when=asyncio.FIRST_COMPLETED)
            if not fut.done() and call.done():
                self._chain_failure(chain, call)  # raises what went wrong along the chain
                # Acknowledged without a result: the result call was answered before, so it is here soon.
                await asyncio.wait({fut}, timeout=5.0)
            if not fut.done():
                raise BadReply(f"the chain through {chain[-1].peer_id[:8]} did not answer the step", chain[-1].peer_id)
            sender, msg = fut.result()
        finally:
            results.waiting.pop(cid, None)
            if call.done():
                _retrieve(call)
            else:  # the acknowledgements come back along the chain after the result: let them
                if self._closed:
                    call.cancel()
                self._background.add(call)
                call.add_done_callback(self._background.discard)
                call.add_done_callback(_retrieve)
        self._take_chain_result(chain, live, sender, msg, time.perf_counter() - t0)

    def _chain_failure(self, chain: list[Stage], call: asyncio.Future) -> None:
        exc = call.exception()
        if exc is None:
            return
        if isinstance(exc, RemoteError) and exc.code == "NoLinkToNext":
            log.warning("chain %s cannot forward (%s): serving it as a star", [s.peer_id[:8] for s in chain],
                        exc.remote_message)
            self._star_until[_chain_key(chain)] = time.monotonic() + STAR_FALLBACK_S
            self.unlinked[_chain_key(chain)] = exc.remote_message
            raise ChainUnlinked(f"the chain's stages cannot link to each other: {exc.remote_message}")
        if isinstance(exc, RemoteError) and exc.code == "NextStageFailed":
            named = [s.peer_id for s in chain[1:] if s.peer_id in exc.remote_message]
            raise StageFailed(exc.remote_message, named[0] if named else chain[0].peer_id)
        if isinstance(exc, RemoteError) and exc.code not in ("BadForward", "SessionEvicted", "RuntimeClosed"):
            raise StageFailed(str(exc), chain[0].peer_id)
        raise exc

    def _take_chain_result(self, chain: list[Stage], live: list[_Pending], sender: str, msg: Message,
                           wall_s: float) -> None:
        stages = msg.header.get("stages")
        if not isinstance(stages, list) or not 0 < len(stages) <= len(chain) or \
                sender != chain[len(stages) - 1].peer_id:
            raise BadReply("the chain's result does not answer for its stages", sender)
        computes = []
        for i, (stage, rec) in enumerate(zip(chain, stages, strict=False)):
            if not isinstance(rec, dict) or rec.get("peer") != stage.peer_id:
                raise BadReply(f"the chain's result misreports stage {i}", sender)
            last = i == len(chain) - 1
            try:
                answers = forward_items(Message(rec), len(live))
                ok = [(p, a) for p, a in zip(live, answers, strict=True) if "error" not in a]
                if i == len(stages) - 1 and not last and ok:
                    raise BadReply("the chain's result stops before its last stage")
                steps = {id(p): token_step(a, p.sample, self.info.vocab_size) for p, a in ok} if last else {}
                x = msg.tensors.get(f"in{i}") if i else None
                rows = sum(int(p.x.shape[0]) for p in live)
                if i and self.observers and (x is None or x.shape != (rows, self.info.hidden_size)):
                    raise BadReply(f"the chain's result lacks stage {i}'s inputs")
            except BadReply as exc:
                exc.peer_id = stage.peer_id
                raise
            compute = rec.get("compute_ms")
            computes.append(compute / 1000 if isinstance(compute, int | float) and compute >= 0 else 0.0)
            self._note_compute(stage, 1000 * computes[-1], live)
            offset = 0
            for p, a in zip(live, answers, strict=True):
                n = int(p.x.shape[0])
                xi = p.x if i == 0 else None if x is None else x[offset: offset + n]
                offset += n
                if "error" in a:
                    p.fail(remote_error(str(a["error"]), str(a.get("message", ""))))
                    continue
                seen = {**a, "sample": p.sample} if last else a
                for obs in self.observers:
                    obs.on_call(p.trace.observed[obs.name], stage.peer_id, stage.start, stage.end, p.session,
                                p.pos, xi, seen)
                if last:
                    p.done(steps[id(p)])
            live = [p for p, _ in ok]
        overhead = max(0.0, wall_s - sum(computes)) / (len(chain) + 1)
        self.hop_overhead_s = 0.9 * self.hop_overhead_s + 0.1 * min(overhead, 1.0)

    def _note_compute(self, stage: Stage, ms: float, batch: list[_Pending]) -> None:
        key = (stage.peer_id, stage.start, stage.end)
        self.last_compute_ms[key] = ms
        if any(p.x.shape[0] > 1 for p in batch):
            return  # a prefill: stage_compute_ms tracks decode steps
        old = self.stage_compute_ms.get(key)
        self.stage_compute_ms[key] = ms if old is None else 0.8 * old + 0.2 * ms

    async def _drop(self, chain: list[Stage], session: str, trace: RequestTrace) -> None:
        for stage in chain:
            with contextlib.suppress(MeshError, TimeoutError):
                reply = await self.mesh.call(stage.peer_id, "shard.drop", Message({"session": session}), timeout=5)
                for obs in self.observers:
                    obs.on_drop(trace.observed[obs.name], stage.peer_id, stage.start, stage.end, session,
                                reply.header)

    # -- the token loop ------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """Yield the generated token ids (EOS ends generation and is not yielded)."""
        async for step in self.generate_steps(prompt_ids, params):
            yield step.token

    async def generate_steps(self, prompt_ids: list[int], params: SamplingParams,
                             constraint: Constraint | None = None) -> AsyncIterator[TokenStep]:
        """Yield each generated token with its log-probability and ``params.logprobs`` top alternatives.
        ``constraint`` is asked for a token mask before each step; the stage that draws applies it."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        sampler = Sampler(params)
        trace = RequestTrace()
        self.traces = [*self.traces[-99:], trace]
        started = time.perf_counter()
        tokens = list(prompt_ids)
        chain = await self._wait_route(len(tokens), set(), REROUTE_TIMEOUT)
        session, pos, failed = secrets.token_hex(8), 0, set()
        trace.routes.append([(s.peer_id, s.start, s.end) for s in chain])
        for obs in self.observers:
            trace.observed[obs.name] = obs.begin([(s.start, s.end) for s in chain])
        self._enter(chain)
        try:
            while trace.tokens < params.max_tokens:
                allowed = constraint.allowed() if constraint is not None else None
                # The same spec (mask included) for a replay after a failover: the same draw.
                spec = sampler.spec(trace.tokens, None if allowed is None else pack_mask(allowed, self.info.vocab_size))
                try:
                    step = await self._step(chain, session, pos, tokens[pos:], trace, spec)
                except (MeshError, TimeoutError) as exc:
                    if isinstance(exc, EngineClosed):
                        raise
                    if isinstance(exc, RemoteError) and exc.code not in ("BadForward", "SessionEvicted", "RuntimeClosed"):
                        raise
                    bad = None if isinstance(exc, ChainUnlinked) else _failed_stage(chain, exc)
                    failed |= {bad} if bad else set()
                    log.warning("stage failed (%s); re-routing request with %d tokens", exc, len(tokens))
                    self._leave(chain)
                    self._drop_later(chain, session, trace)
                    chain = await self._wait_route(len(tokens), failed, REROUTE_TIMEOUT)
                    self._enter(chain)
                    session, pos = secrets.token_hex(8), 0
                    trace.failovers += 1
                    trace.routes.append([(s.peer_id, s.start, s.end) for s in chain])
                    continue
                pos = len(tokens)
                if step.token in self.eos_ids:
                    break  # like the OpenAI API and LocalEngine: EOS ends the answer and is not part of it
                if constraint is not None:
                    constraint.accept(step.token)
                tokens.append(step.token)
                trace.tokens += 1
                if trace.first_token_s is None:
                    trace.first_token_s = time.perf_counter() - started
                yield step
        finally:
            self._leave(chain)
            # Free the caches without making the caller wait for it.
            dropped = self._drop_later(chain, session, trace)
            for obs in self.observers:
                obs.finish(trace.observed[obs.name], trace.tokens, time.perf_counter() - started, dropped)

    def _drop_later(self, chain: list[Stage], session: str, trace: RequestTrace) -> asyncio.Future:
        if self._closed:  # the stages evict the session on their own when it stays idle
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        task = asyncio.ensure_future(self._drop(chain, session, trace))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def aclose(self) -> None:
        """Stop the engine's own tasks (batches in flight, cache drops) and its observers'; requests still
        generating fail with ``EngineClosed``. The owner of the engine calls this before leaving the mesh."""
        self._closed = True
        while True:  # a cancelled batch may leave its chain call to the background: that one too
            tasks = [t for t in (*(t for b in self._batchers.values() for t in b.tasks()), *self._background)
                     if not t.done()]
            if not tasks:
                break
            for t in tasks:
                t.cancel()
            for t in tasks:
                await cancel_and_wait(t)
        self._background.clear()  # all done (their own discard callbacks may not have run yet)
        self._batchers.clear()
        for obs in self.observers:
            close = getattr(obs, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def _enter(self, chain: list[Stage]) -> None:
        for s in chain:
            self._inflight[s.peer_id] = self._inflight.get(s.peer_id, 0) + 1
        key = _chain_key(chain)
        self._active[key] = self._active.get(key, 0) + 1

    def _leave(self, chain: list[Stage]) -> None:
        for s in chain:
            self._inflight[s.peer_id] = max(0, self._inflight.get(s.peer_id, 0) - 1)
        key = _chain_key(chain)
        self._active[key] = self._active.get(key, 0) - 1
        if self._active[key] <= 0:
            del self._active[key]
            batcher = self._batchers.get(key)
            if batcher is not None and batcher.idle():
                del self._batchers[key]

    async def complete(self, prompt: str | list[dict[str, str]], params: SamplingParams) -> str:
        """The whole answer to a prompt (a chat message list gets the model's chat template)."""
        ids = self.encode(prompt)
        out = [t async for t in self.generate(ids, params)]
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def encode(self, prompt: str | list[dict[str, str]]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)


def _retrieve(task: asyncio.Future) -> None:
    """Consume a finished background call's outcome (its failure was handled, or no longer matters)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("chain call ended with %r", task.exception())


def _chain_key(chain: list[Stage]) -> tuple:
    return tuple((s.peer_id, s.start, s.end) for s in chain)


@dataclass(eq=False)
class _Pending:
    """One request's step, waiting to ride the next batch along its chain."""

    session: str
    pos: int
    x: torch.Tensor
    sample: dict[str, Any]
    trace: RequestTrace
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def done(self, step: TokenStep) -> None:
        if not self.future.done():
            self.future.set_result(step)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _ChainBatcher:
    """Coalesces the steps of the requests generating on one chain into one call per stage.

    Without it, concurrent requests reach each stage at scattered times and run in small, inefficient
    batches (and a star of separate calls). Steps are gathered while the previous batch runs; before a
    batch leaves, it waits a moment (``GATHER_WAIT_S``) for requests on the chain that have not yet
    submitted their next step, so the chain's requests stay in step with each other.

    Pipelining (``MeshEngine.micro_batches_for``): with k > 1 the chain's requests travel as up to k
    groups in flight at once, so while one group's hidden states cross the network to stage i + 1,
    stage i computes the next group. Each group gathers about 1/k of the chain's requests.
    """

    def __init__(self, engine: MeshEngine, chain: list[Stage]) -> None:
        self.engine = engine
        self.chain = chain
        self.key = _chain_key(chain)
        self.queue: list[_Pending] = []
        self.task: asyncio.Task | None = None
        self.inflight: dict[asyncio.Task, int] = {}  # batch task -> its requests
        self._arrived = asyncio.Event()

    def idle(self) -> bool:
        return not self.queue and not self.inflight and (self.task is None or self.task.done())

    def tasks(self) -> list[asyncio.Task]:
        return [*([self.task] if self.task is not None else []), *self.inflight]

    async def submit(self, p: _Pending) -> TokenStep:
        self.queue.append(p)
        self._arrived.set()
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())
        return await p.future

    async def _run(self) -> None:
        try:
            while self.queue:
                k = self.engine.micro_batches_for(self.chain)
                while len(self.inflight) >= k:
                    await asyncio.wait(set(self.inflight), return_when=asyncio.FIRST_COMPLETED)
                if not self.queue:
                    break
                active = self.engine._active.get(self.key, 0)
                waiting = active - sum(self.inflight.values())  # requests not riding a batch now
                want = min(waiting, -(-active // k))
                deadline = time.monotonic() + GATHER_WAIT_S
                while len(self.queue) < want and time.monotonic() < deadline:
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), max(0.0, deadline - time.monotonic()))
                batch, tokens, mask_bytes = [], 0, 0
                for p in self.queue:
                    n = int(p.x.shape[0])
                    m = mask_nbytes(self.engine.info.vocab_size) if "mask" in p.sample else 0
                    if batch and ((len(batch) >= max(want, 1) and k > 1) or tokens + n > MAX_BATCH_TOKENS
                                  or mask_bytes + m > MAX_BATCH_MASK_BYTES):
                        break
                    batch.append(p)
                    tokens += n
                    mask_bytes += m
                del self.queue[: len(batch)]
                batch = [p for p in batch if not p.future.done()]
                if not batch:
                    continue
                self.engine.batch_sizes.append(len(batch))
                task = asyncio.ensure_future(self._batch(batch))
                self.inflight[task] = len(batch)
                task.add_done_callback(self._batch_done)
        except asyncio.CancelledError:  # only MeshEngine.aclose cancels a batcher
            for p in self.queue:
                p.fail(EngineClosed("the engine was closed"))
            self.queue.clear()
            raise

    def _batch_done(self, task: asyncio.Task) -> None:
        self.inflight.pop(task, None)
        if not task.cancelled():
            task.exception()  # _batch fails its requests itself; nothing else is left to report

    async def _batch(self, batch: list[_Pending]) -> None:
        try:
            await self.engine._run_batch(self.chain, batch)
        except asyncio.CancelledError:
            for p in batch:
                p.fail(EngineClosed("the engine was closed"))
            raise
        except BaseException as exc:  # the call failed: every request in it fails over on its own
            for p in batch:
                p.fail(exc)
        for p in batch:  # a reply that skipped a request must not leave it waiting
            p.fail(BadReply("the chain did not answer this request"))


def _failed_stage(chain: list[Stage], exc: Exception) -> str | None:
    peer = getattr(exc, "peer_id", None)
    if peer:
        return peer
    text = str(exc)
    for s in chain:
        if s.peer_id[:8] in text:
            return s.peer_id
    return None


def _eos_ids(tokenizer: Any, path: Any) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(path)
        eos = gen.eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except (OSError, ValueError):
        pass
    return ids


def _resources(peers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from .scheduler import PeerResources

    return {pid: PeerResources(pid, int(r.get("free_memory_bytes") or 0), float(r.get("tflops") or 0.0))
            for pid, r in peers.items()}


def _link_rtts(mesh: Mesh, peers: dict[str, dict[str, Any]]) -> list[Any]:
    from .scheduler import LinkMeasure

    out = []
    for pid, rec in peers.items():
        for lk in rec.get("links", []):
            if lk.get("rtt_ms") is not None and (lk.get("peer") in peers or lk.get("peer") == mesh.id):
                out.append(LinkMeasure(pid, str(lk["peer"]), float(lk.get("rtt_ms") or 0.0)))
    return out
