"""GRPO loss, advantages and importance weights against values computed by hand (in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from gradient_nb.rl.grpo import GRPOConfig, advantages, grpo_loss, importance_weights

# One group of two completions; the first has 2 tokens, the second 1 (its 2nd is padding).
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
OLD = torch.zeros(2, 2)
RATIO = torch.tensor([[1.5, 1.0], [0.5, 1.0]])
ADV = torch.tensor([0.5, -0.5])
# exp(old - sampler) = [[4, 0.5], [4, 1]]
SAMPLER = torch.log(torch.tensor([[0.25, 2.0], [0.25, 1.0]]))


def _loss(**kw):
    cfg = GRPOConfig(num_generations=2, epsilon=0.2, max_completion_length=4,
                     importance_sampling_correction=kw.pop("correction", False), **kw)
    logp = torch.log(RATIO).requires_grad_(True)
    return grpo_loss(cfg, logp, OLD, SAMPLER, MASK, ADV, ref=torch.zeros(2, 2)), logp


def test_advantages_by_group_and_scaling() -> None:
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    s = math.sqrt(0.5)  # unbiased std of {1, 0}
    assert torch.allclose(advantages(r, 2, "group"), torch.tensor([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0, 0]))
    assert torch.allclose(advantages(r, 2, "none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    batch_std = float(r.std())
    assert torch.allclose(advantages(r, 2, "batch"), torch.tensor([0.5, -0.5, 0, 0]) / (batch_std + 1e-4))


# Token terms -min(ρA, clip(ρ)A): seq 0 (A=+.5): ρ=1.5 -> clipped 1.2·.5 -> -0.6; ρ=1 -> -0.5.
# seq 1 (A=-.5): ρ=0.5 -> min(-.25, .8·-.5=-.4) -> +0.4; its 2nd token is masked.
@pytest.mark.parametrize("loss_type, want", [
    ("dapo", (-0.6 - 0.5 + 0.4) / 3),  # over all 3 tokens
    ("grpo", ((-0.6 - 0.5) / 2 + 0.4) / 2),  # per sequence, then over sequences
    ("dr_grpo", (-0.6 - 0.5 + 0.4) / (2 * 4)),  # over sequences x max_completion_length
])
def test_loss_types(loss_type: str, want: float) -> None:
    parts, _ = _loss(loss_type=loss_type)
    assert parts.loss.item() == pytest.approx(want, abs=1e-6)
    assert parts.clip_frac == pytest.approx(2 / 3)


def test_gradient_flows_only_through_unclipped_tokens() -> None:
    parts, logp = _loss(loss_type="dapo")
    parts.loss.backward()
    # d(-ρA)/dlogp = -ρA for the unclipped token (1.0 · 0.5), over 3 tokens
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5 / 3], [0.0, 0.0]]), atol=1e-7)


def test_epsilon_high_lets_the_positive_token_through() -> None:
    parts, _ = _loss(loss_type="dapo", epsilon_high=0.6)  # 1.5 < 1.6: -1.5·.5 = -0.75
    assert parts.loss.item() == pytest.approx((-0.75 - 0.5 + 0.4) / 3, abs=1e-6)


def test_sequence_level_ratio() -> None:
    # seq 0: exp(mean(ln 1.5, 0)) = 1.2247 > 1.2 -> both tokens -0.6; seq 1: 0.5 -> +0.4
    parts, _ = _loss(loss_type="dapo", importance_sampling_level="sequence")
    assert parts.loss.item() == pytest.approx((-0.6 - 0.6 + 0.4) / 3, abs=1e-6)


@pytest.mark.parametrize("mode, want", [
    ("token_truncate", [[3.0, 0.5], [3.0, 1.0]]),
    ("token_mask", [[0.0, 0.5], [0.0, 1.0]]),
    ("sequence_truncate", [[2.0], [3.0]]),  # exp(ln 4 + ln .5) = 2; exp(ln 4) = 4 -> 3
    ("sequence_mask", [[2.0], [0.0]]),
])
def test_importance_weight_modes(mode: str, want: list) -> None:
    assert torch.allclose(importance_weights(OLD, SAMPLER, MASK, mode, 3.0), torch.tensor(want))


def test_correction_multiplies_each_token() -> None:
    parts, _ = _loss(loss_type="dapo", correction=True, importance_sampling_mode="token_truncate")
    assert parts.loss.item() == pytest.approx((-0.6 * 3 - 0.5 * 0.5 + 0.4 * 3) / 3, abs=1e-6)
    # mismatch: mean |old - sampler| = (ln 4 + ln 2 + ln 4) / 3
    assert parts.mismatch == pytest.approx((2 * math.log(4) + math.log(2)) / 3, abs=1e-6)


def test_kl_to_the_reference() -> None:
    plain, _ = _loss(loss_type="dapo")
    parts, _ = _loss(loss_type="dapo", beta=0.1)
    # k3 with ref = 0: exp(-logp) + logp - 1 -> 1/1.5 + ln 1.5 - 1, 0, 2 + ln .5 - 1
    kl = [1 / 1.5 + math.log(1.5) - 1, 0.0, 2 + math.log(0.5) - 1]
    assert parts.kl == pytest.approx(sum(kl) / 3, abs=1e-6)
    assert parts.loss.item() == pytest.approx(plain.loss.item() + 0.1 * sum(kl) / 3, abs=1e-6)


def test_config_checks_names() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_mode"):
        GRPOConfig(importance_sampling_mode="token")
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
