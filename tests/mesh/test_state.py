"""The signed replicated state: only an owner writes, replaces or deletes its records; replicas sync
over channels; a hostile peer process changes nothing that others read, and is counted."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.rendezvous import Rendezvous
from gradient_nb.mesh.state import MeshState, Replica


def _sync(a: Replica, b: Replica) -> None:
    b.receive(a.export())
    a.receive(b.export())


def _signed(signer: Identity, owner: str, ns: str, name: str, seq: int, **fields) -> bytes:
    payload = {"owner": owner, "ns": ns, "name": name, "seq": seq, "ts": time.time(), **fields}
    return msgpack.packb(sign_record(signer, payload), use_bin_type=True)


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


def test_forged_and_malformed_records_are_ignored_and_counted() -> None:
    a, b = MeshState(Identity.generate()), MeshState(Identity.generate())
    a.heartbeat({"name": "a"})
    a.put("notes", "x", {"v": 1})
    _sync(a, b)
    aid, mallory = a.identity.peer_id, Identity.generate()
    before = b.forged_entries
    far = time.time_ns()  # a seq far above a's own
    b.receive([_signed(mallory, aid, "peers", "", far, value={"name": "evil"}),  # signed by another key
               _signed(mallory, aid, "notes", "x", far, value={"v": 666}),
               _signed(mallory, aid, "notes", "x", far, **{"del": True}),  # a delete in a's name
               b"\x00junk", msgpack.packb({"payload": {"owner": aid}}), 42])
    assert b.forged_entries - before == 6 and b.rejected["forged"] == 6
    assert b.peers()[aid]["name"] == "a" and b.get("notes", aid, "x") == {"v": 1}


def test_replays_and_equivocation_are_rejected_and_only_the_owner_deletes() -> None:
    a, b = MeshState(Identity.generate()), MeshState(Identity.generate())
    a.heartbeat({"name": "a"})
    a.put("alloc", "m", {"v": 1})
    old = a.export()
    a.put("alloc", "m", {"v": 2})
    _sync(a, b)
    b.receive(old)  # the older signed allocation, re-sent
    assert b.get("alloc", a.identity.peer_id, "m") == {"v": 2}
    assert b.rejected["replay"] >= 1
    rec = next(r for r in a.export() if msgpack.unpackb(r)["payload"]["ns"] == "alloc")
    payload = msgpack.unpackb(rec)["payload"]
    b.receive([_signed(a.identity, a.identity.peer_id, "alloc", "m", payload["seq"], value={"v": 3})])
    assert b.rejected["equivocation"] == 1 and b.get("alloc", a.identity.peer_id, "m") == {"v": 2}
    a.delete("alloc", "m")  # the owner's tombstone wins, and the deleted value cannot come back
    b.receive(a.export())
    b.receive(old)
    assert b.get("alloc", a.identity.peer_id, "m") is None and b.entries("alloc") == []


def test_oversized_records_and_flooding_owners_fill_only_their_own_quota() -> None:
    flood, victim = Identity.generate(), MeshState(Identity.generate())
    reader = MeshState(Identity.generate(), max_records_per_owner=50, max_bytes_per_owner=1 << 20)
    victim.heartbeat({"name": "v"})
    victim.put("notes", "x", 1)
    reader.receive(victim.export())
    fid = flood.peer_id
    reader.receive([_signed(flood, fid, "notes", "big", 1, value="x" * 100_000)])
    reader.receive([_signed(flood, fid, "notes", f"n{i}", 2 + i, value=i) for i in range(80)])
    assert reader.rejected["oversized"] == 1 and reader.rejected["quota"] == 30
    assert reader.get("notes", fid, "big") is None and reader.get("notes", victim.identity.peer_id, "x") == 1
    with pytest.raises(ValueError, match="bytes"):
        victim.put("notes", "huge", "x" * 100_000)  # our own oversized write fails loudly, not silently


def test_silent_peer_is_dropped_after_the_timeout_without_deleting_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = MeshState(Identity.generate(), peer_timeout=5), MeshState(Identity.generate(), peer_timeout=5)
    a.heartbeat({"name": "a"})
    a.put("notes", "x", 1)
    _sync(a, b)
    now = [time.monotonic()]
    monkeypatch.setattr("gradient_nb.mesh.state.time.monotonic", lambda: now[0])
    b.refresh()
    dropped: set[str] = set()
    for _ in range(4):  # b keeps refreshing every 2 s while a stays silent
        now[0] += 2
        dropped |= b.refresh()
    assert dropped == {a.identity.peer_id}
    assert a.identity.peer_id not in b.peers() and b.entries("notes") == []
    assert b.refresh() == set()  # reported once
    a.heartbeat({"name": "a"})  # it speaks again: it is back, with its entries
    b.receive(a.export())
    assert a.identity.peer_id in b.peers() and len(b.entries("notes")) == 1


def test_our_own_pause_does_not_drop_everyone(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = MeshState(Identity.generate(), peer_timeout=5), MeshState(Identity.generate(), peer_timeout=5)
    a.heartbeat({"name": "a"})
    _sync(a, b)
    b.refresh()
    now = [time.monotonic() + 60]  # b's loop was blocked for a minute (a long notebook cell)
    monkeypatch.setattr("gradient_nb.mesh.state.time.monotonic", lambda: now[0])
    assert a.identity.peer_id in b.peers()
    assert b.refresh() == set()


class _Pipe:
    """One end of an in-memory channel pair."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.peer: _Pipe | None = None

    async def send(self, message: bytes) -> None:
        assert self.peer is not None
        self.peer.inbox.put_nowait(message)

    async def recv(self) -> bytes:
        return await self.__anext__()

    def __aiter__(self) -> _Pipe:
        return self

    async def __anext__(self) -> bytes:
        item = await self.inbox.get()
        if item is None:
            raise StopAsyncIteration
        return item


def _pipe(name: str) -> tuple[_Pipe, _Pipe]:
    a, b = _Pipe(f"{name}/a"), _Pipe(f"{name}/b")
    a.peer, b.peer = b, a
    return a, b


async def test_replicas_sync_through_a_relay_that_cannot_forge() -> None:
    a, b, relay = MeshState(Identity.generate()), MeshState(Identity.generate()), Replica()
    a.heartbeat({"name": "a"})
    a.put("notes", "early", 1)  # before any channel: the first digest exchange brings it over
    ra, ar = _pipe("a")
    rb, br = _pipe("b")
    sessions = [a.sync(ar), relay.sync(ra), b.sync(br), relay.sync(rb)]
    tasks = [asyncio.create_task(s.start()) for s in sessions]
    try:
        async with asyncio.timeout(20):
            await sessions[2].synced.wait()
            b.heartbeat({"name": "b"})
            await _until(lambda: b.get("notes", a.identity.peer_id, "early") == 1 and a.identity.peer_id in b.peers(),
                         "a's entry at b")
            a.put("notes", "late", 2)  # pushed at once through the relay
            await _until(lambda: b.get("notes", a.identity.peer_id, "late") == 2 and b.identity.peer_id in a.peers(),
                         "the pushed entry at b")
            await br.send(b"\xc1 not msgpack")  # junk on the relay's channel is counted there
            await _until(lambda: relay.rejected["junk"] >= 1, "the junk counted")
        assert relay.get("notes", a.identity.peer_id, "late") == 2
    finally:
        for p in (ra, ar, rb, br):
            p.inbox.put_nowait(None)
        await asyncio.gather(*tasks, return_exceptions=True)


def _spawn_hostile(url: str, victim: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("hostile_state_peer.py")), url, "h", victim],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_json(proc: subprocess.Popen, timeout: float) -> dict:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not out or not out[0]:
        proc.kill()
        raise AssertionError(f"no line from the hostile peer: {proc.stderr.read()[-3000:]}")
    return json.loads(out[0])


async def _until(check, what: str, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):  # a guard against a hang, not what the test measures
        while not check():  # noqa: ASYNC110 - replicas have no event for "this value arrived"
            await asyncio.sleep(0.05)
    assert check(), what


async def test_a_hostile_peer_process_changes_nothing_others_read_and_is_counted() -> None:
    """A peer process that crafts raw state updates (deletes, overwrites, replays of older signed
    entries, an oversized and an endless document, Yjs updates, garbage) over its links and through the
    rendezvous: every honest reader still reads exactly what the victim wrote, and counts the attacks."""
    kw = {"mesh": "h", "heartbeat": 0.5, "probe_seconds": 0.05, "eager_links": 0, "check_links": False}
    async with Rendezvous() as rv:
        victim = await join(rv.url, name="victim", identity=Identity.generate(), **kw)
        observer = await join(rv.url, name="observer", identity=Identity.generate(), **kw)
        proc = None
        try:
            vid = victim.id
            victim.state.put("notes", "alloc", {"v": 1})
            victim.state.put("notes", "keep", {"k": 1})
            proc = _spawn_hostile(rv.url, vid)
            first = await asyncio.to_thread(_read_json, proc, 120)
            assert first["captured"] == {"v": 1} and vid in first["links"]
            victim.state.put("notes", "alloc", {"v": 2})
            await _until(lambda: observer.state.get("notes", vid, "alloc") == {"v": 2}, "the new allocation")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert (await asyncio.to_thread(_read_json, proc, 120))["attacked"]
            hostile = next(p for p in observer.peers() if p.name == "hostile").id

            def done() -> bool:
                return all((m.state.peers().get(hostile) or {}).get("attacked") for m in (victim, observer))

            await _until(done, "the hostile peer's last heartbeat")
            await asyncio.sleep(3)  # its repeated replays arrive after its heartbeat; they must fail too
            for reader in (observer, victim):
                assert reader.state.get("notes", vid, "alloc") == {"v": 2}
                assert reader.state.get("notes", vid, "keep") == {"k": 1}
                assert reader.peers() and vid in {p.id for p in reader.peers()}
                notes = reader.state.entries("notes")
                assert {(e.owner, e.name) for e in notes if e.owner == vid} == {(vid, "alloc"), (vid, "keep")}
                theirs = [e for e in notes if e.owner == hostile]
                assert all(e.name != "big" for e in theirs) and len(theirs) < 1500
            # Counted: by the victim (its direct link) and by the rendezvous's replica.
            assert victim.state.rejected["replay"] >= 1 and victim.state.rejected["forged"] >= 3
            assert victim.state.rejected["oversized"] >= 1 and victim.state.rejected["junk"] >= 1
            assert rv.rejected("h").get("forged", 0) >= 3 and rv.rejected("h").get("replay", 0) >= 1
        finally:
            if proc is not None:
                proc.stdin.close()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            await observer.leave()
            await victim.leave()
