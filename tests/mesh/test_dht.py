"""The Kademlia DHT on a network of real RPC endpoints joined by in-memory transports."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from gradient_nb.mesh.dht import Dht, RoutingTable, distance, key_id
from gradient_nb.mesh.errors import PeerUnreachable
from gradient_nb.mesh.frames import Message
from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.rpc import CallContext, RpcEndpoint, Services
from gradient_nb.mesh.transport import memory_pair


def _identity(seed: int) -> Identity:
    return Identity.from_private_bytes(hashlib.sha256(f"dht-test-{seed}".encode()).digest())


class MemoryNetwork:
    """Peers that link on first use, like the mesh does: each link is a pair of RpcEndpoints over
    ``memory_pair``, each peer has one Services shared by its links."""

    def __init__(self) -> None:
        self.nodes: dict[str, MemoryNode] = {}

    def add(self, identity: Identity) -> MemoryNode:
        node = MemoryNode(self, identity.peer_id)
        self.nodes[node.local_id] = node
        return node

    async def close(self) -> None:
        for node in list(self.nodes.values()):
            await node.shutdown()


class MemoryNode:
    """A :class:`~gradient_nb.mesh.dht.DhtNetwork` over real RPC endpoints."""

    def __init__(self, net: MemoryNetwork, local_id: str) -> None:
        self.net, self.local_id = net, local_id
        self.services = Services()
        self.links: dict[str, RpcEndpoint] = {}
        self.alive = True
        self.calls_made = 0

    async def _link(self, peer_id: str) -> RpcEndpoint:
        ep = self.links.get(peer_id)
        if ep is not None and not ep.closed:
            return ep
        other = self.net.nodes.get(peer_id)
        if not self.alive or other is None or not other.alive:
            raise PeerUnreachable(f"no link to {peer_id[:8]}")
        ta, tb = memory_pair()
        mine = RpcEndpoint(ta, self.services, remote_id=peer_id)
        theirs = RpcEndpoint(tb, other.services, remote_id=self.local_id)
        self.links[peer_id], other.links[self.local_id] = mine, theirs
        await mine.start()
        await theirs.start()
        return mine

    async def call(self, peer_id: str, method: str, header: dict, timeout: float) -> dict:
        self.calls_made += 1
        ep = await self._link(peer_id)
        return (await ep.call(method, Message(header), timeout=timeout)).header

    def serve(self, method: str, handler: Callable[[str, dict], Awaitable[dict]]) -> None:
        async def unary(msg: Message, ctx: CallContext) -> Message:
            return Message(await handler(ctx.peer_id, msg.header))

        self.services.unary(method, unary)

    async def shutdown(self) -> None:
        self.alive = False
        for ep in list(self.links.values()):
            await ep.close()
        self.links.clear()


class Swarm:
    def __init__(self, n: int, *, k: int = 20, alpha: int = 3, record_ttl: float = 600.0, seed: int = 0,
                 **dht_kw: object) -> None:
        self.net = MemoryNetwork()
        self.ids = [_identity(seed * 1000 + i) for i in range(n)]
        self.dhts = [Dht(self.net.add(ident), ident, k=k, alpha=alpha, record_ttl=record_ttl, rpc_timeout=2.0,
                         **dht_kw) for ident in self.ids]  # type: ignore[arg-type]
        # Sparse bootstrap: each node knows only one or two others (a chain plus a few random shortcuts).
        rng = random.Random(seed)
        for i, d in enumerate(self.dhts):
            if i:
                d.add_contact(self.ids[i - 1].peer_id)
            if i % 2 and n > 2:
                j = rng.randrange(n)
                if j != i:
                    d.add_contact(self.ids[j].peer_id)
        self.initial_sizes = [d.routing_table_size() for d in self.dhts]

    async def start(self) -> Swarm:
        for d in self.dhts:
            await d.start()
        for d in self.dhts:
            await d.bootstrap()
        return self

    async def close(self) -> None:
        for d in self.dhts:
            await d.stop()
        await self.net.close()

    def node(self, i: int) -> MemoryNode:
        return self.net.nodes[self.ids[i].peer_id]


async def eventually(probe: Callable[[], Awaitable[bool]], what: str, timeout: float = 40.0) -> None:
    """Poll until ``probe`` holds; the timeout only guards against a hang."""
    async with asyncio.timeout(timeout):
        while not await probe():  # noqa: ASYNC110 - the condition lives in other nodes; nothing to await
            await asyncio.sleep(0.1)


# -- routing table ---------------------------------------------------------------------------------------

def test_key_ids_and_distance() -> None:
    assert key_id("layers/0-10") == hashlib.sha256(b"layers/0-10").hexdigest()[:40]
    a, b = "0" * 40, "0" * 39 + "3"
    assert distance(a, b) == 3 and distance(b, b) == 0


def test_routing_table_buckets_replacements_and_closest() -> None:
    local = "0" * 40
    table = RoutingTable(local, k=2)
    far = [f"8{i:039x}" for i in range(1, 5)]  # all in the top bucket (first bit differs)
    near = "0" * 39 + "1"
    assert table.bucket_index(far[0]) == 159 and table.bucket_index(near) == 0
    assert table.touch(far[0]) is None and table.touch(far[1]) is None
    # The bucket is full: the newcomer waits, and the oldest contact is the one to ping.
    assert table.touch(far[2]) == far[0]
    assert far[2] not in table and len(table) == 2
    # Seeing the oldest again makes it the newest; the next candidate to ping is far[1].
    table.touch(far[0])
    assert table.touch(far[3]) == far[1]
    # A dead contact is replaced by the freshest waiting one.
    table.remove(far[1])
    assert far[3] in table and far[1] not in table
    table.touch(near)
    assert table.closest("0" * 39 + "2", 2) == [near, far[0]]
    assert table.closest("0" * 40, 10, exclude={near}) == sorted([far[0], far[3]], key=lambda p: int(p, 16))
    with pytest.raises(ValueError):
        table.bucket_index(local)


# -- the swarm -------------------------------------------------------------------------------------------

async def test_sparse_swarm_finds_nodes_and_providers() -> None:
    swarm = await Swarm(20, seed=1).start()
    try:
        assert max(swarm.initial_sizes) <= 2
        # Bootstrapping learned peers well beyond the one or two each node started with.
        assert min(d.routing_table_size() for d in swarm.dhts) > 2
        everyone = sorted(i.peer_id for i in swarm.ids)
        # find_node from the far end of the chain returns the true closest nodes.
        target = swarm.ids[5].peer_id
        found = await swarm.dhts[19].find_node(target)
        truth = sorted((p for p in everyone if p != swarm.ids[19].peer_id), key=lambda p: distance(p, target))
        assert found[:3] == truth[:3]
        # Two providers of one key, one of another; every node finds them.
        assert await swarm.dhts[3].provide("layers/0-10", {"layers": [0, 10]}) >= 2
        assert await swarm.dhts[11].provide("layers/0-10", {"layers": [0, 10]}) >= 2
        assert await swarm.dhts[7].provide("layers/10-20") >= 2
        for d in swarm.dhts:
            recs = await d.find_providers("layers/0-10")
            assert sorted(r["provider"] for r in recs) == sorted([swarm.ids[3].peer_id, swarm.ids[11].peer_id])
            assert all(r["key"] == "layers/0-10" and r["value"] == {"layers": [0, 10]} for r in recs)
            assert all(r["expires"] > time.time() for r in recs)
        recs = await swarm.dhts[0].find_providers("layers/10-20")
        assert [r["provider"] for r in recs] == [swarm.ids[7].peer_id]
        assert await swarm.dhts[0].find_providers("nobody/provides/this") == []
    finally:
        await swarm.close()


async def test_routing_tables_stay_bounded() -> None:
    k = 3
    swarm = await Swarm(32, k=k, seed=2).start()
    try:
        for i in range(0, 32, 4):
            await swarm.dhts[i].provide(f"key-{i}")
        for i in range(1, 32, 3):
            assert [r["provider"] for r in await swarm.dhts[i].find_providers("key-8")] == [swarm.ids[8].peer_id]
        for d in swarm.dhts:
            assert all(len(b) <= k for b in d.table.buckets)
            assert all(len(r) <= k for r in d.table.replacements)
        # Records are replicated to about k nodes (not everywhere), the closest to the key among them.
        kid = key_id("key-8")
        holders = [d.local_id for d in swarm.dhts if kid in d._store]
        assert len(holders) <= k + 1
        assert min((d.local_id for d in swarm.dhts), key=lambda p: distance(p, kid)) in holders
        sizes = [d.routing_table_size() for d in swarm.dhts]
        # Nobody knows everyone: the farthest buckets hold about half and a quarter of the swarm but keep k.
        assert max(sizes) < 31
        assert min(sizes) >= 1
    finally:
        await swarm.close()


async def test_forged_records_are_refused() -> None:
    swarm = await Swarm(16, seed=3).start()
    try:
        alice, mallory = swarm.ids[2], _identity(999)
        honest = swarm.dhts[5]
        now = time.time()

        async def add(record: dict) -> dict:
            return await swarm.node(0).call(honest.local_id, "dht.add_provider", {"record": record}, 5)

        # Mallory claims to be Alice.
        forged = sign_record(mallory, {"peer_id": alice.peer_id, "key": "k", "value": {}, "expires": now + 60})
        reply = await add(forged)
        assert reply["stored"] is False and "signed by" in reply["reason"]
        # A payload changed after signing.
        good = sign_record(alice, {"peer_id": alice.peer_id, "key": "k", "value": {}, "expires": now + 60})
        tampered = dict(good, payload=dict(good["payload"], value={"evil": True}))
        assert (await add(tampered))["stored"] is False
        # Expired, too long-lived, missing fields, not a record at all.
        for payload in ({"peer_id": alice.peer_id, "key": "k", "value": {}, "expires": now - 1},
                        {"peer_id": alice.peer_id, "key": "k", "value": {}, "expires": now + 10**7},
                        {"peer_id": alice.peer_id, "key": "k", "value": {}},
                        {"key": "k", "value": {}, "expires": now + 60}):
            assert (await add(sign_record(alice, payload)))["stored"] is False
        assert (await add({"payload": 1}))["stored"] is False  # type: ignore[dict-item]
        assert honest.stats.records_refused == 7
        assert honest.stored_records() == 0
        assert (await add(good))["stored"] is True
        assert honest.stored_records() == 1

        # A lying node that serves a forged record (bypassing its own checks) does not fool readers.
        liar = swarm.dhts[9]
        forged_k = sign_record(mallory, {"peer_id": alice.peer_id, "key": "k", "value": {"x": 1},
                                         "expires": now + 60})
        other_key = sign_record(alice, {"peer_id": alice.peer_id, "key": "other", "value": {},
                                        "expires": now + 60})
        liar._store.setdefault(key_id("k"), {})[mallory.peer_id] = (forged_k, forged_k["payload"])
        liar._store[key_id("k")]["x" * 40] = (other_key, other_key["payload"])
        reader = swarm.dhts[14]
        recs = await reader.find_providers("k")
        assert [(r["provider"], r["value"]) for r in recs] == [(alice.peer_id, {})]
        assert reader.stats.records_rejected_on_read >= 2
    finally:
        await swarm.close()


async def test_records_of_a_stopped_provider_expire_while_a_live_one_is_republished() -> None:
    ttl = 2.0
    swarm = await Swarm(16, seed=4).start()
    try:
        stays, leaves, reader = swarm.dhts[1], swarm.dhts[6], swarm.dhts[12]
        assert await stays.provide("svc/x", ttl=ttl) >= 2
        assert await leaves.provide("svc/x", ttl=ttl) >= 2
        recs = await reader.find_providers("svc/x")
        assert sorted(r["provider"] for r in recs) == sorted([stays.local_id, leaves.local_id])
        await leaves.stop()
        await swarm.node(6).shutdown()

        async def only_the_live_one() -> bool:
            return [r["provider"] for r in await reader.find_providers("svc/x")] == [stays.local_id]

        # Waiting for the departed provider's record to vanish takes more than one ttl, so the live
        # provider's record is only still there because it was republished.
        await eventually(only_the_live_one, "the stopped provider's record to expire")
        assert stays.stats.republished >= 1
        # Storing nodes drop the expired record itself, not just hide it.
        await eventually(lambda: _no_record_of(swarm, leaves.local_id), "expired records to be dropped")
        # unprovide stops republishing; then that record expires too.
        stays.unprovide("svc/x")

        async def none_left() -> bool:
            return await reader.find_providers("svc/x") == []

        await eventually(none_left, "the withdrawn record to expire")
    finally:
        await swarm.close()


async def _no_record_of(swarm: Swarm, provider: str) -> bool:
    live = [d for d in swarm.dhts if d._running]
    for d in live:
        d._live_records(key_id("svc/x"))  # what any lookup does: expired records go
    return all(provider not in providers for d in live for providers in d._store.values())


async def test_dead_contacts_are_evicted_and_live_ones_kept() -> None:
    # k=1 makes every bucket full at once, so each newcomer triggers a ping of the bucket's occupant.
    swarm = Swarm(6, k=1, seed=5)
    await swarm.start()
    try:
        me = swarm.dhts[0]
        table = me.table
        occupant_of = {i: next(iter(b)) for i, b in enumerate(table.buckets) if b}
        assert occupant_of
        idx = max(occupant_of)  # the farthest bucket: half of all ids fall in it
        occupant = occupant_of[idx]
        newcomer = _identity(12345)
        while table.bucket_index(newcomer.peer_id) != idx:
            newcomer = _identity(random.randrange(10**9))
        # A live occupant survives the ping and the newcomer waits in the replacement cache.
        swarm.net.add(newcomer)  # reachable, though it runs no DHT
        me.add_contact(newcomer.peer_id)
        await eventually(lambda: _idle(me), "the ping to finish")
        assert occupant in table and newcomer.peer_id not in table
        assert newcomer.peer_id in table.replacements[idx]
        # A dead occupant is replaced by the waiting newcomer when the next contact arrives.
        index = swarm.ids.index(next(i for i in swarm.ids if i.peer_id == occupant))
        await swarm.dhts[index].stop()
        await swarm.node(index).shutdown()
        me.add_contact(newcomer.peer_id)
        await eventually(lambda: _idle(me), "the ping to finish")
        assert occupant not in table and newcomer.peer_id in table
    finally:
        await swarm.close()


async def _idle(dht: Dht) -> bool:
    return not dht._pinging


async def test_lookups_survive_dead_nodes_and_learn_callers() -> None:
    swarm = await Swarm(16, seed=6).start()
    try:
        assert await swarm.dhts[4].provide("model/shard") >= 2
        for i in (1, 2, 3, 8):
            await swarm.dhts[i].stop()
            await swarm.node(i).shutdown()
        recs = await swarm.dhts[15].find_providers("model/shard", timeout=20)
        assert [r["provider"] for r in recs] == [swarm.ids[4].peer_id]
        # A node that only called us becomes a contact.
        newcomer = _identity(4242)
        node = swarm.net.add(newcomer)
        fresh = Dht(node, newcomer, rpc_timeout=2.0)
        await fresh.start()
        fresh.add_contact(swarm.ids[0].peer_id)
        await fresh.bootstrap()
        assert newcomer.peer_id in swarm.dhts[0].table
        assert fresh.routing_table_size() > 1
        assert [r["provider"] for r in await fresh.find_providers("model/shard")] == [swarm.ids[4].peer_id]
        await fresh.stop()
    finally:
        await swarm.close()


async def test_provide_with_no_contacts_stores_locally_and_bad_input_is_refused() -> None:
    net = MemoryNetwork()
    ident = _identity(77)
    dht = Dht(net.add(ident), ident)
    await dht.start()
    try:
        assert await dht.provide("solo") == 1
        assert [r["provider"] for r in await dht.find_providers("solo")] == [ident.peer_id]
        assert await dht.find_node(ident.peer_id) == []
        with pytest.raises(ValueError):
            await dht.provide("")
        with pytest.raises(ValueError):
            await dht.provide("big", {"blob": b"x" * 10000})
        with pytest.raises(ValueError):
            await dht.find_node("not-an-id")
        dht.add_contact("garbage")
        dht.add_contact(ident.peer_id)
        assert dht.routing_table_size() == 0
    finally:
        await dht.stop()
        await net.close()
    with pytest.raises(ValueError):
        Dht(net.add(_identity(78)), _identity(79))


async def test_one_provider_cannot_fill_a_nodes_store() -> None:
    swarm = await Swarm(4, seed=5, max_keys_per_provider=10).start()
    try:
        flooder, node = swarm.ids[0], swarm.dhts[2]
        now = time.time()
        replies = [await swarm.node(0).call(node.local_id, "dht.add_provider", {"record": sign_record(
            flooder, {"peer_id": flooder.peer_id, "key": f"diag/{i}", "value": {}, "expires": now + 60})}, 5)
            for i in range(25)]
        assert [r["stored"] for r in replies] == [True] * 10 + [False] * 15
        assert "per provider" in replies[-1]["reason"] and node.stats.records_refused == 15
        other = swarm.ids[1]
        assert (await swarm.node(1).call(node.local_id, "dht.add_provider", {"record": sign_record(
            other, {"peer_id": other.peer_id, "key": "diag/x", "value": {}, "expires": now + 60})}, 5))["stored"]
    finally:
        await swarm.close()
