"""Hide-and-Shill's detectors as a swarm of agents on the mesh: beacon selection and a weighted vote per window.

The paper runs detection as several agents with distributed logs whose verdicts are weighed (Symphony).
Here every part of that is the agents layer's own, nothing is rebuilt:

- A **detector agent** (``detector_agent``) is an ``Agent``: a mesh peer that publishes a signed
  capability record with the ``market surveillance`` skill and hosts one MCP tool, ``flag_windows``
  (``detector_server``), backed by its own ``Detector`` policy trained with the rl layer's GRPO on the
  theory-based reward (``train_shards``; the caller hands the grpo module over, as ``run_study``'s
  callers do, because the agents layer may not import the rl layer). Each detector trains on its own
  shard of the training episodes from its own seed (decentralized training), so their errors differ.
- The tool takes an episode's **observation** (``observation``): what a market watcher sees, as JSON
  (window features, each post's window and account, who follows whom) — never the ground truth, never
  pickle. Every field is checked (``parse_observation``) and bad input is refused with the typed error
  ``InvalidObservation`` (the caller gets ``ToolCallError`` with that kind). It answers per-window flag
  probabilities, flags and the accounts its flags point at (``detector.attribute_posts``).
- A **requester** (``Surveillance``) asks about one episode at a time: a beacon for the surveillance
  task, bids, k detectors chosen by the ``Selector`` (recomputed similarity, the requester's own
  reputation, LinUCB) among agents whose *signed* record lists the tool; each chosen detector's tool is
  called through the MCP-over-mesh bridge (``Toolbox`` / ``MeshServer``) with a timeout; then per
  window a ``weighted_vote`` between ``flag`` and ``clear``, each vote weighing reputation × confidence
  (the probability the detector's policy gave the side it took). The run's events (beacon, bid,
  select, dispatch, tool_call, tool_result, vote, final) go to the requester's run log.
- **Outcomes** (``Surveillance.record``): one signed outcome per asked detector and episode, in the
  ledger: success when its flags agree with a reference on at least ``agreement`` of the windows. The
  reference is the vote (Symphony's rule: agreeing with the winner is a success; available at once),
  or an audit when one arrives (e.g. the windows the theory calls abnormal once the information-only
  price is revealed, as audited fundamentals are). A detector that is often wrong loses reputation, so
  its votes weigh less and the bandit picks it less.

Why one outcome per episode, not per window: outcomes are signed records in the replicated state; an
episode is the unit a requester asks about, and per-window records would multiply the state by the
number of windows for no better estimate of who is reliable.
Why the requester sends features, not raw posts: the text features need the embedder (hundreds of MB,
seconds to load); a detector agent then needs nothing but its small policy, and the observation stays a
few kilobytes, far below the mesh's frame limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from ...mesh.identity import Identity
from ...mesh.peer import join
from ...mesh.rendezvous import Rendezvous
from ..agent import Agent
from ..beacon import Beacon
from ..events import RunLog
from ..ledger import Skill
from ..mcp_mesh import MeshServer, Toolbox, ToolCallError
from ..requester import Requester
from ..vote import votes_from, weighted_vote
from .detector import FEATURES, Detector, attribute_posts, f1_score
from .simulator import Episode
from .study import bootstrap_f1, train_detector

SERVER, TOOL = "surveillance", "flag_windows"
SKILL = Skill("market surveillance", "flag manipulated trading windows (pump-and-dump and shill campaigns) from "
              "a market's prices, volume, social posts and follower graph, and name the accounts behind them")
TASK = "Flag the manipulated windows of this market episode: pump-and-dump and coordinated shill campaigns."
AGREEMENT = 0.8
MAX_WINDOWS, MAX_POSTS, MAX_ACCOUNTS, MAX_EDGES, MAX_TOP = 4096, 50_000, 20_000, 200_000, 100


class InvalidObservation(ValueError):
    """An observation that is not what ``observation`` builds (shape, range, or a non-finite number)."""


class NoDetectors(RuntimeError):
    """No detector agent answered: none bid for the surveillance task, or every chosen one failed."""


def observation(ep: Episode, X: np.ndarray) -> dict[str, Any]:
    """The JSON-able observation of ``ep`` a detector agent is sent: ``X`` (``window_features``), each
    post's window and account, the number of accounts and the follower graph's edges. Nothing of the
    ground truth (labels, manipulators, the information-only price)."""
    i, j = np.nonzero(np.triu(ep.adjacency, 1))
    return {"features": np.asarray(X, dtype=float).tolist(),
            "post_window": np.minimum(ep.post_t // ep.config.window, ep.config.n_windows - 1).astype(int).tolist(),
            "post_account": ep.post_account.astype(int).tolist(), "n_accounts": int(ep.adjacency.shape[0]),
            "edges": np.stack([i, j], 1).astype(int).tolist()}


def _ints(values: Any, name: str, bound: int, limit: int) -> np.ndarray:
    if not isinstance(values, list) or len(values) > limit:
        raise InvalidObservation(f"{name} is a list of at most {limit} integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InvalidObservation(f"{name} holds integers only")
    arr = np.asarray(values, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= bound):
        raise InvalidObservation(f"{name} must lie in [0, {bound})")
    return arr


def parse_observation(obs: dict[str, Any], n_features: int = len(FEATURES)) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray, np.ndarray]:
    """(features [windows, n_features], post windows, post accounts, adjacency [n, n] bool) from an
    observation, or ``InvalidObservation`` saying what is wrong. Every byte is treated as hostile:
    sizes are bounded before anything is allocated from them."""
    if not isinstance(obs, dict):
        raise InvalidObservation("an observation is a JSON object")
    missing = {"features", "post_window", "post_account", "n_accounts", "edges"} - set(obs)
    if missing:
        raise InvalidObservation(f"missing {', '.join(sorted(missing))}")
    rows = obs["features"]
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_WINDOWS:
        raise InvalidObservation(f"features is a list of 1 to {MAX_WINDOWS} windows")
    if not all(isinstance(r, list) and len(r) == n_features for r in rows):
        raise InvalidObservation(f"each window has {n_features} features ({', '.join(FEATURES)})")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for r in rows for v in r):
        raise InvalidObservation("features are finite numbers")
    X = np.asarray(rows, dtype=float)
    n = obs["n_accounts"]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_ACCOUNTS:
        raise InvalidObservation(f"n_accounts is an integer from 1 to {MAX_ACCOUNTS}")
    windows = _ints(obs["post_window"], "post_window", len(rows), MAX_POSTS)
    accounts = _ints(obs["post_account"], "post_account", n, MAX_POSTS)
    if len(windows) != len(accounts):
        raise InvalidObservation("post_window and post_account have one entry per post")
    edges = obs["edges"]
    if not isinstance(edges, list) or len(edges) > MAX_EDGES or not all(isinstance(e, list) and len(e) == 2
                                                                         for e in edges):
        raise InvalidObservation(f"edges is a list of at most {MAX_EDGES} [account, account] pairs")
    pairs = _ints([v for e in edges for v in e], "edges", n, 2 * MAX_EDGES).reshape(-1, 2)
    adjacency = np.zeros((n, n), dtype=bool)
    adjacency[pairs[:, 0], pairs[:, 1]] = True
    adjacency |= adjacency.T
    np.fill_diagonal(adjacency, False)
    return X, windows, accounts, adjacency


def flag_report(det: Detector, obs: dict[str, Any], *, invert: bool = False, top: int = 10) -> dict[str, Any]:
    """What ``flag_windows`` answers: per-window probabilities and flags, and the ``top`` accounts the
    flags point at. ``invert`` turns the detector into an adversary that reports the opposite."""
    X, windows, accounts, adjacency = parse_observation(obs, len(det.mean))
    p = det.scores(X).astype(float)
    if invert:
        p = 1.0 - p
    flags = p > 0.5
    return {"probabilities": [round(float(x), 6) for x in p], "flags": flags.tolist(),
            "accounts": top_accounts(windows, accounts, adjacency, flags, top)}


def top_accounts(windows: np.ndarray, accounts: np.ndarray, adjacency: np.ndarray, flags: np.ndarray,
                 top: int) -> list[dict[str, Any]]:
    """The ``top`` accounts by ``detector.attribute_posts`` score (those scoring above zero), best first."""
    scores = attribute_posts(windows, accounts, adjacency, flags)
    order = np.argsort(-scores, kind="stable")[: max(0, min(int(top), MAX_TOP))]
    return [{"account": int(a), "score": round(float(scores[a]), 6)} for a in order if scores[a] > 0]


def detector_server(det: Detector, *, invert: bool = False) -> MCPServer:
    """The MCP server a detector agent hosts: one tool, ``flag_windows``, backed by ``det``."""
    # log_level: the SDK configures the process's root logger with it; at its default (INFO) every mesh
    # record would flood the notebook or the bench's stderr.
    srv = MCPServer("market-surveillance", instructions="Flags manipulated windows of a market episode.",
                    log_level="WARNING")

    def flag_windows(features: list[list[float]], post_window: list[int], post_account: list[int],
                     n_accounts: int, edges: list[list[int]], top: int = 10) -> dict[str, Any]:
        """Flag the manipulated windows of one market episode. features: one row per window
        (ret, abs_ret, reversal, volume_z, news_sim, hype_sim, repetition, density, sync, log_posts);
        post_window/post_account: each post's window and account; edges: the follower graph as
        [account, account] pairs. Returns per-window probabilities and flags, and the top accounts."""
        obs = {"features": features, "post_window": post_window, "post_account": post_account,
               "n_accounts": n_accounts, "edges": edges}
        try:
            return flag_report(det, obs, invert=invert, top=top)
        except InvalidObservation as exc:  # the kind travels to the caller as ToolCallError.kind
            raise ToolError(f"InvalidObservation: {exc}") from None

    srv.tool(name=TOOL)(flag_windows)
    return srv


def detector_agent(mesh: Any, det: Detector, *, name: str, invert: bool = False, capacity: int = 4,
                   heartbeat: float = 1.0) -> Agent:
    """A detector agent on ``mesh`` (``await agent.start()`` publishes it); ``invert`` makes it adversarial."""
    return Agent(mesh, name=name, role="detector", skills=[SKILL], servers={SERVER: detector_server(det, invert=invert)},
                 model="logistic flag policy (GRPO)", capacity=capacity, heartbeat=heartbeat)


def train_shards(episodes: list[Episode], X: list[np.ndarray], grpo: Any, n: int, *, steps: int, seed: int = 0,
                 **options: Any) -> list[Detector]:
    """``n`` detectors, detector ``i`` trained with GRPO (``study.train_detector``) on the disjoint shard
    ``episodes[i::n]`` from seed ``seed + i``, with its own feature scaler: no detector sees another's
    data, as volunteers training on their own machines would not."""
    if not 1 <= n <= len(episodes):
        raise ValueError("between 1 detector and one per training episode")
    out = []
    for i in range(n):
        eps, xs = episodes[i::n], X[i::n]
        det = Detector(seed=seed + i).fit_scaler(np.concatenate(xs))
        train_detector(det, eps, xs, grpo, steps=steps, seed=seed + i, **options)
        out.append(det)
    return out


@dataclass
class Verdict:
    """The swarm's answer for one episode, and what ``Surveillance.record`` needs to score the voters."""

    flags: np.ndarray  # [windows] bool: the weighted vote
    flag_share: np.ndarray  # [windows]: the weight that voted flag over all weight
    accounts: list[dict[str, Any]]  # attribution from the vote's flags
    probabilities: dict[str, np.ndarray]  # per agent that answered
    weights: dict[str, float]  # per agent: its reputation when it voted
    asked: list[str]  # every chosen agent, answered or not
    names: dict[str, str]
    beacon: Beacon
    log: RunLog
    seconds: dict[str, float] = field(default_factory=dict)
    recorded: bool = False

    def agent_flags(self, agent: str) -> np.ndarray | None:
        p = self.probabilities.get(agent)
        return None if p is None else p > 0.5


class Surveillance:
    """The requester's side of the swarm over ``mesh``: ``await flag(observation)``, then ``record``."""

    def __init__(self, mesh: Any, *, k: int = 3, timeout: float = 30.0, agreement: float = AGREEMENT,
                 requester: Requester | None = None) -> None:
        # The Requester holds the ledger view, the selector (LinUCB) and the run logs: one of each per peer.
        self.requester = requester or Requester(mesh, task_timeout=timeout)
        self.mesh, self.k, self.timeout, self.agreement = mesh, k, timeout, agreement
        self.ledger, self.selector = self.requester.ledger, self.requester.selector
        self.toolbox = Toolbox(mesh)

    def detectors(self) -> dict[str, str]:
        """Live agents whose signed capability record lists ``flag_windows``: peer id -> name."""
        return {a: c.name for a, c in self.ledger.agents().items()
                if a != self.mesh.id and any(t.get("name") == TOOL and t.get("server") == SERVER for t in c.tools)}

    async def flag(self, obs: dict[str, Any], *, k: int | None = None, exclude: set[str] = frozenset(),
                   top: int = 10) -> Verdict:
        X, windows, accounts, adjacency = parse_observation(obs)  # refuse a bad request before asking anyone
        log = self.requester.runs.new()
        beacon = await asyncio.to_thread(Beacon.for_task, TASK, k=k or self.k)  # the embedder, off the loop
        log.emit("beacon", beacon=beacon.id, task=TASK, k=beacon.k)
        detectors = self.detectors()
        bids = [b for b in await self.selector.collect_bids(self.mesh, beacon, exclude=exclude)
                if b["agent"] in detectors]  # only agents that sign for the tool; a calculator's bid is no use
        for b in bids:
            log.emit("bid", agent=b["agent"], score=round(float(b["score"]), 4))
        chosen = self.selector.choose(beacon, bids)
        if not chosen:
            log.emit("final", answer=None, error="no detector bid")
            raise NoDetectors("no detector agent bid for the surveillance task")
        for c in chosen:
            log.emit("select", agent=c["agent"], name=c.get("name"), value=round(float(c["value"]), 4))
        asked = [c["agent"] for c in chosen]
        # A task group owns the calls: if one fails unexpectedly, the others are cancelled and awaited.
        async with asyncio.TaskGroup() as tg:
            calls = [tg.create_task(self._ask(a, obs, len(X), log)) for a in asked]
        answers = [c.result() for c in calls]
        probs = {a: p for a, (p, _) in zip(asked, answers, strict=True) if p is not None}
        seconds = {a: s for a, (_, s) in zip(asked, answers, strict=True)}
        verdict = Verdict(np.zeros(len(X), bool), np.zeros(len(X)), [], probs,
                          {a: self.ledger.reputation(a) for a in probs}, asked, detectors, beacon, log, seconds)
        if not probs:
            self.record(verdict)  # every chosen detector failed: each one's failure is an outcome
            log.emit("final", answer=None, error="every chosen detector failed")
            raise NoDetectors("every chosen detector failed")
        for w in range(len(X)):
            replies = [{"agent": a, "answer": "flag" if p[w] > 0.5 else "clear", "confidence": max(p[w], 1 - p[w])}
                       for a, p in probs.items()]
            winner, tally = weighted_vote(votes_from(replies, self.ledger.reputation))
            verdict.flags[w] = winner == "flag"
            verdict.flag_share[w] = tally.get("flag", 0.0) / max(sum(tally.values()), 1e-12)
        verdict.accounts = top_accounts(windows, accounts, adjacency, verdict.flags, top)
        log.emit("vote", weights={a: round(w, 4) for a, w in verdict.weights.items()},
                 flagged=np.nonzero(verdict.flags)[0].tolist())
        log.emit("final", answer=verdict.flags.tolist(), accounts=verdict.accounts)
        return verdict

    async def _ask(self, agent: str, obs: dict[str, Any], n_windows: int, log: RunLog) -> tuple[np.ndarray | None,
                                                                                                 float]:
        self.toolbox.add(agent, MeshServer(agent, SERVER))
        log.emit("dispatch", agent=agent, mode="tools")
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(self.toolbox.call(agent, TOOL, obs), self.timeout)
            p = out.get("probabilities") if isinstance(out, dict) else None
            if not (isinstance(p, list) and len(p) == n_windows and all(
                    isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 1 for x in p)):
                raise ToolCallError("BadReply", TOOL, "probabilities are one number in [0, 1] per window")
        except (ToolCallError, TimeoutError) as exc:
            kind = exc.kind if isinstance(exc, ToolCallError) else "Timeout"
            log.emit("error", agent=agent, error=f"{kind}: {exc}")
            return None, time.perf_counter() - t0
        log.emit("tool_call", agent=agent, tool=TOOL, arguments={"windows": n_windows})
        log.emit("tool_result", agent=agent, tool=TOOL, result={"flagged": [i for i, x in enumerate(p) if x > 0.5]})
        return np.asarray(p, dtype=float), time.perf_counter() - t0

    def record(self, verdict: Verdict, *, reference: np.ndarray | None = None) -> dict[str, bool]:
        """One signed outcome per asked detector: success when its flags agree with ``reference`` (default:
        the vote) on at least ``agreement`` of the windows; a detector that did not answer failed. A verdict
        is recorded once, against the vote at once or against an audit later: the outcome's task id is the
        beacon's, and readers count a task id once (the ledger's replay rule)."""
        if verdict.recorded:
            raise ValueError("this verdict's outcomes are already recorded")
        if reference is not None and np.shape(reference) != verdict.flags.shape:
            raise ValueError(f"the reference has one flag per window ({len(verdict.flags)})")
        verdict.recorded = True
        ref = verdict.flags if reference is None else np.asarray(reference, dtype=bool)
        out = {}
        for agent in verdict.asked:
            flags = verdict.agent_flags(agent)
            ok = flags is not None and float((flags == ref).mean()) >= self.agreement
            # Requester._outcome feeds the bandit and signs the outcome record: one code path for every mode.
            self.requester._outcome(verdict.beacon, agent, ok, time.perf_counter() - verdict.seconds.get(agent, 0.0))
            out[agent] = ok
        return out


@contextlib.asynccontextmanager
async def local_swarm(detectors: Sequence[tuple[str, Detector, bool]], *, k: int = 3, heartbeat: float = 0.5,
                      peer_timeout: float = 5.0, timeout: float = 30.0,
                      ready_s: float = 30.0) -> AsyncIterator[Surveillance]:
    """A real mesh in this process: a rendezvous, one detector agent per ``(name, detector, adversarial)``
    and a requester peer; yields the requester's ``Surveillance`` once every detector is in its ledger.
    For the bench, the tests and the notebook; across machines each detector runs ``detector_agent`` on
    its own joined mesh."""

    async def peer(name: str) -> Any:
        return await join(rv.url, name=name, identity=Identity.generate(), heartbeat=heartbeat,
                          peer_timeout=peer_timeout, probe_seconds=0.05)

    agents: list[Agent] = []
    meshes: list[Any] = []
    async with Rendezvous() as rv:
        try:
            for name, det, invert in detectors:
                meshes.append(await peer(name))
                agent = detector_agent(meshes[-1], det, name=name, invert=invert, heartbeat=heartbeat)
                await agent.start()
                agents.append(agent)  # only a started agent is stopped; leaving its mesh ends the rest
            meshes.append(await peer("surveillance-requester"))
            surveillance = Surveillance(meshes[-1], k=k, timeout=timeout)
            deadline = time.monotonic() + ready_s
            while len(surveillance.detectors()) < len(agents):
                if time.monotonic() > deadline:
                    raise NoDetectors(f"{len(surveillance.detectors())} of {len(agents)} detectors joined in {ready_s} s")
                await asyncio.sleep(0.1)
            yield surveillance
        finally:
            for a in agents:
                await a.stop()
            for m in meshes:
                await m.leave()


async def evaluate_swarm(surveillance: Surveillance, episodes: list[Episode], X: list[np.ndarray], *,
                         k: int | None = None) -> dict[str, Any]:
    """Ask the swarm about every episode in order, recording outcomes against the vote after each (so
    weights move as the run goes); the swarm's flags, and per detector (by name) its F1 over the mesh,
    the episodes it answered and its final reputation."""
    swarm: list[np.ndarray] = []
    own: dict[str, list[np.ndarray]] = {}
    ids: dict[str, str] = {}  # name -> peer id of every detector the swarm knew at some episode
    for ep, x in zip(episodes, X, strict=True):
        verdict = await surveillance.flag(observation(ep, x), k=k)
        surveillance.record(verdict)
        ids.update({name: agent for agent, name in verdict.names.items()})
        swarm.append(verdict.flags)
        for agent in verdict.probabilities:
            own.setdefault(verdict.names[agent], []).append(verdict.agent_flags(agent))
    y = np.concatenate([e.labels for e in episodes])
    # A detector that missed an episode has no F1 over the set (it is counted in "answered" instead).
    return {"flags": swarm, "f1": f1_score(y, np.concatenate(swarm)),
            "detectors": {n: {"f1": f1_score(y, np.concatenate(own[n])) if len(own.get(n, ())) == len(episodes)
                              else None, "answered": len(own.get(n, ())),
                              "reputation": surveillance.ledger.reputation(a)} for n, a in ids.items()}}


async def swarm_figures(train: list[Episode], Xtr: list[np.ndarray], test: list[Episode], Xte: list[np.ndarray],
                        grpo: Any, *, detectors: int = 3, k: int | None = None, steps: int = 120, bootstrap: int = 1000,
                        seed: int = 0, **options: Any) -> dict[str, Any]:
    """The bench's swarm figures on held-out ``test``: ``detectors`` agents trained on disjoint shards of
    ``train`` (``train_shards``), asked k at a time over a real in-process mesh, episode by episode.
    Two runs, each on a fresh mesh so no reputation carries over: every detector honest (``f1_swarm``),
    then the last one adversarial, reporting the inverse of its policy (``f1_swarm_adversarial``)."""
    if detectors < 2:
        raise ValueError("a swarm with an adversary needs at least 2 detectors")
    k = k or detectors
    dets = train_shards(train, Xtr, grpo, detectors, steps=steps, seed=seed, **options)
    labels = [e.labels for e in test]
    out: dict[str, Any] = {}
    for case, adversaries in (("", 0), ("_adversarial", 1)):
        roster = [(f"{'adversary' if i >= detectors - adversaries else 'detector'}-{i}", d,
                   i >= detectors - adversaries) for i, d in enumerate(dets)]
        async with local_swarm(roster, k=k) as surveillance:
            res = await evaluate_swarm(surveillance, test, Xte)
        f1, lo, hi = bootstrap_f1(labels, res["flags"], bootstrap, seed)
        out[f"f1_swarm{case}"], out[f"f1_swarm{case}_ci"] = round(f1, 4), [round(lo, 4), round(hi, 4)]
        out[f"swarm{case}_detectors"] = [
            {"name": name, "adversarial": bad, "answered": res["detectors"][name]["answered"],
             "f1": None if res["detectors"][name]["f1"] is None else round(res["detectors"][name]["f1"], 4),
             "reputation": round(res["detectors"][name]["reputation"], 4)} for name, _, bad in roster]
    honest = [d["f1"] for d in out["swarm_detectors"] if d["f1"] is not None]
    best = max(honest) if honest else 0.0
    out["f1_best_detector"] = best
    out["swarm_vs_best_detector"] = round(out["f1_swarm"] / max(best, 1e-9), 3)
    adversary = out["swarm_adversarial_detectors"][-1]
    out["f1_adversary"], out["reputation_adversary"] = adversary["f1"], adversary["reputation"]
    out["swarm_config"] = {"detectors": detectors, "k": k, "shards": "disjoint", "steps": steps,
                           "outcome": f"agreement with the vote on >= {AGREEMENT:.0%} of the windows"}
    return out
