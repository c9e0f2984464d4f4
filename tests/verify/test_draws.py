"""The last stage draws each token itself: verification checks the tokens against recomputed logits.

Real shards of the bundled model, served batched on a real ShardRuntime (a prefill, then one decode call
per token), the tokens drawn from what was served with the entry's per-step specs; the verifier
recomputes the logits in one prefill. Honest tokens pass at float32 and bfloat16 (whose served and
recomputed logits differ most among the 16/32-bit precisions); a token the peer chose instead fails.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from gradient_nb.mesh.identity import Identity
from gradient_nb.models import load_shard, model_info, resolve_model
from gradient_nb.serve.sampling import draw_scores, sample_with
from gradient_nb.serve.shard import ShardRuntime
from gradient_nb.verify.simulate import serve_stage
from gradient_nb.verify.verifier import Tolerance, check_draws, recompute

T, P, NREQ = 14, 4, 6
SPECS = [{"temperature": 0.0, "top_p": 1.0}, {"temperature": 0.8, "top_p": 0.95}, {"temperature": 1.3, "top_p": 1.0}]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def served(request):
    dtype = getattr(torch, request.param)
    path = resolve_model()
    info = model_info(path)
    head, last = load_shard(path, 0, 20, dtype=dtype), load_shard(path, 20, 30, dtype=dtype)
    g = torch.Generator().manual_seed(99)
    with torch.inference_mode():
        inputs = [head(torch.randint(100, info.vocab_size - 100, (T,), generator=g)) for _ in range(NREQ)]
    rt = ShardRuntime(last)

    async def go():
        try:
            return await serve_stage(rt, Identity.generate(), info.content_hash, inputs, P)
        finally:
            await rt.aclose()

    out = []
    for i, s in enumerate(asyncio.run(go())):
        spec = {**SPECS[i % len(SPECS)], "seed": 1000 + i}
        draws = [(pos, sample_with(y, {**spec, "step": k}), {**spec, "step": k})
                 for k, (pos, y) in enumerate(zip(s.positions, s.outputs, strict=True))]
        out.append((recompute(last, s.inputs), draws, s.outputs))
    return out, Tolerance.for_precision(request.param)


def test_honest_draws_pass(served):
    runs, tol = served
    for ref, draws, _ in runs:
        assert check_draws(ref, draws, tol) == ""


def test_a_token_the_peer_chose_fails(served):
    runs, tol = served
    tampered = 0
    for ref, draws, outputs in runs:
        for k, (pos, token, spec) in enumerate(draws):
            if spec["temperature"] == 0.0:
                # The best token clearly below the top one: 1 logit at float32; under bfloat16 honest
                # logits move by up to ~0.75 (a 1.55 slack), so there a different answer is told from
                # a near tie only beyond twice that.
                y = outputs[k].reshape(-1).float()
                gap = max(1.0, 2 * tol.logit_err * float(y.abs().max()))
                other = int(torch.where(y <= y.max() - gap, y, -torch.inf).argmax())
            else:
                scores = draw_scores(outputs[k], spec)
                nucleus = torch.isfinite(scores).nonzero().reshape(-1)
                if len(nucleus) < 2:
                    continue
                other = int(nucleus[scores[nucleus].argmin()])  # in the nucleus, but far from the draw
            assert other != token
            forged = [*draws[:k], (pos, other, spec), *draws[k + 1:]]
            assert check_draws(ref, forged, tol), (pos, spec)
            tampered += 1
    assert tampered >= NREQ * (T - P + 1) // 2


def test_draws_out_of_range_fail(served):
    (ref, draws, _), tol = served[0][0], served[1]
    pos, token, spec = draws[0]
    assert "out of range" in check_draws(ref, [(pos, ref.shape[1], spec)], tol)
    assert "out of range" in check_draws(ref, [(ref.shape[0], token, spec)], tol)


def test_masked_draws_are_judged_within_the_mask(served):
    """Constrained decoding: an honest greedy draw is the best *allowed* token, often not the best of
    the vocabulary; it passes. A token outside the mask fails, however likely it is."""
    from gradient_nb.serve.sampling import pack_mask

    (ref, draws, outputs), tol = served[0][0], served[1]
    pos, _, _ = draws[0]
    y = outputs[0].reshape(-1).float()
    allowed = torch.ones_like(y, dtype=torch.bool)
    allowed[torch.topk(y, 3).indices] = False  # the three best tokens are not allowed
    for base in SPECS:
        spec = {**base, "seed": 7, "step": 0, "mask": pack_mask(allowed, y.numel())}
        honest = sample_with(y, spec)
        assert allowed[honest]
        assert check_draws(ref, [(pos, honest, spec)], tol) == ""
        assert "token" in check_draws(ref, [(pos, int(y.argmax()), spec)], tol)
