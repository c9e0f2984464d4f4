"""A serving peer: holds one contiguous layer range of a model and runs it for the mesh.

The peer announces what it can give (measured free memory and compute are already in its registry
record) and that it serves ``model``; the coordinator (``coordinator.py``) assigns it a layer range in
the published allocation, and the peer loads exactly that range (re-loading when the allocation moves
it). ``shard.forward`` runs the peer's layers for one request's new tokens, with the request's KV cache
kept here between calls; ``shard.drop`` frees a request's cache.

Forwarding (a ``chain`` in the call): instead of answering the entry with its hidden states, a stage
calls the next stage of the chain itself with them, and the last stage, having drawn the tokens,
calls the entry's ``serve.chain_result`` with every stage's per-item answers (commitments, errors,
the drawn tokens) and, when the entry verifies, every later stage's inputs. The critical path of a
step is N + 1 messages; each call's reply (an acknowledgement once the rest of the chain has run) only
carries failures back: a stage that cannot link to the next raises ``NoLinkToNext`` (the entry falls
back to the star for that chain), one whose next stage failed raises ``NextStageFailed`` naming it.
Sessions of a chain are keyed by the entry that owns them (``origin``), as the entry's own calls are,
so its ``shard.drop`` reaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..mesh.errors import MeshError, RemoteError, remote_error
from ..mesh.frames import Message
from ..mesh.peer import Mesh
from ..mesh.rpc import CallContext
from ..mesh.tasks import cancel_and_wait
from ..models import load_shard, model_info, resolve_model
from ..models.manifest import is_synced
from .coordinator import Coordinator, allocation_of, model_cost, serving_peers
from .observers import ShardObserver
from .sampling import TokenStep, draw, parse_spec, unpack_mask
from .shard import RuntimeClosed, ShardError, ShardRuntime
from .weights_sync import ContentServer, SyncError, SyncProgress, WeightFetcher, find_model

log = logging.getLogger(__name__)

MAX_NEW_TOKENS_PER_CALL = 8192
MAX_ITEMS_PER_CALL = 256
MAX_SESSION_LEN = 128
MAX_CHAIN_STAGES = 64
CHAIN_LINK_TIMEOUT = 10.0  # how long a stage tries to link to the next one before the entry uses the star
FETCH_RETRY_S = 5.0  # after a failed weights fetch, try again this much later


class BadForward(ValueError):
    """A forward request this shard cannot run (wrong model or layers, bad inputs)."""


def _parse_chain(chain: Any, ctx: CallContext) -> dict[str, Any] | None:
    """The ``chain`` of a forwarding ``shard.forward`` call, checked (None: answer the caller, the star)."""
    if chain is None:
        return None
    if not isinstance(chain, dict):
        raise BadForward("chain is a map of id, origin, next, stages and inputs")
    cid, origin, nxt, stages, inputs = (chain.get(k) for k in ("id", "origin", "next", "stages", "inputs"))
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_SESSION_LEN:
        raise BadForward("chain id must be a string of at most 128 characters")
    if not isinstance(origin, str) or not 0 < len(origin) <= MAX_SESSION_LEN:
        raise BadForward("chain origin must be a peer id")
    if not isinstance(stages, list) or len(stages) >= MAX_CHAIN_STAGES or not all(isinstance(x, dict) for x in stages):
        raise BadForward(f"chain stages must be a list of at most {MAX_CHAIN_STAGES} maps")
    if not stages and origin != ctx.peer_id:
        raise BadForward("the first stage of a chain is called by the chain's origin")
    if not isinstance(nxt, list) or len(stages) + len(nxt) >= MAX_CHAIN_STAGES or not all(
            isinstance(n, list) and len(n) == 3 and isinstance(n[0], str) and 0 < len(n[0]) <= MAX_SESSION_LEN
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in n[1:]) and n[1] < n[2]
            for n in nxt):
        raise BadForward("chain next must be a list of [peer, start, end] stages")
    return {"id": cid, "origin": origin, "next": nxt, "stages": stages, "inputs": bool(inputs)}


def _parse_items(items: Any, is_last: bool, vocab_size: int, forwarding: bool = False) -> list[dict[str, Any]]:
    """The ``items`` of a ``shard.forward`` call, checked: [{session, pos, n, sample?}, ...]."""
    if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS_PER_CALL:
        raise BadForward(f"shard.forward needs a list of 1..{MAX_ITEMS_PER_CALL} items")
    out, seen = [], set()
    for it in items:
        if not isinstance(it, dict):
            raise BadForward("each item is a map of session, pos and n")
        session, pos, n, sample = it.get("session"), it.get("pos"), it.get("n"), it.get("sample")
        if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_LEN or session in seen:
            raise BadForward("each item needs its own session id (a string of at most 128 characters)")
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0 or \
                not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise BadForward("each item needs pos >= 0 and n >= 1")
        if sample is not None:
            if not is_last and not forwarding:
                raise BadForward("only the last stage samples")
            try:
                sample = parse_spec(sample, vocab_size)
            except ValueError as exc:
                raise BadForward(f"bad sampling spec: {exc}") from None
        seen.add(session)
        out.append({"session": session, "pos": pos, "n": n, "sample": sample})
    return out


class NoLinkToNext(MeshError):
    """A forwarding stage could not link to the next stage of its chain (the entry uses the star)."""


class BadReply(MeshError):
    """A serving peer answered ``shard.forward`` with something malformed (a faulty or dishonest peer)."""

    def __init__(self, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


def forward_items(reply: Message, n_items: int) -> list[dict[str, Any]]:
    """The per-item replies of a ``shard.forward`` call (raises ``BadReply`` on a malformed reply)."""
    items = reply.header.get("items")
    if not isinstance(items, list) or len(items) != n_items or not all(isinstance(i, dict) for i in items):
        raise BadReply(f"the reply does not answer the call's {n_items} items")
    return items


def token_step(answer: dict[str, Any], spec: dict[str, Any], vocab_size: int) -> TokenStep:
    """The token the last stage drew for one item, checked against what the entry asked for (``BadReply``
    when it is malformed or outside the step's token mask)."""
    token, logprob, top = answer.get("token"), answer.get("logprob"), answer.get("top", [])
    if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
        raise BadReply("the last stage answered without a valid token id")
    if not isinstance(logprob, int | float) or isinstance(logprob, bool) or not -math.inf < logprob <= 1e-4:
        raise BadReply("the last stage answered without a valid log-probability")
    want = int(spec.get("logprobs", 0))
    if not isinstance(top, list) or len(top) != min(want, vocab_size) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and not isinstance(e[0], bool)
            and 0 <= e[0] < vocab_size and isinstance(e[1], int | float) and e[1] <= 1e-4 for e in top):
        raise BadReply(f"the last stage answered without the {want} top log-probabilities asked for")
    if "mask" in spec and not bool(unpack_mask(spec["mask"], vocab_size)[token]):
        raise BadReply(f"the last stage drew token {token}, which the step's token mask disallows")
    return TokenStep(token, min(float(logprob), 0.0), [(int(t), min(float(lp), 0.0)) for t, lp in top])


def forward_one(reply: Message) -> torch.Tensor:
    """The output of a one-item ``shard.forward`` call; the item's error raised as the typed error."""
    (item,) = forward_items(reply, 1)
    if "error" in item:
        raise remote_error(str(item["error"]), str(item.get("message", "")))
    y = reply.tensors.get("y")
    if y is None:
        raise BadReply("the reply carries no output")
    return y


class ServingPeer:
    """Serves a layer range of ``model`` on ``mesh``. ``layers=None`` lets the coordinator choose.
    ``observers`` watch the shard (``gradient_nb.verify.attach_commitments`` adds the commitments).

    Every serving peer also provides its model's weights to peers that lack them (``weights_sync.py``);
    a peer built on a synced folder (:meth:`open` on a machine without the model) fetches the parts of
    each layer range it is assigned before loading it, reporting to ``on_weights_progress``."""

    def __init__(self, mesh: Mesh, model: str | None = None, *, dtype: str = "float32",
                 quantization: str | None = None, layers: tuple[int, int] | None = None,
                 memory_cap_bytes: int | None = None, device: str = "cpu",
                 observers: Sequence[ShardObserver] = (),
                 on_weights_progress: Callable[[SyncProgress], None] | None = None) -> None:
        self.mesh = mesh
        self.path = resolve_model(model) if model is not None else resolve_model()
        self.info = model_info(self.path)
        self.fetcher = WeightFetcher(mesh, self.path, self._on_weights) if is_synced(self.path) else None
        self._on_weights_progress = on_weights_progress
        self.content: ContentServer | None = None
        self.model_id = self.info.name
        self.dtype = getattr(torch, dtype)
        self.dtype_name = dtype
        self.quantization = quantization
        self.fixed_layers = layers
        self.memory_cap_bytes = memory_cap_bytes
        self.device = device
        self.runtime: ShardRuntime | None = None
        self.layers: tuple[int, int] | None = None
        self.loads = 0
        self._reload = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._unwatch = None
        self.served_tokens = 0
        self._announced: dict[str, Any] | None = None
        self._queue = 0
        self._latency_ms = 0.0
        self.observers: list[ShardObserver] = list(observers)

    @classmethod
    async def open(cls, mesh: Mesh, model: str | None = None, **kwargs: Any) -> ServingPeer:
        """A serving peer for ``model`` whether this machine has its files or not: without them, its
        manifest, config and tokenizer come from the peers that provide it, and its layers follow when the
        coordinator assigns them (``weights_sync.find_model``). Construction runs off the loop."""
        path = await find_model(mesh, model)
        return await asyncio.to_thread(lambda: cls(mesh, str(path), **kwargs))

    async def start(self) -> ServingPeer:
        if self.fixed_layers is not None:
            s, e = self.fixed_layers
            if not 0 <= s < e <= self.info.num_layers:
                raise ValueError(f"layers {s}..{e} are outside the model's 0..{self.info.num_layers}")
        self._announce()
        self.content = ContentServer(self.mesh, Path(self.path), self.info).start()
        self.mesh.offer("shard.forward", self._forward)
        self.mesh.offer("shard.drop", self._drop)
        self._unwatch = self.mesh.state.watch(lambda _ns: self._reload.set())
        self._task = asyncio.ensure_future(self._follow_allocation())
        self._reload.set()
        self.coordinator = Coordinator(self.mesh, self.model_id, model_cost(self.path)).start()
        return self

    async def stop(self, handover_timeout: float = 30.0) -> None:
        """Stop serving. Hands over first: withdraws from serving, then keeps answering until the
        coordinator has re-planned without this peer (or the time is up), so requests move cleanly."""
        if self._unwatch is not None:
            self._unwatch()
        self.mesh.publish(serving=None, layers=None)
        others = set(serving_peers(self.mesh, self.model_id)) - {self.mesh.id}
        deadline = asyncio.get_running_loop().time() + handover_timeout
        while others and asyncio.get_running_loop().time() < deadline:
            alloc = allocation_of(self.mesh, self.model_id)
            if alloc is not None and alloc.layers_of(self.mesh.id) is None:  # re-planned without us
                break
            await asyncio.sleep(0.2)
        await self.coordinator.stop()
        with contextlib.suppress(Exception):
            self.mesh.withdraw("shard.forward")
            self.mesh.withdraw("shard.drop")
        await cancel_and_wait(self._task)
        if self.content is not None:
            await self.content.stop()
        if self.runtime is not None:
            await self.runtime.aclose()
        self.runtime = None

    def _announce(self) -> None:
        cap = self.memory_cap_bytes
        record = {
            "model": self.model_id, "hash": self.info.content_hash, "num_layers": self.info.num_layers,
            "dtype": self.dtype_name, "quantization": self.quantization,
            "memory_cap_bytes": cap, "fixed_layers": list(self.fixed_layers) if self.fixed_layers else None,
            "layers": list(self.layers) if self.layers else None, "ready": self.runtime is not None,
        }
        # Publish only changes: every publish is a state update that wakes every watcher in the mesh.
        if record != self._announced:
            self._announced = record
            self.mesh.publish(serving=record, layers=record["layers"])

    def _wanted_layers(self) -> tuple[int, int] | None:
        if self.fixed_layers is not None:
            return self.fixed_layers
        alloc = allocation_of(self.mesh, self.model_id)
        layers = None if alloc is None else alloc.layers_of(self.mesh.id)
        return None if layers is None else (layers.start, layers.stop)

    async def _follow_allocation(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            wanted = self._wanted_layers()
            if wanted is not None and wanted != self.layers:
                await self._load(wanted)
            self._announce()
            await asyncio.sleep(0.2)  # coalesce bursts of state changes

    async def _load(self, layers: tuple[int, int]) -> None:
        start, end = layers
        if self.fetcher is not None and self.fetcher.missing(start, end):
            try:
                await self.fetcher.fetch_layers(start, end)
            except SyncError as exc:
                log.warning("could not fetch layers %d..%d of %s (retrying in %g s): %s", start, end,
                            self.model_id, FETCH_RETRY_S, exc)
                asyncio.get_running_loop().call_later(FETCH_RETRY_S, self._reload.set)
                return
            if self.content is not None:
                await self.content.refresh()  # provide what was just fetched
        log.info("loading layers %d..%d of %s", start, end, self.model_id)
        shard = await asyncio.to_thread(load_shard, self.path, start, end, dtype=self.dtype,
                                        quantization=self.quantization, device=self.device)
        for obs in self.observers:
            shard = obs.on_load(shard)
        old, self.runtime = self.runtime, ShardRuntime(shard)
        self.layers = (start, end)
        self.loads += 1
        if old is not None:  # its requests fail with RuntimeClosed, which the entry answers by re-routing
            await old.aclose()

    async def _forward(self, msg: Message, ctx: CallContext) -> Message:
        """Run this peer's layers on a batch of requests' new tokens (the entry coalesces concurrent
        requests on the same chain into one call, so they share one model pass here)."""
        h = msg.header
        rt = self.runtime
        if rt is None or self.layers is None:
            raise BadForward("this peer holds no layers yet")
        if h.get("model") != self.model_id:
            raise BadForward(f"this peer serves {self.model_id!r}, not {h.get('model')!r}")
        entry, end = h.get("start"), h.get("end")
        # A chain may enter at any of this peer's layers (stitching replicas) but always runs to its end.
        if not isinstance(entry, int) or end != self.layers[1] or not self.layers[0] <= entry < end:
            raise BadForward(f"this peer runs layers {self.layers[0]}..{self.layers[1]} (entered at any of them, "
                             f"to the end), not {entry}..{end}")
        chain = _parse_chain(h.get("chain"), ctx)
        if chain is not None and bool(chain["next"]) == rt.is_last:
            raise BadForward("a chain ends exactly at the model's last layer")
        items = _parse_items(h.get("items"), rt.is_last, self.info.vocab_size, chain is not None)
        x = msg.tensors.get("x")
        total = sum(it["n"] for it in items)
        if x is None or x.dim() < 1 or x.shape[0] != total or total > MAX_NEW_TOKENS_PER_CALL:
            raise BadForward(f"x must hold the items' {total} tokens (at most {MAX_NEW_TOKENS_PER_CALL} a call)")
        if entry == 0:
            if x.dtype != torch.int64 or x.dim() != 1:
                raise BadForward("the first stage takes a 1-d int64 tensor of token ids")
            if int(x.min()) < 0 or int(x.max()) >= self.info.vocab_size:
                raise BadForward("token id out of the vocabulary")
        elif x.dim() != 2 or x.shape[1] != self.info.hidden_size or not x.is_floating_point():
            raise BadForward(f"this stage takes hidden states [tokens, {self.info.hidden_size}]")
        # Sessions belong to the entry that drives them (star: the caller; chain: the chain's origin).
        owner = ctx.peer_id if chain is None else chain["origin"]
        keys = [f"{owner}/{it['session']}" for it in items]
        chunks = torch.split(x, [it["n"] for it in items])
        started = time.perf_counter()
        self._queue += len(items)
        self.mesh.extra_record["serving_stats"] = self._stats()
        try:
            # All items enter the runtime's queue before its batcher wakes: one model pass for all.
            outs = await asyncio.gather(*(rt.forward(k, range(it["pos"], it["pos"] + it["n"]), c, entry=entry)
                                          for k, it, c in zip(keys, items, chunks, strict=True)),
                                        return_exceptions=True)
        finally:
            self._queue -= len(items)
        for out in outs:  # a runtime fault fails the call; a request's own problem fails only its item
            if isinstance(out, BaseException) and not isinstance(out, ShardError):
                raise out
        self.served_tokens += total
        self._latency_ms = 0.8 * self._latency_ms + 0.2 * 1000 * (time.perf_counter() - started)
        # Picked up by the next heartbeat: per-call publishing would flood the mesh with updates.
        self.mesh.extra_record["serving_stats"] = self._stats()
        # Sampling and commitments are torch work too: on the model thread (see shard.py's module doc).
        replies, rows = await rt.run(self._replies, keys, items, outs, entry, end, rt.is_last)
        # The entry subtracts compute_ms from the call's wall time to learn the per-hop overhead (routing).
        header = {"layers": [entry, end], "compute_ms": 1000 * (time.perf_counter() - started), "items": replies}
        if chain is not None:
            return await self._pass_on(chain, header, items, rows, msg, ctx)
        return Message(header, {"y": torch.cat(rows)} if rows else {})

    async def _pass_on(self, chain: dict[str, Any], header: dict[str, Any], items: list[dict[str, Any]],
                       rows: list[torch.Tensor], msg: Message, ctx: CallContext) -> Message:
        """Forwarding: call the next stage with this stage's hidden states, or, on the last stage, the
        chain's origin with every stage's answers. Returns once the rest of the chain has run."""
        k = len(chain["stages"])
        stages = [*chain["stages"], {"peer": self.mesh.id, **header}]
        # Later stages' inputs travel on to the entry when it verifies (it recomputes from them).
        tensors = {f"in{i}": msg.tensors[f"in{i}"] for i in range(1, k) if f"in{i}" in msg.tensors}
        if chain["inputs"] and k >= 1:
            tensors[f"in{k}"] = msg.tensors["x"]
        # Keep a second of the caller's deadline to report a failure further down the chain in time.
        remaining = max(0.1, ctx.deadline - asyncio.get_running_loop().time() - 1.0)
        live = [it for it, r in zip(items, header["items"], strict=True) if "error" not in r]
        if not chain["next"] or not live:
            await self.mesh.call(chain["origin"], "serve.chain_result",
                                 Message({"id": chain["id"], "stages": stages}, tensors), timeout=remaining)
            return Message({"ok": True})
        peer, start, end = chain["next"][0]
        try:
            if peer != self.mesh.id:
                await self.mesh.connect(peer, timeout=min(remaining, CHAIN_LINK_TIMEOUT))
        except MeshError as exc:
            raise NoLinkToNext(f"no link from {self.mesh.id} to the next stage {peer}: {exc}") from None
        fwd = [{"session": it["session"], "pos": it["pos"], "n": it["n"],
                **({"sample": it["sample"]} if it["sample"] is not None else {})} for it in live]
        nxt = {**chain, "next": chain["next"][1:], "stages": stages}
        try:
            await self.mesh.call(peer, "shard.forward", Message(
                {"model": self.model_id, "start": start, "end": end, "items": fwd, "chain": nxt},
                {"x": torch.cat(rows), **tensors}), timeout=remaining)
        except RemoteError as exc:
            if exc.code in ("NextStageFailed", "NoLinkToNext"):  # further down the chain: as it is
                raise RemoteError(exc.code, exc.remote_message) from None
            raise RemoteError("NextStageFailed", f"stage {peer} failed: {exc}") from None
        except (MeshError, TimeoutError) as exc:
            raise RemoteError("NextStageFailed", f"stage {peer} failed: {type(exc).__name__}: {exc}") from None
        return Message({"ok": True})

    def _replies(self, keys: list[str], items: list[dict[str, Any]], outs: list[Any], entry: int, end: int,
                 is_last: bool) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        replies: list[dict[str, Any]] = []
        rows: list[torch.Tensor] = []
        for key, it, out in zip(keys, items, outs, strict=True):
            if isinstance(out, BaseException):
                replies.append({"error": type(out).__name__, "message": str(out)})
                continue
            reply: dict[str, Any] = {}
            for obs in self.observers:
                reply.update(obs.on_forward(key, entry, end, it["pos"], it["n"], out, is_last))
            if is_last and it["sample"] is not None:
                step = draw(out.reshape(-1)[: self.info.vocab_size], it["sample"])
                reply.update(token=step.token, logprob=step.logprob)
                if step.top:
                    reply["top"] = [[t, lp] for t, lp in step.top]
            else:
                rows.append(out.reshape(1, -1) if is_last else out)
            replies.append(reply)
        return replies, rows

    async def _drop(self, msg: Message, ctx: CallContext) -> Message:
        session = msg.header.get("session")
        header: dict[str, Any] = {"ok": True}
        if not isinstance(session, str):
            return Message(header)
        key = f"{ctx.peer_id}/{session}"
        rt = self.runtime
        if rt is not None:
            rt.drop(key)

        def flush() -> None:
            for obs in self.observers:
                header.update(obs.on_drop(key))

        if rt is None:
            flush()
            return Message(header)
        try:  # after the session's last forward's commitments, which are made on the model thread
            await rt.run(flush)
        except RuntimeClosed:
            flush()
        return Message(header)

    def _on_weights(self, progress: SyncProgress) -> None:
        # The registry record carries it with the next heartbeat (as serving_stats).
        self.mesh.extra_record["weights_sync"] = progress.as_dict()
        if progress.finished:
            log.info("%s", progress.line())
        if self._on_weights_progress is not None:
            self._on_weights_progress(progress)

    def _stats(self) -> dict[str, Any]:
        return {"served_tokens": self.served_tokens, "queue": self._queue,
                "latency_ms": round(self._latency_ms, 3)}

    def status(self) -> dict[str, Any]:
        last = self.fetcher.last if self.fetcher is not None else None
        return {"model": self.model_id, "layers": self.layers, "loads": self.loads,
                "served_tokens": self.served_tokens, "weights": last.as_dict() if last is not None else None}
