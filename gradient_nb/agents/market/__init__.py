"""Hide-and-Shill (arXiv 2508.05387) as a reproducible study on a simulated market.

``simulator``: a seeded market with honest traders, information events (a true value change the price
follows with a delay), and manipulators who run shill campaigns over a synthetic social graph and
pump-and-dump; every episode carries its ground truth (manipulated windows, manipulating accounts, the
information-only counterfactual price). ``detector``: multi-modal window features (post text through
the offline embedder, graph signals, delayed price reaction and volume), the z-score rule baseline, the
theory-based reward and the logistic detector policy trained with the rl layer's GRPO loss.
``study``: train, evaluate on held-out episodes with bootstrap intervals, one round of manipulator
co-evolution (a best-response search, or the manipulators learning with the same GRPO), the same
figures after it. ``swarm``: the detectors as agents on the mesh (each hosting an MCP tool backed by its
own GRPO-trained policy), chosen by beacons and combined by the agents layer's weighted vote.
"""

from .detector import (
           FEATURES,
           Detector,
           attribution_accuracy,
           f1_score,
           rule_flags,
           theory_reward,
           window_features,
)
from .simulator import Episode, MarketConfig, Strategy, simulate

__all__ = ["FEATURES", "Detector", "Episode", "MarketConfig", "Strategy", "attribution_accuracy", "f1_score",
           "rule_flags", "simulate", "theory_reward", "window_features"]
