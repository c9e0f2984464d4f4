"""Run Echo without a notebook: a local mesh of sampler processes plus this process as the trainer.

``gradient-nb echo train CONFIG.yaml`` and ``gradient-nb bench echo`` use this. Sequential and async
runs start ``peers`` serving processes (``gradient-nb peer --serve``, exactly what volunteers run), each
holding the whole model, so each is a sampler pipeline of its own; the co-located baseline needs none.
With ``rendezvous`` (``echo train --rendezvous URL``) nothing is started: this process joins that mesh
and trains with the serving peers already there (volunteers' ``gradient-nb peer --serve``), once
``peers`` of them serve the model; when it ends, or dies, they go back to their base weights when their
lease runs out (``sampler.py``).
With ``pin``, the trainer runs on CPU core 0 and the samplers on the other cores, one torch thread each,
to stand for separate machines on one box.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ..models.loader import DEFAULT_MODEL, model_info
from .trainer import EchoConfig, EchoRun, RunState


def _pin(pids: list[int]) -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"pinned": False, "why": "fewer than 2 cores"}
    os.sched_setaffinity(0, {cores[0]})
    for pid in pids:
        os.sched_setaffinity(pid, set(cores[1:]))
    torch.set_num_threads(1)
    return {"pinned": True, "trainer_cores": [cores[0]], "sampler_cores": cores[1:], "torch_threads": 1}


async def train_headless(cfg: EchoConfig, *, peers: int = 2, emit: Callable[[dict[str, Any]], None] | None = None,
                         pin: bool = False, rendezvous: str | None = None, mesh_name: str = "default",
                         secret: str | None = None, ready_timeout: float = 300.0) -> RunState:
    """Train as ``cfg`` says; ``emit`` gets each step's metrics. Returns the run's state."""

    def on_step(m: dict[str, Any]) -> None:
        if emit is not None:
            emit({"event": "step", **{k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()}})

    if cfg.mode == "colocated" or cfg.rank > 0:  # a data-parallel rank > 0 trains on rank 0's batches
        if pin:
            placement = _pin([])
            if emit is not None:
                emit({"event": "placement", **placement})
        state = await EchoRun(cfg, on_step=on_step).run()
    elif rendezvous is not None:
        state = await _train_on_mesh(cfg, rendezvous, mesh_name, secret, peers, ready_timeout, on_step, emit)
    else:
        from ..serve.cluster import start_local_cluster

        n = model_info(cfg.model or DEFAULT_MODEL).num_layers
        cluster = await start_local_cluster(peers, model=cfg.model, layers=[(0, n)] * peers,
                                            peer_args=["--threads", "1"] if pin else None)
        try:
            if pin:
                placement = _pin([p.pid for p in cluster.processes])
                if emit is not None:
                    emit({"event": "placement", **placement})
            state = await EchoRun(cfg, mesh=cluster.mesh, engine=cluster.engine, on_step=on_step).run()
        finally:
            await cluster.stop()
    if emit is not None:
        emit({"event": "done", **state.summary()})
    return state


async def _train_on_mesh(cfg: EchoConfig, url: str, mesh_name: str, secret: str | None, peers: int,
                         timeout: float, on_step: Callable[[dict[str, Any]], None],
                         emit: Callable[[dict[str, Any]], None] | None) -> RunState:
    import asyncio

    from ..mesh.identity import Identity
    from ..mesh.peer import join
    from ..serve.cluster import wait_ready
    from ..serve.pipeline import MeshEngine

    mesh = await join(url, mesh=mesh_name, secret=secret, name="echo-trainer", identity=Identity.generate())
    engine = None
    try:
        engine = await asyncio.to_thread(MeshEngine, mesh, cfg.model)
        await wait_ready(mesh, engine, peers, timeout)
        if emit is not None:
            emit({"event": "joined", "peer_id": mesh.id, "mesh": mesh.mesh_name,
                  "samplers": len(engine.mesh.providers("echo.sync"))})
        return await EchoRun(cfg, mesh=mesh, engine=engine, on_step=on_step).run()
    finally:
        if engine is not None:
            await engine.aclose()
        await mesh.leave()
