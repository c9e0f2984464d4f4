"""Verifiers are accountable: a lazy helper that clears its partner is caught by a canary and by spot-checks.

A `gradient-nb peer --serve` process holds layers 10:20 with the test-only fault of a skipped layer
(the cheat). Its partner, a mesh peer announcing the same layers, computes nothing: it relays every
job it gets to the cheat and returns the cheat's answer, so whatever the entry asks it to recompute
agrees with the cheat's commitments, i.e. it answers "pass" for its partner without computing.
Before the fix the entry took such a pass on the helper's word. Now:

1. a canary: the entry has a job of known answer for 10:20 (the cheat's first request, recomputed
   here while nobody else held the layers); it sends it to the partner as one more fresh prefill,
   the answer is wrong, the partner is failed as a verifier and the cheat's request is judged here;
2. a spot-check: a second entry (its own evidence only: the first one's verdicts are nothing to it)
   rechecks the partner's passing answer here and catches both.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
import torch

from gradient_nb.mesh.demo import read_event, spawn_peer, stop_processes
from gradient_nb.mesh.frames import Message
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.rendezvous import Rendezvous
from gradient_nb.models import load_shard, model_info, resolve_model
from gradient_nb.verify import TEST_FAULT_ENV
from gradient_nb.verify.policy import SamplingPolicy
from gradient_nb.verify.reputation import reputations
from gradient_nb.verify.service import VerifyManager

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAST = ["--heartbeat", "0.5", "--peer-timeout", "5"]
CHEAT = {TEST_FAULT_ENV: "skip_layer"}


async def _ready(mesh, pid: str) -> None:
    for _ in range(600):
        if (mesh.state.peers().get(pid, {}).get("serving") or {}).get("ready"):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{pid[:8]} never became ready")


async def _serve_through(mesh, manager: VerifyManager, model: str, peer: str, hidden: torch.Tensor):
    """One request through ``peer``'s layers 10:20 (a prefill then decode calls), audited by ``manager``."""
    audit = manager.begin([(10, 20)])
    session = secrets.token_hex(8)
    calls = [(0, hidden[:6])] + [(p, hidden[p:p + 1]) for p in range(6, hidden.shape[0])]
    for pos, x in calls:
        reply = await mesh.call(peer, "shard.forward", Message(
            {"model": model, "start": 10, "end": 20,
             "items": [{"session": session, "pos": pos, "n": x.shape[0]}]}, {"x": x}), timeout=60)
        manager.on_call(audit, peer, 10, 20, session, pos, x, reply.header["items"][0])
    reply = await mesh.call(peer, "shard.drop", Message({"session": session}), timeout=10)
    manager.on_drop(audit, peer, 10, 20, session, reply.header)
    return audit


async def test_a_helper_clearing_its_partner_is_caught_by_a_canary_and_by_spot_checks():
    rv = await Rendezvous().start()
    procs = []
    meshes = []
    try:
        procs.append(spawn_peer(rv.url, name="cheat", env=CHEAT, extra=["--serve", "default", "--layers", "10:20", *FAST]))
        cheat = (await read_event(procs[0], 120))["peer_id"]
        path = resolve_model()
        info = model_info(path)
        first = await asyncio.to_thread(load_shard, path, 0, 10)
        gen = torch.Generator().manual_seed(11)
        hidden = [await asyncio.to_thread(first, torch.randint(100, 20000, (14,), generator=gen)) for _ in range(3)]

        entry = await join(rv.url, name="entry", identity=Identity.generate(), probe_seconds=0.05)
        meshes.append(entry)
        canaries = VerifyManager(entry, path, info.content_hash, info.num_layers,
                                 policy=SamplingPolicy(1.0, recheck=0.0, canary=1.0))
        await _ready(entry, cheat)
        # Nobody else holds 10:20 yet: recomputed here. Caught, and now a job of known answer.
        (v1,) = await canaries.verify(await _serve_through(entry, canaries, info.name, cheat, hidden[0]))
        assert v1.status == "fail" and "recomputed by" not in v1.reason, v1.reason

        lazy = await join(rv.url, name="partner", identity=Identity.generate(), probe_seconds=0.05)
        meshes.append(lazy)
        partner = lazy.id

        async def relay(msg: Message, _ctx) -> Message:  # the partner's "recomputation": ask the cheat
            return await lazy.call(cheat, "shard.forward", msg, timeout=60)

        async def drop(msg: Message, _ctx) -> Message:
            return await lazy.call(cheat, "shard.drop", msg, timeout=10)

        lazy.offer("shard.forward", relay)
        lazy.offer("shard.drop", drop)
        lazy.publish(serving={"model": info.name, "hash": info.content_hash, "num_layers": info.num_layers,
                              "dtype": "float32", "quantization": None, "memory_cap_bytes": None,
                              "fixed_layers": [10, 20], "layers": [10, 20], "ready": True}, layers=[10, 20])
        await _ready(entry, partner)
        (v2,) = await canaries.verify(await _serve_through(entry, canaries, info.name, cheat, hidden[1]))
        assert v2.status == "fail" and "recomputed by" not in v2.reason, v2.reason  # not cleared by the partner
        rep = reputations(entry)[partner]
        assert rep.verifier_failures == 1 and rep.failed(), rep
        assert any("known" in x.get("reason", "") and x.get("role") == "verifier" for x in rep.last)
        assert partner in canaries.avoided_peers()  # a lying verifier is not routed to either

        # A second entry, with no verdicts of its own yet (the first one's count for nothing here):
        # every passing answer of a helper is spot-checked.
        entry2 = await join(rv.url, name="entry2", identity=Identity.generate(), probe_seconds=0.05)
        meshes.append(entry2)
        spot = VerifyManager(entry2, path, info.content_hash, info.num_layers,
                             policy=SamplingPolicy(1.0, recheck=1.0, canary=0.0))
        await _ready(entry2, partner)
        assert partner not in spot.failed_peers() and cheat not in spot.failed_peers()
        (v3,) = await spot.verify(await _serve_through(entry2, spot, info.name, cheat, hidden[2]))
        assert v3.status == "fail", v3.reason
        rep2 = reputations(entry2)
        assert rep2[partner].verifier_failures == 1 and rep2[cheat].failures == 1
        assert any("spot-check" in x.get("reason", "") for x in rep2[partner].last)
        assert {partner, cheat} <= spot.avoided_peers()
    finally:
        for m in meshes:
            await m.leave()
        await asyncio.to_thread(stop_processes, procs)
        await rv.stop()
