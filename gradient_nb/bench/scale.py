"""``gradient-nb bench scale``: what membership and discovery cost each peer at n = 10, 100, 1000.

Simulated with the real mesh code over an in-process network: every peer runs a real
:class:`~gradient_nb.mesh.dht.Dht` (Kademlia, signed provider records), and the global state is real
:class:`~gradient_nb.mesh.state.MeshState` replicas. Only the transport is simulated: each RPC is
msgpack-encoded both ways (bytes counted), delayed by ``--latency`` ms (+- 50 % jitter) each way and lost
with probability ``--loss`` (a lost call fails after ``--loss-timeout`` s, as a timed-out call would).

Two designs, measured in the same run:

- **directory** (the design for 1,000 peers): peers announce what they serve (a model's layer ranges,
  services) as DHT provider records and find providers by DHT lookups; the replicated state holds only
  what must be global (the coordinators' allocations). At rest a peer refreshes its routing table and
  republishes its records once per period (``refresh_interval`` = record_ttl / 2 = 300 s).
- **registry** (today's design, the baseline): every peer's record sits in the replicated registry that
  every peer holds, and every peer re-signs it every heartbeat (2 s); each replica receives each of them.

Per n: ``join_s`` (a new peer: bootstrap lookup + announcing its layers, median over joiners),
``lookup_hops_p50`` (query rounds of a provider lookup to its first record; ``node_lookup_hops_p50``
the rounds of a lookup of a random peer's id to its closest node), ``msgs_per_peer_s``
(messages a peer sends at rest per second, directory design; ``registry_msgs_per_peer_s`` the baseline:
records each peer receives per second), ``state_bytes_per_peer`` (routing table + DHT records held +
global state; ``registry_state_bytes_per_peer`` the baseline's registry replica), ``replan_s`` (after 10 %
of the peers leave at once: a coordinator finds the live providers of every layer range: lookups that
route around the departed, plus one ping per provider found). ``*_ratio`` = directory / registry.

Prints one JSON object; ``--plot PATH`` also writes a PNG of the per-peer figures against n.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgpack

from ..mesh.dht import Dht
from ..mesh.errors import PeerUnreachable
from ..mesh.identity import Identity
from ..mesh.state import MeshState

PERIOD_S = 300.0  # the DHT's refresh interval and republish period (record_ttl 600 s / 2)
HEARTBEAT_S = 2.0  # the registry design's heartbeat
RANGES = 10  # layer ranges of the served model: each peer serves one
K, ALPHA = 10, 3


class SimNet:
    """Peers by id; each call is delayed, maybe lost, and counted (messages and bytes per sender)."""

    def __init__(self, latency_s: float, loss: float, loss_timeout: float, seed: int) -> None:
        self.latency_s, self.loss, self.loss_timeout = latency_s, loss, loss_timeout
        self.rng = random.Random(seed)
        self.nodes: dict[str, SimNode] = {}
        self.dead: set[str] = set()
        self.msgs: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def _delay(self) -> float:
        return self.latency_s * (0.5 + self.rng.random())

    def count(self, sender: str, body: dict) -> dict:
        data = msgpack.packb(body, use_bin_type=True)
        self.msgs[sender] += 1
        self.bytes[sender] += len(data)
        return msgpack.unpackb(data, raw=False)


class SimNode:
    """A :class:`~gradient_nb.mesh.dht.DhtNetwork` on a :class:`SimNet`."""

    def __init__(self, net: SimNet, local_id: str) -> None:
        self.net, self.local_id = net, local_id
        self.handlers: dict[str, Callable[[str, dict], Awaitable[dict]]] = {}
        net.nodes[local_id] = self

    async def call(self, peer_id: str, method: str, header: dict, timeout: float) -> dict:
        net = self.net
        if self.local_id in net.dead:
            raise PeerUnreachable("this peer has left")
        request = net.count(self.local_id, {"m": method, "h": header})
        target = net.nodes.get(peer_id)
        if target is None or peer_id in net.dead or net.rng.random() < net.loss:
            await asyncio.sleep(min(timeout, net.loss_timeout))
            raise PeerUnreachable(f"no answer from {peer_id[:8]}")
        await asyncio.sleep(net._delay())
        reply = await target.handlers[method](self.local_id, request["h"])
        reply = net.count(peer_id, reply)
        await asyncio.sleep(net._delay())
        return reply

    def serve(self, method: str, handler: Callable[[str, dict], Awaitable[dict]]) -> None:
        self.handlers[method] = handler


def _identity(seed: int, i: int) -> Identity:
    return Identity.from_private_bytes(hashlib.sha256(f"bench-scale-{seed}-{i}".encode()).digest())


def _range_key(r: int) -> str:
    return f"layers/bench-model/{r}"


async def _gather(coros: Sequence[Awaitable[Any]], width: int) -> list[Any]:
    """Run ``coros`` at most ``width`` at a time (a thousand joins at once are not a realistic arrival)."""
    sem = asyncio.Semaphore(width)

    async def one(c: Awaitable[Any]) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def _join(dht: Dht, contact: str, r: int) -> float:
    t0 = time.perf_counter()
    dht.add_contact(contact)
    await dht.bootstrap()
    await dht.provide(_range_key(r), {"range": r})
    return time.perf_counter() - t0


async def measure(n: int, *, latency_ms: float, loss: float, loss_timeout: float, seed: int,
                  width: int) -> dict[str, Any]:
    net = SimNet(latency_ms / 1000, loss, loss_timeout, seed)
    ids = [_identity(seed, i) for i in range(n)]
    dhts = [Dht(SimNode(net, ident.peer_id), ident, k=K, alpha=ALPHA, rpc_timeout=max(1.0, loss_timeout))
            for ident in ids]
    rng = random.Random(seed)
    # Everyone but the last few joins (through a random earlier peer); the last few are timed.
    timed = min(10, n // 2)
    await dhts[0].provide(_range_key(0), {"range": 0})
    await _gather([_join(d, ids[rng.randrange(i)].peer_id, i % RANGES) for i, d in enumerate(dhts[1:n - timed], 1)],
                  width)
    join_s = [await _join(d, ids[rng.randrange(n - timed)].peer_id, i % RANGES)
              for i, d in enumerate(dhts[n - timed:], n - timed)]

    # Lookups of providers from random peers.
    hops = []
    for _ in range(30):
        d = dhts[rng.randrange(n)]
        await d.find_providers(_range_key(rng.randrange(RANGES)))
        hops.append(d.last_lookup_hops)

    node_hops = []
    for _ in range(30):
        d = dhts[rng.randrange(n)]
        await d.find_node(ids[rng.randrange(n)].peer_id)
        node_hops.append(d.last_lookup_hops)

    # At rest: one period of maintenance (2 refresh lookups and one republish per peer), counted.
    net.msgs.clear()
    net.bytes.clear()
    for d in dhts:
        for entry in d._provided.values():
            entry.next_publish = 0.0

    async def rest(d: Dht) -> None:
        await d._maintain_once(-1.0)

    await _gather([rest(d) for d in dhts], width)
    msgs_per_peer_s = sum(net.msgs.values()) / n / PERIOD_S

    # The global state in this design: one signed allocation per model (constant in n).
    coordinator = MeshState(ids[0])
    coordinator.heartbeat({"name": "coordinator"})
    coordinator.put("serve", "alloc-bench-model", {"ranges": [[r, 10 * r, 10 * r + 10] for r in range(RANGES)]})
    global_bytes = coordinator.size_bytes()
    state_bytes = [len(d.table) * 20 + sum(len(msgpack.packb(rec)) for ps in d._store.values()
                                           for rec, _ in ps.values()) + global_bytes for d in dhts]

    # Baseline: the registry every peer holds, one signed record per peer, re-signed every heartbeat.
    reader = MeshState(_identity(seed, -1))
    writers = [MeshState(ident) for ident in ids]
    for w in writers:
        w.heartbeat({"name": w.identity.peer_id[:6], "services": ["shard.forward"], "serving": {"layers": [0, 10]}})
    accepted0 = reader.accepted
    for w in writers:  # one heartbeat round reaching one replica
        reader.receive(w.export())
    registry_msgs = (reader.accepted - accepted0) / HEARTBEAT_S
    registry_bytes = reader.size_bytes()

    # 10 % of the peers leave at once; a coordinator finds the live providers of every range.
    gone = set(rng.sample(range(1, n), max(1, n // 10)))
    net.dead |= {ids[i].peer_id for i in gone}
    coord = dhts[0]
    t0 = time.perf_counter()

    async def live_providers(r: int) -> list[str]:
        found = [f["provider"] for f in await coord.find_providers(_range_key(r)) if f["provider"] != coord.local_id]
        alive = await asyncio.gather(*(coord.ping(p) for p in found))
        return [p for p, ok in zip(found, alive, strict=True) if ok]

    live = dict(enumerate(await asyncio.gather(*(live_providers(r) for r in range(RANGES)))))
    replan_s = time.perf_counter() - t0
    for d in dhts:
        await d.stop()
    return {
        "n": n,
        "join_s": round(statistics.median(join_s), 3),
        "lookup_hops_p50": statistics.median(hops),
        "node_lookup_hops_p50": statistics.median(node_hops),
        "msgs_per_peer_s": round(msgs_per_peer_s, 4),
        "state_bytes_per_peer": round(statistics.mean(state_bytes)),
        "replan_s": round(replan_s, 3),
        "registry_msgs_per_peer_s": round(registry_msgs, 2),
        "registry_state_bytes_per_peer": registry_bytes,
        "msgs_ratio": round(msgs_per_peer_s / registry_msgs, 5),
        "state_ratio": round(statistics.mean(state_bytes) / registry_bytes, 4),
        "routing_table_p50": statistics.median(len(d.table) for d in dhts),
        "ranges_with_live_providers": sum(1 for v in live.values() if v),
    }


def _growth(rows: list[dict[str, Any]], key: str, a: int, b: int) -> float | None:
    ra = next((r for r in rows if r["n"] == a), None)
    rb = next((r for r in rows if r["n"] == b), None)
    return round(rb[key] / ra[key], 3) if ra and rb and ra[key] else None


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (mine, base, label) in zip(axes, [("msgs_per_peer_s", "registry_msgs_per_peer_s", "messages / peer / s"),
                                              ("state_bytes_per_peer", "registry_state_bytes_per_peer",
                                               "state bytes / peer")], strict=True):
        ax.loglog(ns, [r[mine] for r in rows], "o-", label="DHT directory (new)")
        ax.loglog(ns, [r[base] for r in rows], "s--", label="global registry (before)")
        ax.set_xlabel("peers")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for n in args.n:
        rows.append(await measure(n, latency_ms=args.latency_ms, loss=args.loss, loss_timeout=args.loss_timeout,
                                  seed=args.seed, width=args.width))
    out: dict[str, Any] = {
        "bench": "scale", "latency_ms": args.latency_ms, "loss": args.loss, "k": K, "alpha": ALPHA,
        "period_s": PERIOD_S, "heartbeat_s": HEARTBEAT_S, "rows": rows,
        # Target: per-peer messages and state grow at most logarithmically from 100 to 1000 peers
        # (log(1000)/log(100) = 1.5); the registry grows linearly (10x).
        "msgs_growth_100_1000": _growth(rows, "msgs_per_peer_s", 100, 1000),
        "state_growth_100_1000": _growth(rows, "state_bytes_per_peer", 100, 1000),
        "registry_msgs_growth_100_1000": _growth(rows, "registry_msgs_per_peer_s", 100, 1000),
    }
    if out["msgs_growth_100_1000"] is not None and out["state_growth_100_1000"] is not None:
        out["log_target_met"] = out["msgs_growth_100_1000"] <= 1.5 and out["state_growth_100_1000"] <= 1.5
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gradient-nb bench scale", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--latency-ms", type=float, default=10.0, help="one-way delay per message (+-50%%)")
    ap.add_argument("--loss", type=float, default=0.01, help="probability that a call is lost")
    ap.add_argument("--loss-timeout", type=float, default=0.5, help="seconds until a lost call fails")
    ap.add_argument("--width", type=int, default=50, help="peers joining or maintaining at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", help="write a PNG of the per-peer figures against n")
    args = ap.parse_args(argv)
    out = asyncio.run(_run(args))
    if args.plot:
        _plot(out["rows"], args.plot)
        out["plot"] = args.plot
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
