"""``gradient-nb bench serve``: the served model against the same model in one process, same run.

Prints one JSON object. Baseline: plain transformers ``generate`` (greedy, KV cache) in this process,
before any peer starts, so nothing competes with it. Then a local mesh of N serving peer processes:
single-stream tokens/s and time to first token, and the aggregate tokens/s of 8 concurrent streams,
each as a ratio to the baseline.
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


async def _run(args: argparse.Namespace) -> dict:
    from ..models import load_tokenizer, resolve_model
    from ..serve.cluster import start_local_cluster
    from ..serve.sampling import SamplingParams
    from ..verify import attach_verification

    path = resolve_model(args.model) if args.model else resolve_model()
    tok = load_tokenizer(path)
    ids_list = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]) for p in PROMPTS]
    base = await asyncio.to_thread(_baseline, path, tok, ids_list, args.tokens)
    layers = [tuple(int(v) for v in r.split(":")) for r in args.layers.split(",")] if args.layers else None
    peer_args = ["--threads", str(args.peer_threads)] if args.peer_threads else None
    cluster = await start_local_cluster(args.peers, model=args.model, layers=layers, peer_args=peer_args)
    try:
        engine = cluster.engine
        attach_verification(engine)  # as users serve: 1% of requests verified
        model_name = engine.model_name
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens)
        # Both sides generate exactly args.tokens tokens: the baseline with min_new_tokens, the mesh by
        # not stopping at EOS.
        engine.eos_ids = set()

        async def one(ids: list[int], p: SamplingParams) -> tuple[int, float, float]:
            start = time.perf_counter()
            first = None
            n = 0
            async for _ in engine.generate(ids, p):
                first = first or time.perf_counter() - start
                n += 1
            return n, first or 0.0, time.perf_counter() - start

        await one(ids_list[0], SamplingParams(temperature=0.0, max_tokens=4))  # links and caches warm
        singles = [await one(ids, params) for ids in ids_list[:3]]
        single_rate = statistics.median(n / t for n, _, t in singles)
        ttft = statistics.median(f for _, f, _ in singles)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(ids, params) for ids in ids_list[:8]))
        agg_rate = sum(n for n, _, _ in results) / (time.perf_counter() - start)
        alloc = cluster.allocation()
        mesh_figures = {
            "allocation": [[(s.peer_id[:8], s.start, s.end) for s in pipe] for pipe in alloc.pipelines],
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradient-nb bench serve")
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--layers", default=None, help="e.g. 0:10,10:20,20:30 (default: the scheduler)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--model", default=None)
    p.add_argument("--peer-threads", type=int, default=None, help="CPU threads per serving peer process")
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(_run(args))))
    return 0
