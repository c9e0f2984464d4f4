"""A serving peer: holds one contiguous layer range of a model and runs it for the mesh.

The peer announces what it can give (measured free memory and compute are already in its registry
record) and that it serves ``model``; the coordinator (``coordinator.py``) assigns it a layer range in
the published allocation, and the peer loads exactly that range (re-loading when the allocation moves
it). ``shard.forward`` runs the peer's layers for one request's new tokens, with the request's KV cache
kept here between calls; ``shard.drop`` frees a request's cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..mesh.frames import Message
from ..mesh.peer import Mesh
from ..mesh.rpc import CallContext
from ..models import load_shard, model_info, resolve_model
from .coordinator import Coordinator, allocation_of, model_cost, serving_peers
from .observers import ShardObserver
from .shard import ShardRuntime

log = logging.getLogger(__name__)

MAX_NEW_TOKENS_PER_CALL = 8192


class BadForward(ValueError):
    """A forward request this shard cannot run (wrong model or layers, bad inputs)."""


class ServingPeer:
    """Serves a layer range of ``model`` on ``mesh``. ``layers=None`` lets the coordinator choose.
    ``observers`` watch the shard (``gradient_nb.verify.attach_commitments`` adds the commitments)."""

    def __init__(self, mesh: Mesh, model: str | None = None, *, dtype: str = "float32",
                 quantization: str | None = None, layers: tuple[int, int] | None = None,
                 memory_cap_bytes: int | None = None, device: str = "cpu",
                 observers: Sequence[ShardObserver] = ()) -> None:
        self.mesh = mesh
        self.path = resolve_model(model) if model is not None else resolve_model()
        self.info = model_info(self.path)
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

    async def start(self) -> ServingPeer:
        if self.fixed_layers is not None:
            s, e = self.fixed_layers
            if not 0 <= s < e <= self.info.num_layers:
                raise ValueError(f"layers {s}..{e} are outside the model's 0..{self.info.num_layers}")
        self._announce()
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
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
        log.info("loading layers %d..%d of %s", start, end, self.model_id)
        shard = await asyncio.to_thread(load_shard, self.path, start, end, dtype=self.dtype,
                                        quantization=self.quantization, device=self.device)
        for obs in self.observers:
            shard = obs.on_load(shard)
        self.runtime = ShardRuntime(shard)
        self.layers = (start, end)
        self.loads += 1

    async def _forward(self, msg: Message, ctx: CallContext) -> Message:
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
        session, pos = h.get("session"), h.get("pos")
        x = msg.tensors.get("x")
        if not isinstance(session, str) or not isinstance(pos, int) or pos < 0 or x is None:
            raise BadForward("shard.forward needs session, pos and a tensor x")
        if entry == 0:
            if x.dtype != torch.int64 or x.dim() != 1 or not 0 < x.numel() <= MAX_NEW_TOKENS_PER_CALL:
                raise BadForward("the first stage takes a 1-d int64 tensor of token ids")
            if int(x.min()) < 0 or int(x.max()) >= self.info.vocab_size:
                raise BadForward("token id out of the vocabulary")
        elif x.dim() != 2 or x.shape[1] != self.info.hidden_size or not x.is_floating_point() \
                or not 0 < x.shape[0] <= MAX_NEW_TOKENS_PER_CALL:
            raise BadForward(f"this stage takes hidden states [tokens, {self.info.hidden_size}]")
        positions = list(range(pos, pos + x.shape[0]))
        started = time.perf_counter()
        self._queue += 1
        self.mesh.extra_record["serving_stats"] = self._stats()
        try:
            y = await rt.forward(f"{ctx.peer_id}/{session}", positions, x, entry=entry)
        finally:
            self._queue -= 1
        self.served_tokens += x.shape[0]
        self._latency_ms = 0.8 * self._latency_ms + 0.2 * 1000 * (time.perf_counter() - started)
        # Picked up by the next heartbeat: per-call publishing would flood the mesh with updates.
        self.mesh.extra_record["serving_stats"] = self._stats()
        # The entry subtracts this from the call's wall time to learn the per-hop overhead (routing).
        header: dict[str, Any] = {"layers": [entry, end], "compute_ms": 1000 * (time.perf_counter() - started)}
        for obs in self.observers:
            header.update(obs.on_forward(f"{ctx.peer_id}/{session}", entry, end, pos, x.shape[0], y, rt.is_last))
        return Message(header, {"y": y})

    async def _drop(self, msg: Message, ctx: CallContext) -> Message:
        session = msg.header.get("session")
        header: dict[str, Any] = {"ok": True}
        if self.runtime is not None and isinstance(session, str):
            self.runtime.drop(f"{ctx.peer_id}/{session}")
        if isinstance(session, str):
            for obs in self.observers:
                header.update(obs.on_drop(f"{ctx.peer_id}/{session}"))
        return Message(header)

    def _stats(self) -> dict[str, Any]:
        return {"served_tokens": self.served_tokens, "queue": self._queue,
                "latency_ms": round(self._latency_ms, 3)}

    def status(self) -> dict[str, Any]:
        return {"model": self.model_id, "layers": self.layers, "loads": self.loads,
                "served_tokens": self.served_tokens}
