"""The Hide-and-Shill study: train a detector with GRPO, evaluate held out, one co-evolution round.

1. Simulate ``train_episodes`` and, with other seeds, ``test_episodes`` (``simulator``).
2. Baselines on the held-out episodes: the z-score rule (``f1_rule``) and the detector policy as
   initialised (``f1_untrained``).
3. GRPO (``train_detector``): each step draws ``batch`` training episodes (the prompts); the policy
   samples ``num_generations`` flag vectors per episode (the completions, one Bernoulli "token" per
   window); each completion's reward is the episode's delayed theory-based reward (the mean over its
   windows, ``detector.theory_reward``); advantages and the clipped loss are the rl layer's
   (``gradient_nb.rl.grpo.advantages`` and ``grpo_loss`` with TRL's ``GRPOConfig`` names), with
   ``num_iterations`` optimizer steps per batch, so the ratio moves off 1 and the clip engages.
   The grpo module is passed in (``grpo=``): the layering test keeps the agents layer from importing
   the rl layer, so the bench and the notebook, which sit above both, hand it over; there is one GRPO.
4. ``f1_trained``, ``attribution_accuracy`` (R-precision of manipulating accounts from the flags) on the
   held-out episodes, with bootstrap intervals over episodes (``bootstrap`` resamples, 95%).
5. Co-evolution, one round: the manipulators answer the trained detector with a **best-response
   search** (``manipulators="search"``, the default): every candidate ``Strategy`` of a small grid (how many accounts, pump length and
   pressure, posting jitter, disguise as news, starting after real news) is played on
   ``coevolution_episodes`` fresh episodes, scored by its payoff ``profit × (1 - recall)`` (profit: the
   mean unexplained price excess at the pump's end, relative to the default strategy's; recall: the
   share of its campaign windows the trained detector flags); the best is kept. Or they learn with the
   same GRPO (``manipulators="grpo"``, ``learn_strategy``): a categorical policy over the grid, 8
   strategies sampled a step, each rewarded with its payoff on fresh episodes. Then the same figures
   on held-out episodes played with it (``*_after_coevolution``), and the detector's answer: GRPO
   continued for ``retrain_steps`` on training episodes half of which use the new strategy
   (``f1_retrained_after_coevolution``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .detector import (
    Detector,
    attribution_accuracy,
    f1_score,
    rule_flags,
    theory_reward,
    unexplained,
    window_features,
)
from .simulator import Episode, MarketConfig, Strategy, simulate


@dataclass
class StudyConfig:
    train_episodes: int = 64
    test_episodes: int = 64
    steps: int = 120
    batch: int = 8
    num_generations: int = 8
    num_iterations: int = 2
    learning_rate: float = 0.05
    seed: int = 0
    bootstrap: int = 1000
    coevolution_candidates: int = 24  # strategies tried (a seeded subset of the grid)
    coevolution_episodes: int = 6
    retrain_steps: int = 60
    manipulators: str = "search"  # how they answer the trained detector: "search" or "grpo"
    manipulator_steps: int = 8  # GRPO steps when manipulators == "grpo"
    market: MarketConfig = field(default_factory=MarketConfig)


def _logp(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of Bernoulli flags ``actions`` under ``logits`` (broadcast)."""
    return -torch.nn.functional.binary_cross_entropy_with_logits(logits.expand_as(actions), actions, reduction="none")


def train_detector(det: Detector, episodes: list[Episode], X: list[np.ndarray], grpo: Any, *, steps: int,
                   batch: int = 8, num_generations: int = 8, num_iterations: int = 2, learning_rate: float = 0.05,
                   seed: int = 0) -> list[float]:
    """GRPO on the theory-based reward; returns the mean sampled reward of each step."""
    cfg = grpo.GRPOConfig(num_generations=num_generations, learning_rate=learning_rate, loss_type="grpo",
                          scale_rewards="group", beta=0.0)
    opt = torch.optim.Adam(det.parameters(), lr=cfg.learning_rate)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    G, history = cfg.num_generations, []
    for _ in range(steps):
        idx = rng.choice(len(episodes), size=min(batch, len(episodes)), replace=False)
        with torch.no_grad():
            logits = torch.stack([det.logits(X[i]) for i in idx])  # [B, windows]
            actions = torch.bernoulli(torch.sigmoid(logits)[:, None, :].expand(-1, G, -1), generator=gen)
            old = _logp(logits[:, None, :], actions).reshape(len(idx) * G, -1)
        rewards = torch.tensor([float(theory_reward(episodes[i], actions[b].numpy().astype(bool)).mean(-1)[g])
                                for b, i in enumerate(idx) for g in range(G)])
        adv = grpo.advantages(rewards, G, cfg.scale_rewards)
        flat = actions.reshape(len(idx) * G, -1)
        mask = torch.ones_like(flat)
        for _ in range(num_iterations):
            logits = torch.stack([det.logits(X[i]) for i in idx])
            logp = _logp(logits[:, None, :], actions).reshape(len(idx) * G, -1)
            parts = grpo.grpo_loss(cfg, logp, old, old, mask, adv)  # on-policy: sampler == old
            opt.zero_grad()
            parts.loss.backward()
            opt.step()
        history.append(float(rewards.mean()))
    return history


def bootstrap_f1(labels: list[np.ndarray], flags: list[np.ndarray], n: int, seed: int) -> tuple[float, float, float]:
    """Pooled window F1 and its 95% percentile interval over episodes resampled with replacement."""
    point = f1_score(np.concatenate(labels), np.concatenate(flags))
    rng = np.random.default_rng(seed)
    k = len(labels)
    tp = np.array([float((y & f).sum()) for y, f in zip(labels, flags, strict=True)])
    tot = np.array([float(y.sum() + f.sum()) for y, f in zip(labels, flags, strict=True)])
    idx = rng.integers(k, size=(n, k))
    stats = 2 * tp[idx].sum(1) / np.maximum(tot[idx].sum(1), 1e-9)
    return point, float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def bootstrap_mean(values: np.ndarray, n: int, seed: int) -> tuple[float, float, float]:
    v = np.asarray([x for x in values if not np.isnan(x)])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(len(v), size=(n, len(v)))].mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates over every threshold, and the area under the curve."""
    y = np.asarray(labels, bool)
    order = np.argsort(-scores, kind="stable")
    tps = np.concatenate([[0], np.cumsum(y[order])])
    fps = np.concatenate([[0], np.cumsum(~y[order])])
    tpr, fpr = tps / max(y.sum(), 1), fps / max((~y).sum(), 1)
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def _campaign_stats(det: Detector, eps: list[Episode], X: list[np.ndarray]) -> tuple[float, float]:
    """(mean unexplained excess at each pump's end, recall of the campaign windows) under ``det``."""
    excess, hit, total = [], 0.0, 0.0
    for ep, x in zip(eps, X, strict=True):
        for _, pe, _ in ep.campaigns:
            excess.append(ep.price[pe] - ep.info_price[pe])
        f = det.flags(x)
        hit += float((f & ep.labels).sum())
        total += float(ep.labels.sum())
    return float(np.mean(excess)) if excess else 0.0, hit / max(total, 1.0)


STRATEGY_GRID = {"accounts": (1.0, 0.5, 0.25), "shape": ((8, 1.0), (14, 0.5)), "jitter": (0, 3),
                 "disguise": (0.0, 0.6), "after_news": (False, True)}


def best_response(det: Detector, market: MarketConfig, *, candidates: int, episodes: int, seed: int,
                  embed=None) -> tuple[Strategy, list[dict]]:
    """The manipulators' best answer to ``det`` among ``candidates`` strategies of ``STRATEGY_GRID``."""
    kw = {} if embed is None else {"embed": embed}
    grid = list(itertools.product(*STRATEGY_GRID.values()))
    rng = np.random.default_rng(seed)
    default = (1.0, (8, 1.0), 0, 0.0, False)
    picks = [default, *[grid[i] for i in rng.permutation(len(grid)) if grid[i] != default][:candidates - 1]]
    seeds = [10_000_000 + seed * 1000 + i for i in range(episodes)]
    tried, base_profit = [], None
    for accounts, (pump, pressure), jitter, disguise, after in picks:
        st = Strategy(accounts=accounts, pump_steps=pump, pressure=pressure, jitter=jitter, disguise=disguise,
                      after_news=after)
        eps = [simulate(s, market, st) for s in seeds]
        profit, recall = _campaign_stats(det, eps, [window_features(e, **kw) for e in eps])
        base_profit = profit if base_profit is None else base_profit
        payoff = profit / max(base_profit, 1e-9) * (1 - recall)
        tried.append({"strategy": st.as_dict(), "profit": profit, "recall": recall, "payoff": payoff})
    best = max(tried, key=lambda r: r["payoff"])
    return Strategy(**best["strategy"]), tried


def learn_strategy(det: Detector, market: MarketConfig, grpo: Any, *, steps: int, episodes: int, seed: int,
                   num_generations: int = 8, learning_rate: float = 0.5, embed=None) -> tuple[Strategy, list[dict]]:
    """The manipulators learn with the same GRPO: a categorical policy over ``STRATEGY_GRID`` (one
    "token" per rollout: the strategy), each rollout played on ``episodes`` fresh episodes against
    ``det`` and rewarded with the payoff ``profit × (1 - recall)``; returns the most probable strategy."""
    kw = {} if embed is None else {"embed": embed}
    grid = list(itertools.product(*STRATEGY_GRID.values()))

    def strategy(i: int) -> Strategy:
        accounts, (pump, pressure), jitter, disguise, after = grid[i]
        return Strategy(accounts=accounts, pump_steps=pump, pressure=pressure, jitter=jitter, disguise=disguise,
                        after_news=after)

    def play(st: Strategy, seeds: list[int]) -> tuple[float, float]:
        eps = [simulate(s, market, st) for s in seeds]
        return _campaign_stats(det, eps, [window_features(e, **kw) for e in eps])

    base_profit, _ = play(Strategy(), [20_000_000 + seed * 1000 + i for i in range(2 * episodes)])
    cfg = grpo.GRPOConfig(num_generations=num_generations, learning_rate=learning_rate, loss_type="grpo",
                          scale_rewards="group")
    logits = torch.zeros(len(grid), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=cfg.learning_rate)
    gen = torch.Generator().manual_seed(seed)
    tried: list[dict] = []
    for step in range(steps):
        seeds = [30_000_000 + seed * 100_000 + step * episodes + i for i in range(episodes)]
        with torch.no_grad():
            arms = torch.multinomial(torch.softmax(logits, 0), cfg.num_generations, replacement=True, generator=gen)
            old = torch.log_softmax(logits, 0)[arms][:, None]
        rewards = []
        for a in arms.tolist():
            profit, recall = play(strategy(a), seeds)
            payoff = profit / max(base_profit, 1e-9) * (1 - recall)
            rewards.append(payoff)
            tried.append({"strategy": strategy(a).as_dict(), "profit": profit, "recall": recall, "payoff": payoff,
                          "step": step})
        adv = grpo.advantages(torch.tensor(rewards), cfg.num_generations, cfg.scale_rewards)
        for _ in range(2):
            logp = torch.log_softmax(logits, 0)[arms][:, None]
            parts = grpo.grpo_loss(cfg, logp, old, old, torch.ones_like(logp), adv)
            opt.zero_grad()
            parts.loss.backward()
            opt.step()
    return strategy(int(torch.argmax(logits))), tried


def _evaluate(eps: list[Episode], X: list[np.ndarray], dets: dict[str, Detector | None], cfg: StudyConfig,
              suffix: str, seed: int) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    labels = [e.labels for e in eps]
    out: dict[str, Any] = {}
    flags_by: dict[str, list[np.ndarray]] = {}
    for name, det in dets.items():
        flags = [rule_flags(e) for e in eps] if det is None else [det.flags(x) for x in X]
        flags_by[name] = flags
        f1, lo, hi = bootstrap_f1(labels, flags, cfg.bootstrap, seed)
        out[f"f1_{name}{suffix}"] = round(f1, 4)
        out[f"f1_{name}{suffix}_ci"] = [round(lo, 4), round(hi, 4)]
    for name, key in (("trained", "attribution_accuracy"), ("rule", "attribution_accuracy_rule")):
        acc, lo, hi = bootstrap_mean(np.array([attribution_accuracy(e, f) for e, f in zip(eps, flags_by[name], strict=True)]),
                                     cfg.bootstrap, seed)
        out[f"{key}{suffix}"] = round(acc, 4)
        out[f"{key}{suffix}_ci"] = [round(lo, 4), round(hi, 4)]
    return out, flags_by


def run_study(cfg: StudyConfig, grpo: Any, *, embed=None, keep: bool = False) -> dict[str, Any]:
    """Every figure of the study, as a JSON-able dict; ``keep`` adds the episodes, detectors and flags
    under ``"_artifacts"`` (for the notebook's figures)."""
    kw = {} if embed is None else {"embed": embed}
    m = cfg.market
    train = [simulate(1_000_000 + cfg.seed * 10_000 + i, m) for i in range(cfg.train_episodes)]
    test = [simulate(2_000_000 + cfg.seed * 10_000 + i, m) for i in range(cfg.test_episodes)]
    Xtr = [window_features(e, **kw) for e in train]
    Xte = [window_features(e, **kw) for e in test]
    untrained = Detector(seed=cfg.seed).fit_scaler(np.concatenate(Xtr))
    det = untrained.clone()
    history = train_detector(det, train, Xtr, grpo, steps=cfg.steps, batch=cfg.batch,
                             num_generations=cfg.num_generations, num_iterations=cfg.num_iterations,
                             learning_rate=cfg.learning_rate, seed=cfg.seed)
    dets = {"rule": None, "untrained": untrained, "trained": det}
    out, flags = _evaluate(test, Xte, dets, cfg, "", cfg.seed)
    y = np.concatenate([e.labels for e in test])
    for name in ("untrained", "trained"):
        out[f"auc_{name}"] = round(roc_curve(y, np.concatenate([dets[name].scores(x) for x in Xte]))[2], 4)
    out["trained_vs_rule"] = round(out["f1_trained"] / max(out["f1_rule"], 1e-9), 3)
    out["trained_vs_untrained"] = round(out["f1_trained"] / max(out["f1_untrained"], 1e-9), 3)
    k = max(1, len(history) // 10)
    out["reward_first_steps"], out["reward_last_steps"] = round(np.mean(history[:k]), 4), round(np.mean(history[-k:]), 4)
    u = np.concatenate([unexplained(e)[0] for e in test])
    out["label_vs_abnormal_f1"] = round(f1_score(y, u > 2.0), 4)  # how well the reward's notion matches labels

    if cfg.manipulators == "grpo":
        strategy, tried = learn_strategy(det, m, grpo, steps=cfg.manipulator_steps, episodes=cfg.coevolution_episodes,
                                         seed=cfg.seed, embed=embed)
        method = f"GRPO over a strategy grid ({cfg.manipulator_steps} steps, 8 strategies a step)"
    elif cfg.manipulators == "search":
        strategy, tried = best_response(det, m, candidates=cfg.coevolution_candidates,
                                        episodes=cfg.coevolution_episodes, seed=cfg.seed, embed=embed)
        method = "best-response search over a strategy grid (not GRPO)"
    else:
        raise ValueError(f"manipulators learn by 'search' or 'grpo', not {cfg.manipulators!r}")
    test2 = [simulate(3_000_000 + cfg.seed * 10_000 + i, m, strategy) for i in range(cfg.test_episodes)]
    Xte2 = [window_features(e, **kw) for e in test2]
    after, flags2 = _evaluate(test2, Xte2, dets, cfg, "_after_coevolution", cfg.seed + 1)
    out.update(after)
    train2 = [simulate(4_000_000 + cfg.seed * 10_000 + i, m, strategy) for i in range(cfg.train_episodes // 2)]
    retrained = det.clone()
    mix = train[: cfg.train_episodes - len(train2)] + train2
    train_detector(retrained, mix, Xtr[: len(mix) - len(train2)] + [window_features(e, **kw) for e in train2], grpo,
                   steps=cfg.retrain_steps, batch=cfg.batch, num_generations=cfg.num_generations,
                   num_iterations=cfg.num_iterations, learning_rate=cfg.learning_rate, seed=cfg.seed + 1)
    re, _ = _evaluate(test2, Xte2, {"retrained": retrained, "rule": None, "trained": retrained}, cfg,
                      "_after_coevolution", cfg.seed + 1)
    out["f1_retrained_after_coevolution"] = re["f1_retrained_after_coevolution"]
    out["f1_retrained_after_coevolution_ci"] = re["f1_retrained_after_coevolution_ci"]
    out["attribution_accuracy_retrained_after_coevolution"] = re["attribution_accuracy_after_coevolution"]
    chosen = [r for r in tried if Strategy(**r["strategy"]) == strategy]
    out["coevolution"] = {"method": method, "candidates": len(tried), "strategy": strategy.as_dict(),
                          "payoff_best": round(max(r["payoff"] for r in tried), 4),
                          "recall_chosen": round(float(np.mean([r["recall"] for r in chosen])), 4) if chosen else None}
    if cfg.manipulators == "search":
        out["coevolution"]["recall_default"] = round(tried[0]["recall"], 4)
    lo = out["f1_trained_ci"][0]
    out["target_f1_trained_above_both"] = bool(lo > max(out["f1_rule"], out["f1_untrained"]))
    out["config"] = {"train_episodes": cfg.train_episodes, "test_episodes": cfg.test_episodes, "steps": cfg.steps,
                     "num_generations": cfg.num_generations, "seed": cfg.seed, "bootstrap": cfg.bootstrap}
    if keep:
        out["_artifacts"] = {"train": train, "X_train": Xtr, "test": test, "test_after": test2, "X": Xte, "X_after": Xte2, "detectors": dets,
                             "retrained": retrained, "flags": flags, "flags_after": flags2, "history": history,
                             "tried": tried}
    return out


def small(**over: Any) -> StudyConfig:
    """Settings for tests and the notebook: seconds, not minutes."""
    base = StudyConfig(train_episodes=24, test_episodes=24, steps=60, bootstrap=300, coevolution_candidates=8,
                       coevolution_episodes=4, retrain_steps=30)
    return replace(base, **over)
