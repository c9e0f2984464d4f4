"""notebooks/volunteer.ipynb's one cell, in a real kernel: it joins a mesh by URL and serves the layers the
mesh lacks, and another peer's request goes through it.

The cell runs as saved, with only its URL set to this test's rendezvous; the package is installed already,
so its pip step is skipped (no network). A headless peer serves layers 0–15 of the bundled model; the
volunteer gets layers from the coordinator (the rest, or a whole replica where it fits), prints what it serves and its links, and a third peer's
greedy answer (the bundled model's known one) is routed through the volunteer's layers.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import nbformat
import pytest
from kernel_driver import REPO, Kernel

from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from tests.conftest import Procs

pytestmark = [pytest.mark.slow]

PLACEHOLDER = 'MESH_URL = "ws://203.0.113.5:8765"'


def volunteer_cell(url: str) -> str:
    nb = nbformat.read(REPO / "notebooks" / "volunteer.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 1 and PLACEHOLDER in code[0], "the volunteer notebook is one cell with a URL to set"
    return code[0].replace(PLACEHOLDER, f"MESH_URL = {url!r}")


async def route_through(engine, peer_id: str, timeout: float = 60.0) -> None:
    """Wait (bounded) until the entry's route goes through ``peer_id``: the registry records of the
    serving peers reach this fresh peer by heartbeats."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if peer_id in [stage.peer_id for stage in engine.current_route()]:
                return
        except Exception as exc:  # no route yet: the records are still arriving
            last = exc
        else:
            last = None
        if loop.time() > deadline:
            raise AssertionError(f"no route through the volunteer: {last}")
        await asyncio.sleep(0.5)


async def test_volunteer_cell_serves_layers_another_peer_uses(procs: Procs, tmp_path: Path) -> None:
    from gradient_nb.serve.pipeline import MeshEngine
    from gradient_nb.serve.sampling import SamplingParams

    _, url = procs.rendezvous()
    procs.peer(url, "server", "--ephemeral", "--serve", "default", "--layers", "0:15")
    kernel = Kernel(env={"GRADIENT_NB_HOME": str(tmp_path)})
    try:
        # Blocking here is fine: this process has not joined yet.
        out = kernel.run(volunteer_cell(url), timeout=300).stdout
        served = re.search(r"serving layers (\d+)–(\d+) of smollm2-135m-instruct on cpu \(float32\) as volunteer", out)
        assert served, out
        start, end = int(served.group(1)), int(served.group(2))
        assert start < end and end == 30, out  # what the server's 0–15 leaves, or a whole replica
        assert "link to server: host → host, direct" in out, out
        volunteer_id = kernel.value("v.mesh.id")
        assert volunteer_id != Identity.load_or_create(tmp_path / "identity.key").peer_id  # its own kernel key

        mesh = await join(url, name="asker", identity=Identity.generate())
        try:
            engine = await asyncio.to_thread(MeshEngine, mesh)
            await route_through(engine, volunteer_id)
            ids = engine.encode([{"role": "user", "content": "What is the capital of France?"}])
            got = [t async for t in engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=8))]
            assert engine.tokenizer.decode(got, skip_special_tokens=True).startswith("The capital of France is Paris")
            route = engine.traces[-1].routes[-1]
            # The route may use part of what the volunteer holds (a chain enters a peer at any layer).
            assert any(pid == volunteer_id and start <= a < b <= end for pid, a, b in route), route
            assert route[0][1] == 0 and route[-1][2] == 30, route
            await engine.aclose()
        finally:
            await mesh.leave()
        kernel.run("%mesh leave")
    finally:
        kernel.stop()
