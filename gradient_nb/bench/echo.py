"""``gradient-nb bench echo``: the three Echo modes on the same task, seeds and steps, one JSON object.

For ``colocated``, ``sequential`` and ``async``: ``reward_first`` / ``reward_last`` (mean reward of the
first / last quarter of the steps), ``samples_per_s`` (completions trained on per second, from the end
of the first step to the end of the last),
``step_s`` (mean wall time of a step), ``sync_ms`` (mean weight-sync time per step) and ``sync_bytes``
(adapter bytes moved per step, all samplers). Ratios measured in the same run:
``async_vs_sequential_samples_per_s`` and ``async_vs_colocated_reward`` (reward_last ratio).

To stand for separate machines on one box, the trainer is pinned to core 0 and the sampler processes
to the other cores, one torch thread each (``placement`` in the JSON says what was done). The default
model is the tiny char-level Llama (warm-started, ``gradient_nb.testing.tinymodel``) so a run takes a
minute on 2 cores; ``--model default`` runs the bundled SmolLM2-135M.

Each model gets the task settings where its first rewards are neither all 0 nor all 1 (GRPO learns only
from a group's differences): the tiny model answers of length 4 in 24 tokens, 16 a step; the 135M model,
which answers in prose, must fit a 12–24 letter answer into 12 tokens, 8 a step. ``--task-len``,
``--max-tokens``, ``--num-generations`` and ``--learning-rate`` override them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def _mode(args: argparse.Namespace, mode: str, model: str) -> dict[str, Any]:
    """Run one mode in a fresh process (pinning is per process), return its figures."""
    cmd = [sys.executable, "-m", "gradient_nb.bench.echo", "--one", mode, "--model", model,
           "--steps", str(args.steps), "--num-generations", str(args.num_generations), "--task-len", args.task_len,
           "--peers", str(args.peers), "--max-tokens", str(args.max_tokens), "--learning-rate", str(args.learning_rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _steady_rate(m: list[dict[str, Any]]) -> float:
    """Completions trained on per second from the end of the first step to the end of the last: the first
    step carries one-time costs (the first batch's sampling with nobody to overlap it, torch's warm-up)."""
    if len(m) < 2:
        return m[0]["samples"] / m[0]["step_s"]
    return sum(x["samples"] for x in m[1:]) / (m[-1]["elapsed_s"] - m[0]["elapsed_s"])


async def _one(args: argparse.Namespace) -> dict[str, Any]:
    from ..rl.headless import train_headless
    from ..rl.trainer import EchoConfig

    lo, hi = _task_len(args.task_len)
    cfg = EchoConfig(task={"name": "format", "min_len": lo, "max_len": hi}, mode=args.one, model=args.model,
                     steps=args.steps, num_generations=args.num_generations, learning_rate=args.learning_rate,
                     max_tokens=args.max_tokens, seed=1, max_staleness=4)
    placement: dict[str, Any] = {}

    def emit(e: dict[str, Any]) -> None:
        if e.get("event") == "placement":
            placement.update({k: v for k, v in e.items() if k != "event"})

    t0 = time.perf_counter()
    state = await train_headless(cfg, peers=args.peers, emit=emit, pin=True)
    wall = time.perf_counter() - t0
    m = state.metrics
    k = max(1, len(m) // 4)
    return {"reward_first": statistics.mean(x["reward_mean"] for x in m[:k]),
            "reward_last": statistics.mean(x["reward_mean"] for x in m[-k:]),
            "samples_per_s": _steady_rate(m),
            "step_s": statistics.mean(x["step_s"] for x in m),
            "sync_ms": statistics.mean(x["sync_ms"] for x in m),
            "sync_bytes": int(statistics.mean(x["sync_bytes"] for x in m)),
            "dropped_stale": state.dropped_stale, "wall_s": wall, "placement": placement}


# Per model: (task answer length "lo:hi", max_tokens, num_generations, learning_rate); see the docstring.
SETTINGS = {"tiny": ("4:4", 24, 16, 6e-3), "default": ("12:24", 12, 8, 2e-3)}


def _task_len(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"--task-len wants LO:HI letters, e.g. 12:24, not {text!r}") from None
    if not 1 <= a <= b:
        raise SystemExit(f"--task-len wants 1 <= LO <= HI, not {text!r}")
    return a, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradient-nb bench echo")
    p.add_argument("--model", default="tiny", help="'tiny' (default), 'default' (SmolLM2-135M) or a model folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-generations", type=int, help="completions a step (per model, see above)")
    p.add_argument("--max-tokens", type=int, help="tokens a completion (per model)")
    p.add_argument("--learning-rate", type=float, help="(per model)")
    p.add_argument("--task-len", help="the format task's answer length in letters, LO:HI (per model)")
    p.add_argument("--peers", type=int, default=1, help="sampler processes (sequential, async)")
    p.add_argument("--one", choices=["colocated", "sequential", "async"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = SETTINGS["default" if args.model == "default" else "tiny"]  # a model folder: as the tiny one
    for name, value in zip(("task_len", "max_tokens", "num_generations", "learning_rate"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    _task_len(args.task_len)
    if args.one:
        print(json.dumps(asyncio.run(_one(args))))
        return 0
    model = args.model
    if model == "tiny":
        from ..models.loader import home
        from ..testing.tinymodel import tiny_char_model

        model = str(tiny_char_model(home() / "models" / "tiny-char-warm-150", warm_steps=150))
    elif model == "default":
        from ..models.loader import DEFAULT_MODEL

        model = DEFAULT_MODEL
    lo, hi = _task_len(args.task_len)
    out: dict[str, Any] = {"model": os.path.basename(model), "task": f"format (length {lo}–{hi} letters)",
                           "steps": args.steps, "num_generations": args.num_generations,
                           "max_tokens": args.max_tokens, "learning_rate": args.learning_rate,
                           "sampler_processes": args.peers, "seed": 1}
    modes = {mode: _mode(args, mode, model) for mode in ("colocated", "sequential", "async")}
    out["placement"] = modes["sequential"].pop("placement")
    for figures in modes.values():
        figures.pop("placement", None)
    out.update(modes)
    out["async_vs_sequential_samples_per_s"] = modes["async"]["samples_per_s"] / modes["sequential"]["samples_per_s"]
    out["async_vs_colocated_reward"] = modes["async"]["reward_last"] / max(modes["colocated"]["reward_last"], 1e-9)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
