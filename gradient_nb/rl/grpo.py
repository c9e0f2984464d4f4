"""GRPO's loss with TRL's field names, and the truncated importance-sampling correction.

For a group of ``num_generations`` completions of one prompt with rewards r_i, the advantage is
``A_i = r_i - mean(r)`` divided by the std (``scale_rewards``: "group", "batch" or "none"; TRL adds
1e-4). Per completion token t, with log-probs under the policy being trained (``logp``), under the
policy that produced the rollout as the trainer computes it (``old``) and as the sampler reported it
(``sampler``):

- ratio ``ρ = exp(logp - old)`` per token (``importance_sampling_level="token"``), or the exp of the
  masked mean of the log-ratio over the completion, one per sequence (``"sequence"``, GSPO);
- clipped surrogate ``-min(ρ A, clip(ρ, 1 - epsilon, 1 + epsilon_high) A)``;
- times the truncated importance weight of the trainer vs the sampler, which corrects for the
  sampler's numerics or stale weights: ``w = exp(old - sampler)`` per token, or the exp of the summed
  log-ratio per sequence; ``*_truncate`` caps it at ``importance_sampling_cap`` (3.0), ``*_mask``
  zeroes it past the cap (TRL's ``vllm_importance_sampling_mode``; TRL only runs it with vLLM, here it
  runs for every rollout because every rollout carries its sampler's log-probs);
- plus ``beta · KL`` to a reference (k3 estimator ``exp(ref - logp) - (ref - logp) - 1``) when beta > 0;
- reduced by ``loss_type``: "grpo" (mean over each sequence's tokens, then over sequences), "dapo"
  (sum over all tokens / number of tokens) or "dr_grpo" (sum / (sequences · max_completion_length)).

``old`` is computed by the trainer with the adapter of the rollout's own version, never with the
current one: recomputing it with the current weights makes ρ ≡ 1 and the clip never engages on stale
rollouts (AReaL #201). For an on-policy rollout the two coincide and ``old = logp.detach()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class GRPOConfig:
    """TRL's GRPOConfig names (defaults as TRL's where the name is TRL's)."""

    num_generations: int = 8
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: = epsilon (DAPO's clip-higher sets it above)
    beta: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"  # "group", "batch" or "none" (TRL also accepts True/False)
    importance_sampling_level: str = "token"
    importance_sampling_correction: bool = True  # TRL: vllm_importance_sampling_correction
    importance_sampling_mode: str = "token_truncate"  # TRL: vllm_importance_sampling_mode
    importance_sampling_cap: float = 3.0  # TRL: vllm_importance_sampling_cap
    max_completion_length: int = 16
    temperature: float = 1.0
    learning_rate: float = 1e-5
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scale_rewards is True:
            self.scale_rewards = "group"
        elif self.scale_rewards is False:
            self.scale_rewards = "none"
        if self.loss_type not in ("grpo", "dapo", "dr_grpo"):
            raise ValueError(f"loss_type must be grpo, dapo or dr_grpo, not {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be group, batch or none, not {self.scale_rewards!r}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError("importance_sampling_level must be token or sequence")
        if self.importance_sampling_mode not in IS_MODES:
            raise ValueError(f"importance_sampling_mode must be one of {IS_MODES}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2 (advantages compare a group's completions)")
        if not 0 < self.temperature <= 2:
            raise ValueError("temperature must be in (0, 2] (RL samples; greedy has no log-probabilities to "
                             "correct)")


def advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """Group-relative advantages of rewards [B] laid out group after group."""
    groups = rewards.view(-1, num_generations)
    mean = groups.mean(dim=1, keepdim=True)
    adv = (groups - mean).view(-1)
    if scale_rewards == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1)
        adv = adv / (std + 1e-4)
    elif scale_rewards == "batch":
        adv = adv / (rewards.std() + 1e-4)
    return adv


def importance_weights(old: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float = 3.0) -> torch.Tensor:
    """Truncated importance weights [B, T] (or [B, 1] for sequence modes) of trainer vs sampler."""
    log_ratio = (old - sampler) * mask
    if mode.startswith("token"):
        w = torch.exp(log_ratio)
    else:
        w = torch.exp(log_ratio.sum(dim=-1, keepdim=True))
    if mode.endswith("truncate"):
        return w.clamp(max=cap)
    return w.masked_fill(w > cap, 0.0)


@dataclass
class LossParts:
    loss: torch.Tensor
    ratio_mean: float
    clip_frac: float
    kl: float
    is_weight_mean: float
    mismatch: float  # mean |old - sampler| over the completion tokens


def grpo_loss(cfg: GRPOConfig, logp: torch.Tensor, old: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor,
              adv: torch.Tensor, ref: torch.Tensor | None = None) -> LossParts:
    """The GRPO loss of one batch: ``logp`` [B, T] (with grad), ``old``/``sampler``/``ref`` [B, T],
    ``mask`` [B, T] of completion tokens, ``adv`` [B]."""
    old, sampler = old.detach(), sampler.detach()
    log_ratio = logp - old
    if cfg.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    ratio = torch.exp(log_ratio)
    high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + high)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, clipped * a)
    is_w = torch.ones_like(per_token[:, :1])
    if cfg.importance_sampling_correction:
        is_w = importance_weights(old, sampler, mask, cfg.importance_sampling_mode, cfg.importance_sampling_cap)
        per_token = per_token * is_w
    kl = torch.zeros_like(logp)
    if cfg.beta != 0.0:
        if ref is None:
            raise ValueError("beta > 0 needs the reference model's log-probabilities")
        d = ref.detach() - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + cfg.beta * kl
    per_token = per_token.expand_as(mask) if per_token.shape != mask.shape else per_token
    if cfg.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif cfg.loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        loss = (per_token * mask).sum() / (mask.shape[0] * cfg.max_completion_length)
    n = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        r = ratio.expand_as(mask) if ratio.shape != mask.shape else ratio
        clip = ((r < 1 - cfg.epsilon) & (a < 0)) | ((r > 1 + high) & (a > 0))
        w = is_w.expand_as(mask) if is_w.shape != mask.shape else is_w
        return LossParts(loss, float((r * mask).sum() / n), float((clip.float() * mask).sum() / n),
                         float((kl * mask).sum() / n), float((w * mask).sum() / n),
                         float(((old - sampler).abs() * mask).sum() / n))
