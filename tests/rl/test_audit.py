"""Untrusted samplers: a real sampler peer serving perturbed weights is caught by the rollout audit.

Three serving peers on an in-process mesh (real rendezvous, links, RPC, commitments), each a full replica
of the warm tiny model; one adds noise to one layer's weights when it loads (what a volunteer who serves
a tampered model does). With every rollout audited, its rollouts are caught and dropped, it is excluded,
the honest samplers' rollouts all pass, and training goes on. In a pipeline, the cheating stage alone is
blamed (async mode there): the honest stage after it is re-computed from the very hidden states it was
given.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradient_nb.rl.trainer import EchoConfig, EchoRun
from gradient_nb.verify.reputation import failed_peers

pytestmark = pytest.mark.slow
NOISE = 0.05  # x each weight matrix's std, on one of the four layers


class NoisyLayer:
    """A ShardObserver that perturbs one decoder layer's weights as the shard loads (test-only cheat)."""

    def on_load(self, shard):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for w in shard.layers[1].parameters():
                if w.dim() == 2:
                    w.add_(torch.randn(w.shape, generator=g) * (NOISE * float(w.std())))
        return shard

    def on_forward(self, *args) -> dict:
        return {}

    def on_drop(self, key: str) -> dict:
        return {}


async def test_a_sampler_serving_perturbed_weights_is_caught_and_dropped(warm: Path, swarm) -> None:
    def cheat_last(i: int, server) -> None:
        if i == 2:
            server.observers.append(NoisyLayer())

    async with swarm(warm, 3, lease_s=60, setup=cheat_last) as sw:
        cheat = sw.samplers[2][0].id
        cfg = EchoConfig(task={"name": "format", "min_len": 4, "max_len": 4}, model=str(warm), mode="sequential",
                         steps=3, num_generations=4, prompts_per_step=3, max_tokens=12, seed=1, audit_fraction=1.0)
        run = EchoRun(cfg, mesh=sw.mesh, engine=sw.engine)
        state = await run.run()
        verdicts = list(run.auditor.verdicts)
        summary = [(v.peer[:8], v.status, round(v.max_err, 6)) for v in verdicts]
        assert state.status == "done" and len(state.metrics) == 3, state.error
        assert set(state.excluded_samplers) == {cheat}, (state.excluded_samplers, summary)
        assert state.audit_failed >= 1 and state.dropped_untrusted >= cfg.num_generations
        honest = [v for v in verdicts if v.peer != cheat]
        assert honest and all(v.ok for v in honest), summary  # no false positive on an honest sampler
        assert any(not v.ok for v in verdicts if v.peer == cheat)
        # It was excluded after its first failure: no rollout of a later step came from it, every step
        # trained on a full batch, and the audit counts add up.
        first = next(i for i, m in enumerate(state.metrics) if m["dropped_untrusted"])
        assert all(m["dropped_untrusted"] == 0 for m in state.metrics[first + 1:])
        assert all(m["samples"] == cfg.num_generations * cfg.prompts_per_step for m in state.metrics)
        assert state.audited == sum(m["audited"] for m in state.metrics) == len(verdicts)
        assert state.dropped_untrusted == sum(m["dropped_untrusted"] for m in state.metrics)
        assert cheat in failed_peers(sw.mesh)  # its failed verdict is signed into the mesh state
        print("audit verdicts:", summary)


async def test_in_a_pipeline_only_the_cheating_stage_is_blamed(warm: Path, swarm) -> None:
    def cheat_second(i: int, server) -> None:
        if i == 1:
            server.observers.append(NoisyLayer())  # layer 1 of the model, in the first stage

    async with swarm(warm, 3, lease_s=60, setup=cheat_second, layers=[(0, 2), (0, 2), (2, 4)]) as sw:
        cheat, downstream = sw.samplers[1][0].id, sw.samplers[2][0].id
        cfg = EchoConfig(task={"name": "format", "min_len": 4, "max_len": 4}, model=str(warm), mode="async",
                         steps=2, num_generations=4, prompts_per_step=2, max_tokens=8, seed=2, audit_fraction=1.0)
        run = EchoRun(cfg, mesh=sw.mesh, engine=sw.engine)
        state = await run.run()
        verdicts = list(run.auditor.verdicts)
        summary = [(v.peer[:8], v.start, v.end, v.status, round(v.max_err, 6)) for v in verdicts]
        assert state.status == "done" and set(state.excluded_samplers) == {cheat}, (state.error, summary)
        assert len(state.metrics) == 2 and all(m["samples"] == 8 for m in state.metrics)
        assert any(not v.ok for v in verdicts if v.peer == cheat)
        assert all(v.ok for v in verdicts if v.peer != cheat), summary
        # Rollouts through the cheat whose downstream stage, fed the cheat's hidden states, still passed.
        failed = {v.request for v in verdicts if v.peer == cheat and not v.ok}
        assert any(v.peer == downstream and v.ok and v.request in failed for v in verdicts), summary
