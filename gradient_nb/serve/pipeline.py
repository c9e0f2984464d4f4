"""Generation across the mesh: phase 2 of the scheduler, the token loop, and failover.

The entry peer (the one a user talks to) drives every request: for each step it sends the new tokens
through the chain of stages chosen for the request, gets the last stage's logits back and samples.
Each stage keeps the request's KV cache, so a decode step moves one token's hidden state per hop.

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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..mesh.errors import MeshError, RemoteError
from ..mesh.frames import Message
from ..mesh.peer import Mesh
from ..models import load_tokenizer, model_info, resolve_model
from .coordinator import allocation_of, model_cost, serving_peers
from .observers import RequestObserver
from .sampling import Sampler, SamplingParams
from .scheduler import Stage, route

log = logging.getLogger(__name__)

STAGE_TIMEOUT = 60.0
# Per-hop overhead assumed until measured: about what a loopback hop of this project's RPC costs on a
# 2-core CPU (framing, data channel, event loops), i.e. 2 layers of the default model's compute.
INITIAL_HOP_OVERHEAD_S = 0.002
REROUTE_TIMEOUT = 120.0


class NoRoute(MeshError):
    """No chain of live peers covers every layer of the model."""


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
    async def _step(self, chain: list[Stage], session: str, pos: int, tokens: list[int],
                    trace: RequestTrace) -> torch.Tensor:
        x: torch.Tensor = torch.tensor(tokens, dtype=torch.int64)
        for stage in chain:
            t0 = time.perf_counter()
            reply = await self.mesh.call(stage.peer_id, "shard.forward", Message(
                {"model": self.model_name, "session": session, "pos": pos, "start": stage.start,
                 "end": stage.end}, {"x": x}), timeout=STAGE_TIMEOUT)
            compute = reply.header.get("compute_ms")
            if isinstance(compute, int | float) and 0 <= compute:
                overhead = max(0.0, time.perf_counter() - t0 - compute / 1000)
                self.hop_overhead_s = 0.9 * self.hop_overhead_s + 0.1 * min(overhead, 1.0)
            for obs in self.observers:
                obs.on_call(trace.observed[obs.name], stage.peer_id, stage.start, stage.end, session, pos, x,
                            reply.header)
            x = reply.tensors["y"]
        return x

    async def _drop(self, chain: list[Stage], session: str, trace: RequestTrace) -> None:
        for stage in chain:
            with contextlib.suppress(MeshError, TimeoutError):
                reply = await self.mesh.call(stage.peer_id, "shard.drop", Message({"session": session}), timeout=5)
                for obs in self.observers:
                    obs.on_drop(trace.observed[obs.name], stage.peer_id, stage.start, stage.end, session,
                                reply.header)

    # -- the token loop ------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
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
                try:
                    logits = await self._step(chain, session, pos, tokens[pos:], trace)
                except (MeshError, TimeoutError) as exc:
                    if isinstance(exc, RemoteError) and exc.code not in ("BadForward", "SessionEvicted", "RuntimeClosed"):
                        raise
                    bad = _failed_stage(chain, exc)
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
                token = sampler.next_token(logits.reshape(-1)[: self.info.vocab_size].float())
                if token in self.eos_ids:
                    break  # like the OpenAI API and LocalEngine: EOS ends the answer and is not part of it
                tokens.append(token)
                trace.tokens += 1
                if trace.first_token_s is None:
                    trace.first_token_s = time.perf_counter() - started
                yield token
        finally:
            self._leave(chain)
            # Free the caches without making the caller wait for it.
            dropped = self._drop_later(chain, session, trace)
            for obs in self.observers:
                obs.finish(trace.observed[obs.name], trace.tokens, time.perf_counter() - started, dropped)

    def _drop_later(self, chain: list[Stage], session: str, trace: RequestTrace) -> asyncio.Task:
        task = asyncio.ensure_future(self._drop(chain, session, trace))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _enter(self, chain: list[Stage]) -> None:
        for s in chain:
            self._inflight[s.peer_id] = self._inflight.get(s.peer_id, 0) + 1

    def _leave(self, chain: list[Stage]) -> None:
        for s in chain:
            self._inflight[s.peer_id] = max(0, self._inflight.get(s.peer_id, 0) - 1)

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
