"""Fixtures of the RL tests: a tiny char-level Llama shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradient_nb.testing.tinymodel import tiny_char_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_char_model(tmp_path_factory.mktemp("rl") / "tiny")


class Swarm:
    """An in-process mesh: a rendezvous, ``n`` serving peers (each a full replica of the tiny model, each
    an RL sampler committing to its outputs, as volunteers' peers do) and a trainer peer with a ``MeshEngine``
    over them. ``setup(i, server)`` runs on each serving peer before its observers are attached (a test
    makes one a cheat there)."""

    def __init__(self, path: Path, n: int, lease_s: float, setup=None, layers=None) -> None:
        self.path, self.n, self.lease_s, self.setup = path, n, lease_s, setup
        self.layers = layers or [(0, 4)] * n  # each peer's layer range (default: whole replicas)
        self.samplers: list = []

    async def __aenter__(self) -> Swarm:
        from gradient_nb.mesh.identity import Identity
        from gradient_nb.mesh.peer import join
        from gradient_nb.mesh.rendezvous import Rendezvous
        from gradient_nb.rl.sampler import attach_sampler
        from gradient_nb.serve.cluster import wait_ready
        from gradient_nb.serve.node import ServingPeer
        from gradient_nb.serve.pipeline import MeshEngine
        from gradient_nb.verify import attach_commitments

        self.rv = await Rendezvous().start()
        for i in range(self.n):
            mesh = await join(self.rv.url, name=f"sampler-{i}", identity=Identity.generate(), probe_seconds=0.05,
                              heartbeat=0.5, peer_timeout=3.0)
            server = ServingPeer(mesh, str(self.path), layers=self.layers[i])
            if self.setup is not None:
                self.setup(i, server)
            attach_commitments(server)
            service = attach_sampler(server, lease_s=self.lease_s)
            await server.start()
            self.samplers.append((mesh, server, service))
        self.mesh = await join(self.rv.url, name="trainer", identity=Identity.generate(), probe_seconds=0.05,
                               heartbeat=0.5, peer_timeout=3.0)
        self.engine = MeshEngine(self.mesh, str(self.path))
        await wait_ready(self.mesh, self.engine, self.n, 120)
        return self

    async def kill(self, i: int) -> None:
        mesh, server, service = self.samplers[i]
        await service.stop()
        await server.stop(handover_timeout=0)
        await mesh.leave()

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.aclose()
        await self.mesh.leave()
        for i, (mesh, _, _) in enumerate(self.samplers):
            if not mesh._closed:
                await self.kill(i)
        await self.rv.stop()


@pytest.fixture(scope="session")
def warm() -> Path:
    """The tiny model after a short supervised warm start on answers of the format task's shape (built once
    per machine, ~20 s on 2 idle cores, kept under $GRADIENT_NB_HOME)."""
    from gradient_nb.models.loader import home

    return tiny_char_model(home() / "models" / "tiny-char-warm-150", warm_steps=150)


@pytest.fixture
def swarm() -> type[Swarm]:
    """``async with swarm(path, n, lease_s) as sw``: an in-process mesh of samplers and a trainer."""
    return Swarm


async def until(predicate, timeout: float = 60.0) -> None:
    """Wait (polling) until ``predicate()`` is true."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest.fixture
def wait_for():
    return until
