"""Per-precision tolerances (nf4, float16, bfloat16): honest serving passes, each attack fails.

The limits in ``Tolerance.for_precision`` were set over honest maxima measured on the bundled model
(see ``_PRECISION_LIMITS`` in verifier.py); these tests fail if a limit is loosened so far that an
attack gets through, or tightened so far that honest variation is flagged. They are a short version
of that calibration (264 honest and 54 runs per attack per precision there): real bitsandbytes
nf4 on CPU, real 16-bit float shards, served on a real ShardRuntime (a prefill, then one decode call
per token, requests batched together) and re-computed by one prefill.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

from gradient_nb.mesh.identity import Identity
from gradient_nb.models import load_shard, model_info, resolve_model
from gradient_nb.serve.shard import ShardRuntime
from gradient_nb.verify.simulate import perturbed_shard, random_like, serve_stage, skip_layer
from gradient_nb.verify.verifier import Tolerance, verify_stage

RANGES = [(0, 10), (10, 20), (20, 30)]
T, P = 12, 4  # tokens per request, prompt part (the rest is decoded one call at a time)
NREQ = 6
# (dtype, quantization) as a serving peer announces them
PRECISIONS = {"nf4": (torch.float32, "nf4"), "float16": (torch.float16, None), "bfloat16": (torch.bfloat16, None)}

# Weight noise (x each matrix's std) that each precision's limits must catch, on which stages. Under
# bfloat16 honest variation is larger than what 1 % noise causes; 3 % is caught on hidden-state stages
# but not on the logits stage (20:30), where even 5 % slips through in some runs: see the README.
NOISE = {"nf4": (0.01, RANGES), "float16": (0.01, RANGES), "bfloat16": (0.03, RANGES[:2])}
# What a cheaper peer may serve while announcing the precision: nothing is lower than nf4.
LOWER = {"nf4": [], "float16": [(torch.float16, "nf4"), (torch.bfloat16, None)],
         "bfloat16": [(torch.bfloat16, "nf4")]}


@pytest.fixture(scope="module")
def base():
    # One intra-op thread by default (a small shared machine); the honest runs also use 2.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = resolve_model()
    try:
        yield {"path": path, "info": model_info(path), "ident": Identity.generate(), "worlds": {}}
    finally:
        torch.set_num_threads(threads)


def _world(base, prec):
    """The shards at ``prec`` and each stage's honest inputs through a chain of that precision."""
    if prec not in base["worlds"]:
        dtype, quant = PRECISIONS[prec]
        # The server and the verifier share one copy of the layers: loading is deterministic (nf4
        # quantization included), so a second copy holds the same weights; the calibration loaded two.
        shards = {r: load_shard(base["path"], *r, dtype=dtype, quantization=quant) for r in RANGES}
        g = torch.Generator().manual_seed(4321)
        inputs = {}
        for i in range(NREQ):
            x = torch.randint(100, base["info"].vocab_size - 100, (T,), generator=g)
            for r in RANGES:
                inputs[r, i] = x
                x = shards[r](x)
        tol = Tolerance.for_precision(str(dtype).removeprefix("torch."), quant)
        base["worlds"][prec] = {"shards": shards, "inputs": inputs, "tol": tol}
    return base["worlds"][prec]


def _run(base, w, server, r, reqs, fed=None, **kw):
    """Serve ``fed`` (default ``reqs``) on ``server`` and verify each as request ``reqs[i]``."""
    rt = ShardRuntime(server)

    async def go():
        try:
            return await serve_stage(rt, base["ident"], base["info"].content_hash,
                                     [w["inputs"][r, i] for i in (fed or reqs)], P, **kw)
        finally:
            await rt.aclose()

    served = asyncio.run(go())
    return [verify_stage(w["shards"][r], w["inputs"][r, i], s.records, s.binding, peer=base["ident"].peer_id,
                         tol=w["tol"], expected_positions=s.positions) for i, s in zip(reqs, served, strict=True)]


@pytest.mark.parametrize("prec", list(PRECISIONS))
def test_honest_runs_pass(base, prec):
    """A batch of 6 at 1 thread, some of them in reverse order at 2 threads, one alone."""
    w = _world(base, prec)
    verdicts = []
    try:
        for r in RANGES:
            for th, reqs in [(1, list(range(NREQ))), (2, [4, 3, 2]), (1, [1])]:
                torch.set_num_threads(th)
                verdicts += _run(base, w, w["shards"][r], r, reqs)
    finally:
        torch.set_num_threads(1)
    assert len(verdicts) == 3 * (NREQ + 4)
    bad = [(v.start, v.end, v.reason) for v in verdicts if not v.ok]
    assert not bad, bad


def _attack_verdicts(base, prec, attack):
    w = _world(base, prec)
    dtype, quant = PRECISIONS[prec]
    reqs = [0, 1]
    verdicts = []
    if attack == "skip_layer":
        for r in RANGES:
            verdicts += _run(base, w, skip_layer(w["shards"][r]), r, reqs)
    elif attack == "perturb_weights":
        rel, ranges = NOISE[prec]
        for r in ranges:
            verdicts += _run(base, w, perturbed_shard(base["path"], *r, rel, dtype=dtype, quantization=quant), r, reqs)
    elif attack == "lower_precision":
        for d, q in LOWER[prec]:
            for r in RANGES:
                verdicts += _run(base, w, load_shard(base["path"], *r, dtype=d, quantization=q), r, reqs)
    elif attack == "other_request":
        for r in RANGES:
            verdicts += _run(base, w, w["shards"][r], r, reqs, fed=reqs[1:] + reqs[:1])
    elif attack == "random_states":
        for r in RANGES:
            verdicts += _run(base, w, w["shards"][r], r, reqs,
                             outputs_override=lambda i, p, y: random_like(y, 1000 * i + p))
    return verdicts


# Nothing lower than nf4 can be served in its place, so nf4 has no lower-precision attack.
@pytest.mark.parametrize("prec,attack", [
    (prec, attack) for prec in PRECISIONS
    for attack in ("skip_layer", "perturb_weights", "lower_precision", "other_request", "random_states")
    if attack != "lower_precision" or LOWER[prec]])
def test_attacks_fail(base, prec, attack):
    verdicts = _attack_verdicts(base, prec, attack)
    outcome = Counter(v.status for v in verdicts)
    assert verdicts and outcome["fail"] == len(verdicts), outcome


def test_quantized_16bit_gets_the_looser_limits():
    """nf4 computing in bfloat16 varies like bfloat16 (measured: max 0.035, mean 0.012)."""
    assert Tolerance.for_precision("bfloat16", "nf4") == Tolerance.for_precision("bfloat16")
    assert Tolerance.for_precision("float32", "nf4").mean_err < Tolerance.for_precision("bfloat16").mean_err
    assert Tolerance.for_precision("float32", "int8") == Tolerance.for_precision("float16", "int8")
    assert Tolerance.for_precision("float32") == Tolerance()
