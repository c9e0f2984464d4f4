"""Verification on a real local serving mesh: a dishonest peer is caught and then avoided.

Three `gradient-nb peer --serve` processes hold layers 0:10, 10:20 and 20:30; the middle one is
started with the test-only fault injection (its own environment variable: 1 % noise on its weights).
The entry peer samples every stage, verifies, records signed verdicts in the mesh state, and stops
routing through the failed peer; once an honest peer joins, requests go through it and pass.
"""

from __future__ import annotations

import asyncio

import pytest

from gradient_nb.mesh.demo import read_event, spawn_peer, stop_processes
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.rendezvous import Rendezvous
from gradient_nb.serve.cluster import wait_ready
from gradient_nb.serve.pipeline import MeshEngine, NoRoute
from gradient_nb.serve.sampling import SamplingParams
from gradient_nb.verify import TEST_FAULT_ENV, attach_verification, verification_of
from gradient_nb.verify.policy import SamplingPolicy
from gradient_nb.verify.report import verify_generation
from gradient_nb.verify.reputation import reputations

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAST = ["--heartbeat", "0.5", "--peer-timeout", "5"]


async def _generate(engine: MeshEngine, n: int = 10):
    ids = engine.encode([{"role": "user", "content": "What is the capital of France?"}])
    out = [t async for t in engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=n))]
    trace = engine.traces[-1]
    await asyncio.wait_for(trace.observed["verify"].done.wait(), 300)
    return out, trace


async def test_dishonest_peer_is_caught_and_avoided(capsys):
    rv = await Rendezvous().start()
    procs = []
    mesh = None
    try:
        for i, (layers, env) in enumerate([("0:10", {}), ("10:20", {TEST_FAULT_ENV: "perturb_weights:0.01"}),
                                           ("20:30", {})]):
            procs.append(spawn_peer(rv.url, name=f"shard-{i}", env=env,
                                    extra=["--serve", "default", "--layers", layers, *FAST]))
        a, bad, c = [(await read_event(p, 120))["peer_id"] for p in procs]
        mesh = await join(rv.url, name="entry", identity=Identity.generate(), probe_seconds=0.05)
        engine = await asyncio.to_thread(MeshEngine, mesh)
        attach_verification(engine, SamplingPolicy(1.0))  # verify every stage of every request
        await wait_ready(mesh, engine, 3, 300)

        _, trace = await _generate(engine)
        by_peer = {v.peer: v for v in trace.observed["verify"].verdicts}
        assert set(by_peer) == {a, bad, c}
        assert by_peer[bad].status == "fail", by_peer[bad].reason
        # The last stage got the cheater's states as inputs and computed honestly on them: not blamed.
        assert by_peer[a].ok and by_peer[c].ok, (by_peer[a].reason, by_peer[c].reason)
        assert all(v.commitment_bytes > 0 and v.committed_tokens > 0 for v in by_peer.values())

        rep = reputations(mesh)  # read back from the signed, replicated state
        assert rep[bad].failures >= 1 and rep[bad].failed(mesh.id)
        assert rep[a].passes >= 1 and not rep[a].failed(mesh.id)
        with pytest.raises(NoRoute):  # nobody else holds 10:20: no route rather than a cheating one
            engine.current_route()

        # An honest peer joins (the coordinator gives it the whole model): requests avoid the cheater.
        procs.append(spawn_peer(rv.url, name="honest", extra=["--serve", "default", *FAST]))
        honest = (await read_event(procs[-1], 120))["peer_id"]
        await wait_ready(mesh, engine, 4, 300)
        route = engine.current_route()
        assert bad not in {s.peer_id for s in route}

        _, trace2 = await _generate(engine)
        assert all(bad not in {p for p, _, _ in r} for r in trace2.routes)
        verdicts = {v.peer: v for v in trace2.observed["verify"].verdicts}
        assert honest in verdicts
        assert all(v.ok for v in verdicts.values()), [(v.peer[:8], v.reason) for v in verdicts.values()]

        # The %%verify API on the first (dishonest) generation: a verdict per shard, a plot, the cost.
        report = await verify_generation(engine, trace.observed["verify"].id)
        rows = {r["layers"]: r for r in report.rows()}
        assert rows["10:20"]["verdict"] == "fail" and rows["0:10"]["verdict"] == "pass"
        assert report.cost_fraction > 0 and len(report.figure().data) == 2
        assert "fail" in report._repr_html_()

        # %verify in a kernel whose session holds this engine: set the policy, list reputations.
        from IPython.core.interactiveshell import InteractiveShell

        from gradient_nb.notebook.session import current
        from gradient_nb.notebook.verify_magic import VerifyMagics

        ip = InteractiveShell.instance()
        ip.register_magics(VerifyMagics)
        session = current()
        session.engine, session.mesh = engine, mesh
        try:
            ip.run_line_magic("verify", "policy 5%")
            assert verification_of(engine).policy.rate == pytest.approx(0.05)
            capsys.readouterr()
            ip.run_line_magic("verify", "reputation")
            table = capsys.readouterr().out
            assert "FAILED" in table and "shard-1" in table
        finally:
            session.engine = session.mesh = None
    finally:
        if mesh is not None:
            await mesh.leave()
        await asyncio.to_thread(stop_processes, procs)
        await rv.stop()


async def test_a_peer_with_the_same_layers_recomputes_as_ordinary_work():
    """Two peers hold 10:20 (one cheats, skipping a layer). A stage is recomputed for the verifier by the
    other holder through plain shard.forward on a fresh session; a helper's failing word is checked here
    before anyone is blamed."""
    import secrets

    import torch

    from gradient_nb.mesh.frames import Message
    from gradient_nb.models import load_shard, model_info, resolve_model
    from gradient_nb.verify.service import VerifyManager

    rv = await Rendezvous().start()
    procs = []
    mesh = None
    try:
        for name, env in (("cheat", {TEST_FAULT_ENV: "skip_layer"}), ("honest", {})):
            procs.append(spawn_peer(rv.url, name=name, env=env, extra=["--serve", "default", "--layers", "10:20", *FAST]))
        bad, good = [(await read_event(p, 120))["peer_id"] for p in procs]
        mesh = await join(rv.url, name="entry", identity=Identity.generate(), probe_seconds=0.05)
        path = resolve_model()
        info = model_info(path)
        manager = VerifyManager(mesh, path, info.content_hash, info.num_layers)
        first = await asyncio.to_thread(load_shard, path, 0, 10)
        ids = torch.randint(100, 20000, (18,), generator=torch.Generator().manual_seed(7))
        hidden = await asyncio.to_thread(first, ids)

        def ready(pid: str) -> bool:
            srv = mesh.state.peers().get(pid, {}).get("serving") or {}
            return bool(srv.get("ready"))

        async def serve_through(peer: str):
            audit = manager.begin([(10, 20)])
            session = secrets.token_hex(8)
            calls = [(0, hidden[:6])] + [(p, hidden[p:p + 1]) for p in range(6, hidden.shape[0])]
            for pos, x in calls:
                reply = await mesh.call(peer, "shard.forward", Message(
                    {"model": info.name, "start": 10, "end": 20,
                     "items": [{"session": session, "pos": pos, "n": x.shape[0]}]}, {"x": x}), timeout=60)
                manager.on_call(audit, peer, 10, 20, session, pos, x, reply.header["items"][0])
            reply = await mesh.call(peer, "shard.drop", Message({"session": session}), timeout=10)
            manager.on_drop(audit, peer, 10, 20, session, reply.header)
            return audit

        for _ in range(600):
            if ready(bad) and ready(good):
                break
            await asyncio.sleep(0.5)
        # The honest peer first: the cheater, as the other holder, recomputes for the verifier and
        # lies; the verifier double-checks a failure here before blaming anyone, and fails the helper.
        (v_good,) = await manager.verify(await serve_through(good))
        assert v_good.ok and "recomputed by" not in v_good.reason, v_good.reason
        assert bad in manager.failed_peers() and good not in manager.failed_peers()
        # Then the cheater's own work, recomputed by the honest peer, confirmed here.
        (v_bad,) = await manager.verify(await serve_through(bad))
        assert v_bad.status == "fail" and f"recomputed by {good[:8]}, confirmed here" in v_bad.reason, v_bad.reason
    finally:
        if mesh is not None:
            await mesh.leave()
        await asyncio.to_thread(stop_processes, procs)
        await rv.stop()
