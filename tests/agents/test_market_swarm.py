"""Hide-and-Shill's detectors as a swarm of agents on a real in-process mesh: each detector an agents-layer
Agent with its own GRPO-trained policy behind an MCP tool, chosen by beacons, combined by the weighted vote;
an adversarial detector is outvoted and loses reputation. Features go through the real MiniLM embedder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradient_nb.agents.market import MarketConfig, f1_score, simulate, window_features
from gradient_nb.agents.market.detector import unexplained
from gradient_nb.agents.market.swarm import (
    SERVER,
    TOOL,
    InvalidObservation,
    evaluate_swarm,
    local_swarm,
    observation,
    parse_observation,
    train_shards,
)
from gradient_nb.agents.mcp_mesh import MeshServer, ToolCallError
from gradient_nb.rl import grpo
from tests.conftest import HEARTBEAT, PEER_TIMEOUT

# Two honest voters and one adversary: where the honest two disagree the vote follows the more confident
# (and, once outcomes arrive, the more reputable) one, so the swarm may land between them, never far below
# the better one. This is the most it may fall below the best honest detector.
MARGIN = 0.1


@pytest.fixture(scope="module")
def market() -> dict:
    cfg = MarketConfig()
    train = [simulate(100 + i, cfg) for i in range(24)]
    test = [simulate(500 + i, cfg) for i in range(16)]
    Xtr, Xte = [window_features(e) for e in train], [window_features(e) for e in test]
    # Decentralized training: three detectors, each on its own disjoint shard of 8 episodes, own seed.
    detectors = train_shards(train, Xtr, grpo, 3, steps=40, batch=8)
    return {"test": test, "Xte": Xte, "detectors": detectors}


def test_observation_round_trips_and_bad_input_is_refused(market: dict) -> None:
    ep, x = market["test"][0], market["Xte"][0]
    obs = json.loads(json.dumps(observation(ep, x)))  # what crosses the wire is plain JSON
    assert not {"labels", "manipulators", "info_price", "campaigns"} & set(obs)
    X, windows, accounts, adjacency = parse_observation(obs)
    assert np.array_equal(X, x) and np.array_equal(adjacency, ep.adjacency)
    assert np.array_equal(accounts, ep.post_account) and windows.max() < ep.n_windows
    n_posts = len(obs["post_window"])
    for bad in ({k: v for k, v in obs.items() if k != "edges"},
                {**obs, "features": [row[:-1] for row in obs["features"]]},
                {**obs, "features": [[float("nan")] * len(x[0])] * len(x)},
                {**obs, "features": [[True] * len(x[0])] * len(x)},
                {**obs, "features": []},
                {**obs, "post_account": [obs["n_accounts"]] * n_posts},
                {**obs, "post_window": [len(x)] * n_posts},
                {**obs, "post_window": obs["post_window"][:-1]},
                {**obs, "edges": [[0, 1, 2]]},
                {**obs, "edges": [[0, -1]]},
                {**obs, "n_accounts": 0},
                "not an object"):
        with pytest.raises(InvalidObservation):
            parse_observation(bad)  # type: ignore[arg-type]


async def test_swarm_outvotes_an_adversarial_detector_that_loses_reputation(market: dict) -> None:
    test, Xte, dets = market["test"], market["Xte"], market["detectors"]
    y = np.concatenate([e.labels for e in test])
    local = {name: f1_score(y, np.concatenate([d.flags(x) for x in Xte]))
             for name, d in (("honest-0", dets[0]), ("honest-1", dets[1]))}
    roster = [("honest-0", dets[0], False), ("honest-1", dets[1], False), ("adversary", dets[2], True)]
    async with local_swarm(roster, k=3, heartbeat=HEARTBEAT, peer_timeout=PEER_TIMEOUT) as swarm:
        ids = {name: agent for agent, name in swarm.detectors().items()}
        assert set(ids) == {"honest-0", "honest-1", "adversary"}
        cap = swarm.ledger.agents()[ids["adversary"]]
        assert cap.role == "detector" and cap.skills[0].name == "market surveillance"
        assert {"features", "edges"} <= set(next(t for t in cap.tools if t["name"] == TOOL)["input_schema"]
                                            ["properties"])

        # Bad input over the mesh gets a typed error; the link and the agent stay up.
        obs = observation(test[0], Xte[0])
        swarm.toolbox.add("adversary", MeshServer(ids["adversary"], SERVER))
        for bad, kind in (({**obs, "post_account": [10**6] * len(obs["post_window"])}, "InvalidObservation"),
                          ({**obs, "features": "a pickle, perhaps"}, "InvalidArguments")):
            with pytest.raises(ToolCallError) as e:
                await swarm.toolbox.call("adversary", TOOL, bad)
            assert e.value.kind == kind, e.value

        # One episode by hand: every detector chosen by the beacon, the vote logged, accounts attributed.
        verdict = await swarm.flag(obs)
        assert sorted(verdict.asked) == sorted(ids.values()) and set(verdict.probabilities) == set(ids.values())
        assert np.array_equal(verdict.agent_flags(ids["adversary"]), ~dets[2].flags(Xte[0]))
        assert verdict.flags.any() and verdict.accounts  # the vote's flags point at accounts
        assert {"beacon", "bid", "select", "dispatch", "tool_call", "tool_result", "vote", "final"} <= \
            set(verdict.log.kinds())
        outcome = swarm.record(verdict)
        assert not outcome[ids["adversary"]] and outcome[ids["honest-0"]]

        early = await evaluate_swarm(swarm, test[1:5], Xte[1:5])
        late = await evaluate_swarm(swarm, test[5:], Xte[5:])
        with pytest.raises(ValueError):
            swarm.record(verdict)  # once per verdict: readers would ignore a second outcome of the same task
        # An audit as the reference instead of the vote (the windows the theory calls abnormal, once p* is
        # revealed): the adversary fails it too.
        audited = swarm.record(await swarm.flag(obs), reference=unexplained(test[0])[0] > 2.0)
        assert not audited[ids["adversary"]]
    rep = {n: late["detectors"][n]["reputation"] for n in ids}
    # The adversary's reputation falls as outcomes are recorded; the honest detectors' rises.
    assert rep["adversary"] < early["detectors"]["adversary"]["reputation"] < 0.5 < rep["honest-0"]
    assert rep["adversary"] < 0.1 < 0.9 < min(rep["honest-0"], rep["honest-1"]), rep
    flags = np.concatenate([verdict.flags, *early["flags"], *late["flags"]])
    f1_swarm = f1_score(y, flags)
    f1_adversary = f1_score(y, np.concatenate([~dets[2].flags(x) for x in Xte]))
    assert f1_swarm > f1_adversary + 0.4, (f1_swarm, f1_adversary)
    assert f1_swarm >= max(local.values()) - MARGIN, (f1_swarm, local)


def test_bench_prints_the_swarm_keys(capsys: pytest.CaptureFixture[str], market: dict) -> None:
    from gradient_nb.bench import market as bench

    assert bench.main(["--train-episodes", "4", "--test-episodes", "4", "--steps", "3", "--retrain-steps", "2",
                       "--candidates", "2", "--candidate-episodes", "1", "--bootstrap", "20", "--swarm", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (*bench.KEYS, *bench.SWARM_KEYS):
        assert key in out, key
    assert "_artifacts" not in out
    assert out["f1_swarm_ci"][0] <= out["f1_swarm"] <= out["f1_swarm_ci"][1]
    assert [d["adversarial"] for d in out["swarm_adversarial_detectors"]] == [False, True]
    assert all(d["answered"] == 4 for d in out["swarm_detectors"] + out["swarm_adversarial_detectors"])
    assert out["swarm_config"]["detectors"] == 2 and out["swarm_config"]["k"] == 2
