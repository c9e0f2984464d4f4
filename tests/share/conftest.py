"""Fixtures of the shared-notebook tests: two real Jupyter servers, a rendezvous and two mesh peers."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gradient_nb.mesh.processes import stop_processes
from gradient_nb.notebook.share.harness import (
    START_TIMEOUT_S,
    Server,
    join_peer,
    start_rendezvous,
    start_server,
    wait_ready,
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """Two Jupyter servers, each with its own root directory and port: the two users' JupyterLabs."""
    base = tmp_path_factory.mktemp("jupyter")
    pair = (start_server(base / "alice", base / "runtime-a"), start_server(base / "bob", base / "runtime-b"))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for s in pair:
            wait_ready(s, deadline)
        yield pair
    finally:
        stop_processes([s.proc for s in pair])


@pytest.fixture(scope="module")
def rendezvous() -> Iterator[str]:
    p, url = start_rendezvous()
    try:
        yield url
    finally:
        stop_processes([p])
        p.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
async def peers(rendezvous: str) -> AsyncIterator[tuple[Any, Any]]:
    """Two mesh peers, Alice's (the owner) and Bob's, in a mesh of their own."""
    mesh = f"nb-{secrets.token_hex(4)}"
    a = await join_peer(rendezvous, "alice", mesh=mesh)
    b = await join_peer(rendezvous, "bob", mesh=mesh)
    try:
        yield a, b
    finally:
        await b.leave()
        await a.leave()


