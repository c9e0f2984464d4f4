"""A local serving mesh in one call: an embedded rendezvous, serving peer processes and an entry peer.

This is what ``gradient-nb serve`` runs, and what tests, the serving benchmark and the quick-start
notebook use. The serving peers are separate processes (``gradient-nb peer --serve``), exactly what a
volunteer machine runs; this process is the entry peer that routes requests and samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from ..mesh.demo import read_event, spawn_peer, stop_processes
from ..mesh.identity import Identity
from ..mesh.peer import Mesh, join
from ..mesh.rendezvous import Rendezvous
from .coordinator import allocation_of, serving_peers
from .pipeline import MeshEngine, NoRoute


@dataclass
class LocalCluster:
    rendezvous: Rendezvous
    mesh: Mesh
    engine: MeshEngine
    processes: list[subprocess.Popen]
    peer_ids: list[str]
    api: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def allocation(self) -> Any:
        return allocation_of(self.mesh, self.engine.model_name)

    async def stop(self) -> None:
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.stop()
        await self.engine.aclose()
        await self.mesh.leave()
        await asyncio.to_thread(stop_processes, self.processes)
        await self.rendezvous.stop()

    async def __aenter__(self) -> LocalCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def split_cap(peers: int, model: str | None = None, dtype_bytes: float = 4.0) -> int:
    """A memory cap per local peer under which no peer can hold the whole model but ``peers`` of them
    can (as the quick-start notebook caps its peers): 1.4x the weights' share of one peer, for the KV
    cache and the scheduler's margin."""
    from ..models import resolve_model
    from .coordinator import model_cost

    cost = model_cost(resolve_model(model) if model is not None else resolve_model(), dtype_bytes)
    total = cost.embed_bytes + cost.head_bytes + cost.num_layers * cost.layer_bytes
    return int(1.4 * total / max(1, peers))


def layer_args(layers: list[tuple[int, int]] | None, i: int) -> list[str]:
    return ["--layers", f"{layers[i][0]}:{layers[i][1]}"] if layers else []


async def wait_ready(mesh: Mesh, engine: MeshEngine, peers: int, timeout: float) -> None:
    """Until ``peers`` serving peers are up and a route covers the model."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if len(serving_peers(mesh, engine.model_name)) >= peers:
                engine.current_route()
                return
        except NoRoute:
            pass
        if time.monotonic() > deadline:
            live = serving_peers(mesh, engine.model_name)
            raise TimeoutError(f"the model is not served after {timeout:.0f} s: {len(live)} serving peers, "
                               f"allocation {allocation_of(mesh, engine.model_name)}")
        await asyncio.sleep(0.2)


async def start_local_cluster(peers: int = 3, *, model: str | None = None,
                              layers: list[tuple[int, int]] | None = None, dtype: str = "float32",
                              quantization: str | None = None, peer_args: list[str] | None = None,
                              api: bool = False, api_port: int = 0, api_key: str | None = None,
                              api_host: str = "127.0.0.1", memory_cap_bytes: int | None = None,
                              timeout: float = 300.0) -> LocalCluster:
    """Start a rendezvous, ``peers`` serving processes and this process as the entry peer.
    ``memory_cap_bytes`` caps what each serving peer offers (``split_cap`` makes the model split)."""
    if layers is not None and len(layers) != peers:
        raise ValueError("give one layer range per peer")
    rv = await Rendezvous().start()
    procs: list[subprocess.Popen] = []
    mesh = None
    try:
        for i in range(peers):
            extra = ["--serve", model or "default", "--dtype", dtype, *layer_args(layers, i),
                     *(["--quantization", quantization] if quantization else []),
                     *(["--memory-cap", str(int(memory_cap_bytes))] if memory_cap_bytes else []), *(peer_args or [])]
            procs.append(spawn_peer(rv.url, name=f"shard-{i + 1}", extra=extra))
        ids = [(await read_event(p, timeout))["peer_id"] for p in procs]
        mesh = await join(rv.url, name="entry", identity=Identity.generate(), probe_seconds=0.05)
        engine = await asyncio.to_thread(MeshEngine, mesh, model)
        await wait_ready(mesh, engine, peers, timeout)
        cluster = LocalCluster(rv, mesh, engine, procs, ids)
        if api:
            from .api import serve_api

            cluster.api = await serve_api(engine, host=api_host, port=api_port, api_key=api_key)
        return cluster
    except BaseException:
        if mesh is not None:
            await mesh.leave()
        await asyncio.to_thread(stop_processes, procs)
        await rv.stop()
        raise
