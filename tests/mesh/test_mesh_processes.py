"""The mesh end to end: a rendezvous process, headless peer processes, and this test as one more peer.

Everything is real: aiortc links between processes, msgpack RPC, pycrdt state synced through the
rendezvous room and then over the links.
"""

from __future__ import annotations

import asyncio
import signal
import time

import msgpack
import pytest
import torch

from gradient_nb.mesh.demo import read_event, wait_for_peers
from gradient_nb.mesh.errors import JoinRefused, MeshError
from gradient_nb.mesh.frames import Message
from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.peer import join
from tests.conftest import HEARTBEAT, PEER_TIMEOUT

pytestmark = pytest.mark.slow

# A vanished peer must be gone from every registry within this (timeout + heartbeats + a check).
LEAVE_BOUND = PEER_TIMEOUT + 3 * HEARTBEAT + 2.0


async def _join(url: str, name: str, **kw):
    return await join(url, name=name, identity=Identity.generate(), heartbeat=HEARTBEAT,
                      peer_timeout=PEER_TIMEOUT, probe_seconds=0.05, **kw)


async def _eventually(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


async def _view(mesh, pid: str, namespace: str = "") -> dict:
    return (await mesh.call(pid, "diag.view", Message({"namespace": namespace}), timeout=10)).header


async def test_four_peers_calls_streams_cancel_and_state(procs) -> None:
    _, url = procs.rendezvous()
    children = [procs.peer(url, f"p{i}") for i in range(4)]
    ids = [(await read_event(p))["peer_id"] for p in children]
    mesh = await _join(url, "driver")
    try:
        await wait_for_peers(mesh, 5)
        # 16 MiB tensors round-trip bit for bit (float32 and bfloat16, non-contiguous input too).
        big = torch.randn(2048, 2048)
        bf = torch.randn(4096, 2048).to(torch.bfloat16)
        reply = await mesh.call(ids[0], "diag.echo", Message({"k": 1}, {"a": big, "b": bf.t()}), timeout=120)
        assert torch.equal(reply.tensors["a"], big)
        assert reply.tensors["b"].dtype == torch.bfloat16 and torch.equal(reply.tensors["b"], bf.t())
        # Every peer answers calls, on links made on demand.
        for pid in ids:
            assert (await mesh.call(pid, "diag.echo", Message({"from": "driver"}))).header == {"from": "driver"}
        # A long stream arrives complete and in order.
        items = [m.header["i"] async for m in mesh.stream(ids[1], "diag.count", Message({"n": 3000}))]
        assert items == list(range(3000))
        # A cancelled stream stops on the far side: its progress record stops growing, unfinished.
        got = 0
        async for _ in mesh.stream(ids[2], "diag.count", Message({"n": 100000, "delay": 0.02, "tag": "c1"})):
            got += 1
            if got == 5:
                break
        first = await _eventually(lambda: _progress(mesh, ids[2], "c1"), 10, "the far side to record progress")
        await asyncio.sleep(1.0)
        later = await _progress(mesh, ids[2], "c1")
        await asyncio.sleep(1.0)
        last = await _progress(mesh, ids[2], "c1")
        assert not last["finished"] and last["done"] == later["done"] and later["done"] < 100, (first, later, last)
        # State converges on every peer.
        mesh.state.put("notes", "greeting", {"text": "hi"})
        for pid in ids:
            view = await _eventually(
                lambda pid=pid: _has_entry(mesh, pid, "notes", [mesh.id, "greeting", {"text": "hi"}]),
                15, "the entry to reach every peer")
            assert sorted(view["peers"]) == sorted([*ids, mesh.id])
    finally:
        await mesh.leave()


async def _progress(mesh, pid: str, tag: str):
    view = await _view(mesh, pid, "diag")
    for owner, name, value in view["entries"]:
        if owner == pid and name == tag:
            return value
    return None


async def _has_entry(mesh, pid: str, ns: str, entry: list):
    view = await _view(mesh, pid, ns)
    return view if entry in view["entries"] else None


async def test_killed_peer_leaves_every_registry_within_bound(procs) -> None:
    _, url = procs.rendezvous()
    children = [procs.peer(url, f"k{i}") for i in range(3)]
    ids = [(await read_event(p))["peer_id"] for p in children]
    mesh = await _join(url, "driver")
    try:
        await wait_for_peers(mesh, 4)
        for pid in ids:  # make sure everyone sees everyone first
            await _eventually(lambda pid=pid: _sees(mesh, pid, 4), 15, "full registries")
        children[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivors = ids[1:]
        while True:
            views = [await _view(mesh, pid) for pid in survivors]
            gone_everywhere = ids[0] not in {p.id for p in mesh.peers()} and all(
                ids[0] not in v["peers"] for v in views)
            if gone_everywhere:
                break
            assert time.monotonic() - killed_at < LEAVE_BOUND, "a killed peer outlived the registry bound"
            await asyncio.sleep(0.1)
        # A clean leave is seen too (the leaver withdraws its own entry).
        children[1].send_signal(signal.SIGTERM)
        assert (await read_event(children[1]))["event"] == "left"
        await _eventually(lambda: _gone(mesh, ids[1]), LEAVE_BOUND, "the clean leave")
    finally:
        await mesh.leave()


async def _sees(mesh, pid: str, n: int):
    return len((await _view(mesh, pid))["peers"]) == n


async def _gone(mesh, pid: str):
    return pid not in {p.id for p in mesh.peers()}


async def test_mesh_survives_rendezvous_loss(procs) -> None:
    rv, url = procs.rendezvous()
    children = [procs.peer(url, f"r{i}") for i in range(3)]
    ids = [(await read_event(p))["peer_id"] for p in children]
    mesh = await _join(url, "driver", eager_links=0)
    try:
        await wait_for_peers(mesh, 4)
        hub = ids[0]
        await mesh.connect(hub)
        await _eventually(lambda: _linked_to_all(mesh, hub, ids), 20, "the hub to link to every peer")
        rv.send_signal(signal.SIGKILL)
        rv.wait(10)
        await _eventually(lambda: _no_rendezvous(mesh), 10, "the rendezvous loss to be noticed")
        # Drop every link but the hub's: new links now need signaling relayed through the hub.
        for pid in ids[1:]:
            await mesh._drop_link(pid)
        for pid in ids[1:]:
            reply = await mesh.call(pid, "diag.echo", Message({"x": pid}), timeout=40)
            assert reply.header == {"x": pid}
        mesh.state.put("notes", "after", {"v": 1})
        for pid in ids:
            await _eventually(lambda pid=pid: _has_entry(mesh, pid, "notes", [mesh.id, "after", {"v": 1}]), 15,
                              "state sync without the rendezvous")
        # A newcomer cannot join without the rendezvous, and says why.
        with pytest.raises(JoinRefused, match="cannot reach the rendezvous"):
            await _join(url, "late")
        late = procs.peer(url, "late-process")
        assert await asyncio.to_thread(late.wait, 60) == 2
        assert "cannot reach the rendezvous" in late.stderr.read()
    finally:
        await mesh.leave()


async def _linked_to_all(mesh, hub: str, ids: list[str]):
    view = await _view(mesh, hub)
    return set(ids) - {hub} <= set(view["links"])


async def _no_rendezvous(mesh):
    return not mesh.rendezvous_connected


async def test_join_secret_forged_state_and_bad_frames(procs) -> None:
    _, url = procs.rendezvous("--secret", "s3cret")
    with pytest.raises(JoinRefused, match="join secret"):
        await _join(url, "nosecret")
    with pytest.raises(JoinRefused, match="wrong or missing join secret"):
        await _join(url, "wrong", secret="guess")
    child = procs.peer(url, "good", "--secret", "s3cret")
    pid = (await read_event(child))["peer_id"]
    mesh = await _join(url, "driver", secret="s3cret")
    try:
        await wait_for_peers(mesh, 2)
        # A forged registry entry (a key signed by someone else than the peer it names) is ignored.
        mallory = Identity.generate()
        forged = sign_record(mallory, {"owner": pid, "ns": "peers", "name": "", "seq": time.time_ns(),
                                       "ts": time.time(), "value": {"name": "evil"}})
        await mesh.connect(pid)  # sent raw on the link's state channel, as a hostile peer would
        await mesh._links[pid].link.transports["state"].send(
            msgpack.packb({"t": "rec", "r": [msgpack.packb(forged), b"\x00garbage"]}))
        view = await _eventually(lambda: _forged_seen(mesh, pid), 10, "the forged entries to be rejected")
        assert sorted(view["peers"]) == sorted([pid, mesh.id])
        assert {p.name for p in mesh.peers()} == {"good", "driver"}
        # Garbage frames on a real link get error replies; the link and the peer stay up.
        await mesh.connect(pid)
        rpc_transport = mesh._links[pid].link.transports["rpc"]
        for junk in (b"", b"\xff" * 7, b"\x00\x00\x00\x05abcde", msgpack.packb({"kind": "call"}), bytes(1000)):
            await rpc_transport.send(junk)
        with pytest.raises(MeshError):
            await mesh.call(pid, "no.such.method", timeout=10)
        assert (await mesh.call(pid, "diag.echo", Message({"ok": 1}))).header == {"ok": 1}
    finally:
        await mesh.leave()


async def _forged_seen(mesh, pid: str):
    view = await _view(mesh, pid)
    return view if view["forged"] >= 2 else None


async def test_dht_over_eight_peers(procs) -> None:
    _, url = procs.rendezvous()
    children = [procs.peer(url, f"d{i}") for i in range(8)]
    ids = [(await read_event(p, timeout=120))["peer_id"] for p in children]
    mesh = await _join(url, "driver")
    try:
        await wait_for_peers(mesh, 9, timeout=120)
        assert (await mesh.call(ids[0], "diag.provide", Message({"key": "diag/layers-0-10"}), timeout=60)).header[
            "stored"] >= 1
        await mesh.call(ids[5], "diag.provide", Message({"key": "diag/layers-0-10"}), timeout=60)
        await mesh.call(ids[3], "diag.provide", Message({"key": "diag/blob", "ttl": 4}), timeout=60)
        for pid in (ids[7], ids[2]):
            found = (await mesh.call(pid, "diag.find", Message({"key": "diag/layers-0-10"}), timeout=60)).header
            assert sorted(found["providers"]) == sorted([ids[0], ids[5]])
        assert [r["provider"] for r in await mesh.dht.find_providers("diag/blob")] == [ids[3]]
        # A departed provider's record expires (no one republishes it).
        children[3].send_signal(signal.SIGKILL)
        await _eventually(lambda: _no_providers(mesh, ids[1], "diag/blob"), 30, "the record to expire")
    finally:
        await mesh.leave()


async def _no_providers(mesh, pid: str, key: str):
    found = (await mesh.call(pid, "diag.find", Message({"key": key}), timeout=30)).header
    return found["providers"] == []


async def test_direct_tcp_links_between_processes_and_a_rewritten_address(procs) -> None:
    """Peers that reach each other's advertised address link over TCP/TLS (``direct-tcp`` in links(),
    the published records and the snapshot), and calls work over it. When the address a peer dials
    leads to someone else's listener (a man in the middle rewrote it), the dial fails the identity
    check and the link is made another way (the signed offer's address, or WebRTC): the rogue
    never gets a link. A peer without a listener links over WebRTC."""
    from gradient_nb.mesh.direct import DirectEndpoint

    _, url = procs.rendezvous()
    child = procs.peer(url, "p0")
    pid = (await read_event(child))["peer_id"]
    mesh = await _join(url, "driver")
    other = rogue = None
    try:
        await wait_for_peers(mesh, 2)
        reply = await mesh.call(pid, "diag.echo", Message({"k": 7}, {"t": torch.arange(1000)}), timeout=20)
        assert reply.header["k"] == 7 and torch.equal(reply.tensors["t"], torch.arange(1000))
        assert mesh.links()[pid]["kind"] == "direct-tcp" and not mesh.links()[pid]["relayed"]

        async def published() -> bool:
            snap = mesh.snapshot()
            return any(lk["kind"] == "direct-tcp" for lk in snap["links"]) and \
                all(lk["kind"] == "direct-tcp" for lk in snap["links"])

        await _eventually(published, 10, "both ends to publish a direct-tcp link")

        # A rogue listener with its own identity; the next peer's advertised address points at it.
        async def grab(link) -> None:
            grabbed.append(link)
            await link.close()

        grabbed: list = []
        rogue = DirectEndpoint(Identity.generate(), mesh="default", secret=None, accept=lambda p: True,
                               on_link=grab)
        await rogue.listen("127.0.0.1", 0)
        other = await _join(url, "victim", eager_links=0, check_links=False)
        other._direct.addresses = lambda: [f"127.0.0.1:{rogue.port}"]

        async def echo(msg: Message, ctx) -> Message:
            return Message(dict(msg.header))

        other.offer("test.echo", echo)

        async def advertised() -> bool:
            return (mesh.state.peers().get(other.id) or {}).get("direct") == [f"127.0.0.1:{rogue.port}"]

        await _eventually(advertised, 10, "the rewritten address to arrive")
        reply = await mesh.call(other.id, "test.echo", Message({"k": 8}), timeout=60)
        assert reply.header["k"] == 8
        # Our dial failed the identity check. The link is either the victim's own dial to us (it
        # dials the address in our signed offer, authenticated both ways) or WebRTC, depending on
        # who asked first; never a direct link that we dialed, and the rogue got nothing.
        kind = mesh.links()[other.id]["kind"]
        assert kind in ("direct-tcp", "webrtc-direct"), kind
        assert kind == "webrtc-direct" or not mesh._links[other.id].link.initiator
        assert not grabbed
        # A peer without a direct listener links over WebRTC, and says so.
        plain = await _join(url, "plain", eager_links=0, check_links=False, direct=False)
        try:
            plain.offer("test.echo", echo)
            assert (await mesh.call(plain.id, "test.echo", Message({"k": 9}), timeout=60)).header["k"] == 9
            assert mesh.links()[plain.id]["kind"] == "webrtc-direct"
        finally:
            await plain.leave()
    finally:
        if other is not None:
            await other.leave()
        if rogue is not None:
            await rogue.close()
        await mesh.leave()
