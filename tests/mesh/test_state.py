"""The signed replicated state, two replicas synced by Yjs updates (as the links and the room do)."""

from __future__ import annotations

import time

import msgpack
import pytest
from pycrdt import Map

from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.state import MeshState


def _sync(a: MeshState, b: MeshState) -> None:
    b.doc.apply_update(a.doc.get_update(b.doc.get_state()))
    a.doc.apply_update(b.doc.get_update(a.doc.get_state()))


def test_entries_converge_and_are_verified() -> None:
    a, b = MeshState(Identity.generate()), MeshState(Identity.generate())
    a.heartbeat({"name": "a"})
    b.heartbeat({"name": "b"})
    a.put("notes", "x", {"v": 1})
    b.put("notes", "x", {"v": 2})
    _sync(a, b)
    for s in (a, b):
        assert {p["name"] for p in s.peers().values()} == {"a", "b"}
        assert sorted((e.owner == a.identity.peer_id, e.value["v"]) for e in s.entries("notes")) == [
            (False, 2), (True, 1)]


def test_forged_and_malformed_entries_are_ignored_and_counted() -> None:
    a, b = MeshState(Identity.generate()), MeshState(Identity.generate())
    a.heartbeat({"name": "a"})
    _sync(a, b)
    mallory = Identity.generate()
    registry = b.doc.get("peers", type=Map)
    # Mallory signs a record for a's id, and writes garbage and a record under a key she does not own.
    registry[a.identity.peer_id] = msgpack.packb(sign_record(mallory, {"peer_id": a.identity.peer_id,
                                                                       "name": "evil", "seq": 99, "ts": time.time()}))
    registry["0" * 40] = b"\x00junk"
    b.doc.get("notes", type=Map)[f"{a.identity.peer_id}/x"] = msgpack.packb(
        sign_record(mallory, {"owner": a.identity.peer_id, "name": "x", "value": 1, "ts": time.time()}))
    _sync(b, a)
    assert a.identity.peer_id not in b.peers()  # the forgery replaced the real record: a is unknown, not "evil"
    assert all(p.get("name") != "evil" for s in (a, b) for p in s.peers().values())
    assert b.entries("notes") == []
    assert b.forged_entries >= 3
    a.heartbeat({"name": "a"})  # the owner's next heartbeat restores its entry everywhere
    _sync(a, b)
    assert b.peers()[a.identity.peer_id]["name"] == "a"


def test_silent_peer_is_dropped_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = MeshState(Identity.generate(), peer_timeout=5), MeshState(Identity.generate(), peer_timeout=5)
    a.heartbeat({"name": "a"})
    _sync(a, b)
    now = [time.monotonic()]
    monkeypatch.setattr("gradient_nb.mesh.state.time.monotonic", lambda: now[0])
    b.refresh()
    for _ in range(4):  # b keeps refreshing every 2 s while a stays silent
        now[0] += 2
        dropped = b.refresh()
    assert dropped == {a.identity.peer_id} or a.identity.peer_id not in b.peers()
    assert a.identity.peer_id not in b.peers()


def test_our_own_pause_does_not_drop_everyone(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = MeshState(Identity.generate(), peer_timeout=5), MeshState(Identity.generate(), peer_timeout=5)
    a.heartbeat({"name": "a"})
    _sync(a, b)
    b.refresh()
    now = [time.monotonic() + 60]  # b's loop was blocked for a minute (a long notebook cell)
    monkeypatch.setattr("gradient_nb.mesh.state.time.monotonic", lambda: now[0])
    assert a.identity.peer_id in b.peers()
    assert b.refresh() == set()
