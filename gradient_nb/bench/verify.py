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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import torch

from ..mesh.identity import Identity
from ..models import load_shard, load_tokenizer, model_info, resolve_model
from ..serve.shard import ShardRuntime
from ..verify.commitments import Binding, CommitmentBuilder
from ..verify.policy import DEFAULT_RATE
from ..verify.verifier import Tolerance, verify_stage

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
    from ..verify.simulate import nf4_shard, perturb_weights, random_like, serve_stage, skip_layer

    ident = Identity.generate()
    shards = {r: load_shard(path, *r) for r in STAGES}
    per_stage = -(-runs // len(STAGES))
    g = torch.Generator().manual_seed(99)
    ids = [torch.randint(100, info.vocab_size - 100, (20,), generator=g) for _ in range(per_stage + 1)]
    inputs: dict[tuple[tuple[int, int], int], torch.Tensor] = {}
    with torch.inference_mode():
        for i, x in enumerate(ids):
            for r in STAGES:
                inputs[r, i] = x
                x = shards[r](x)
    out: dict[str, Any] = {}
    for attack in ("honest", "skip_layer", "perturb_weights", "nf4_not_fp32", "other_request", "random_states"):
        caught = total = 0
        for r in STAGES:
            honest = shards[r]
            server = {"skip_layer": lambda h: skip_layer(h), "perturb_weights": lambda h: perturb_weights(h, 0.01),
                      "nf4_not_fp32": lambda h, r=r: nf4_shard(path, *r)}.get(attack, lambda h: h)(honest)
            reqs = list(range(per_stage))
            fed = reqs[1:] + reqs[:1] if attack == "other_request" else reqs
            override = (lambda i, p, y: random_like(y, 1000 * i + p)) if attack == "random_states" else None
            rt = ShardRuntime(server)

            async def go(rt: ShardRuntime = rt, fed: list[int] = fed, override: Any = override,
                         r: tuple[int, int] = r) -> list:
                try:
                    return await serve_stage(rt, ident, info.content_hash, [inputs[r, i] for i in fed], 6,
                                             outputs_override=override)
                finally:
                    await rt.aclose()

            served = asyncio.run(go())
            for i, s in zip(reqs, served, strict=True):
                v = verify_stage(honest, inputs[r, i], s.records, s.binding, peer=ident.peer_id,
                                 expected_positions=s.positions)
                caught += not v.ok
                total += 1
        key = "honest_false_positive_rate" if attack == "honest" else attack
        out[key] = {"rate": round(caught / total, 4), "runs": total}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradient-nb bench verify", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=48, help="new tokens per generation")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="sampling rate (default: the policy's)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on shared CPUs)")
    p.add_argument("--detection", type=int, default=0, metavar="N",
                   help="also measure each attack's detection rate over N runs (0: skip)")
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    if args.detection > 0:
        path = resolve_model()
        result["detection"] = _detection(path, model_info(path), args.detection)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
