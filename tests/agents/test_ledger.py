"""The capability ledger over two replicas of the signed mesh state (synced as the links sync them)."""

from __future__ import annotations

import time

import pytest

from gradient_nb.agents.ledger import CAPABILITIES, OUTCOMES, Ledger, Skill, outcome_record
from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.state import MeshState
from tests.agents.conftest import replay, snapshot, sync


def _pair() -> tuple[MeshState, MeshState, Ledger, Ledger]:
    a, b = MeshState(Identity.generate()), MeshState(Identity.generate())
    a.heartbeat({"name": "agent"})
    b.heartbeat({"name": "requester"})
    return a, b, Ledger(a, a.identity, ttl=5), Ledger(b, b.identity, ttl=5)


def _publish(ledger: Ledger, **kw) -> None:
    ledger.publish(name="calc", role="worker", skills=[Skill("arithmetic", "exact arithmetic")],
                   tools=[{"server": "tools", "name": "calculate", "input_schema": {"type": "object"}}],
                   model="SmolLM2", capacity=2, **kw)


def test_capabilities_and_outcomes_form_history() -> None:
    a, b, la, lb = _pair()
    _publish(la, latency_ms=12.0)
    sync(a, b)
    caps = lb.agents()
    assert list(caps) == [a.identity.peer_id]
    assert caps[a.identity.peer_id].skills[0].name == "arithmetic" and caps[a.identity.peer_id].capacity == 2
    lb.record_outcome(a.identity.peer_id, "t1", success=True, latency_ms=30)
    lb.record_outcome(a.identity.peer_id, "t2", success=False, latency_ms=50)
    sync(a, b)
    la.refresh()
    for led in (la, lb):
        h = led.history(a.identity.peer_id)
        assert (h.successes, h.failures) == (1, 1)
        assert led.reputation(a.identity.peer_id) == pytest.approx(0.5)
    assert la.rejected == lb.rejected == 0


def test_forged_and_replayed_records_are_ignored() -> None:
    a, b, la, lb = _pair()
    _publish(la)
    sync(a, b)
    old = snapshot(b, CAPABILITIES, a.identity.peer_id, "capability")
    _publish(la, load=1)
    sync(a, b)
    assert lb.agents()[a.identity.peer_id].load == 1
    # Replay: the agent's own older (validly signed) record put back into the requester's replica.
    replay(b, old)
    assert lb.agents()[a.identity.peer_id].load == 1
    rejected = lb.rejected
    # Forgery: the requester (b) writes in its own slot an outcome about a signed by someone else,
    # a self-rating by a, and replays a valid outcome of its own under a second task id.
    mallory = Identity.generate()
    b.put(OUTCOMES, "f1", outcome_record(mallory, agent=a.identity.peer_id, task="f1", success=True, latency_ms=1))
    a.put(OUTCOMES, "self", outcome_record(a.identity, agent=a.identity.peer_id, task="self", success=True,
                                           latency_ms=1))
    good = outcome_record(b.identity, agent=a.identity.peer_id, task="t1", success=True, latency_ms=1)
    b.put(OUTCOMES, "t1", good)
    b.put(OUTCOMES, "t1-again", good)
    sync(a, b)
    for led in (la, lb):
        led.refresh()
        assert led.history(a.identity.peer_id).successes == 1
    assert lb.rejected - rejected == 3
    # A capability record signed by mallory naming a's id, published in mallory's own slot.
    ms = MeshState(mallory)
    ms.heartbeat({"name": "mallory"})
    ms.put(CAPABILITIES, "capability", sign_record(mallory, {
        "kind": "capability", "peer_id": a.identity.peer_id, "name": "evil", "skills": [], "tools": [],
        "capacity": 9, "load": 0, "seq": 999, "ts": time.time()}))
    sync(ms, b)
    assert all(c.name != "evil" for c in lb.agents().values())
    assert lb.rejected - rejected == 4


def test_silent_agent_drops_out(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, la, lb = _pair()
    _publish(la)
    sync(a, b)
    assert a.identity.peer_id in lb.agents()
    now = [time.monotonic()]
    monkeypatch.setattr("gradient_nb.agents.ledger.time.monotonic", lambda: now[0])
    now[0] += 3
    _publish(la)  # a heartbeat inside the ttl keeps it
    sync(a, b)
    assert a.identity.peer_id in lb.agents()
    now[0] += 6
    assert a.identity.peer_id not in lb.agents()
    _publish(la)
    sync(a, b)
    assert a.identity.peer_id in lb.agents()
