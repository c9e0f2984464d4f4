"""Who serves which layers: phase 1 of the scheduler, run by one peer and published in the mesh state.

Every serving peer runs :class:`Coordinator`, but only one, the coordinator, plans: it reads the
measured resources (each peer's throughput at the precision it serves, published by that peer's own
Coordinator; the links' round-trip times from the registry), plans (or re-plans, moving as few layers
as possible) and publishes the allocation under its own signed key. The allocation also states which
precisions the mesh accepts for the model (the coordinator's own and float32, unless it was told
otherwise): a peer serving any other precision is not placed, and entries route only to accepted ones.

Choosing the coordinator. Peer ids are free to create, so "the lowest id coordinates" hands the role
to anyone who grinds a low id, and a signed join time is only a claim (a new identity backdates it).
What a newcomer cannot produce is the past behaviour of peers already serving. So:

1. *Candidates* are the live serving peers; if this process's trust list (``GRADIENT_NB_TRUSTED``:
   peer ids its operator vouches for) names any of them, only those.
2. *Incumbency*: every serving peer publishes, signed, whom it follows (``follow-<model>``). The
   candidate followed by the most other candidates coordinates (a vote for oneself proves nothing and
   is not counted). A peer that just joined has no vote but its own against every peer already
   following the incumbent, so it never takes the role over.
3. *Succession*: when nobody live is followed (the coordinator left), the role goes to the first live
   candidate of the succession line the incumbent published with its allocation (serving peers in the
   order it first saw them, itself first) and its followers copied into their votes, so the line
   outlives it. A newcomer is at the end of that line.
4. Only in a mesh where nobody follows anyone yet (all peers starting together) the lowest id wins:
   nobody is senior to anybody then.

Every step reads only signed, replicated entries, so all peers reach the same answer once their
states agree: no split brain from peers' different clocks. What this does not stop, in a mesh with
neither a join secret nor a trust list: a swarm of identities that serve and all follow one of them,
outnumbering the honest serving peers. A join secret (only holders join at all) or a trust list closes
that; and the coordinator only places layers: what those peers return is still verified by entries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from typing import Any

from ..mesh.peer import Mesh
from ..mesh.tasks import cancel_and_wait
from .scheduler import (
    Allocation,
    LinkMeasure,
    ModelCost,
    PeerResources,
    allocate,
    fixed_pipelines,
    measure_precision_tflops,
    model_cost_from_config,
    precision_name,
    replan,
)

log = logging.getLogger(__name__)

SERVE_NS = "serve"
TRUST_ENV = "GRADIENT_NB_TRUSTED"  # comma-separated peer ids this process trusts (its operator's list)
MAX_LINE = 256  # peers kept in a succession line


def trusted_peers() -> frozenset[str]:
    """The peer ids this process's operator trusts (``GRADIENT_NB_TRUSTED``), read from its own environment."""
    return frozenset(p.strip() for p in os.environ.get(TRUST_ENV, "").split(",") if p.strip())


def _safe(model_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)


def _alloc_name(model_id: str) -> str:
    return "alloc-" + _safe(model_id)


def _follow_name(model_id: str) -> str:
    return "follow-" + _safe(model_id)


def _rate_name(model_id: str) -> str:
    return "rate-" + _safe(model_id)


def serving_peers(mesh: Mesh, model_id: str) -> dict[str, dict[str, Any]]:
    """Registry records of live peers that serve ``model_id``, by id."""
    out = {}
    for pid, rec in mesh.state.peers().items():
        serving = rec.get("serving")
        if isinstance(serving, dict) and serving.get("model") == model_id:
            out[pid] = rec
    return out


def precision_of(rec: dict[str, Any]) -> str | None:
    """The precision a registry record says its peer serves at (None when it names none we serve)."""
    srv = rec.get("serving") or {}
    try:
        return precision_name(str(srv.get("dtype") or "float32"), srv.get("quantization"))
    except ValueError:
        return None


def _votes(mesh: Mesh, model_id: str, voters: set[str]) -> dict[str, dict[str, Any]]:
    """Each voter's signed statement of whom it follows: {voter: {"coordinator", "line"}}."""
    out = {}
    for e in mesh.state.entries(SERVE_NS):
        v = e.value
        if e.owner in voters and e.name == _follow_name(model_id) and isinstance(v, dict) \
                and isinstance(v.get("coordinator"), str):
            line = v.get("line")
            out[e.owner] = {"coordinator": v["coordinator"],
                            "line": [p for p in line[:MAX_LINE] if isinstance(p, str)] if isinstance(line, list) else []}
    return out


def coordinator_of(mesh: Mesh, model_id: str, trusted: frozenset[str] | None = None) -> str | None:
    """The peer that coordinates ``model_id`` (see the module docstring for the rule and why)."""
    peers = serving_peers(mesh, model_id)
    if not peers:
        return None
    trusted = trusted_peers() if trusted is None else trusted
    candidates = {p for p in peers if p in trusted} or set(peers)
    votes = _votes(mesh, model_id, candidates)
    tally: dict[str, int] = {}
    for voter, v in votes.items():
        if v["coordinator"] in candidates and v["coordinator"] != voter:  # voting for oneself proves nothing
            tally[v["coordinator"]] = tally.get(v["coordinator"], 0) + 1
    if tally:
        return min(tally, key=lambda p: (-tally[p], p))
    lines: dict[tuple[str, ...], int] = {}
    for v in votes.values():
        if v["line"]:
            lines[tuple(v["line"])] = lines.get(tuple(v["line"]), 0) + 1
    for line in sorted(lines, key=lambda ln: (-lines[ln], ln)):
        heir = next((p for p in line if p in candidates), None)
        if heir is not None:
            return heir
    return min(candidates)


# The last allocation seen from a rightful coordinator, per mesh and model: while a new coordinator has
# not published yet (it just took over), peers keep following that one instead of anyone's claim.
_last_seen: weakref.WeakKeyDictionary[Any, dict[str, Allocation]] = weakref.WeakKeyDictionary()


def allocation_of(mesh: Mesh, model_id: str) -> Allocation | None:
    """The allocation published by the current coordinator (or, while it has published none yet, the
    last one this process saw from a coordinator; never a plan from a peer that is not coordinating)."""
    seen = _last_seen.setdefault(mesh.state, {})
    coord = coordinator_of(mesh, model_id)
    value = None if coord is None else mesh.state.get(SERVE_NS, coord, _alloc_name(model_id))
    if value is None:
        return seen.get(model_id)
    try:
        alloc = Allocation.from_dict(value)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring a malformed allocation from %s: %s", str(coord)[:8], exc)
        return seen.get(model_id)
    seen[model_id] = alloc
    return alloc


def accepted_precisions(mesh: Mesh, model_id: str) -> set[str] | None:
    """The precisions the coordinator's allocation accepts for ``model_id`` (None: not stated)."""
    alloc = allocation_of(mesh, model_id)
    return set(alloc.precisions) if alloc is not None and alloc.precisions else None


def model_cost(path: Any, dtype_bytes: float = 4.0) -> ModelCost:
    """Memory and compute per layer of the model stored at ``path``, from its config."""
    from transformers import AutoConfig

    return model_cost_from_config(AutoConfig.from_pretrained(path), dtype_bytes)


def _links(peers: dict[str, dict[str, Any]]) -> list[LinkMeasure]:
    """The links between serving peers as their registry records measured them (RTT; bandwidth where given)."""
    out = []
    for pid, rec in peers.items():
        for lk in rec.get("links") or []:
            if isinstance(lk, dict) and lk.get("peer") in peers and isinstance(lk.get("rtt_ms"), (int, float)):
                mbps = lk.get("mbps")
                out.append(LinkMeasure(pid, str(lk["peer"]), float(lk["rtt_ms"]),
                                       float(mbps) if isinstance(mbps, (int, float)) and mbps > 0 else None))
    return out


class Coordinator:
    """Keeps the published allocation of ``model_id`` right while this peer is the coordinator, and
    publishes this peer's vote and its throughput at the precision it serves.

    ``accept``: the precisions this coordinator's allocations accept (default: the one this peer serves,
    and float32).
    """

    def __init__(self, mesh: Mesh, model_id: str, cost: ModelCost, *, interval: float = 1.0,
                 accept: set[str] | None = None, measure_seconds: float = 0.3) -> None:
        self.mesh, self.model_id, self.cost, self.interval = mesh, model_id, cost, interval
        self.accept = set(accept) if accept else None
        self.measure_seconds = measure_seconds
        self.last: Allocation | None = None
        self.plans = 0
        self._line: list[str] = []  # serving peers in the order this peer first saw them (itself first)
        self._task: asyncio.Task | None = None

    def start(self) -> Coordinator:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _measure(self) -> None:
        """Publish this peer's throughput at the precision it serves (phase 1 splits layers by it)."""
        me = self.mesh.state.peers().get(self.mesh.id) or {}
        precision = precision_of(me)
        if precision is None:
            return
        try:
            tflops = await asyncio.to_thread(measure_precision_tflops, precision, "cpu", self.measure_seconds)
        except (RuntimeError, ValueError, ImportError) as exc:  # a quantization kernel missing here
            log.warning("could not measure %s throughput: %s", precision, exc)
            return
        self.mesh.state.put(SERVE_NS, _rate_name(self.model_id), {"precision": precision, "tflops": round(tflops, 5)})

    async def _run(self) -> None:
        await self._measure()
        while True:
            self.step()
            await asyncio.sleep(self.interval)

    def step(self) -> None:
        """One round: note who serves, vote for the coordinator, and plan if that is this peer."""
        peers = serving_peers(self.mesh, self.model_id)
        self._line = [p for p in self._line if p in peers]
        if self.mesh.id in peers and self.mesh.id not in self._line:
            self._line.insert(0, self.mesh.id)
        self._line += sorted(p for p in peers if p not in self._line)
        seen = allocation_of(self.mesh, self.model_id)
        if seen is not None:
            self.last = seen
        coord = coordinator_of(self.mesh, self.model_id)
        if coord is None:
            return
        if coord == self.mesh.id:
            try:
                self.plan_once()
            except ValueError as exc:  # the live peers cannot hold the model (yet)
                log.warning("cannot allocate %s: %s", self.model_id, exc)
        # Follow the coordinator, and keep the succession line it published (ours when it is us).
        line = self._line if coord == self.mesh.id or self.last is None or not self.last.line else self.last.line
        vote = {"coordinator": coord, "line": list(line[:MAX_LINE])}
        if self.mesh.state.get(SERVE_NS, self.mesh.id, _follow_name(self.model_id)) != vote:
            self.mesh.state.put(SERVE_NS, _follow_name(self.model_id), vote)

    def _accepted(self) -> set[str]:
        if self.accept:
            return self.accept
        # The precision this peer serves, and full precision, which is never worse.
        mine = precision_of(self.mesh.state.peers().get(self.mesh.id) or {})
        return {mine or "float32", "float32"}

    def _tflops(self, pid: str, rec: dict[str, Any]) -> float:
        """A peer's throughput at the precision it serves (its published probe), else its float32 probe."""
        rate = self.mesh.state.get(SERVE_NS, pid, _rate_name(self.model_id))
        if isinstance(rate, dict) and rate.get("precision") == precision_of(rec) \
                and isinstance(rate.get("tflops"), (int, float)) and rate["tflops"] > 0:
            return float(rate["tflops"])
        return float(rec.get("tflops") or 0.0)

    def plan_once(self) -> Allocation | None:
        accept = self._accepted()
        peers = {pid: r for pid, r in serving_peers(self.mesh, self.model_id).items() if precision_of(r) in accept}
        fixed = {pid: tuple(r["serving"]["fixed_layers"]) for pid, r in peers.items()
                 if r["serving"].get("fixed_layers")}
        auto = [PeerResources(pid, _capped_memory(r), self._tflops(pid, r), precision_of(r) or "float32")
                for pid, r in sorted(peers.items()) if pid not in fixed]
        current = set(peers)
        if self.last is not None and self.plans and set(self.last.precisions) == accept and \
                {st.peer_id for st in self.last.stages()} | set(self.last.spare) == current:
            return None  # nothing changed since our last plan
        links = _links(peers)
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
            plan = replan(old, auto, self.cost, links) if old is not None and old.stages() \
                else allocate(auto, self.cost, links)
            pipelines.extend(plan.pipelines)
            spare = list(plan.spare)
        alloc = Allocation(self.cost.num_layers, pipelines, spare, extra, precisions=sorted(accept),
                           line=list(self._line[:MAX_LINE]))
        self.mesh.state.put(SERVE_NS, _alloc_name(self.model_id), alloc.to_dict())
        log.info("allocation for %s: %s", self.model_id, alloc.to_dict())
        self.last = alloc
        self.plans += 1
        return alloc


def _capped_memory(rec: dict[str, Any]) -> int:
    free = int(rec.get("free_memory_bytes") or 0)
    cap = rec["serving"].get("memory_cap_bytes")
    return min(free, int(cap)) if cap else free
