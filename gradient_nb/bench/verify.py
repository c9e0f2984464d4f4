"""``gradient-nb bench verify``: what verification costs, against the inference it checks, same run.

Prints one JSON object. The bundled model is split in three stages (0:10, 10:20, 20:30), each on
its own ShardRuntime in this process, and a greedy generation runs through them as the mesh does
(one prefill, then a decode call per token per stage), alternately without and with the
commitments a serving peer computes (top-k + signing, exactly ``ServingPeer._commit``'s builder).
Then every stage is verified as the entry peer would: one prefill of the stage over everything it
was given, plus the comparison with the commitments.

Figures (each a ratio of times measured in this run, medians over the repetitions):
- ``serving_slowdown_with_commitments``: the time spent computing and signing commitments (inline
  on the serving path) / the generation time; ``serving_slowdown_end_to_end`` is the plain
  difference of the two generation timings, which the noise of a shared machine dominates;
- ``full_verification_over_generation``: verifying every stage / the generation it checks;
- ``cost_fraction_at_default_rate``: the expected verification time per request at the default
  sampling rate (each stage drawn with probability ``rate``) / the generation time;
- ``commitment_bytes_per_token``: per stage, signed records' bytes / committed tokens.

With ``--detection N``, also the detection rate of each attack over N verifications (and the false
positives over N honest ones), served and verified in this process as tests/verify does.

``--precisions nf4,float16,bfloat16,int8`` instead reproduces the calibration of each precision's
limits (``Tolerance.for_precision``): per precision, ``--honest`` honest verifications (requests of
``--lengths`` tokens, batch sizes 1..8, other batch positions, 1 and 2 threads; the server and the
verifier each hold their own copy of the layers) with their false positives and the worst and mean
error and overlap against the limits, then ``--runs`` runs of each attack (skipped layer, another
request's states, random states, a lower precision served than announced, weight noise at each level
of ``NOISE``) with the number caught, per stage. Everything goes through ``verify_stage``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from typing import Any

import torch

from ..mesh.identity import Identity
from ..models import load_shard, load_tokenizer, model_info, resolve_model
from ..serve.shard import ShardRuntime
from ..verify.commitments import Binding, CommitmentBuilder
from ..verify.policy import DEFAULT_RATE
from ..verify.verifier import ChunkCheck, Tolerance, verify_stage

STAGES = [(0, 10), (10, 20), (20, 30)]
PROMPT = ("Summarise in a few sentences why the sky is blue, mentioning Rayleigh scattering, the "
          "wavelengths of sunlight, and why sunsets look red. Then give one everyday example.")


async def _generate(runtimes: list[ShardRuntime], prompt: list[int], new_tokens: int, commit: bool,
                    ident: Identity, model_hash: str, rep: int) -> dict[str, Any]:
    session = f"{ident.peer_id}/bench-{rep}-{int(commit)}"
    builders = [CommitmentBuilder(ident, Binding(model_hash, rt.start, rt.end, session)) for rt in runtimes]
    inputs: list[list[torch.Tensor]] = [[] for _ in runtimes]
    records: list[list[dict]] = [[] for _ in runtimes]
    tokens = list(prompt)
    pos = 0
    commit_s = 0.0
    start = time.perf_counter()
    for _ in range(new_tokens):
        x = torch.tensor(tokens[pos:], dtype=torch.int64)
        n = x.shape[0]
        for i, rt in enumerate(runtimes):
            inputs[i].append(x)
            y = await rt.forward(session, range(pos, pos + n), x)
            if commit:  # what ServingPeer._commit does per call
                c0 = time.perf_counter()
                records[i] += builders[i].push(pos + n - 1, y.reshape(1, -1)) if rt.is_last else builders[i].push(pos, y)
                commit_s += time.perf_counter() - c0
            x = y
        pos = len(tokens)
        tokens.append(int(x.argmax()))
    if commit:
        c0 = time.perf_counter()
        for i in range(len(runtimes)):
            records[i] += builders[i].flush()
        commit_s += time.perf_counter() - c0
    elapsed = time.perf_counter() - start
    for rt in runtimes:
        rt.drop(session)
    return {"s": elapsed, "inputs": [torch.cat(p) for p in inputs], "records": records, "session": session, "commit_s": commit_s,
            "tokens": tokens}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    path = resolve_model()
    info = model_info(path)
    tok = load_tokenizer(path)
    prompt = list(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"])
    ident = Identity.generate()
    shards = [load_shard(path, s, e) for s, e in STAGES]
    runtimes = [ShardRuntime(s) for s in shards]
    verifiers = [load_shard(path, s, e) for s, e in STAGES]  # the verifier's own copy of the layers
    try:
        await _generate(runtimes, prompt, 4, True, ident, info.content_hash, -1)  # warm-up
        plain, committed, commit_work, verify_all, per_stage_bytes, statuses = [], [], [], [], [], []
        for rep in range(args.reps):
            # Alternate the order so drift on a shared machine hits both sides alike.
            order = (False, True) if rep % 2 == 0 else (True, False)
            for commit in order:
                g = await _generate(runtimes, prompt, args.tokens, commit, ident, info.content_hash, rep)
                (committed if commit else plain).append(g["s"])
                if commit:
                    last = g
                    commit_work.append(g["commit_s"] / g["s"])
            t0 = time.perf_counter()
            verdicts = []
            for i, (s, e) in enumerate(STAGES):
                b = Binding(info.content_hash, s, e, last["session"])
                verdicts.append(await asyncio.to_thread(verify_stage, verifiers[i], last["inputs"][i],
                                                        last["records"][i], b, peer=ident.peer_id,
                                                        tol=Tolerance()))
            verify_all.append(time.perf_counter() - t0)
            statuses += [v.status for v in verdicts]
            per_stage_bytes = [(v.commitment_bytes, v.committed_tokens) for v in verdicts]
        gen = statistics.median(plain)
        gen_c = statistics.median(committed)
        ver = statistics.median(verify_all)
        rate = args.rate
        return {
            "benchmark": "verify",
            "model": info.name,
            "stages": [list(r) for r in STAGES],
            "prompt_tokens": len(prompt),
            "new_tokens": args.tokens,
            "reps": args.reps,
            "torch_threads": args.threads,
            "sampling_rate": rate,
            "generation_s": round(gen, 4),
            "generation_with_commitments_s": round(gen_c, 4),
            # The commitment work runs inline on the serving path, so its measured share of the
            # generation is the slowdown; the end-to-end difference of two noisy timings is given too.
            "serving_slowdown_with_commitments": round(statistics.median(commit_work), 5),
            "serving_slowdown_end_to_end": round(gen_c / gen - 1, 4),
            "full_verification_s": round(ver, 4),
            "full_verification_over_generation": round(ver / gen, 4),
            # each stage is drawn independently with probability `rate`: expected cost = rate x all stages
            "cost_fraction_at_default_rate": round(rate * ver / gen, 6),
            "commitment_bytes_per_token": {f"{s}:{e}": round(b / max(n, 1), 2)
                                           for (s, e), (b, n) in zip(STAGES, per_stage_bytes, strict=True)},
            "commitment_bytes_per_token_all_stages": round(
                sum(b for b, _ in per_stage_bytes) / (len(prompt) + args.tokens - 1), 2),
            "verdicts": {s: statuses.count(s) for s in sorted(set(statuses))},
            "targets": {"cost_fraction_at_default_rate": 0.01, "serving_slowdown_with_commitments": 0.02},
        }
    finally:
        for rt in runtimes:
            await rt.aclose()


def _detection(path: Any, info: Any, runs: int) -> dict[str, Any]:
    from ..verify.simulate import nf4_shard, perturb_weights, random_like, serve_and_verify, skip_layer

    ident = Identity.generate()
    shards = {r: load_shard(path, *r) for r in STAGES}
    per_stage = -(-runs // len(STAGES))
    inputs = _chain(shards, info, 20, per_stage + 1, seed=99)
    out: dict[str, Any] = {}
    for attack in ("honest", "skip_layer", "perturb_weights", "nf4_not_fp32", "other_request", "random_states"):
        caught = total = 0
        for r in STAGES:
            honest = shards[r]
            server = {"skip_layer": lambda h: skip_layer(h), "perturb_weights": lambda h: perturb_weights(h, 0.01),
                      "nf4_not_fp32": lambda h, r=r: nf4_shard(path, *r)}.get(attack, lambda h: h)(honest)
            reqs = inputs[r][:per_stage]
            verdicts = serve_and_verify(
                server, honest, reqs, 6, ident, info.content_hash,
                fed=inputs[r][1:per_stage + 1] if attack == "other_request" else None,  # the next request's
                outputs_override=(lambda i, p, y: random_like(y, 1000 * i + p)) if attack == "random_states" else None)
            caught += sum(not v.ok for v in verdicts)
            total += len(verdicts)
        key = "honest_false_positive_rate" if attack == "honest" else attack
        out[key] = {"rate": round(caught / total, 4), "runs": total}
    return out


def _chain(shards: dict[tuple[int, int], Any], info: Any, tokens: int, n: int, seed: int
           ) -> dict[tuple[int, int], list[torch.Tensor]]:
    """``n`` random requests of ``tokens`` ids: per stage, its honest inputs (the earlier stages' outputs)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[tuple[int, int], list[torch.Tensor]] = {r: [] for r in STAGES}
    with torch.inference_mode():
        for _ in range(n):
            x = torch.randint(100, info.vocab_size - 100, (tokens,), generator=g)
            for r in STAGES:
                out[r].append(x)
                x = shards[r](x)
    return out


# ------------------------------------------------------------------ per-precision calibration
# (dtype, quantization) as a serving peer announces them; nf4 and int8 compute in float32 on CPU.
PRECISIONS = {"float32": (torch.float32, None), "nf4": (torch.float32, "nf4"), "int8": (torch.float32, "int8"),
              "float16": (torch.float16, None), "bfloat16": (torch.bfloat16, None)}
# What a cheaper peer could serve while announcing each precision (a quantization at the announced dtype).
SERVED_INSTEAD = {"float32": ("float16", "bfloat16", "int8", "nf4"), "float16": ("bfloat16", "int8", "nf4"),
                  "bfloat16": ("int8", "nf4"), "int8": ("nf4",), "nf4": ()}
# Weight noise levels (x each matrix's std): 1 %, and the sweeps where 1 % is not always caught.
NOISE = {"float32": (0.01,), "nf4": (0.01,), "float16": (0.01,), "bfloat16": (0.01, 0.02, 0.03, 0.05),
         "int8": (0.01, 0.05, 0.1)}
# Honest serving, per stage and request length: (threads, requests of a pool of 24) per batch, so a
# request is served at batch sizes 1..8, at other batch positions, with 1 and 2 threads (44 slots).
HONEST_BATCHES = [(1, range(8)), (1, range(7, -1, -1)), (1, range(8, 16)), (1, range(16, 24)), (1, [3]),
                  (2, [20, 21, 22]), (2, range(4, 12))]
PROMPT_LEN, ATTACK_TOKENS, ATTACK_BATCH = 6, 20, 9


def _honest_batches(n: int) -> list[tuple[int, list[int]]]:
    """The first ``n`` slots of ``HONEST_BATCHES`` (cycled), as batches."""
    out: list[tuple[int, list[int]]] = []
    while n > 0:
        for threads, reqs in HONEST_BATCHES:
            take = list(reqs)[:n]
            if take:
                out.append((threads, take))
            n -= len(take)
    return out


def _run_stats(v: Any) -> tuple[float, float, float, float]:
    """What the limits apply to, at a verdict's worst chunk: max err, mean err, min and mean overlap."""
    c = v.chunks or [ChunkCheck(0, 0, math.inf, math.inf, 0.0, 0.0, False)]
    return (max(x.max_err for x in c), max(x.mean_err for x in c), min(x.min_overlap for x in c),
            min(x.mean_overlap for x in c))


def _honest_summary(verdicts: list[Any], tol: Tolerance) -> dict[str, Any]:
    stats = zip(*map(_run_stats, verdicts), strict=True)
    limits = (tol.max_err, tol.mean_err, tol.min_overlap, tol.mean_overlap)
    return {"runs": len(verdicts), "false_positives": sum(not v.ok for v in verdicts),
            **{name: {"worst": round(worst(x), 6), "mean": round(statistics.fmean(x), 6), "limit": limit}
               for name, worst, x, limit in zip(("max_err", "mean_err", "min_overlap", "mean_overlap"),
                                                (max, max, min, min), stats, limits, strict=True)}}


def _precision(path: Any, info: Any, ident: Identity, prec: str, honest: int, runs: int,
               lengths: list[int], only: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """Honest variation against the precision's limits, and each attack's detection rate, through
    ``verify_stage``: a server and a verifier each load their own copy of the layers at ``prec``."""
    from ..verify.simulate import perturbed_shard, random_like, serve_and_verify, skip_layer

    t0 = time.perf_counter()
    dtype, quant = PRECISIONS[prec]
    tol = Tolerance.for_precision(str(dtype).removeprefix("torch."), quant)

    def load(r: tuple[int, int], served: str = prec) -> Any:
        d, q = PRECISIONS[served]
        return load_shard(path, *r, dtype=dtype if q else d, quantization=q)

    verifiers = {r: load(r) for r in STAGES}
    servers = {r: load(r) for r in STAGES}

    def run(server: Any, r: tuple[int, int], inputs: list[torch.Tensor], **kw: Any) -> list[Any]:
        return serve_and_verify(server, verifiers[r], inputs, PROMPT_LEN, ident, info.content_hash, tol=tol, **kw)

    per_stage = -(-honest // (len(lengths) * len(STAGES)))
    verdicts, base_threads = [], torch.get_num_threads()
    for tokens in lengths:
        pool = _chain(verifiers, info, tokens, 24, seed=1234)
        for r in STAGES:
            for threads, reqs in _honest_batches(per_stage):
                torch.set_num_threads(threads)
                verdicts += run(servers[r], r, [pool[r][i] for i in reqs])
            torch.set_num_threads(base_threads)
    out: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "quantization": quant,
                           "honest": _honest_summary(verdicts, tol), "attacks": {}}

    q = -(-runs // len(STAGES))  # requests per stage, served in batches of ATTACK_BATCH
    pool = _chain(verifiers, info, ATTACK_TOKENS, q + 1, seed=1234)  # the first of the honest 20-token ones
    attacks = {"skip_layer": lambda r: skip_layer(servers[r]), "other_request": servers.get,
               "random_states": servers.get,
               **{f"served_{p}": (lambda r, p=p: load(r, p)) for p in SERVED_INSTEAD[prec]},
               **{f"weight_noise_{rel}": (lambda r, rel=rel: perturbed_shard(path, *r, rel, dtype=dtype,
                                                                             quantization=quant))
                  for rel in NOISE[prec]}}
    for name, make in attacks.items():
        if not name.startswith(only):
            continue
        by_stage, stats = {}, []
        for r in STAGES:
            server, found = make(r), []
            for b in range(0, q, ATTACK_BATCH):
                reqs = range(b, min(b + ATTACK_BATCH, q))
                found += run(server, r, [pool[r][i] for i in reqs],
                             fed=[pool[r][i + 1] for i in reqs] if name == "other_request" else None,
                             outputs_override=(lambda i, p, y: random_like(y, 1000 * i + p))
                             if name == "random_states" else None)
            by_stage[f"{r[0]}:{r[1]}"] = [sum(not v.ok for v in found), len(found)]
            stats += map(_run_stats, found)
        out["attacks"][name] = {"caught": sum(c for c, _ in by_stage.values()), "runs": len(stats),
                                "by_stage": by_stage,  # [caught, runs]
                                # the attack's mildest run: how close it came to the limits
                                "least_max_err": round(min(x[0] for x in stats), 6),
                                "least_mean_err": round(min(x[1] for x in stats), 6)}
    out["s"] = round(time.perf_counter() - t0, 1)
    return out


def _precisions(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    path = resolve_model()
    info = model_info(path)
    ident = Identity.generate()
    lengths = [int(t) for t in args.lengths.split(",")]
    return {"benchmark": "verify", "model": info.name, "stages": [list(r) for r in STAGES],
            "prompt_tokens": PROMPT_LEN, "honest_lengths": lengths, "attack_tokens": ATTACK_TOKENS,
            "torch_threads": args.threads,
            "precisions": {prec: _precision(path, info, ident, prec, args.honest, args.runs, lengths,
                                            tuple(args.attacks.split(",")))
                           for prec in args.precisions.split(",")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradient-nb bench verify", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=48, help="new tokens per generation")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="sampling rate (default: the policy's)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on shared CPUs)")
    p.add_argument("--detection", type=int, default=0, metavar="N",
                   help="also measure each attack's detection rate over N runs (0: skip)")
    p.add_argument("--precisions", default="", metavar="P,P",
                   help=f"instead, calibrate the limits of these precisions ({', '.join(PRECISIONS)}): honest "
                        "variation against the limits and each attack's detection rate")
    p.add_argument("--honest", type=int, default=264, metavar="N",
                   help="with --precisions: honest verifications per precision, over the lengths and stages")
    p.add_argument("--runs", type=int, default=54, metavar="N",
                   help="with --precisions: runs per attack per precision, over the stages (rounded up)")
    p.add_argument("--lengths", default="20,64", metavar="T,T", help="with --precisions: honest request lengths")
    p.add_argument("--attacks", default="", metavar="A,A",
                   help="with --precisions: only the attacks whose names start so (e.g. weight_noise,served_)")
    args = p.parse_args(argv)
    if args.precisions:
        unknown = set(args.precisions.split(",")) - set(PRECISIONS)
        if unknown:
            p.error(f"unknown precision {sorted(unknown)}: {', '.join(PRECISIONS)}")
        result = _precisions(args)
    else:
        result = asyncio.run(_run(args))
        if args.detection > 0:
            path = resolve_model()
            result["detection"] = _detection(path, model_info(path), args.detection)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
