"""Who serves which layers: phase 1 of the scheduler, run by one peer and published in the mesh state.

Every serving peer runs :class:`Coordinator`, but only the live serving peer with the lowest id acts:
it reads the measured resources from the registry, plans (or re-plans, moving as few layers as
possible) and publishes the allocation under its own signed key. If it vanishes, the next lowest takes
over from the last allocation it saw. Peers that hold a fixed layer range (``layers=`` given by the
user) are placed as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ..mesh.peer import Mesh
from .scheduler import (
    Allocation,
    ModelCost,
    PeerResources,
    allocate,
    fixed_pipelines,
    model_cost_from_config,
    replan,
)

log = logging.getLogger(__name__)

SERVE_NS = "serve"


def _alloc_name(model_id: str) -> str:
    return "alloc-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)


def serving_peers(mesh: Mesh, model_id: str) -> dict[str, dict[str, Any]]:
    """Registry records of live peers that serve ``model_id``, by id."""
    out = {}
    for pid, rec in mesh.state.peers().items():
        serving = rec.get("serving")
        if isinstance(serving, dict) and serving.get("model") == model_id:
            out[pid] = rec
    return out


def coordinator_of(mesh: Mesh, model_id: str) -> str | None:
    peers = serving_peers(mesh, model_id)
    return min(peers) if peers else None


def allocation_of(mesh: Mesh, model_id: str) -> Allocation | None:
    """The allocation published by the current coordinator (or, while it has published none yet, the
    newest one from any live peer)."""
    name = _alloc_name(model_id)
    entries = [e for e in mesh.state.entries(SERVE_NS) if e.name == name]
    if not entries:
        return None
    coord = coordinator_of(mesh, model_id)
    chosen = next((e for e in entries if e.owner == coord), None) or max(entries, key=lambda e: e.ts)
    try:
        return Allocation.from_dict(chosen.value)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring a malformed allocation from %s: %s", chosen.owner[:8], exc)
        return None


def model_cost(path: Any, dtype_bytes: float = 4.0) -> ModelCost:
    """Memory and compute per layer of the model stored at ``path``, from its config."""
    from transformers import AutoConfig

    return model_cost_from_config(AutoConfig.from_pretrained(path), dtype_bytes)


class Coordinator:
    """Keeps the published allocation of ``model_id`` right while this peer is the coordinator."""

    def __init__(self, mesh: Mesh, model_id: str, cost: ModelCost, *, interval: float = 1.0) -> None:
        self.mesh, self.model_id, self.cost, self.interval = mesh, model_id, cost, interval
        self.last: Allocation | None = None
        self.plans = 0
        self._task: asyncio.Task | None = None

    def start(self) -> Coordinator:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _run(self) -> None:
        while True:
            seen = allocation_of(self.mesh, self.model_id)
            if seen is not None:
                self.last = seen
            if coordinator_of(self.mesh, self.model_id) == self.mesh.id:
                try:
                    self.plan_once()
                except ValueError as exc:  # the live peers cannot hold the model (yet)
                    log.warning("cannot allocate %s: %s", self.model_id, exc)
            await asyncio.sleep(self.interval)

    def plan_once(self) -> Allocation | None:
        peers = serving_peers(self.mesh, self.model_id)
        fixed = {pid: tuple(r["serving"]["fixed_layers"]) for pid, r in peers.items()
                 if r["serving"].get("fixed_layers")}
        auto = [PeerResources(pid, _capped_memory(r), float(r.get("tflops") or 0.0))
                for pid, r in sorted(peers.items()) if pid not in fixed]
        current = set(peers)
        if self.last is not None and self.plans and \
                {st.peer_id for st in self.last.stages()} | set(self.last.spare) == current:
            return None  # nothing changed since our last plan
        pipelines, extra = fixed_pipelines(fixed, self.cost.num_layers)
        spare: list[str] = []
        if auto:
            old = None
            if self.last is not None:
                # Re-plan from the last plan (peers missing from ``auto`` are the holes to fill), so that
                # as few layers as possible move.
                old = Allocation(self.cost.num_layers,
                                 [pipe for pipe in self.last.pipelines if not any(st.peer_id in fixed for st in pipe)],
                                 [p for p in self.last.spare if p not in fixed])
            plan = replan(old, auto, self.cost) if old is not None and old.stages() else allocate(auto, self.cost)
            pipelines.extend(plan.pipelines)
            spare = list(plan.spare)
        alloc = Allocation(self.cost.num_layers, pipelines, spare, extra)
        self.mesh.state.put(SERVE_NS, _alloc_name(self.model_id), alloc.to_dict())
        log.info("allocation for %s: %s", self.model_id, alloc.to_dict())
        self.last = alloc
        self.plans += 1
        return alloc


def _capped_memory(rec: dict[str, Any]) -> int:
    free = int(rec.get("free_memory_bytes") or 0)
    cap = rec["serving"].get("memory_cap_bytes")
    return min(free, int(cap)) if cap else free
