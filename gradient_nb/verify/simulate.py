"""In-process serving of a stage, honest or dishonest, for calibration, tests and the benchmark.

``serve_stage`` drives a real :class:`ShardRuntime` the way the mesh does (a prefill call, then one
decode call per token, several requests batched together) and commits to what it outputs, exactly as
a serving peer does. The dishonest variants are test fault injection: they exist to measure how
often the verifier catches each attack, and nothing in the serving path ever uses them.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..mesh.identity import Identity
from ..models.loader import ShardModel, load_shard
from ..serve.shard import ShardRuntime
from .commitments import Binding, CommitmentBuilder
from .verifier import Tolerance, Verdict, verify_stage

ATTACKS = ("skip_layer", "perturb_weights", "nf4_not_fp32", "other_request", "random_states")


@dataclass
class Served:
    """One request served by a stage: what went in, what came out, what was committed."""

    binding: Binding
    inputs: torch.Tensor  # everything the stage was fed, in order ([T] ids or [T, H])
    outputs: list[torch.Tensor] = field(default_factory=list)  # per call
    records: list[dict[str, Any]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # positions whose output was committed


def _committed_rows(shard_is_last: bool, pos: int, x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor]:
    if shard_is_last:  # the last stage outputs the logits of the call's last position only
        return pos + x.shape[0] - 1, y.reshape(1, -1)
    return pos, y


async def serve_stage(runtime: ShardRuntime, identity: Identity, model_hash: str, requests: Sequence[torch.Tensor],
                      prompt_len: int, *, outputs_override: Callable[[int, int, torch.Tensor], torch.Tensor] | None
                      = None, commit_binding: Callable[[int], Binding] | None = None) -> list[Served]:
    """Serve ``requests`` (each: the stage's inputs for every position) concurrently on ``runtime``.

    Each request gets a prefill of ``prompt_len`` inputs then one decode call per further input;
    their calls are interleaved so the runtime batches them. ``outputs_override(request, pos, y)``
    lets a dishonest stage replace what it returns (and so commits to).
    """
    start, end = runtime.start, runtime.end
    served = [Served(Binding(model_hash, start, end, f"{identity.peer_id}/{secrets.token_hex(8)}"), inp)
              for inp in requests]
    builders = [CommitmentBuilder(identity, commit_binding(i) if commit_binding else s.binding)
                for i, s in enumerate(served)]

    async def one(i: int) -> None:
        s, inp = served[i], requests[i]
        sid = s.binding.request
        calls = [(0, inp[:prompt_len])] + [(p, inp[p:p + 1]) for p in range(prompt_len, inp.shape[0])]
        try:
            for pos, x in calls:
                y = await runtime.forward(sid, range(pos, pos + x.shape[0]), x)
                if outputs_override is not None:
                    y = outputs_override(i, pos, y)
                s.outputs.append(y)
                p0, rows = _committed_rows(runtime.is_last, pos, x, y)
                s.positions.extend(range(p0, p0 + rows.shape[0]))
                s.records += builders[i].push(p0, rows)
            s.records += builders[i].flush()
        finally:
            runtime.drop(sid)

    await asyncio.gather(*(one(i) for i in range(len(requests))))
    return served


def serve_and_verify(server: ShardModel, verifier: ShardModel, inputs: Sequence[torch.Tensor], prompt_len: int,
                     identity: Identity, model_hash: str, *, tol: Tolerance | None = None,
                     fed: Sequence[torch.Tensor] | None = None,
                     outputs_override: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None
                     ) -> list[Verdict]:
    """Serve ``fed`` (default: ``inputs``) as one batch on a fresh runtime of ``server``, then verify each
    served request as ``verifier`` (another copy of the layers) re-computes the matching ``inputs``."""
    runtime = ShardRuntime(server)

    async def go() -> list[Served]:
        try:
            return await serve_stage(runtime, identity, model_hash, inputs if fed is None else fed, prompt_len,
                                     outputs_override=outputs_override)
        finally:
            await runtime.aclose()

    return [verify_stage(verifier, x, s.records, s.binding, peer=identity.peer_id, tol=tol,
                         expected_positions=s.positions)
            for x, s in zip(inputs, asyncio.run(go()), strict=True)]


# ------------------------------------------------------------------------------- attacks


def skip_layer(shard: ShardModel, which: int = -1) -> ShardModel:
    """The same shard minus one decoder layer (weights shared, nothing copied)."""
    layers = list(shard.layers)
    del layers[which]
    s = copy.copy(shard)
    s._modules = dict(shard._modules)
    s._modules["layers"] = nn.ModuleList(layers)
    return s


def perturb_weights(shard: ShardModel, rel: float = 0.01, seed: int = 0) -> ShardModel:
    """A deep copy whose decoder weights carry Gaussian noise of ``rel`` x each matrix's std."""
    s = copy.deepcopy(shard)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.layers.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * (rel * float(p.std())))
    return s


def perturbed_shard(path: Any, start: int, end: int, rel: float = 0.01, *, dtype: torch.dtype = torch.float32,
                    quantization: str | None = None, seed: int = 0) -> ShardModel:
    """Layers ``start..end`` at ``dtype`` / ``quantization`` whose weights carried noise of ``rel`` x each
    matrix's std before quantizing (quantized weights cannot be perturbed in place: they are packed)."""
    s = perturb_weights(load_shard(path, start, end, dtype=dtype), rel, seed)
    if quantization is not None:
        from ..models.quantize import quantize_linears

        quantize_linears(s.layers, quantization, dtype=dtype)
        s.quantization = quantization
    return s


def nf4_shard(path: Any, start: int, end: int) -> ShardModel:
    return load_shard(path, start, end, quantization="nf4")


def random_like(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Random states with the same per-row scale as the honest ones (the cheapest forgery)."""
    g = torch.Generator().manual_seed(seed)
    rms = y.float().pow(2).mean(-1, keepdim=True).sqrt()
    return (torch.randn(y.shape, generator=g) * rms).to(y.dtype)


def apply_test_fault(shard: ShardModel, spec: str) -> ShardModel:
    """The dishonest shard a test asks for: ``skip_layer`` or ``perturb_weights[:REL]``."""
    kind, _, arg = spec.partition(":")
    if kind == "skip_layer":
        return skip_layer(shard)
    if kind == "perturb_weights":
        return perturb_weights(shard, float(arg) if arg else 0.01)
    raise ValueError(f"unknown test fault {spec!r}: skip_layer or perturb_weights[:REL]")
