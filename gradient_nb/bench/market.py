"""``gradient-nb bench market``: Hide-and-Shill's detectors on held-out simulated episodes, one JSON object.

The study is ``gradient_nb.agents.market.study.run_study`` (its docstring has the protocol); this bench
hands it the rl layer's GRPO (``gradient_nb.rl.grpo``) and prints every figure:

- ``f1_rule`` (z-score baseline), ``f1_untrained`` (the detector policy as initialised),
  ``f1_trained`` (after GRPO on the theory-based reward), each with a 95% bootstrap interval over
  held-out episodes (``*_ci``), and the ratios ``trained_vs_rule``, ``trained_vs_untrained``;
- ``attribution_accuracy`` (R-precision of the manipulating accounts from the trained detector's flags;
  ``attribution_accuracy_rule`` from the rule's), ``auc_untrained``, ``auc_trained``;
- after one round of manipulator co-evolution (a best-response search over strategies, or with
  ``--manipulators grpo`` the same GRPO over a categorical strategy policy):
  ``f1_rule_after_coevolution``, ``f1_untrained_after_coevolution``, ``f1_trained_after_coevolution``
  (the trained detector, not retrained), ``attribution_accuracy_after_coevolution``, and the detector's
  answer ``f1_retrained_after_coevolution``; ``coevolution`` says what the manipulators chose;
- ``target_f1_trained_above_both``: the lower end of ``f1_trained_ci`` above both baselines.

With ``--swarm N`` (opt-in: it trains N more detectors and starts two in-process meshes, about doubling
the run), the same held-out episodes are asked of a swarm of N detector agents on a real mesh
(``gradient_nb.agents.market.swarm``: each trained with the same GRPO on its own disjoint shard of the
training episodes, chosen by beacon selection, combined by the weighted vote, outcomes in the ledger):
``f1_swarm`` / ``f1_swarm_ci`` (every detector honest), ``swarm_detectors`` (each one's own F1 over the
mesh and final reputation), ``f1_best_detector``, ``swarm_vs_best_detector``; and on a fresh mesh with
the last detector adversarial (it reports the inverse of its policy): ``f1_swarm_adversarial`` /
``f1_swarm_adversarial_ci``, ``swarm_adversarial_detectors``, ``f1_adversary``, ``reputation_adversary``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

KEYS = ("f1_rule", "f1_untrained", "f1_trained", "f1_trained_ci", "attribution_accuracy",
        "f1_rule_after_coevolution", "f1_untrained_after_coevolution", "f1_trained_after_coevolution",
        "attribution_accuracy_after_coevolution", "f1_retrained_after_coevolution")
SWARM_KEYS = ("f1_swarm", "f1_swarm_ci", "swarm_detectors", "f1_best_detector", "swarm_vs_best_detector",
              "f1_swarm_adversarial", "f1_swarm_adversarial_ci", "swarm_adversarial_detectors", "f1_adversary",
              "reputation_adversary", "swarm_config", "swarm_wall_s")


def main(argv: list[str] | None = None) -> int:
    from ..agents.market.simulator import MarketConfig
    from ..agents.market.study import StudyConfig, run_study
    from ..rl import grpo

    d = StudyConfig()
    p = argparse.ArgumentParser(prog="gradient-nb bench market", description=__doc__.split("\n")[0])
    p.add_argument("--train-episodes", type=int, default=d.train_episodes)
    p.add_argument("--test-episodes", type=int, default=d.test_episodes)
    p.add_argument("--steps", type=int, default=d.steps, help="GRPO steps (default: %(default)s)")
    p.add_argument("--retrain-steps", type=int, default=d.retrain_steps)
    p.add_argument("--num-generations", type=int, default=d.num_generations)
    p.add_argument("--batch", type=int, default=d.batch, help="episodes per GRPO step")
    p.add_argument("--candidates", type=int, default=d.coevolution_candidates, help="strategies the manipulators try")
    p.add_argument("--candidate-episodes", type=int, default=d.coevolution_episodes)
    p.add_argument("--manipulators", choices=("search", "grpo"), default=d.manipulators,
                   help="how the manipulators answer the trained detector (default: %(default)s)")
    p.add_argument("--manipulator-steps", type=int, default=d.manipulator_steps, help="their GRPO steps")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap)
    p.add_argument("--market-steps", type=int, default=MarketConfig().steps, help="steps per episode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--swarm", type=int, default=0, metavar="N",
                   help="also run a swarm of N detector agents over an in-process mesh (default: off)")
    p.add_argument("--swarm-k", type=int, default=None, help="detectors asked per episode (default: N)")
    args = p.parse_args(argv)
    if min(args.train_episodes, args.test_episodes, args.steps, args.batch, args.candidates,
           args.candidate_episodes, args.bootstrap, args.manipulator_steps) < 1 or args.num_generations < 2:
        p.error("counts are at least 1 and --num-generations at least 2")
    if args.swarm and not 2 <= args.swarm <= args.train_episodes:
        p.error("--swarm is 2 detectors (one honest, one adversarial) up to one per training episode")
    if args.swarm_k is not None and not 1 <= args.swarm_k <= max(args.swarm, 1):
        p.error("--swarm-k is between 1 and --swarm")
    if args.market_steps < 4 * MarketConfig().window:
        p.error(f"--market-steps is at least {4 * MarketConfig().window}")
    cfg = StudyConfig(train_episodes=args.train_episodes, test_episodes=args.test_episodes, steps=args.steps,
                      batch=args.batch, num_generations=args.num_generations, seed=args.seed,
                      bootstrap=args.bootstrap, coevolution_candidates=args.candidates,
                      coevolution_episodes=args.candidate_episodes, retrain_steps=args.retrain_steps,
                      manipulators=args.manipulators, manipulator_steps=args.manipulator_steps,
                      market=MarketConfig(steps=args.market_steps))
    t0 = time.perf_counter()
    out = run_study(cfg, grpo, keep=bool(args.swarm))
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    art = out.pop("_artifacts", None)
    if art is not None:
        from ..agents.market.swarm import swarm_figures

        t1 = time.perf_counter()
        out.update(asyncio.run(swarm_figures(
            art["train"], art["X_train"], art["test"], art["X"], grpo, detectors=args.swarm, k=args.swarm_k,
            steps=args.steps, bootstrap=args.bootstrap, seed=args.seed, batch=args.batch,
            num_generations=args.num_generations)))
        out["swarm_wall_s"] = round(time.perf_counter() - t1, 2)
    print(json.dumps(out))
    return 0
