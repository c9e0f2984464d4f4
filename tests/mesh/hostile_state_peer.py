"""A hostile peer process for tests/mesh/test_state.py: it joins a mesh like any peer, then attacks
another peer's state with everything a peer can send on its state channels.

    python tests/mesh/hostile_state_peer.py URL MESH VICTIM_ID

It prints JSON lines: ``{"captured": ...}`` once it holds the victim's ``notes/alloc`` record, then
waits for a line on stdin, and once it sees that record replaced, it attacks through its links and
through the rendezvous websocket:

- replays the older signed ``notes/alloc`` record it captured;
- deletes the victim's ``notes/alloc`` and ``notes/keep`` and its registry record;
- overwrites ``notes/alloc`` with a record it signs itself;
- publishes an oversized entry and more entries than any owner needs (a document that grows without bound);
- sends raw Yjs updates (the old replication's wire format) and plain garbage.

It speaks both state formats (the Yjs document of old and the signed-record sync of now), so the same
test shows the attacks succeed against the old design and fail against the new one. Then it publishes
``attacked: true`` in its own registry record, prints ``{"attacked": true}`` and stays until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import msgpack
from pycrdt import Doc, Map, create_update_message

from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.peer import join

BIG = 200_000
MANY = 1500


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _held(mesh, victim: str, name: str) -> bytes | None:
    st = mesh.state
    if hasattr(st, "doc"):  # the old design: one Yjs document
        raw = st.doc.get("notes", type=Map).get(f"{victim}/{name}")
        return bytes(raw) if raw is not None else None
    o = st._owners.get(victim)
    rec = o.records.get(("notes", name)) if o is not None else None
    return rec.raw if rec is not None else None


def _value(raw: bytes) -> object:
    return msgpack.unpackb(raw, raw=False)["payload"].get("value")


async def _wait(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise TimeoutError("hostile peer waited in vain")
        await asyncio.sleep(0.1)
    return got


def _yjs_junk(victim: str) -> list[bytes]:
    """Yjs sync messages that set and delete the victim's keys in a document of our own."""
    doc = Doc()
    m = doc.get("notes", type=Map)
    m[f"{victim}/alloc"] = b"x"
    del m[f"{victim}/alloc"]
    return [create_update_message(doc.get_update()), b"\x00\x02\x05junk!", b""]


async def _attack_old(mesh, me: Identity, victim: str, old: bytes) -> None:
    st = mesh.state
    notes, registry = st.doc.get("notes", type=Map), st.doc.get("peers", type=Map)
    notes[f"{victim}/alloc"] = old  # replay
    del notes[f"{victim}/keep"]  # delete
    if victim in registry:
        del registry[victim]
    notes[f"{victim}/alloc"] = msgpack.packb(sign_record(me, {"owner": victim, "name": "alloc", "value": {"v": 666},
                                                               "ts": time.time()}))
    notes[f"{me.peer_id}/big"] = msgpack.packb(sign_record(me, {"owner": me.peer_id, "name": "big", "value": "x" * BIG,
                                                                 "ts": time.time()}))
    for i in range(MANY):
        notes[f"{me.peer_id}/n{i}"] = msgpack.packb(sign_record(me, {"owner": me.peer_id, "name": f"n{i}",
                                                                      "value": i, "ts": time.time()}))
    await asyncio.sleep(1.0)
    notes[f"{victim}/alloc"] = old  # again, after the victim's replicas have answered
    if f"{victim}/keep" in notes:
        del notes[f"{victim}/keep"]


def _signed(me: Identity, owner: str, ns: str, name: str, seq: int, **fields) -> bytes:
    payload = {"owner": owner, "ns": ns, "name": name, "seq": seq, "ts": time.time(), **fields}
    return msgpack.packb(sign_record(me, payload), use_bin_type=True)


async def _attack_new(mesh, me: Identity, victim: str, old: bytes) -> None:
    now = time.time_ns() // 1000
    messages = [
        {"t": "rec", "r": [old]},  # replay
        {"t": "rec", "r": [_signed(me, victim, "notes", "alloc", now + 10**9, **{"del": True}),  # delete
                           _signed(me, victim, "notes", "keep", now + 10**9, **{"del": True}),
                           _signed(me, victim, "peers", "", now + 10**9, **{"del": True})]},
        {"t": "rec", "r": [_signed(me, victim, "notes", "alloc", now + 10**9, value={"v": 666})]},  # overwrite
        {"t": "rec", "r": [_signed(me, me.peer_id, "notes", "big", now + 1, value="x" * BIG)]},  # oversized
        *({"t": "rec", "r": [_signed(me, me.peer_id, "notes", f"n{i}", now + 2 + i, value=i)
                             for i in range(j, j + 100)]} for j in range(0, MANY, 100)),
        {"t": "digest", "d": [[victim, 1, 0]]},
    ]
    frames = [msgpack.packb(m, use_bin_type=True) for m in messages] + _yjs_junk(victim)
    for frame in frames:
        for pl in list(mesh._links.values()):
            await pl.link.transports["state"].send(frame)
        await mesh._ws.send_bytes(msgpack.packb({"t": "y", "data": frame}))
    await asyncio.sleep(1.0)
    for frame in frames[:3]:
        for pl in list(mesh._links.values()):
            await pl.link.transports["state"].send(frame)


async def main(url: str, mesh_name: str, victim: str) -> None:
    me = Identity.generate()
    mesh = await join(url, mesh=mesh_name, name="hostile", identity=me, heartbeat=0.5, probe_seconds=0.05,
                      eager_links=0)
    try:
        # A join needs one link only; the attack goes over a link to the victim itself too.
        await mesh.connect(victim, 30)
        old = await _wait(lambda: _held(mesh, victim, "alloc"))
        _emit({"captured": _value(old), "links": sorted(mesh._links)})
        await asyncio.to_thread(sys.stdin.readline)
        await _wait(lambda: (raw := _held(mesh, victim, "alloc")) is not None and raw != old)
        if hasattr(mesh.state, "doc"):
            await _attack_old(mesh, me, victim, old)
        else:
            await _attack_new(mesh, me, victim, old)
        mesh.publish(attacked=True)  # in its registry record, which no quota it filled can block
        _emit({"attacked": True})
        await asyncio.to_thread(sys.stdin.readline)
    finally:
        await mesh.leave()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
