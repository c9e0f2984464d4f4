"""Beacon selection: five agents with distinct skills, the MiniLM embedder, bids and a LinUCB requester."""

from __future__ import annotations

import random

from gradient_nb.agents.beacon import Beacon, Selector, self_score
from gradient_nb.agents.ledger import Ledger, Skill
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.state import MeshState
from tests.agents.conftest import sync

SKILLS = {
    "calc": ("arithmetic", "add, subtract, multiply and divide numbers exactly"),
    "units": ("unit conversion", "convert kilometres to miles, kilograms to pounds, celsius to fahrenheit"),
    "french": ("translation", "translate English sentences into French"),
    "docs": ("document search", "find passages in local documents and notes"),
    "code": ("python programming", "write and debug Python functions"),
}
TASKS = {
    "What is 1234 times 56 minus 78?": "calc",
    "How many pounds are 12 kilograms?": "units",
    "Say 'good morning, my friend' in French.": "french",
    "Which of my notes mention the tide tables?": "docs",
    "Fix the bug in this Python function that sorts a list.": "code",
}


def _mesh_of(names: dict[str, tuple[str, str]]) -> tuple[Ledger, dict[str, Ledger]]:
    req = MeshState(Identity.generate())
    req.heartbeat({"name": "requester"})
    agents = {}
    for name, (skill, desc) in names.items():
        st = MeshState(Identity.generate())
        st.heartbeat({"name": name})
        led = Ledger(st, st.identity)
        led.publish(name=name, role="worker", skills=[Skill(skill, desc)], tools=[], model="m", capacity=2)
        sync(st, req)
        agents[name] = led
    return Ledger(req, req.identity), agents


def _bids(requester: Ledger, beacon: Beacon) -> list[dict]:
    out = []
    for cap in requester.agents().values():
        if cap.agent != requester.identity.peer_id:
            bid = self_score(cap, beacon.header(), 0.5)
            if bid is not None:
                out.append(bid)
    return out


def test_beacons_pick_the_agent_whose_skills_match() -> None:
    requester, agents = _mesh_of(SKILLS)
    by_id = {led.identity.peer_id: name for name, led in agents.items()}
    sel = Selector(requester)
    for task, want in TASKS.items():
        beacon = Beacon.for_task(task, k=1)
        chosen = sel.choose(beacon, _bids(requester, beacon))
        assert [by_id[c["agent"]] for c in chosen] == [want], (task, chosen)
    # k=2 returns two distinct agents, the matching one first.
    beacon = Beacon.for_task("convert 3 miles to kilometres", k=2)
    chosen = sel.choose(beacon, _bids(requester, beacon))
    assert len({c["agent"] for c in chosen}) == 2 and by_id[chosen[0]["agent"]] == "units"


def test_the_bandit_shifts_toward_the_agent_that_succeeds() -> None:
    twins = {"a": ("arithmetic", "exact arithmetic on numbers"), "b": ("arithmetic", "exact arithmetic on numbers")}
    requester, agents = _mesh_of(twins)
    a, b = agents["a"].identity.peer_id, agents["b"].identity.peer_id
    rng = random.Random(7)
    sel = Selector(requester, alpha=0.3)
    picks = []
    for i in range(40):
        beacon = Beacon.for_task(f"compute {i} plus {i * 3}", k=1)
        chosen = sel.choose(beacon, _bids(requester, beacon))[0]["agent"]
        ok = rng.random() < (0.9 if chosen == b else 0.2)
        sel.learn(beacon, chosen, ok)
        requester.record_outcome(chosen, f"task-{i}", success=ok, latency_ms=10)
        picks.append(chosen)
    assert picks[-15:].count(b) >= 13, picks
    assert requester.reputation(b) > requester.reputation(a)
