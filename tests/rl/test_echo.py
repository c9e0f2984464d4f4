"""Echo end to end on an in-process mesh (real rendezvous, links, serving peers and RPC; a tiny model).

One swarm of two samplers carries the sequential-mode claims (learning, same gradients as the
co-located baseline, sampler/trainer log-prob agreement, versions never mixing, a sampler lost
mid-rollout); a second, with one short-leased sampler, the weight-sync failures, async staleness and
a trainer that goes away.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gradient_nb.mesh.errors import RemoteError
from gradient_nb.rl.policy import Policy
from gradient_nb.rl.rollouts import LocalSampler, MixedVersions
from gradient_nb.rl.tasks import Prompt
from gradient_nb.rl.trainer import EchoConfig, EchoRun, Trainer
from gradient_nb.rl.weights import Announcement, BlobRejected, announce, assemble, check_announcement

pytestmark = pytest.mark.slow
TASK = {"name": "format", "min_len": 4, "max_len": 4}
# Sampler vs trainer log-probs at float32 (merged weights in a shard vs peft's side matrices, KV-cached
# decode vs one teacher-forced pass): measured max |difference| ~2e-7 over a batch here.
LOGPROB_TOL = 1e-5


def _p_value(first: list[float], last: list[float]) -> float:
    """Exact one-sided permutation test that ``last`` has the higher mean."""
    both = np.array(first + last)
    observed = np.mean(last) - np.mean(first)
    n, hits, total = len(last), 0, 0
    for idx in itertools.combinations(range(len(both)), n):
        mask = np.zeros(len(both), bool)
        mask[list(idx)] = True
        hits += (both[mask].mean() - both[~mask].mean()) >= observed - 1e-12
        total += 1
    return hits / total


def _cfg(warm: Path, **kw) -> EchoConfig:
    base = dict(task=TASK, model=str(warm), steps=30, num_generations=16, learning_rate=6e-3, max_tokens=24,
                lora_rank=8, seed=1)
    return EchoConfig(**{**base, **kw})


def _assert_learns(metrics: list[dict]) -> float:
    r = [m["reward_mean"] for m in metrics]
    p = _p_value(r[:10], r[-10:])
    assert np.mean(r[-10:]) > np.mean(r[:10]) and p < 0.01, (r, p)
    return p


async def test_colocated_baseline_learns(warm: Path) -> None:
    state = await EchoRun(_cfg(warm, mode="colocated")).run()
    assert state.status == "done" and len(state.metrics) == 30
    _assert_learns(state.metrics)


async def test_sequential_mode_on_the_mesh(warm: Path, swarm, wait_for) -> None:
    async with swarm(warm, 2, lease_s=60) as sw:
        # 1. With the same seeds, the mesh samplers and the co-located sampler draw the same tokens, their
        #    log-probs agree with the trainer's recomputation, and one step's LoRA gradients are the same.
        cfg = _cfg(warm, mode="sequential")
        run = EchoRun(cfg, mesh=sw.mesh, engine=sw.engine)
        prompt = Prompt("Reply with 4 letters inside <answer></answer>.", {"length": 4})
        v, _, nbytes = await run._publish_and_sync()
        assert nbytes > 0
        mesh_groups = await run.sampler.groups([prompt], run.run_id, v, seed=5)
        twin = Trainer(cfg)  # a fresh policy from the same seed: the co-located baseline's
        local = LocalSampler(twin.policy, run.task, num_generations=16, max_tokens=24, temperature=1.0,
                             eos_ids=[twin.policy.tokenizer.eos_token_id])
        local_groups = [local.group(prompt, 5)]
        mesh_rs, local_rs = mesh_groups[0].rollouts, local_groups[0].rollouts
        assert [r.completion_ids for r in mesh_rs] == [r.completion_ids for r in local_rs]
        with torch.no_grad():
            lp, _, mask = run.trainer.policy.token_logprobs([r.prompt_ids for r in mesh_rs],
                                                            [r.completion_ids for r in mesh_rs])
        sampler = torch.zeros_like(lp)
        for i, r in enumerate(mesh_rs):
            sampler[i, : len(r.logprobs)] = torch.tensor(r.logprobs)
        assert float(((lp - sampler).abs() * mask).max()) < LOGPROB_TOL
        g_seq = run.trainer.gradients(mesh_groups)
        g_col = twin.gradients(local_groups)
        assert g_seq.keys() == g_col.keys() and len(g_seq) > 0
        assert max(float((g_seq[k] - g_col[k]).abs().max()) for k in g_seq) < 1e-6

        # 2. A version published (not synced) mid-rollout does not leak into it: the batch stays v's.
        batch = asyncio.ensure_future(run.sampler.groups([prompt], run.run_id, v, seed=6))
        await asyncio.sleep(0.05)
        run.trainer.train_step(mesh_groups)  # v + 1 exists now
        _, config, blob = run.trainer.snapshot()
        run.publisher.publish(v + 1, config, blob)
        groups = await batch
        assert {r.version for r in groups[0].rollouts} == {v}
        stale = run.trainer._old_logprobs(groups, torch.zeros(16, 24))  # recomputed with v's adapter
        for i, r in enumerate(groups[0].rollouts):
            assert np.allclose(stale[i, : len(r.logprobs)].numpy(), r.logprobs, atol=LOGPROB_TOL)
        # Training on that stale batch: the ratio is pi_now / pi_v, not 1 (AReaL #201), and the step works.
        stats = run.trainer.train_step(groups)
        assert abs(stats["ratio_mean"] - 1.0) > 1e-4 and stats["staleness"] == 1.0

        # 3. A sampler re-synced mid-rollout (here: deliberately) makes the batch mixed: it is refused.
        batch = asyncio.ensure_future(run.sampler.groups([prompt], run.run_id, v, seed=7))
        await wait_for(lambda: run.sampler.guard.seen)
        await run._publish_and_sync()
        with pytest.raises(MixedVersions):
            await batch
        run.close()

        # 4. Training learns through the mesh, and goes on when a sampler leaves in the middle of a rollout.
        learn = EchoRun(_cfg(warm, mode="sequential"), mesh=sw.mesh, engine=sw.engine)
        killed = asyncio.Event()

        async def kill_mid_rollout() -> None:
            await wait_for(lambda: len(learn.state.metrics) >= 20 and learn.sampler.guard.seen, 300)
            await sw.kill(0)
            killed.set()

        killer = asyncio.ensure_future(kill_mid_rollout())
        state = await learn.run()
        await killer
        assert killed.is_set() and state.status == "done" and len(state.metrics) == 30
        assert max(m["mismatch"] for m in state.metrics) < LOGPROB_TOL
        _assert_learns(state.metrics)


async def test_weight_sync_failures_staleness_and_a_trainer_that_goes_away(warm: Path, swarm) -> None:
    async with swarm(warm, 1, lease_s=2.0) as sw:
        _, server, service = sw.samplers[0]
        run = EchoRun(_cfg(warm, mode="sequential", sync_deadline_s=1.0), mesh=sw.mesh, engine=sw.engine)
        await run._publish_and_sync()
        assert service.tag == [run.run_id, 0]

        # A tampered blob: the sync fails loudly and the sampler stops producing rollouts (no tag).
        publish = run.publisher.publish

        def tampered(version: int, config: bytes, blob: bytes) -> Announcement:
            a = publish(version, config, blob)
            run.publisher._blobs[version] = blob[:-1] + bytes([blob[-1] ^ 1])
            return a

        run.publisher.publish = tampered
        run.trainer.policy.version = 1  # as if a step had been taken
        with pytest.raises(RuntimeError, match="no sampler holds version 1"):
            await run._publish_and_sync()
        assert "tampered" in run.state.sync_failures[-1] and service.tag is None
        assert service.state.startswith("stopped")

        # A trainer that does not answer: the sync fails by its deadline, it does not hang.
        run.publisher.publish = publish
        run.trainer.policy.version = 2

        async def never(msg, ctx):
            await asyncio.sleep(3600)

        sw.mesh.offer("echo.chunk", never)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="no sampler holds version 2"):
            await run._publish_and_sync()
        assert time.monotonic() - t0 < 1.0 + 5 and "did not finish within" in run.state.sync_failures[-1]
        run.close()

        # Async mode: batches more than max_staleness versions behind are dropped and counted.
        arun = EchoRun(_cfg(warm, mode="async", steps=6, max_staleness=0), mesh=sw.mesh, engine=sw.engine)
        state = await arun.run()
        assert state.status == "done" and len(state.metrics) == 6
        assert all(m["lag"] == 0 for m in state.metrics) and state.dropped_stale >= 1
        assert service.tag == [arun.run_id, arun.trainer.policy.version - 1] or service.tag is not None

        # The trainer is gone: within its lease the sampler restores the base weights and stops tagging.
        t0 = time.monotonic()
        while service.tag is not None:
            assert time.monotonic() - t0 < 2.0 + 3, "the sampler kept serving a dead trainer's version"
            await asyncio.sleep(0.1)
        assert service.state.startswith("stopped: no sync")
        base = Policy(warm).model.get_base_model().model.layers[0].self_attn.q_proj.weight
        assert torch.equal(server.runtime.shard.layers[0].self_attn.q_proj.weight, base)


def test_blob_checks() -> None:
    from gradient_nb.mesh.identity import Identity

    trainer, other = Identity.generate(), Identity.generate()
    from safetensors.torch import save

    blob = save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4),
                 "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2)})
    a = announce(trainer, "run", 3, b'{"r": 2, "lora_alpha": 4, "peft_type": "LORA"}', blob)
    assert assemble(a, [blob[:10], blob[10:]]).r == 2
    with pytest.raises(BlobRejected, match="truncated"):
        assemble(a, [blob[:-5]])
    with pytest.raises(BlobRejected, match="tampered"):
        assemble(a, [blob[:-1] + b"x"])
    with pytest.raises(BlobRejected, match="not signed by the trainer"):
        check_announcement(a.record, other.peer_id)
    forged = dict(a.record, payload={**a.record["payload"], "sha256": "0" * 64})
    with pytest.raises(BlobRejected):
        check_announcement(forged, trainer.peer_id)
    assert isinstance(check_announcement(a.record, trainer.peer_id), Announcement)
    with pytest.raises(RemoteError.__mro__[1]):  # a MeshError subclass
        raise BlobRejected("x")
