"""Hide-and-Shill on the simulated market: determinism, labels, the theory-based reward, GRPO training, the bench.

The features go through the real MiniLM embedder (loaded once for the module); training uses the rl
layer's GRPO loss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradient_nb.agents.market import Detector, MarketConfig, Strategy, f1_score, simulate, theory_reward
from gradient_nb.agents.market.detector import unexplained, window_features
from gradient_nb.agents.market.study import train_detector
from gradient_nb.rl import grpo


def test_simulator_is_deterministic_by_seed() -> None:
    a, b, c = simulate(7), simulate(7), simulate(8)
    assert np.array_equal(a.price, b.price) and np.array_equal(a.volume, b.volume)
    assert a.post_text == b.post_text and np.array_equal(a.post_account, b.post_account)
    assert np.array_equal(a.labels, b.labels) and a.campaigns == b.campaigns and a.events == b.events
    assert not np.array_equal(a.price, c.price)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        MarketConfig(steps=10)
    with pytest.raises(ValueError):
        Strategy(accounts=0.0)
    with pytest.raises(ValueError):
        Strategy(pump_steps=0)


def test_labels_a_pump_moves_the_price_without_information() -> None:
    cfg = MarketConfig()
    found = 0
    for seed in range(20):
        ep = simulate(seed, cfg)
        assert ep.campaigns and ep.labels.any()
        for s, pe, de in ep.campaigns:
            # the windows of the campaign are labelled, and only its accounts' cluster posts shill
            assert ep.labels[s // cfg.window] and ep.labels[(de - 1) // cfg.window]
            # the pump moves the price off the information-only path by much more than noise
            assert ep.price[pe] - ep.info_price[pe] > 4 * cfg.noise_sigma
            if not any(s - cfg.window <= t < pe for t, _, _ in ep.events):
                found += 1  # no information event during this pump: the value is flat, the price is not
                assert ep.value[pe] == ep.value[s]
                assert ep.price[pe] - ep.price[s] > 2 * cfg.noise_sigma
        # manipulators are exactly the cluster accounts that posted in a campaign
        assert not ep.manipulators[: cfg.n_honest].any() and ep.manipulators.sum() >= 1
        shill_posters = {int(a) for a, t in zip(ep.post_account, ep.post_text, strict=True) if "to the moon" in t}
        assert shill_posters and shill_posters <= set(np.nonzero(ep.manipulators)[0].tolist())
        # windows with an information event and no campaign are not labelled
        for t, _, _ in ep.events:
            if not any(s <= t < de for s, _, de in ep.campaigns) and not any(
                    abs(t // cfg.window - s // cfg.window) <= 2 for s, _, _ in ep.campaigns):
                assert not ep.labels[t // cfg.window]
    assert found >= 10


def test_reward_ranks_an_informed_flag_below_a_manipulation_flag() -> None:
    cfg = MarketConfig()
    informed, manipulated = [], []
    for seed in range(30):
        ep = simulate(seed, cfg)
        u, info = unexplained(ep)
        for w in range(cfg.n_windows):
            flag = np.zeros(cfg.n_windows, bool)
            flag[w] = True
            r = float(theory_reward(ep, flag)[w])
            if ep.labels[w] and u[w] > 2:
                manipulated.append(r)
            elif info[w] > 2 and not ep.labels[max(w - 1, 0): w + 2].any():
                informed.append(r)  # an information move, away from any campaign (and its price's return)
    assert informed and manipulated
    assert max(informed) < min(manipulated)
    assert np.mean(informed) < -0.5 < 0.5 < np.mean(manipulated)


@pytest.fixture(scope="module")
def features() -> dict:
    cfg = MarketConfig()
    train = [simulate(100 + i, cfg) for i in range(16)]
    test = [simulate(500 + i, cfg) for i in range(16)]
    return {"train": train, "test": test, "Xtr": [window_features(e) for e in train],
            "Xte": [window_features(e) for e in test]}


def test_grpo_training_improves_held_out_f1(features: dict) -> None:
    det = Detector(seed=0).fit_scaler(np.concatenate(features["Xtr"]))
    y = np.concatenate([e.labels for e in features["test"]])

    def f1(d: Detector) -> float:
        return f1_score(y, np.concatenate([d.flags(x) for x in features["Xte"]]))

    before = f1(det)
    history = train_detector(det, features["train"], features["Xtr"], grpo, steps=40, batch=8, seed=0)
    after = f1(det)
    assert np.mean(history[-5:]) > np.mean(history[:5])
    assert after > before + 0.2 and after > 0.6, (before, after)


def test_bench_prints_every_key(capsys: pytest.CaptureFixture[str], features: dict) -> None:
    from gradient_nb.bench import market

    assert market.main(["--train-episodes", "4", "--test-episodes", "4", "--steps", "3", "--retrain-steps", "2",
                        "--candidates", "2", "--candidate-episodes", "1", "--bootstrap", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (*market.KEYS, "f1_rule_ci", "f1_untrained_ci", "attribution_accuracy_ci", "coevolution", "f1_trained_after_coevolution_ci", "target_f1_trained_above_both"):
        assert key in out, key
    assert len(out["f1_trained_ci"]) == 2 and out["f1_trained_ci"][0] <= out["f1_trained"] <= out["f1_trained_ci"][1]
    assert out["coevolution"]["candidates"] == 2 and Strategy(**out["coevolution"]["strategy"])


def test_manipulators_learning_with_grpo_evade_the_trained_detector(features: dict) -> None:
    from gradient_nb.agents.market.study import _campaign_stats, learn_strategy

    det = Detector(seed=0).fit_scaler(np.concatenate(features["Xtr"]))
    train_detector(det, features["train"], features["Xtr"], grpo, steps=40, batch=8, seed=0)
    cfg = MarketConfig()
    learned, tried = learn_strategy(det, cfg, grpo, steps=4, episodes=2, seed=0)
    assert len(tried) == 4 * 8

    def recall(st: Strategy) -> float:
        eps = [simulate(900 + i, cfg, st) for i in range(6)]
        return _campaign_stats(det, eps, [window_features(e) for e in eps])[1]

    assert recall(learned) < recall(Strategy())  # held-out episodes: the learned strategy is flagged less
