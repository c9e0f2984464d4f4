"""The GRPO trainer and Echo's three ways to feed it: co-located, sequential pull, asynchronous push-pull.

- ``colocated`` — one process alternates sampling (``LocalSampler``, the trainer's own policy) and
  training: the baseline the other two are compared against.
- ``sequential`` — before every rollout batch the trainer publishes the current version and every
  sampler syncs it (``echo.sync``, a deadline each); the batch is sampled through the mesh's serving
  path and trained on at once. Every rollout is on-policy: least bias, samplers idle while training.
- ``async`` — rollout producers run concurrently with training and push version-tagged batches into a
  replay buffer; the trainer takes the next batch, drops those more than ``max_staleness`` versions
  behind (counted), and trains on the rest. A producer re-syncs samplers to the latest version before
  each batch, never during one. Best utilisation, bounded staleness.

The trainer never blocks on a sampler: every sync has ``sync_deadline_s``, every token step of a
rollout ``step_timeout``, and the async trainer waits at most ``rollout_deadline_s`` for a batch before
failing loudly (``RolloutTimeout``). Stopping (``stop()``, the end of the steps, or an error) cancels
the producers and withdraws the trainer's services; samplers then fall back to their base weights when
their lease ends: there is no end-of-training barrier anyone could deadlock on (prime-rl #2219).

The importance ratio's denominator for a rollout of version v is recomputed by the trainer with v's
adapter (the last ``max_staleness + 1`` adapters are kept), so stale rollouts get a real ratio that the
clip acts on, and the truncated importance weight corrects for the sampler/trainer mismatch
(``grpo.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .grpo import GRPOConfig, advantages, grpo_loss
from .policy import Policy
from .rollouts import Group, LocalSampler, MeshSampler, MixedVersions
from .tasks import get_task

log = logging.getLogger(__name__)

MODES = ("colocated", "sequential", "async")


class RolloutTimeout(TimeoutError):
    """No rollout batch arrived within the deadline."""


@dataclass
class EchoConfig:
    """What ``%%echo train`` / ``gradient-nb echo train`` read (GRPO fields keep TRL's names)."""

    task: Any = "format"
    mode: str = "sequential"
    model: str | None = None
    steps: int = 20
    num_generations: int = 8
    prompts_per_step: int = 1
    learning_rate: float = 2e-3
    max_grad_norm: float = 1.0  # TRL's default; 0 turns clipping off
    lr_scheduler_type: str = "linear"  # TRL's default (to 0 over `steps`); or "constant"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    max_staleness: int = 4
    samplers: Any = "auto"  # auto / N / list of peer names
    max_tokens: int = 16
    temperature: float = 1.0
    seed: int = 0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    importance_sampling_level: str = "token"
    importance_sampling_correction: bool = True
    importance_sampling_mode: str = "token_truncate"
    importance_sampling_cap: float = 3.0
    sync_deadline_s: float = 30.0
    # How long a sampler stays bound to this run without a sync (capped by the sampler's own lease): when
    # the trainer dies, its samplers go back to their base weights this long after its last sync.
    sampler_lease_s: float = 60.0
    rollout_deadline_s: float = 120.0
    # Untrusted samplers (audit.py): the share of rollouts re-computed against their commitments; a sampler
    # that fails one has all its rollouts dropped and is excluded. 0 trusts every sampler.
    audit_fraction: float = 0.05
    # Data-parallel trainers (distributed.py): this trainer is rank `rank` of `world_size`, joined through
    # `init_method` (tcp://RANK0-HOST:PORT, or env:// under torchrun); rank 0 samples and publishes.
    world_size: int = 1
    rank: int = 0
    init_method: str | None = None
    dist_backend: str = "auto"  # gloo on CPU, nccl where the policy is on CUDA
    dist_timeout_s: float = 60.0  # a collective that waits longer fails loudly (TrainerLost)
    save: str | None = None  # where to save the final adapter

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.max_staleness < 0 or self.steps < 1 or self.prompts_per_step < 1:
            raise ValueError("steps and prompts_per_step must be >= 1, max_staleness >= 0")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction must be within [0, 1], not {self.audit_fraction}")
        if not 0 <= self.rank < self.world_size or self.prompts_per_step < self.world_size:
            raise ValueError("need 0 <= rank < world_size <= prompts_per_step (every trainer gets whole groups)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EchoConfig:
        names = {f.name for f in fields(cls)}
        d = dict(d or {})
        if "lora" in d and isinstance(d["lora"], dict):  # `lora: {rank: 8, alpha: 16}`
            lora = d.pop("lora")
            d.setdefault("lora_rank", lora.get("rank", 8))
            d.setdefault("lora_alpha", lora.get("alpha", 16.0))
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown echo settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, text: str) -> EchoConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})

    def grpo(self) -> GRPOConfig:
        return GRPOConfig(num_generations=self.num_generations, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                          beta=self.beta, loss_type=self.loss_type, scale_rewards=self.scale_rewards,
                          importance_sampling_level=self.importance_sampling_level,
                          importance_sampling_correction=self.importance_sampling_correction,
                          importance_sampling_mode=self.importance_sampling_mode,
                          importance_sampling_cap=self.importance_sampling_cap,
                          max_completion_length=self.max_tokens, temperature=self.temperature,
                          learning_rate=self.learning_rate)


class Trainer:
    """GRPO over a LoRA policy. ``train_step(groups)`` is one optimizer step; it publishes nothing."""

    def __init__(self, cfg: EchoConfig, policy: Policy | None = None) -> None:
        from ..models.loader import DEFAULT_MODEL

        self.cfg = cfg
        self.grpo = cfg.grpo()
        self.policy = policy or Policy(cfg.model or DEFAULT_MODEL, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                       seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        self.optimizer = torch.optim.AdamW(self.policy.trainable(), lr=cfg.learning_rate, weight_decay=0.0)
        # TRL's default schedule: linear decay to 0 over the run's steps.
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: max(0.0, 1.0 - i / cfg.steps) if cfg.lr_scheduler_type == "linear" else 1.0)
        self.history: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        # A step and a snapshot of the adapter for publishing run in worker threads: never interleaved.
        self.lock = threading.Lock()
        self._remember()

    def snapshot(self) -> tuple[int, bytes, bytes]:
        """(version, adapter config, adapter safetensors) of the current policy, consistent."""
        with self.lock:
            return (self.policy.version, *self.policy.adapter_bytes())

    def _remember(self) -> None:
        self.history[self.policy.version] = self.policy.adapter_state()
        while len(self.history) > self.cfg.max_staleness + 1:
            self.history.popitem(last=False)

    def _old_logprobs(self, groups: list[Group], logp: torch.Tensor) -> torch.Tensor:
        """The log-probs of each rollout under the adapter of its own version, as the trainer computes them:
        ``logp`` (detached) for rollouts of the current version, a recomputation with the kept adapter of
        their version for stale ones. Swapping adapters changes the LoRA weights in place, so ``loss``
        calls this before it builds the graph of ``logp`` (then with ``logp`` = zeros) and merges after."""
        old = logp.detach().clone()
        rs = [r for g in groups for r in g.rollouts]
        stale = {r.version for r in rs} - {self.policy.version}
        if not stale:
            return old
        current = self.policy.adapter_state()
        try:
            for v in sorted(stale):
                if v not in self.history:
                    raise ValueError(f"version {v} is older than the kept adapters (max_staleness)")
                rows = [i for i, r in enumerate(rs) if r.version == v]
                self.policy.load_adapter_state(self.history[v])
                with torch.no_grad():
                    lp, _, _ = self.policy.token_logprobs([rs[i].prompt_ids for i in rows],
                                                          [rs[i].completion_ids for i in rows], self.cfg.temperature)
                width = min(lp.shape[1], old.shape[1])
                old[rows, :width] = lp[:, :width]
        finally:
            self.policy.load_adapter_state(current)
        return old

    def loss(self, groups: list[Group]) -> tuple[Any, dict[str, float]]:
        rs = [r for g in groups for r in g.rollouts]
        rewards = torch.tensor([r.reward for r in rs], dtype=torch.float32)
        adv = self.advantages(rewards)
        width = max(len(r.completion_ids) for r in rs)
        stale_old = self._old_logprobs(groups, torch.zeros(len(rs), width))  # before the graph (see there)
        self.policy.model.train()
        logp, ent, mask = self.policy.token_logprobs([r.prompt_ids for r in rs], [r.completion_ids for r in rs],
                                                     self.cfg.temperature)
        sampler = torch.zeros_like(mask)
        for i, r in enumerate(rs):
            sampler[i, : len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        fresh = torch.tensor([r.version == self.policy.version for r in rs])[:, None]
        old = torch.where(fresh, logp.detach(), stale_old)
        ref = None
        if self.grpo.beta != 0.0:
            with torch.no_grad(), self.policy.model.disable_adapter():
                ref, _, _ = self.policy.token_logprobs([r.prompt_ids for r in rs], [r.completion_ids for r in rs],
                                                       self.cfg.temperature)
        parts = grpo_loss(self.grpo, logp, old, sampler, mask, adv, ref)
        n = float(mask.sum().clamp(min=1))
        stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rs) > 1 else 0.0,
                 "kl": parts.kl, "entropy": float((ent * mask).sum()) / n, "mismatch": parts.mismatch,
                 "ratio_mean": parts.ratio_mean, "clip_frac": parts.clip_frac, "is_weight_mean": parts.is_weight_mean,
                 "staleness": float(sum(self.policy.version - r.version for r in rs) / len(rs)),
                 "completion_tokens": n}
        return parts.loss, stats

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return advantages(rewards, self.cfg.num_generations, self.grpo.scale_rewards)

    def reduce_gradients(self) -> None:
        """After backward, before clipping: where data-parallel trainers all-reduce (``distributed.py``)."""
        return None

    def gradients(self, groups: list[Group]) -> dict[str, torch.Tensor]:
        """The LoRA gradients one step on ``groups`` would apply (nothing changes)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.loss(groups)
        loss.backward()
        self.reduce_gradients()
        out = {n: p.grad.detach().clone() for n, p in self.policy.model.named_parameters() if p.grad is not None}
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        t0 = time.perf_counter()
        with self.lock:
            self.optimizer.zero_grad(set_to_none=True)
            loss, stats = self.loss(groups)
            loss.backward()
            self.reduce_gradients()
            if self.cfg.max_grad_norm > 0:
                stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.policy.trainable(), self.cfg.max_grad_norm))
            self.optimizer.step()
            self.schedule.step()
            self.policy.version += 1
            self._remember()
        stats.update(loss=float(loss.detach()), version=self.policy.version, train_s=time.perf_counter() - t0)
        return stats


@dataclass
class RunState:
    """What a run reports while it goes (the notebook widget and ``%echo status`` read this)."""

    mode: str
    steps: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    dropped_stale: int = 0
    dropped_mixed: int = 0
    audited: int = 0  # rollouts re-computed against their commitments (audit.py)
    audit_failed: int = 0  # audited rollouts that failed
    dropped_untrusted: int = 0  # rollouts dropped because a sampler of theirs failed an audit
    excluded_samplers: dict[str, str] = field(default_factory=dict)  # peer id -> why
    sync_failures: list[str] = field(default_factory=list)
    status: str = "starting"
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "metrics"}
        d["done_steps"] = len(self.metrics)
        if self.metrics:
            d["last"] = self.metrics[-1]
        return d


class EchoRun:
    """One training run in one of the three modes. ``await run()`` trains ``cfg.steps`` steps.

    ``mesh``/``engine`` (a ``MeshEngine`` over serving peers that run ``SamplerService``) are needed for
    ``sequential`` and ``async``. ``on_step(metrics)`` is called after every step.
    """

    def __init__(self, cfg: EchoConfig, trainer: Trainer | None = None, *, mesh: Any = None, engine: Any = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        from .distributed import make_trainer

        self.cfg = cfg
        self.trainer = trainer or make_trainer(cfg)
        self.follower = cfg.world_size > 1 and cfg.rank != 0  # trains on rank 0's batches: no sampling here
        self.task = get_task(cfg.task)
        self.mesh, self.engine = mesh, engine
        self.on_step = on_step
        self.state = RunState(cfg.mode, cfg.steps)
        self.rng = random.Random(cfg.seed)
        self._stop = asyncio.Event()
        self.publisher = None
        self.sampler: MeshSampler | None = None
        self.auditor = None
        if cfg.mode != "colocated" and not self.follower:
            if mesh is None or engine is None:
                raise ValueError(f"mode {cfg.mode!r} samples on the mesh: pass mesh= and engine=")
            from .rollouts import new_run_id
            from .weights import Publisher

            self.run_id = new_run_id()
            self.publisher = Publisher(mesh, self.run_id, keep=cfg.max_staleness + 2)
            self.sampler = MeshSampler(engine, self.task, num_generations=cfg.num_generations,
                                       max_tokens=cfg.max_tokens, temperature=cfg.temperature)
            if cfg.audit_fraction > 0:
                from .audit import RolloutAuditor

                self.auditor = RolloutAuditor(mesh, engine.path, engine.info.content_hash, engine.info.num_layers,
                                              fraction=cfg.audit_fraction)
                engine.observers.append(self.auditor)
        self._announced = None
        self._sync_lock = asyncio.Lock()
        self._batch_seed = 0
        self._started = time.perf_counter()

    def stop(self) -> None:
        self._stop.set()

    def _prompts(self) -> list[Any]:
        return [self.task.prompt(self.rng) for _ in range(self.cfg.prompts_per_step)]

    def _record(self, stats: dict[str, Any]) -> None:
        stats["step"] = len(self.state.metrics) + 1
        stats["elapsed_s"] = time.perf_counter() - self._started
        self.state.metrics.append(stats)
        if self.on_step is not None:
            try:
                self.on_step(stats)
            except Exception:  # a display callback must not end training
                log.exception("echo on_step callback failed")

    # -- weight sync ---------------------------------------------------------------------------------
    def _samplers(self) -> list[str]:
        from .sampler import SYNC_METHOD

        peers = [p for p in self.mesh.providers(SYNC_METHOD)]
        want = self.cfg.samplers
        if isinstance(want, int) and not isinstance(want, bool):
            peers = peers[:want]
        elif isinstance(want, list):
            peers = [p for p in peers if p.name in want or p.id in want]
        excluded = self.auditor.excluded if self.auditor is not None else {}
        return [p.id for p in peers if p.id not in excluded]

    async def _publish_and_sync(self) -> tuple[int, float, int]:
        """Publish the current version (once) and sync every sampler to it; returns (version, ms, bytes).
        Samplers that fail are routed around (and stop producing rollouts on their side)."""
        from ..mesh.frames import Message
        from .sampler import SYNC_METHOD

        async with self._sync_lock:
            if self._announced is None or self._announced.version != self.trainer.policy.version:
                v, config, blob = await asyncio.to_thread(self.trainer.snapshot)
                self._announced = self.publisher.publish(v, config, blob)
                if self.auditor is not None:
                    self.auditor.remember(v, config, blob, keep=self.cfg.max_staleness + 2)
            v = self._announced.version
            a = self._announced
            peers = self._samplers()
            t0 = time.perf_counter()

            async def one(pid: str) -> tuple[str, Any]:
                try:
                    return pid, await self.mesh.call(pid, SYNC_METHOD, Message(
                        {"announcement": a.record, "deadline_s": self.cfg.sync_deadline_s,
                         "lease_s": self.cfg.sampler_lease_s}),
                        timeout=self.cfg.sync_deadline_s + 5)
                except Exception as exc:  # each failure is recorded and routed around
                    return pid, exc

            results = await asyncio.gather(*(one(p) for p in peers))
            ms = 1000 * (time.perf_counter() - t0)
            nbytes = 0
            ok = set()
            for pid, r in results:
                if isinstance(r, BaseException):
                    self.state.sync_failures.append(f"{pid[:8]}: {r}")
                    log.warning("sampler %s failed to sync version %d: %s", pid[:8], v, r)
                else:
                    ok.add(pid)
                    nbytes += int(r.header.get("bytes") or 0)
            # Route only through samplers at this version; everything else (failed, new, non-samplers) is avoided.
            live = {p.id for p in self.mesh.peers()}
            self.sampler.guard.avoid = live - ok
            if not ok:
                raise RuntimeError(f"no sampler holds version {v}: {self.state.sync_failures[-len(peers):] or 'none'}")
            return v, ms, nbytes

    async def _mesh_batch(self) -> tuple[list[Group], dict[str, float]]:
        audit = {"audited": 0, "dropped_untrusted": 0} if self.auditor is not None else {}
        todo, kept = self._prompts(), []
        t0 = time.perf_counter()
        while True:
            v, ms, nbytes = await self._publish_and_sync()
            if kept and kept[0].version != v:
                todo, kept = [r.prompt for g in kept for r in g.rollouts[:1]] + todo, []  # never mix versions
            self._batch_seed += 1
            try:
                groups = await self.sampler.groups(todo, self.run_id, v, self.cfg.seed * 7919 + self._batch_seed)
            except MixedVersions as exc:
                self.state.dropped_mixed += 1
                log.warning("dropped a rollout batch: %s", exc)
                continue
            if self.auditor is not None:
                trusted, report = await self.auditor.audit(groups)
                self.state.audited += report.audited
                self.state.audit_failed += report.failed
                self.state.dropped_untrusted += report.dropped
                self.state.excluded_samplers = dict(self.auditor.excluded)
                audit["audited"] += report.audited
                audit["dropped_untrusted"] += report.dropped
                # The prompts of groups that held a failed sampler's rollout are sampled again without it,
                # so the step still trains on a whole batch.
                keep = {id(g) for g in trusted}
                kept += [g for g in groups if id(g) in keep]
                todo = [p for g, p in zip(groups, todo, strict=True) if id(g) not in keep]
            else:
                kept, todo = kept + groups, []
            if not todo:
                n = sum(len(g.rollouts) for g in kept)
                return kept, {"sync_ms": ms, "sync_bytes": nbytes, "sample_s": time.perf_counter() - t0,
                              "samples": n, **audit}

    # -- the modes -----------------------------------------------------------------------------------
    async def run(self) -> RunState:
        self.state.status = "running"
        self._started = time.perf_counter()
        try:
            if self.follower:
                await asyncio.to_thread(self.trainer.follow)
            elif self.cfg.mode == "async":
                await self._run_async()
            else:
                await self._run_in_turn()
            self.state.status = "stopped" if self._stop.is_set() else "done"
            if self.cfg.save and not self.follower:
                self.trainer.policy.save(self.cfg.save)
        except asyncio.CancelledError:
            self.state.status = "cancelled"
            raise
        except Exception as exc:
            self.state.status, self.state.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.close()
        return self.state

    def close(self) -> None:
        """Withdraw the trainer's chunk service and give the engine back (``run`` does it when it ends)."""
        if self.publisher is not None:
            self.publisher.close()
        if self.sampler is not None:
            self.sampler.detach()
        if self.auditor is not None:
            with contextlib.suppress(ValueError):
                self.engine.observers.remove(self.auditor)
        close = getattr(self.trainer, "close", None)  # a data-parallel rank 0 tells the others to stop
        if close is not None:
            close()

    async def _run_in_turn(self) -> None:
        local = None
        if self.cfg.mode == "colocated":
            eos = {self.trainer.policy.tokenizer.eos_token_id} - {None}
            local = LocalSampler(self.trainer.policy, self.task, num_generations=self.cfg.num_generations,
                                 max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature, eos_ids=eos)
        for _ in range(self.cfg.steps):
            if self._stop.is_set():
                return
            t0 = time.perf_counter()
            if local is not None:
                prompts = self._prompts()
                ts = time.perf_counter()
                self._batch_seed += 1
                seed = self.cfg.seed * 7919 + self._batch_seed
                groups = [await asyncio.to_thread(local.group, p, seed, j) for j, p in enumerate(prompts)]
                info = {"sync_ms": 0.0, "sync_bytes": 0, "sample_s": time.perf_counter() - ts,
                        "samples": sum(len(g.rollouts) for g in groups)}
            else:
                groups, info = await self._mesh_batch()
            stats = await asyncio.to_thread(self.trainer.train_step, groups)
            stats.update(info, step_s=time.perf_counter() - t0)
            stats["samples_per_s"] = info["samples"] / stats["step_s"]
            self._record(stats)

    def admit(self, groups: list[Group]) -> int | None:
        """The batch's lag in versions, or None (dropped and counted) past ``max_staleness``."""
        lag = self.trainer.policy.version - min(g.version for g in groups)
        if lag > self.cfg.max_staleness:
            self.state.dropped_stale += 1
            return None
        return lag

    async def _run_async(self) -> None:
        # One producer: it samples batch k+1 while the trainer trains on batch k (different machines),
        # and re-syncs samplers only between its own batches, so no batch straddles a version.
        buffer: asyncio.Queue = asyncio.Queue(maxsize=1)

        async def produce() -> None:
            while not self._stop.is_set():
                groups, info = await self._mesh_batch()
                await buffer.put((groups, info))

        producers = [asyncio.ensure_future(produce())]
        started = time.perf_counter()
        samples = 0
        try:
            while len(self.state.metrics) < self.cfg.steps and not self._stop.is_set():
                t0 = time.perf_counter()
                getter = asyncio.ensure_future(buffer.get())
                done, _ = await asyncio.wait({getter, *producers}, timeout=self.cfg.rollout_deadline_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    failed = [p for p in producers if p.done()]
                    if failed and failed[0].exception() is not None:
                        raise failed[0].exception()  # a producer's loud failure ends the run loudly
                    raise RolloutTimeout(f"no rollout batch within {self.cfg.rollout_deadline_s:.0f} s")
                groups, info = getter.result()
                if self.auditor is not None:  # its sampler may have failed an audit since it was sampled
                    groups, dropped = self.auditor.screen(groups)
                    self.state.dropped_untrusted += dropped
                    info["dropped_untrusted"] += dropped
                    info["samples"] = sum(len(g.rollouts) for g in groups)
                    if not groups:
                        continue
                lag = self.admit(groups)
                if lag is None:
                    continue
                stats = await asyncio.to_thread(self.trainer.train_step, groups)
                samples += info["samples"]
                stats.update(info, step_s=time.perf_counter() - t0, lag=lag)
                stats["samples_per_s"] = samples / (time.perf_counter() - started)
                self._record(stats)
        finally:
            for p in producers:
                p.cancel()
            for p in producers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await p
