"""Data-parallel trainers: several trainer processes train one policy through ``torch.distributed``.

Where trainer machines reach each other directly (one cluster, one LAN), the gradient exchange is
torch's own engine, not an all-reduce of ours over the mesh: a process group (gloo on CPU, NCCL where
the policy is on CUDA) that the trainers join with a TCP ``init_method`` (``tcp://HOST:PORT`` of rank
0, given in each trainer's config; ``env://`` under ``torchrun``).

The one idea: every rank holds whole GRPO groups of the same batch, computes its local loss scaled so
that the ranks' losses SUM to the loss of the whole batch, and the LoRA gradients are summed with
``torch.distributed.all_reduce`` between backward and clipping. Every rank then clips the same summed
gradient and takes the same AdamW step, so the adapters stay identical (they start identical: rank 0's
are broadcast at start) and equal, to float rounding, a single trainer's on the combined batch:

- ``dapo`` (sum over tokens / tokens): the local loss is scaled by local tokens / all tokens;
  ``grpo`` and ``dr_grpo`` (per-sequence means): by local sequences / all sequences;
- advantages are per group, so local ones are the global ones; ``scale_rewards: batch`` divides by the
  std of the whole batch's rewards, all-reduced (sum, sum of squares, count).

DistributedDataParallel's mean of gradients would be right only for equal shares of tokens, and a GRPO
batch's completions have different lengths: hence the explicit, weighted sum.

Rank 0 is the Echo run: it samples (through the mesh, or co-located), publishes every adapter version
to the samplers and hands each batch to the other ranks by ``broadcast`` of plain tensors (ids,
log-probs, rewards, versions: nothing is pickled, so ``broadcast_object_list`` is not used). The other
ranks ``follow``: receive a batch, train on their share, until rank 0 says stop. Every collective runs
under the process group's timeout (``dist_timeout_s``), and a rank that dies breaks its peers'
connections: the others fail loudly with ``TrainerLost`` instead of waiting forever (trl #6797's
hang, here between trainers).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .rollouts import Group, Rollout
from .tasks import Prompt
from .trainer import EchoConfig, Trainer

log = logging.getLogger(__name__)

STOP = -1


class TrainerLost(RuntimeError):
    """Another data-parallel trainer is gone or did not answer within the timeout."""


def backend_for(cfg: EchoConfig, device: torch.device) -> str:
    if cfg.dist_backend != "auto":
        return cfg.dist_backend
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def share(groups: list[Group], rank: int, world_size: int) -> list[Group]:
    """The whole groups rank ``rank`` trains on (round-robin); every rank gets at least one."""
    if len(groups) < world_size:
        raise ValueError(f"{len(groups)} groups cannot be shared by {world_size} trainers: set prompts_per_step "
                         f">= world_size")
    return groups[rank::world_size]


class DistributedTrainer(Trainer):
    """A ``Trainer`` that is one rank of a data-parallel group (``cfg.world_size`` > 1)."""

    def __init__(self, cfg: EchoConfig, policy: Any = None) -> None:
        super().__init__(cfg, policy)
        self.rank, self.world_size = cfg.rank, cfg.world_size
        self.device = next(iter(self.policy.trainable())).device
        self.backend = backend_for(cfg, self.device)
        self.timeout_s = cfg.dist_timeout_s
        if not dist.is_initialized():
            self._collective("join the process group", lambda: dist.init_process_group(
                self.backend, init_method=cfg.init_method or "env://", world_size=self.world_size, rank=self.rank,
                timeout=timedelta(seconds=self.timeout_s)))
        self.comm = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        with torch.no_grad():  # every rank starts from rank 0's adapter
            for p in self.policy.trainable():
                self._collective("broadcast the adapter", lambda p=p: self._broadcast_(p.data))
        self._remember()
        self._scale: float | None = None

    # -- collectives, each failing loudly --------------------------------------------------------
    def _collective(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except (RuntimeError, ValueError) as exc:  # DistBackendError and gloo's errors are RuntimeErrors
            raise TrainerLost(f"trainer rank {self.rank} of {self.world_size}: could not {what} (a peer trainer "
                              f"died, or did not answer within {self.timeout_s:.0f} s): {exc}") from exc

    def _broadcast_(self, t: torch.Tensor) -> None:
        if t.device == self.comm:
            dist.broadcast(t, src=0)
            return
        c = t.to(self.comm)
        dist.broadcast(c, src=0)
        t.copy_(c.to(t.device))

    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.comm)
        self._collective("all-reduce", lambda: dist.all_reduce(t))
        return t.tolist()

    # -- the weighted gradient sum ---------------------------------------------------------------
    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        if self.grpo.scale_rewards != "batch":
            return super().advantages(rewards)
        n, s, s2 = self._sum([float(rewards.numel()), float(rewards.sum()), float((rewards.double() ** 2).sum())])
        std = max((s2 - s * s / n) / max(n - 1, 1), 0.0) ** 0.5  # unbiased, as torch.std
        groups = rewards.view(-1, self.cfg.num_generations)
        return (groups - groups.mean(dim=1, keepdim=True)).view(-1) / (std + 1e-4)

    def loss(self, groups: list[Group]) -> tuple[Any, dict[str, float]]:
        loss, stats = super().loss(groups)
        local = stats["completion_tokens"] if self.grpo.loss_type == "dapo" else float(
            sum(len(g.rollouts) for g in groups))
        total = self._sum([local])[0]
        self._scale = local / total
        return loss * self._scale, stats

    def reduce_gradients(self) -> None:
        params = [p for p in self.policy.trainable() if p.grad is not None]
        if len(params) != len(self.policy.trainable()):
            raise RuntimeError("every LoRA parameter must have a gradient on every rank")
        flat = torch.cat([p.grad.reshape(-1) for p in params]).to(self.comm)
        self._collective("all-reduce the LoRA gradients", lambda: dist.all_reduce(flat))
        flat = flat.to(params[0].grad.device)
        at = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[at:at + n].view_as(p.grad))
            at += n

    def _step_mine(self, groups: list[Group]) -> dict[str, float]:
        stats = super().train_step(share(groups, self.rank, self.world_size))
        stats["loss"] = self._sum([stats["loss"]])[0]  # each rank's is its share of the batch's loss
        return stats

    # -- rank 0 leads, the others follow ---------------------------------------------------------
    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """Rank 0: hand ``groups`` (the whole batch) to every rank, and train on its share with them."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 takes batches; the other ranks follow()")
        self._send(groups)
        stats = self._step_mine(groups)
        rewards = torch.tensor([r.reward for g in groups for r in g.rollouts])
        stats.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()) if rewards.numel() > 1 else 0.0,
                     trainers=self.world_size)
        return stats

    def follow(self, max_steps: int | None = None) -> int:
        """Ranks > 0: train on every batch rank 0 hands out until it stops (or ``max_steps``); returns the
        steps taken."""
        steps = 0
        while (max_steps is None or steps < max_steps) and (groups := self._receive()) is not None:
            self._step_mine(groups)
            steps += 1
        return steps

    def close(self) -> None:
        """Rank 0: tell the others to stop. Then leave the process group."""
        if not dist.is_initialized():
            return
        try:
            if self.rank == 0:
                self._broadcast_(torch.tensor([STOP, 0, 0], dtype=torch.int64))
        except (RuntimeError, ValueError) as exc:
            log.warning("could not tell the other trainers to stop: %s", exc)
        finally:
            dist.destroy_process_group()

    # -- a batch as plain tensors ----------------------------------------------------------------
    def _send(self, groups: list[Group]) -> None:
        rs = [(gi, r) for gi, g in enumerate(groups) for r in g.rollouts]
        rows = torch.tensor([[gi, r.version, len(r.prompt_ids), len(r.completion_ids)] for gi, r in rs],
                            dtype=torch.int64)
        ids = torch.tensor([t for _, r in rs for t in [*r.prompt_ids, *r.completion_ids]], dtype=torch.int64)
        floats = torch.tensor([x for _, r in rs for x in [r.reward, *r.logprobs]], dtype=torch.float64)
        self._collective("hand out the batch", lambda: self._broadcast_(
            torch.tensor([len(rs), ids.numel(), floats.numel()], dtype=torch.int64)))
        for t in (rows, ids, floats):
            self._collective("hand out the batch", lambda t=t: self._broadcast_(t))

    def _receive(self) -> list[Group] | None:
        head = torch.zeros(3, dtype=torch.int64)
        self._collective("receive a batch from rank 0", lambda: self._broadcast_(head))
        n, n_ids, n_floats = head.tolist()
        if n == STOP:
            return None
        if not (0 < n and 0 <= n_ids and n <= n_floats):
            raise TrainerLost(f"rank 0 announced a malformed batch {head.tolist()}")
        rows = torch.zeros(n, 4, dtype=torch.int64)
        ids = torch.zeros(n_ids, dtype=torch.int64)
        floats = torch.zeros(n_floats, dtype=torch.float64)
        for t in (rows, ids, floats):
            self._collective("receive a batch from rank 0", lambda t=t: self._broadcast_(t))
        groups: dict[int, list[Rollout]] = {}
        at_i = at_f = 0
        for gi, version, lp, lc in rows.tolist():
            p, c = ids[at_i:at_i + lp].tolist(), ids[at_i + lp:at_i + lp + lc].tolist()
            at_i += lp + lc
            reward, logprobs = floats[at_f].item(), floats[at_f + 1:at_f + 1 + lc].tolist()
            at_f += 1 + lc
            groups.setdefault(gi, []).append(Rollout(version, Prompt(""), p, c, logprobs, reward))
        if at_i != n_ids or at_f != n_floats:
            raise TrainerLost("the batch from rank 0 does not add up")
        return [Group(groups[k]) for k in sorted(groups)]


def make_trainer(cfg: EchoConfig) -> Trainer:
    """A plain ``Trainer``, or one rank of a data-parallel group when ``cfg.world_size`` > 1."""
    return DistributedTrainer(cfg) if cfg.world_size > 1 else Trainer(cfg)
