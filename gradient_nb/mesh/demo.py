"""``gradient-nb demo``: a local mesh of peer processes, introduced by an embedded rendezvous.

It starts the rendezvous in this process, launches headless peers as separate processes, joins as one
more peer, then exercises what the mesh does (links, calls with tensors, streams, replicated state, the
DHT) and prints a short report. The process helpers live in ``processes.py`` (re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import torch

from .frames import Message
from .identity import Identity
from .peer import Mesh, join
from .processes import read_event, spawn_peer, stop_processes
from .rendezvous import Rendezvous

__all__ = ["read_event", "run_demo", "spawn_peer", "stop_processes", "wait_for_peers"]


async def wait_for_peers(mesh: Mesh, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(mesh.peers()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(mesh.peers())} of {count} peers appeared")
        await asyncio.sleep(0.2)


async def run_demo(peers: int = 3) -> int:
    t0 = time.perf_counter()
    home = Path(os.environ.get("GRADIENT_NB_HOME", Path.home() / ".cache" / "gradient-nb"))
    home.mkdir(parents=True, exist_ok=True)
    async with Rendezvous() as rv:
        print(f"rendezvous: {rv.url} (embedded)")
        # Local demo peers: they also offer the diag.* test services the demo calls (volunteers do not).
        procs = [spawn_peer(rv.url, name=f"volunteer-{i + 1}", module="gradient_nb.testing.diagpeer")
                 for i in range(peers)]
        try:
            ids = [(await read_event(p))["peer_id"] for p in procs]
            mesh = await join(rv.url, name="notebook", identity=Identity.generate())
            try:
                await wait_for_peers(mesh, peers + 1)
                print(f"joined: {len(mesh.peers())} peers after {time.perf_counter() - t0:.1f} s")
                report = []
                payload = torch.randn(256, 1024)
                for pid in ids:
                    start = time.perf_counter()
                    reply = await mesh.call(pid, "diag.echo", Message({"hello": mesh.name}, {"x": payload}))
                    first = time.perf_counter() - start
                    start = time.perf_counter()
                    await mesh.call(pid, "diag.echo", Message({"hello": mesh.name}, {"x": payload}))
                    again = time.perf_counter() - start
                    items = [m.header["i"] async for m in mesh.stream(pid, "diag.count", Message({"n": 100}))]
                    ok = torch.equal(reply.tensors["x"], payload) and items == list(range(100))
                    report.append((pid, first, again, ok))
                mesh.state.put("demo", "greeting", {"text": "hello from the notebook peer"})
                await mesh.dht.provide("demo/greeting")
                providers = await mesh.dht.find_providers("demo/greeting")
                print()
                from ..cli import format_peers

                print(format_peers(mesh.snapshot()))
                print()
                for pid, first, again, ok in report:
                    name = next(p.name for p in mesh.peers() if p.id == pid)
                    print(f"call {name:12s} 1 MiB tensor echo: {first * 1000:7.1f} ms (link set-up included),"
                          f" {again * 1000:6.1f} ms warm; 100-item stream: {'ok' if ok else 'MISMATCH'}")
                print(f"DHT: 'demo/greeting' provided by {[p['provider'][:8] for p in providers]}")
                print(f"done in {time.perf_counter() - t0:.1f} s")
                return 0 if all(ok for *_, ok in report) and providers else 1
            finally:
                await mesh.leave()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stop_processes, procs)
