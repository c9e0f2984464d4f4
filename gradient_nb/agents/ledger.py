"""The capability ledger: who can do what (signed capability records) and how it went (signed outcomes).

Symphony keeps a ledger of capabilities; symphony-coord keeps it in a YAML file. Here it lives in the
mesh's replicated state, and every record carries its author's Ed25519 signature *inside* the value,
so a record is self-authenticating wherever it travels (the state layer's own per-owner signature
says who wrote the slot; ours says who vouches for the content):

- A **capability record** (namespace ``agents``, entry ``capability``) is signed by the agent itself:
  role, skills with descriptions, tools with their JSON schemas, model, capacity, current load,
  observed latency, a heartbeat counter ``seq`` and its wall-clock ``ts``. The agent republishes it
  every heartbeat.
- An **outcome record** (namespace ``agent-outcomes``, entry ``<task id>``) is signed by the
  *requester* that dispatched a task: which agent, success, latency, the task id and a timestamp.
  Each requester keeps its last ``MAX_OUTCOMES_PER_REQUESTER``; together they form each agent's
  history, from which reputation is computed.

Invariants a reader keeps (each peer decides for itself, nothing is trusted because it is present):
- A record whose signature fails, whose signer is not the agent (capability) or the requester named
  in it (outcome), or that rates its own signer, is ignored and counted in ``rejected``.
- Replays are ignored: a capability record whose ``seq`` is not above the highest this reader has
  accepted from that agent, and an outcome whose (requester, task id) was already counted, or whose
  timestamp is in the future or older than ``OUTCOME_MAX_AGE_S``.
- An agent is live while its heartbeat ``seq`` keeps advancing on the *local* clock within ``ttl``
  (clock skew between machines does not matter); a silent one drops out of ``agents()``.
- History a reader has verified stays in its memory even after the requester leaves the mesh.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..mesh.errors import SignatureInvalid
from ..mesh.identity import Identity, is_peer_id, sign_record, verify_record

log = logging.getLogger(__name__)

CAPABILITIES = "agents"
OUTCOMES = "agent-outcomes"
CAPABILITY_ENTRY = "capability"
DEFAULT_TTL_S = 10.0
OUTCOME_MAX_AGE_S = 24 * 3600.0
CLOCK_SKEW_S = 60.0
MAX_OUTCOMES_PER_REQUESTER = 200
MAX_SEEN_OUTCOMES = 100_000


@dataclass
class Skill:
    name: str
    description: str


@dataclass
class Capability:
    """What an agent says it can do, as verified by a reader."""

    agent: str  # peer id
    name: str
    role: str
    skills: list[Skill]
    tools: list[dict[str, Any]]  # {"server", "name", "description", "input_schema"}
    model: str
    capacity: int
    load: int
    latency_ms: float | None
    seq: int
    ts: float

    def text(self) -> str:
        """The skills as one text, what beacons compare a task against."""
        return "; ".join(f"{s.name}: {s.description}" for s in self.skills)


@dataclass
class Outcome:
    requester: str
    agent: str
    task: str
    success: bool
    latency_ms: float
    ts: float


@dataclass
class History:
    successes: int = 0
    failures: int = 0
    latency_ms: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.successes + self.failures

    def reputation(self) -> float:
        """Posterior mean success rate under a Beta(1, 1) prior: 0.5 for a newcomer."""
        return (self.successes + 1) / (self.count + 2)


def capability_record(identity: Identity, *, name: str, role: str, skills: list[Skill],
                      tools: list[dict[str, Any]], model: str, capacity: int, load: int,
                      latency_ms: float | None, seq: int) -> dict[str, Any]:
    """A capability record signed by the agent ``identity``."""
    if capacity < 1:
        raise ValueError("capacity is at least 1 concurrent task")
    payload = {"kind": "capability", "peer_id": identity.peer_id, "name": name, "role": role,
               "skills": [{"name": s.name, "description": s.description} for s in skills],
               "tools": tools, "model": model, "capacity": int(capacity), "load": int(load),
               "latency_ms": None if latency_ms is None else float(latency_ms), "seq": int(seq), "ts": time.time()}
    return sign_record(identity, payload)


def outcome_record(identity: Identity, *, agent: str, task: str, success: bool, latency_ms: float) -> dict[str, Any]:
    """An outcome record signed by the requester ``identity``."""
    payload = {"kind": "outcome", "requester": identity.peer_id, "agent": agent, "task": task,
               "success": bool(success), "latency_ms": float(latency_ms), "ts": time.time()}
    return sign_record(identity, payload)


def _check_capability(record: Any, owner: str) -> Capability:
    payload = verify_record(record, expect_peer_id=owner)
    if payload.get("kind") != "capability":
        raise SignatureInvalid("not a capability record")
    skills = payload.get("skills")
    tools = payload.get("tools")
    cap, load, seq = payload.get("capacity"), payload.get("load"), payload.get("seq")
    if not isinstance(skills, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                               and isinstance(s.get("description"), str) for s in skills):
        raise SignatureInvalid("skills must be a list of {name, description}")
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise SignatureInvalid("tools must be a list of {name, ...}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (cap, load, seq)) or cap < 1:
        raise SignatureInvalid("capacity, load and seq must be counts (capacity >= 1)")
    latency = payload.get("latency_ms")
    return Capability(owner, str(payload.get("name", "")), str(payload.get("role", "")),
                      [Skill(s["name"], s["description"]) for s in skills], tools, str(payload.get("model", "")),
                      cap, load, None if not isinstance(latency, int | float) else float(latency), seq,
                      float(payload.get("ts", 0.0)))


def _check_outcome(record: Any, writer: str) -> Outcome:
    payload = verify_record(record, expect_peer_id=writer)
    if payload.get("kind") != "outcome" or payload.get("requester") != writer:
        raise SignatureInvalid("not an outcome record by the peer that wrote it")
    agent, task = payload.get("agent"), payload.get("task")
    if not is_peer_id(agent) or not isinstance(task, str) or not task:
        raise SignatureInvalid("an outcome names an agent (peer id) and a task id")
    if agent == writer:
        raise SignatureInvalid("an agent cannot rate itself")
    if not isinstance(payload.get("success"), bool) or not isinstance(payload.get("latency_ms"), int | float):
        raise SignatureInvalid("an outcome has a boolean success and a latency")
    return Outcome(writer, agent, task, payload["success"], float(payload["latency_ms"]),
                   float(payload.get("ts", 0.0)))


class Ledger:
    """One peer's view of the ledger over its mesh state (anything with ``put``/``get``/``entries``/``delete``
    as ``MeshState``); also publishes this peer's own records."""

    def __init__(self, state: Any, identity: Identity, *, ttl: float = DEFAULT_TTL_S) -> None:
        self.state = state
        self.identity = identity
        self.ttl = ttl
        self.rejected = 0
        self._best_seq: dict[str, int] = {}
        self._heard: dict[str, tuple[int, float]] = {}  # agent -> (seq, local monotonic when it advanced)
        self._caps: dict[str, Capability] = {}
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._history: dict[str, History] = {}
        self._rejected_keys: set[tuple[str, str, str, float]] = set()
        self._seq = 0
        self._mine: list[str] = []  # task ids of the outcomes this peer published, oldest first

    # -- writing -------------------------------------------------------------------------------
    def publish(self, *, name: str, role: str, skills: list[Skill], tools: list[dict[str, Any]], model: str,
                capacity: int, load: int = 0, latency_ms: float | None = None) -> None:
        """Publish (or refresh: one heartbeat) this peer's capability record."""
        self._seq += 1
        rec = capability_record(self.identity, name=name, role=role, skills=skills, tools=tools, model=model,
                                capacity=capacity, load=load, latency_ms=latency_ms, seq=self._seq)
        self.state.put(CAPABILITIES, CAPABILITY_ENTRY, rec)

    def withdraw(self) -> None:
        self.state.delete(CAPABILITIES, CAPABILITY_ENTRY)

    def record_outcome(self, agent: str, task: str, *, success: bool, latency_ms: float) -> None:
        """Append this requester's signed outcome of ``task`` done by ``agent``."""
        if "/" in task:
            raise ValueError("a task id has no '/'")
        rec = outcome_record(self.identity, agent=agent, task=task, success=success, latency_ms=latency_ms)
        self.state.put(OUTCOMES, task, rec)
        self._mine.append(task)
        while len(self._mine) > MAX_OUTCOMES_PER_REQUESTER:
            self.state.delete(OUTCOMES, self._mine.pop(0))
        self.refresh()

    # -- reading -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the state: verify new records, fold new outcomes into the histories."""
        now = time.monotonic()
        for e in self.state.entries(CAPABILITIES):
            if e.name != CAPABILITY_ENTRY:
                continue
            try:
                cap = _check_capability(e.value, e.owner)
            except SignatureInvalid as exc:
                self._reject(e, exc)
                continue
            best = self._best_seq.get(cap.agent, -1)
            if cap.seq < best or (cap.seq == best and cap.agent in self._caps and self._caps[cap.agent].ts != cap.ts):
                self._reject(e, SignatureInvalid(f"replayed capability seq {cap.seq} <= {best}"))
                continue
            if cap.seq > best:
                self._best_seq[cap.agent] = cap.seq
                self._heard[cap.agent] = (cap.seq, now)
            self._caps[cap.agent] = cap
        wall = time.time()
        for e in self.state.entries(OUTCOMES):
            key = (e.owner, e.name)
            if key in self._seen:
                continue
            try:
                out = _check_outcome(e.value, e.owner)
                if out.task != e.name:
                    raise SignatureInvalid("outcome stored under another task id (a replay)")
                if (out.requester, out.task) in self._seen:
                    raise SignatureInvalid("outcome already counted")
                if out.ts > wall + CLOCK_SKEW_S or out.ts < wall - OUTCOME_MAX_AGE_S:
                    raise SignatureInvalid("outcome timestamp out of range")
            except SignatureInvalid as exc:
                self._reject(e, exc)
                continue
            self._seen[key] = None
            if len(self._seen) > MAX_SEEN_OUTCOMES:
                self._seen.popitem(last=False)
            h = self._history.setdefault(out.agent, History())
            if out.success:
                h.successes += 1
            else:
                h.failures += 1
            h.latency_ms = [*h.latency_ms[-99:], out.latency_ms]

    def _reject(self, entry: Any, exc: Exception) -> None:
        # A rejected slot stays rejected until its bytes change, so count each bad record once.
        key = (entry.namespace, entry.owner, entry.name, entry.ts)
        if key not in self._rejected_keys:
            self._rejected_keys.add(key)
            self.rejected += 1
            log.warning("ignoring ledger record %s/%s/%s: %s", entry.namespace, entry.owner[:8], entry.name, exc)

    def agents(self) -> dict[str, Capability]:
        """The live agents' capabilities by peer id (their heartbeat advanced within ``ttl``)."""
        self.refresh()
        now = time.monotonic()
        return {a: c for a, c in self._caps.items()
                if a == self.identity.peer_id or now - self._heard.get(a, (0, -1e18))[1] <= self.ttl}

    def history(self, agent: str) -> History:
        return self._history.get(agent, History())

    def reputation(self, agent: str) -> float:
        return self.history(agent).reputation()
