"""Rollouts: groups of completions with the sampler's own log-probabilities, tagged with one version.

A rollout carries the policy version it was sampled with, the prompt, the completion token ids, the
log-probability of each sampled token under the distribution it was actually drawn from (temperature
applied; top_p is 1 for RL, so that distribution is the policy's), and the reward. The end-of-sequence
token is part of the completion when the policy chose it: stopping is a decision the policy learns
(length targets), so its log-probability is trained like any other token's.

Two sources, one draw rule (``serve.sampling``'s seeded Gumbel-max draw):

- ``MeshSampler`` drives the mesh's serving path (``MeshEngine.generate_steps``): any pipeline, the
  group's ``num_generations`` requests concurrently, so each stage batches them. Every stage tags its
  replies with the adapter version it serves (``SamplerService``); ``VersionGuard`` sees every tag, and
  a batch in which any stage answered with another version — a sampler re-synced mid-rollout, a
  failover onto a peer at another version — is dropped and counted, so a rollout never mixes versions.
- ``LocalSampler`` samples from the trainer's own policy in the trainer's process: the co-located
  baseline. A group is one batch of ``num_generations`` rows of the same prompt with a shared KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..serve.sampling import SamplingParams, draw_scores
from .tasks import Prompt, score


@dataclass
class Rollout:
    version: int
    prompt: Prompt
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # the sampler's, one per completion token
    reward: float = 0.0
    text: str = ""
    sampler: str = ""  # who produced it: "local" or the peer ids of the chain
    seed: int | None = None  # its sampling seed (unique to it): how an audit finds its stages' commitments
    peers: tuple[str, ...] = ()  # the ids of the peers that served it (set by the audit)


@dataclass
class Group:
    """``num_generations`` rollouts of one prompt, all of one version."""

    rollouts: list[Rollout]

    @property
    def version(self) -> int:
        return self.rollouts[0].version


class MixedVersions(RuntimeError):
    """A stage answered a rollout with another adapter version than the batch was sampled for."""


def group_seeds(seed: int, index: int, n: int) -> list[int]:
    """The sampling seeds of the ``n`` completions of the ``index``-th group of a batch seeded ``seed``:
    the same in every sampler, so the co-located and the mesh samplers draw the same tokens from the
    same weights."""
    return [random.Random(f"{seed}:{index}:{i}").randrange(1 << 62) for i in range(n)]


def _spec(temperature: float, seed: int, step: int) -> dict[str, Any]:
    return {"temperature": float(temperature), "top_p": 1.0, "seed": seed, "step": step}


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _finish(tokenizer: Any, task: Any, rollouts: list[Rollout]) -> Group:
    for r in rollouts:
        r.text = tokenizer.decode(r.completion_ids, skip_special_tokens=True)
    rewards = score(task, [r.prompt for r in rollouts], [r.text for r in rollouts])
    for r, x in zip(rollouts, rewards, strict=True):
        r.reward = x
    return Group(rollouts)


class LocalSampler:
    """Samples groups from ``policy`` in this process (the co-located baseline)."""

    def __init__(self, policy: Any, task: Any, *, num_generations: int, max_tokens: int, temperature: float,
                 eos_ids: Sequence[int]) -> None:
        self.policy, self.task = policy, task
        self.n, self.max_tokens, self.temperature = num_generations, max_tokens, temperature
        self.eos = set(eos_ids)

    def group(self, prompt: Prompt, seed: int, index: int = 0) -> Group:
        tok = self.policy.tokenizer
        ids = prompt_ids(tok, prompt)
        model = self.policy.model
        seeds = group_seeds(seed, index, self.n)
        outs: list[list[int]] = [[] for _ in range(self.n)]
        lps: list[list[float]] = [[] for _ in range(self.n)]
        done = [False] * self.n
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            logits = out.logits[0, -1].float().expand(self.n, -1)
            past = out.past_key_values
            past.batch_repeat_interleave(self.n)  # one prefill for the group
            for step in range(self.max_tokens):
                nxt = []
                for i in range(self.n):
                    t = int(torch.argmax(draw_scores(logits[i], _spec(self.temperature, seeds[i], step))))
                    if not done[i]:
                        lp = torch.log_softmax(logits[i] / self.temperature, dim=-1)[t]
                        outs[i].append(t)
                        lps[i].append(float(lp))
                        done[i] = t in self.eos
                    nxt.append(t)
                if all(done) or step + 1 == self.max_tokens:
                    break
                out = model(input_ids=torch.tensor(nxt)[:, None], past_key_values=past, use_cache=True)
                logits, past = out.logits[:, -1].float(), out.past_key_values
        rollouts = [Rollout(self.policy.version, prompt, ids, o, lp, sampler="local")
                    for o, lp in zip(outs, lps, strict=True)]
        return _finish(tok, self.task, rollouts)


class VersionGuard:
    """A ``RequestObserver`` on the rollout engine: records the adapter version every stage answered with
    and steers routing away from peers that are not at the expected version."""

    name = "echo"

    def __init__(self) -> None:
        self.expected: tuple[str, int] | None = None
        self.seen: set[Any] = set()
        self.peers: set[str] = set()
        self.avoid: set[str] = set()

    def reset(self, run: str, version: int) -> None:
        self.expected = (run, version)
        self.seen, self.peers = set(), set()

    def avoided_peers(self) -> set[str]:
        return set(self.avoid)

    def begin(self, stages: Any) -> None:
        return None

    def on_call(self, record: Any, peer: str, start: int, end: int, session: str, pos: int, x: torch.Tensor,
                header: dict[str, Any]) -> None:
        tag = header.get("echo")
        self.seen.add(tuple(tag) if isinstance(tag, list) else tag)
        self.peers.add(peer)

    def on_drop(self, *args: Any) -> None:
        return None

    def finish(self, *args: Any) -> None:
        return None

    def check(self) -> None:
        if self.seen != {self.expected}:
            got = sorted(str(s) for s in self.seen)
            raise MixedVersions(f"stages answered with versions {got}, the batch was sampled for {self.expected}")

    async def aclose(self) -> None:
        return None


class MeshSampler:
    """Samples groups through the mesh's serving path (a ``MeshEngine`` whose peers run ``SamplerService``)."""

    def __init__(self, engine: Any, task: Any, *, num_generations: int, max_tokens: int, temperature: float,
                 step_timeout: float = 60.0) -> None:
        self.engine, self.task = engine, task
        self.n, self.max_tokens, self.temperature = num_generations, max_tokens, temperature
        # The engine would end at EOS without yielding it; the policy's choice to stop is trained, so
        # this engine yields it and the loop below ends the completion after it.
        self.eos = set(engine.eos_ids)
        engine.eos_ids = set()
        self.guard = VersionGuard()
        engine.observers.append(self.guard)
        self.step_timeout = step_timeout

    def detach(self) -> None:
        """Give the engine back as it was (its EOS handling, no version guard)."""
        with contextlib.suppress(ValueError):
            self.engine.observers.remove(self.guard)
        self.engine.eos_ids = set(self.eos)

    async def _one(self, ids: list[int], seed: int) -> tuple[list[int], list[float]]:
        params = SamplingParams(temperature=self.temperature, top_p=1.0, max_tokens=self.max_tokens, seed=seed)
        toks: list[int] = []
        lps: list[float] = []
        steps = self.engine.generate_steps(ids, params)
        try:
            while True:
                try:
                    s = await asyncio.wait_for(steps.__anext__(), self.step_timeout)
                except StopAsyncIteration:
                    break
                toks.append(int(s.token))
                lps.append(float(s.logprob))
                if s.token in self.eos:
                    break
        finally:
            await steps.aclose()
        return toks, lps

    async def groups(self, prompts: Sequence[Prompt], run: str, version: int, seed: int) -> list[Group]:
        """One batch: every prompt's group, concurrently, all for ``version``; raises MixedVersions if
        any stage answered with another version (the whole batch is then discarded)."""
        tok = self.engine.tokenizer
        self.guard.reset(run, version)
        all_ids = [prompt_ids(tok, p) for p in prompts]
        seeds = [group_seeds(seed, j, self.n) for j in range(len(prompts))]
        outs = await asyncio.gather(*(self._one(ids, s) for ids, ss in zip(all_ids, seeds, strict=True) for s in ss))
        self.guard.check()
        chain = ",".join(sorted(p[:8] for p in self.guard.peers))
        groups = []
        for j, (p, ids) in enumerate(zip(prompts, all_ids, strict=True)):
            rs = [Rollout(version, p, ids, t, lp, sampler=chain, seed=sd)
                  for (t, lp), sd in zip(outs[j * self.n:(j + 1) * self.n], seeds[j], strict=True)]
            groups.append(_finish(tok, self.task, rs))
        return groups


def new_run_id() -> str:
    return "run-" + secrets.token_hex(4)


@dataclass
class Batch:
    groups: list[Group] = field(default_factory=list)

    def rollouts(self) -> list[Rollout]:
        return [r for g in self.groups for r in g.rollouts]
