"""Test-only services that let a test or a lab check and measure a mesh end to end.

Production peers (``gradient-nb peer``) do not offer them: they would let any stranger make a volunteer
echo bulk data, stream a million items, provide DHT keys and write state in its name. Tests start
peers that do with ``python -m gradient_nb.testing.diagpeer`` (the same options as ``gradient-nb peer``).

``diag.echo`` returns what it got (tensors bit for bit); ``diag.count`` streams ``n`` numbered items,
optionally paced, and records in the mesh state how far it got, so a caller can see that a cancelled
stream really stopped on the far side; ``diag.sink`` swallows a payload (bulk throughput);
``diag.view`` tells what this peer sees of the mesh (live peers, a namespace's entries, links);
``diag.provide`` / ``diag.find`` announce and look up keys under ``diag/`` in the DHT.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import torch

from ..mesh.frames import Message
from ..mesh.rpc import CallContext

if TYPE_CHECKING:
    from ..mesh.peer import Mesh

MAX_COUNT = 1_000_000


def install(mesh: Mesh) -> None:
    async def echo(msg: Message, ctx: CallContext) -> Message:
        return Message(dict(msg.header), dict(msg.tensors))

    async def sink(msg: Message, ctx: CallContext) -> Message:
        return Message({"bytes": sum(t.numel() * t.element_size() for t in msg.tensors.values())})

    async def count(msg: Message, ctx: CallContext) -> AsyncIterator[Message]:
        n = msg.header.get("n", 10)
        delay = msg.header.get("delay", 0.0)
        tag = str(msg.header.get("tag", "count"))[:64]
        if not isinstance(n, int) or not 0 <= n <= MAX_COUNT or not isinstance(delay, (int, float)):
            raise ValueError(f"diag.count takes 0 <= n <= {MAX_COUNT} and a numeric delay")
        done = 0
        try:
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                yield Message({"i": i}, {"v": torch.tensor([i], dtype=torch.int64)})
                done = i + 1
                if delay:
                    mesh.state.put("diag", tag, {"done": done, "finished": False})
        finally:
            mesh.state.put("diag", tag, {"done": done, "finished": done == n})

    async def view(msg: Message, ctx: CallContext) -> Message:
        ns = msg.header.get("namespace")
        entries = []
        if isinstance(ns, str) and ns:
            entries = [[e.owner, e.name, e.value] for e in mesh.state.entries(ns)]
        return Message({"peers": sorted(p.id for p in mesh.peers()), "entries": entries,
                        "links": sorted(mesh.links()), "forged": mesh.state.forged_entries,
                        "rendezvous": mesh.rendezvous_connected})

    def diag_key(msg: Message) -> str:
        key = msg.header.get("key")
        if not isinstance(key, str) or not key.startswith("diag/") or len(key) > 200:
            raise ValueError("diag keys are strings under diag/")
        return key

    async def provide(msg: Message, ctx: CallContext) -> Message:
        ttl = msg.header.get("ttl")
        stored = await mesh.dht.provide(diag_key(msg), {"by": mesh.name},
                                        ttl=float(ttl) if isinstance(ttl, (int, float)) else None)
        return Message({"stored": stored})

    async def find(msg: Message, ctx: CallContext) -> Message:
        records = await mesh.dht.find_providers(diag_key(msg))
        return Message({"providers": sorted(r["provider"] for r in records)})

    mesh.offer("diag.view", view)
    mesh.offer("diag.provide", provide)
    mesh.offer("diag.find", find)
    mesh.offer("diag.echo", echo)
    mesh.offer("diag.sink", sink)
    mesh.offer("diag.count", count, streaming=True)
