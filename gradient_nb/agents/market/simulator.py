"""A seeded market with information events, honest traders and pump-and-dump shill campaigns.

The one idea: **rational expectations with a delayed reaction**. Each episode has a fundamental value
``v_t`` (log price, in percent) that jumps at *information events* (news: earnings, approvals) and is
flat otherwise. Honest traders move the price toward it a fraction ``reaction`` of the gap per step, so
an information move is spread over several steps after its news (the delayed reaction the paper uses
as its financial signal)::

    p*_{t+1} = p*_t + reaction · (v_t - p*_t) + ε_t                      (information-only price)
    p_{t+1}  = p_t  + reaction · (v_t + m_t - p_t) + ε_t                  (observed price)

``m_t`` is the manipulators' excess demand: it rises by ``pressure`` per step while a campaign pumps
and falls back to zero while they dump. Both paths share the noise ``ε``, so ``p - p*`` is exactly the
part of the price no information explains; the detector's reward is built on it (``detector``), the
detector never sees it.

Posts: honest accounts chatter, comment on moves, and post the news of an event (each event is
*observed* through posts only with probability ``news_observed``: partial observation). Manipulator
accounts form a dense cluster of the social graph (honest accounts form a sparse random graph) and,
during a pump, post bursts of shill templates, synchronized unless the strategy jitters them, and
possibly disguised as news (``Strategy.disguise``). Volume rises with price moves and with the
manipulators' own trades.

Ground truth per episode: the manipulated windows (a window overlapping a campaign's pump or dump),
the manipulating accounts, the event times, and ``p*``. Everything is drawn from one
``numpy.random.Generator`` seeded by ``seed``: the same (config, strategy, seed) gives the same
episode, bit for bit.

``Strategy`` is what a manipulator controls, and what the co-evolution round searches over: how many
of its accounts post, how long and how hard it pumps, how synchronized and how news-like its posts
are, and whether it starts right after a real news event to hide in the information move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TICKERS = ("ZNTH", "QBIT", "MOXA", "PLVR")
NEWS_UP = ("{tk} reports quarterly earnings above expectations", "Regulator approves {tk}'s new product",
           "{tk} announces a major supply contract", "{tk} raises its full-year guidance")
NEWS_DOWN = ("{tk} misses quarterly earnings estimates", "{tk} recalls its flagship product",
             "{tk} cuts its full-year guidance", "Regulator opens an investigation into {tk}")
CHATTER = ("anyone watching {tk} today?", "holding my {tk} shares, nothing new", "{tk} volume looks normal",
           "what do you think about {tk} long term?", "reading the {tk} annual report tonight")
COMMENT_UP = ("{tk} is up a bit today", "nice green candle on {tk}")
COMMENT_DOWN = ("{tk} is down a bit today", "{tk} slipping this afternoon")
SHILL = ("{tk} to the moon, buy now before it's too late", "huge things coming for {tk}, load up now",
         "don't miss the {tk} rocket, 10x incoming", "{tk} is the next big thing, get in now",
         "insiders are buying {tk}, you should too")


@dataclass(frozen=True)
class MarketConfig:
    steps: int = 160
    window: int = 8  # detection windows of this many steps
    n_honest: int = 60
    n_manipulators: int = 8
    honest_degree: float = 3.0  # mean degree of the honest accounts' random graph
    cluster_p: float = 0.7  # edge probability inside the manipulators' cluster
    bridge_p: float = 0.02  # manipulator-honest edges
    info_rate: float = 4.0 / 160  # information events per step (Poisson)
    info_sigma: float = 4.0  # size of a value jump (percent)
    noise_sigma: float = 0.35  # per-step price noise (percent)
    reaction: float = 0.3  # fraction of the gap to value closed per step
    news_observed: float = 0.8  # an event shows in posts with this probability
    chatter_rate: float = 0.6  # honest chatter posts per step
    campaigns: tuple[int, int] = (1, 2)  # campaigns per episode, min and max
    base_volume: float = 100.0

    def __post_init__(self) -> None:
        if self.window < 2 or self.steps < 4 * self.window:
            raise ValueError("window is at least 2 and steps at least 4 windows")
        if self.n_honest < 5 or self.n_manipulators < 1:
            raise ValueError("at least 5 honest accounts and 1 manipulator")
        if not 0 < self.reaction <= 1 or not 0 <= self.news_observed <= 1 or self.noise_sigma <= 0:
            raise ValueError("reaction in (0, 1], news_observed in [0, 1], noise_sigma > 0")
        if not 0 <= self.campaigns[0] <= self.campaigns[1]:
            raise ValueError("campaigns is (min, max) with 0 <= min <= max")

    @property
    def n_accounts(self) -> int:
        return self.n_honest + self.n_manipulators

    @property
    def n_windows(self) -> int:
        return self.steps // self.window


@dataclass(frozen=True)
class Strategy:
    accounts: float = 1.0  # fraction of the manipulators' accounts that post
    pump_steps: int = 8
    dump_steps: int = 6
    pressure: float = 1.0  # excess demand added per pump step (percent of value)
    posts_per_step: float = 3.0  # shill posts per pump step (and a third of that before it)
    jitter: int = 0  # posts spread over ± jitter steps (0: synchronized bursts)
    disguise: float = 0.0  # fraction of shill posts written as news
    after_news: bool = False  # start right after an information event

    def __post_init__(self) -> None:
        if not 0 < self.accounts <= 1 or not 0 <= self.disguise <= 1:
            raise ValueError("accounts in (0, 1], disguise in [0, 1]")
        if self.pump_steps < 1 or self.dump_steps < 1 or self.jitter < 0 or self.pressure < 0 or self.posts_per_step < 0:
            raise ValueError("pump_steps and dump_steps at least 1; jitter, pressure, posts_per_step not negative")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Episode:
    seed: int
    config: MarketConfig
    strategy: Strategy
    price: np.ndarray  # [steps + 1]
    info_price: np.ndarray  # p*: the same path without manipulation [steps + 1]
    value: np.ndarray  # v [steps + 1]
    volume: np.ndarray  # [steps]
    post_t: np.ndarray  # [P] step of each post
    post_account: np.ndarray  # [P]
    post_text: list[str]
    adjacency: np.ndarray  # [n, n] bool, symmetric
    events: list[tuple[int, float, bool]]  # (step, value jump, observed through posts)
    campaigns: list[tuple[int, int, int]]  # (start, pump end, dump end) steps
    manipulators: np.ndarray  # [n] bool: accounts that posted in a campaign
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [windows] manipulated

    @property
    def n_windows(self) -> int:
        return self.config.n_windows


def _graph(cfg: MarketConfig, rng: np.random.Generator) -> np.ndarray:
    n, h = cfg.n_accounts, cfg.n_honest
    p = np.full((n, n), cfg.bridge_p)
    p[:h, :h] = cfg.honest_degree / max(h - 1, 1)
    p[h:, h:] = cfg.cluster_p
    upper = np.triu(rng.random((n, n)) < p, 1)
    return upper | upper.T


def _campaign_starts(cfg: MarketConfig, st: Strategy, events: list[tuple[int, float, bool]], k: int,
                     rng: np.random.Generator) -> list[int]:
    length = st.pump_steps + st.dump_steps
    latest = cfg.steps - length - 1
    starts: list[int] = []
    candidates = [t + 1 for t, _, _ in events if t + 1 <= latest] if st.after_news else []
    rng.shuffle(candidates)
    for _ in range(k):
        for _try in range(50):
            s = candidates.pop() if candidates else int(rng.integers(4, max(latest, 5)))
            if all(abs(s - o) > length + 4 for o in starts):
                starts.append(s)
                break
    return sorted(starts)


def simulate(seed: int, cfg: MarketConfig = MarketConfig(), strategy: Strategy = Strategy()) -> Episode:
    """One episode, deterministic in (seed, cfg, strategy)."""
    rng = np.random.default_rng(seed)
    T, n, h = cfg.steps, cfg.n_accounts, cfg.n_honest
    tk = TICKERS[int(rng.integers(len(TICKERS)))]
    adjacency = _graph(cfg, rng)

    # Information events: value jumps, observed through news posts or not (partial observation).
    n_events = int(rng.poisson(cfg.info_rate * T))
    times = sorted(int(t) for t in rng.choice(np.arange(4, T - 4), size=min(n_events, T - 8), replace=False))
    events = [(t, float(rng.choice([-1, 1]) * cfg.info_sigma * (0.6 + 0.8 * rng.random())),
               bool(rng.random() < cfg.news_observed)) for t in times]
    value = np.zeros(T + 1)
    for t, jump, _ in events:
        value[t + 1:] += jump

    # Campaigns: pump (m rises), dump (m falls back to 0).
    k = int(rng.integers(cfg.campaigns[0], cfg.campaigns[1] + 1))
    starts = _campaign_starts(cfg, strategy, events, k, rng)
    m = np.zeros(T + 1)
    campaigns = []
    for s in starts:
        pe, de = s + strategy.pump_steps, s + strategy.pump_steps + strategy.dump_steps
        m[s:pe] = strategy.pressure * np.arange(1, strategy.pump_steps + 1)
        peak = m[pe - 1] if strategy.pump_steps else 0.0
        m[pe:de] = peak * (1 - np.arange(1, strategy.dump_steps + 1) / max(strategy.dump_steps, 1))
        campaigns.append((s, pe, de))

    eps = rng.normal(0, cfg.noise_sigma, T)
    price, info_price = np.zeros(T + 1), np.zeros(T + 1)
    for t in range(T):
        info_price[t + 1] = info_price[t] + cfg.reaction * (value[t] - info_price[t]) + eps[t]
        price[t + 1] = price[t] + cfg.reaction * (value[t] + m[t] - price[t]) + eps[t]
    moves = np.abs(np.diff(price))
    trade = np.abs(np.diff(m, prepend=0.0))[:T]  # the manipulators' own buying and selling
    volume = rng.poisson(cfg.base_volume * (1 + 0.8 * moves / cfg.noise_sigma)).astype(float)
    volume += rng.poisson(cfg.base_volume * 0.15 * trade / cfg.noise_sigma)

    post_t: list[int] = []
    post_a: list[int] = []
    post_text: list[str] = []

    def post(t: int, a: int, template: str) -> None:
        if 0 <= t < T:
            post_t.append(int(t))
            post_a.append(int(a))
            post_text.append(template.format(tk=tk))

    for t in range(T):  # chatter, and comments on noticeable moves
        for _ in range(int(rng.poisson(cfg.chatter_rate))):
            post(t, int(rng.integers(h)), CHATTER[int(rng.integers(len(CHATTER)))])
        d = price[t + 1] - price[t]
        if abs(d) > 2 * cfg.noise_sigma and rng.random() < 0.5:
            bank = COMMENT_UP if d > 0 else COMMENT_DOWN
            post(t, int(rng.integers(h)), bank[int(rng.integers(len(bank)))])
    for t, jump, observed in events:  # news of an event, by a few honest accounts over the next steps
        if observed:
            bank = NEWS_UP if jump > 0 else NEWS_DOWN
            headline = bank[int(rng.integers(len(bank)))]
            for a in rng.choice(h, size=int(rng.integers(2, 5)), replace=False):
                post(t + int(rng.integers(0, 3)), int(a), headline)
    n_used = max(1, round(strategy.accounts * cfg.n_manipulators))
    manipulators = np.zeros(n, bool)
    for s, pe, _ in campaigns:
        used = h + rng.choice(cfg.n_manipulators, size=n_used, replace=False)
        manipulators[used] = True
        for t in range(s - 2, pe):
            rate = strategy.posts_per_step / (3 if t < s else 1)
            for _ in range(int(rng.poisson(rate))):
                bank = (NEWS_UP if rng.random() < strategy.disguise else SHILL)
                tt = t + (int(rng.integers(-strategy.jitter, strategy.jitter + 1)) if strategy.jitter else 0)
                post(tt, int(rng.choice(used)), bank[int(rng.integers(len(bank)))])

    order = np.argsort(np.asarray(post_t, dtype=np.int64), kind="stable")
    ep = Episode(seed, cfg, strategy, price, info_price, value, volume,
                 np.asarray(post_t, dtype=np.int64)[order], np.asarray(post_a, dtype=np.int64)[order],
                 [post_text[i] for i in order], adjacency, events, campaigns, manipulators)
    w = cfg.window
    labels = np.zeros(cfg.n_windows, bool)
    for s, _, de in campaigns:
        labels[s // w: min((de - 1) // w + 1, cfg.n_windows)] = True
    ep.labels = labels
    return ep


def all_texts() -> list[str]:
    """Every post text the simulator can write (a finite bank: embed it once)."""
    banks = NEWS_UP + NEWS_DOWN + CHATTER + COMMENT_UP + COMMENT_DOWN + SHILL
    return [t.format(tk=tk) for tk in TICKERS for t in banks]


def simulate_many(seeds, cfg: MarketConfig = MarketConfig(), strategy: Strategy = Strategy()) -> list[Episode]:
    return [simulate(int(s), cfg, strategy) for s in seeds]
