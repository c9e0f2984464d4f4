"""``gradient-nb bench serve``: the served model against the same model in one process, same run.

Prints one JSON object. Baseline: plain transformers ``generate`` (greedy, KV cache) in this process,
before any peer starts, so nothing competes with it. Then a local mesh of N serving peer processes:
single-stream tokens/s and time to first token, and the aggregate tokens/s of 8 concurrent streams,
each as a ratio to the baseline.

``--delay-ms D`` runs the mesh in the NAT lab instead (root needed): the entry and each serving peer on
a LAN of its own behind a cone NAT whose router holds every packet leaving the LAN D ms
(``testing/natlab.py``), and reports per-token latency and time to first token against their bounds:
the one-process compute plus (N + 1) x D, what forwarding (N + 1 messages a step) cannot beat; and
8 streams with one and with two micro-batches in flight per chain (pipelining), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "What does a compiler do?",
    "Name a famous painter.",
    "How many legs does a spider have?",
    "Give me a tip for learning to code.",
]


def _prompts(model: str | None) -> tuple:
    from ..models import load_tokenizer, resolve_model

    path = resolve_model(model) if model else resolve_model()
    tok = load_tokenizer(path)
    ids_list = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]) for p in PROMPTS]
    return path, tok, ids_list


def _baseline(path, tokenizer, ids_list: list[list[int]], new_tokens: int) -> dict[str, float]:
    from ..models import load_full_model

    model = load_full_model(path)
    model.eval()
    rates, ttfts = [], []
    with torch.inference_mode():
        for ids in ids_list[:3]:
            x = torch.tensor([ids])
            start = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            ttfts.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            rates.append((out.shape[1] - x.shape[1]) / (time.perf_counter() - start))
    del model
    return {"tokens_per_s": statistics.median(rates), "ttft_s": statistics.median(ttfts)}


async def _one(engine, ids: list[int], p) -> tuple[int, float, float]:
    start = time.perf_counter()
    first = None
    n = 0
    async for _ in engine.generate(ids, p):
        first = first or time.perf_counter() - start
        n += 1
    return n, first or 0.0, time.perf_counter() - start


async def _measure(engine, ids_list: list[list[int]], tokens: int) -> dict[str, float]:
    """Single-stream tokens/s and time to first token (medians of 3), then 8 concurrent streams' tokens/s."""
    from ..serve.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    # Both sides generate exactly `tokens` tokens: the baseline with min_new_tokens, the mesh by not
    # stopping at EOS.
    engine.eos_ids = set()
    await _one(engine, ids_list[0], SamplingParams(temperature=0.0, max_tokens=4))  # links and caches warm
    # The stages' own compute (as they report it): of a prefill alone, then of the singles' decode steps.
    stages = [(s.peer_id, s.start, s.end) for s in engine.current_route()]
    await _one(engine, ids_list[1], SamplingParams(temperature=0.0, max_tokens=1))
    prefill_compute = sum(engine.last_compute_ms.get(k, 0.0) for k in stages) / 1000
    singles = [await _one(engine, ids, params) for ids in ids_list[:3]]
    decode_compute = sum(engine.stage_compute_ms.get(k, 0.0) for k in stages) / 1000
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(engine, ids, params) for ids in ids_list[:8]))
    return {"prefill_compute": prefill_compute, "decode_compute": decode_compute,
            "single": statistics.median(n / t for n, _, t in singles),
            "ttft": statistics.median(f for _, f, _ in singles),
            "agg": sum(n for n, _, _ in results) / (time.perf_counter() - start)}


async def _streams(engine, ids_list: list[list[int]], tokens: int) -> float:
    """Aggregate tokens/s of 8 concurrent greedy streams."""
    from ..serve.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(engine, ids, params) for ids in ids_list[:8]))
    return sum(n for n, _, _ in results) / (time.perf_counter() - start)


async def _pipelining(engine, ids_list: list[list[int]], tokens: int) -> dict[str, float]:
    """8 streams with 1 and with 2 micro-batches in flight per chain, in the same run, in the order
    1, 2, 2, 1 (so a drift of the machine's speed over the runs weighs on both alike); means of two."""
    before = engine.micro_batches
    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        for k in (1, 2, 2, 1):
            engine.micro_batches = k
            rates[k].append(await _streams(engine, ids_list, tokens))
    finally:
        engine.micro_batches = before
    un, pi = statistics.mean(rates[1]), statistics.mean(rates[2])
    return {"unpipelined_8_streams_tokens_per_s": round(un, 2), "pipelined_8_streams_tokens_per_s": round(pi, 2),
            "pipelined_over_unpipelined_8_streams": round(pi / un, 3)}


async def _run(args: argparse.Namespace) -> dict:
    if args.delay_ms is not None:
        return await _run_delayed(args)
    from ..serve.cluster import start_local_cluster
    from ..verify import attach_verification

    path, tok, ids_list = _prompts(args.model)
    base = await asyncio.to_thread(_baseline, path, tok, ids_list, args.tokens)
    layers = [tuple(int(v) for v in r.split(":")) for r in args.layers.split(",")] if args.layers else None
    peer_args = ["--threads", str(args.peer_threads)] if args.peer_threads else None
    cluster = await start_local_cluster(args.peers, model=args.model, layers=layers, peer_args=peer_args)
    try:
        engine = cluster.engine
        attach_verification(engine)  # as users serve: 1% of requests verified
        engine.forwarding = not args.star
        if args.micro_batches:
            engine.micro_batches = args.micro_batches
        model_name = engine.model_name
        figures = await _measure(engine, ids_list, args.tokens)
        single_rate, ttft, agg_rate = figures["single"], figures["ttft"], figures["agg"]
        stage_ms = {f"{k[0][:8]}[{k[1]}:{k[2]}]": round(v, 2) for k, v in engine.stage_compute_ms.items()}
        alloc = cluster.allocation()
        mesh_figures = {
            "allocation": [[(s.peer_id[:8], s.start, s.end) for s in pipe] for pipe in alloc.pipelines],
            "forwarding": engine.forwarding, "step_calls": engine.step_calls,
            "micro_batches": engine.micro_batches_for(engine.current_route()),
            "stages_decode_compute_s": round(figures["decode_compute"], 4), "stage_compute_ms_8_streams": stage_ms,
        }
    finally:
        await cluster.stop()
    # The baseline again, now that the peers are gone: on a shared machine the faster of the two runs is
    # the fair (conservative) one to divide by.
    again = await asyncio.to_thread(_baseline, path, tok, ids_list, args.tokens)
    base = {"tokens_per_s": max(base["tokens_per_s"], again["tokens_per_s"]),
            "ttft_s": min(base["ttft_s"], again["ttft_s"])}
    return {
        "benchmark": "serve", "model": model_name, "peers": args.peers, "peer_threads": args.peer_threads, **mesh_figures,
        "new_tokens": args.tokens,
        "baseline_one_process_tokens_per_s": round(base["tokens_per_s"], 2),
        "baseline_one_process_ttft_s": round(base["ttft_s"], 4),
        "mesh_single_stream_tokens_per_s": round(single_rate, 2),
        "mesh_single_stream_ratio": round(single_rate / base["tokens_per_s"], 3),
        "mesh_ttft_s": round(ttft, 4),
        "mesh_ttft_ratio": round(ttft / base["ttft_s"], 3),
        "mesh_8_streams_tokens_per_s": round(agg_rate, 2),
        "mesh_8_streams_ratio_to_one_process_single": round(agg_rate / base["tokens_per_s"], 3),
    }


async def _run_delayed(args: argparse.Namespace) -> dict:
    """The mesh in the NAT lab with ``args.delay_ms`` on every packet leaving a LAN; the entry runs in a
    LAN of its own too (``--entry`` mode of this module), the baseline here."""
    import subprocess
    import sys

    from ..testing.meshprobe import read_json_line, start_rendezvous
    from ..testing.natlab import NatLab

    path, tok, ids_list = _prompts(args.model)
    base = await asyncio.to_thread(_baseline, path, tok, ids_list, args.tokens)
    layers = [r.split(":") for r in args.layers.split(",")] if args.layers else None
    n = len(layers) if layers else args.peers
    hosts = {"entry": "cone", **{f"s{i + 1}": "cone" for i in range(n)}}
    with NatLab(hosts, delay_ms=args.delay_ms) as lab:
        _, url = await asyncio.to_thread(start_rendezvous, lab)
        stun = ["--stun", lab.ice_config("entry").stun or ""]
        for i in range(n):
            lab.spawn(f"s{i + 1}", [sys.executable, "-m", "gradient_nb.cli", "peer", "--rendezvous", url,
                                    "--name", f"shard-{i + 1}", "--ephemeral", *stun, "--serve", args.model or "default",
                                    *(["--layers", ":".join(layers[i])] if layers else []),
                                    *(["--threads", str(args.peer_threads)] if args.peer_threads else [])],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        entry = lab.spawn("entry", [sys.executable, "-m", "gradient_nb.bench.serve", "--entry", url, *stun,
                                    "--peers", str(n), "--tokens", str(args.tokens),
                                    *(["--model", args.model] if args.model else []),
                                    *(["--star"] if args.star else []),
                                    *(["--micro-batches", str(args.micro_batches)] if args.micro_batches else [])],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        mesh_figures = await asyncio.to_thread(read_json_line, entry, 1800)
    again = await asyncio.to_thread(_baseline, path, tok, ids_list, args.tokens)
    base = {"tokens_per_s": max(base["tokens_per_s"], again["tokens_per_s"]),
            "ttft_s": min(base["ttft_s"], again["ttft_s"])}
    d = args.delay_ms / 1000
    m = dict(mesh_figures)
    single, agg, ttft, model = m.pop("single"), m.pop("agg"), m.pop("ttft"), m.pop("model")
    prefill, decode = m.pop("prefill_compute"), m.pop("decode_compute")
    # The bounds: the stages' own compute in this run (what they report) plus one delay per message on a
    # step's path, N + 1 with forwarding. The prefill's bound leaves out its bytes' transfer time.
    token_bound = decode + (len(m["route"]) + 1) * d
    ttft_bound = prefill + (len(m["route"]) + 1) * d
    return {
        "benchmark": "serve", "model": model, "peers": n, "delay_ms": args.delay_ms, "new_tokens": args.tokens,
        **m,
        "baseline_one_process_tokens_per_s": round(base["tokens_per_s"], 2),
        "baseline_one_process_ttft_s": round(base["ttft_s"], 4),
        "stages_decode_compute_s": round(decode, 4), "stages_prefill_compute_s": round(prefill, 4),
        "token_latency_bound_s": round(token_bound, 4),
        "mesh_token_latency_s": round(1 / single, 4),
        "token_latency_over_bound": round(1 / single / token_bound, 3),
        "ttft_bound_s": round(ttft_bound, 4),
        "mesh_ttft_s": round(ttft, 4),
        "ttft_over_bound": round(ttft / ttft_bound, 3),
        "mesh_single_stream_tokens_per_s": round(single, 2),
        "mesh_8_streams_tokens_per_s": round(agg, 2),
        "mesh_8_streams_over_single": round(agg / single, 3),
    }


async def _entry(args: argparse.Namespace) -> dict:
    """``--entry URL``: this process is the entry peer of a mesh already serving (the NAT lab's)."""
    from ..mesh.ice import IceConfig
    from ..mesh.identity import Identity
    from ..mesh.peer import join
    from ..serve.cluster import wait_ready
    from ..serve.pipeline import MeshEngine
    from ..verify import attach_verification

    _, _, ids_list = _prompts(args.model)
    mesh = await join(args.entry, name="entry", identity=Identity.generate(), ice=IceConfig(stun=args.stun),
                      probe_seconds=0.05)
    try:
        engine = await asyncio.to_thread(MeshEngine, mesh, args.model)
        if args.micro_batches:
            engine.micro_batches = args.micro_batches
        engine.forwarding = not args.star
        attach_verification(engine)
        await wait_ready(mesh, engine, args.peers, 900)
        route = engine.current_route()
        figures = await _measure(engine, ids_list, args.tokens)
        if engine.forwards(route):  # pipelining is a forwarding chain's (the star keeps one group)
            figures.update(await _pipelining(engine, ids_list, args.tokens))
        links = mesh.links()
        out = {"model": engine.model_name, "route": [[s.peer_id[:8], s.start, s.end] for s in route],
               "forwarding": engine.forwards(route), "step_calls": engine.step_calls,
               "links_from_entry": sorted({str(v.get("type")) for v in links.values()}),
               "hop_overhead_ms": round(1000 * engine.hop_overhead_s, 2),
               "micro_batches": engine.micro_batches_for(route), **figures}
        await engine.aclose()
        return out
    finally:
        await mesh.leave()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradient-nb bench serve")
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--layers", default=None, help="e.g. 0:10,10:20,20:30 (default: the scheduler)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--model", default=None)
    p.add_argument("--peer-threads", type=int, default=None, help="CPU threads per serving peer process")
    p.add_argument("--delay-ms", type=float, default=None,
                   help="run the peers in the NAT lab with this one-way delay leaving each LAN (needs root)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="groups of concurrent requests in flight along a chain (default: the engine's choice)")
    p.add_argument("--star", action="store_true", help="the entry calls every stage (no forwarding)")
    p.add_argument("--entry", help=argparse.SUPPRESS)  # the NAT lab's entry process (see _run_delayed)
    p.add_argument("--stun", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(_entry(args) if args.entry else _run(args))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
