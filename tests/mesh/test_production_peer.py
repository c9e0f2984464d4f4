"""What a volunteer runs offers no test hooks: ``gradient-nb peer`` has no ``diag.*`` services (a test
peer, ``python -m gradient_nb.testing.diagpeer``, has them), and its mesh services are rate-limited."""

from __future__ import annotations

import asyncio

import pytest

from gradient_nb.mesh.errors import RemoteError, UnknownMethod
from gradient_nb.mesh.frames import Message
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.processes import read_event, spawn_peer, stop_processes
from gradient_nb.mesh.rendezvous import Rendezvous


async def test_a_production_peer_offers_no_diag_services_and_limits_its_own() -> None:
    async with Rendezvous() as rv:
        fast = ["--heartbeat", "0.5"]
        prod = spawn_peer(rv.url, name="volunteer", extra=fast)
        test = spawn_peer(rv.url, name="tester", extra=fast, module="gradient_nb.testing.diagpeer")
        mesh = None
        try:
            prod_id = (await read_event(prod, 120))["peer_id"]
            test_id = (await read_event(test, 120))["peer_id"]
            mesh = await join(rv.url, name="caller", identity=Identity.generate(), heartbeat=0.5, probe_seconds=0.05)
            async with asyncio.timeout(60):
                while not {prod_id, test_id} <= {p.id for p in mesh.peers()}:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            services = {p.id: p.services for p in mesh.peers()}
            assert not [s for s in services[prod_id] if s.startswith("diag.")]
            assert "diag.echo" in services[test_id]
            with pytest.raises(UnknownMethod):
                await mesh.call(prod_id, "diag.echo", Message({"x": 1}), timeout=30)
            assert (await mesh.call(test_id, "diag.echo", Message({"x": 1}), timeout=30)).header == {"x": 1}
            # The volunteer's own mesh services answer within limits, and refuse a flood with a clear error.
            results = await asyncio.gather(*(mesh.call(prod_id, "mesh.ping", Message(), timeout=30)
                                             for _ in range(200)), return_exceptions=True)
            refused = [r.code for r in results if isinstance(r, RemoteError)]
            assert refused and set(refused) == {"RateLimited"}
            assert all(isinstance(r, (Message, RemoteError)) for r in results)
        finally:
            if mesh is not None:
                await mesh.leave()
            await asyncio.to_thread(stop_processes, [prod, test])
