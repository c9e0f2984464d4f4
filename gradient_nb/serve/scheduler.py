"""Parallax-style two-phase scheduling: place layer ranges on peers, then route each request.

Phase 1 (`allocate`, `replan`) decides which peer holds which contiguous layer range. Peers are
grouped into pipelines, each covering every layer once. Following Parallax, the plan maximises

    Z = k² / s        (k complete pipelines, s stages in all = k / mean pipeline depth)

so more pipelines (throughput) win, but each extra hop in a pipeline (latency) costs. Groups are
chosen exactly (dynamic programming over peer subsets) for up to ``EXACT_PEER_LIMIT`` peers and
greedily above that. Inside a pipeline layers are split in proportion to measured compute, capped
by what each peer's memory holds at its position (the first stage also holds the embedding, the
last the LM head).

Phase 2 (`route`, `Router`) picks, per request, the chain of (peer, layer range) with the least
expected latency over whatever replicas exist, stitching across pipelines where ranges abut or
overlap. Inputs are measurements (free memory, a matmul probe, link RTT/bandwidth, queue depth),
never a table of device names.

Precision: each peer serves at one precision (`precision_name`: "float32", "bfloat16", "int8", ...),
and its ``tflops`` is the throughput measured *at that precision* (`measure_precision_tflops`), since an
int8 or nf4 peer on a CPU runs several times slower than its float32 matmul probe says. Whoever asks
for tokens states which precisions it accepts (``route(..., precisions=)``); a peer announcing any
other precision is never routed to, whatever it says about itself. The verifier then checks a stage
at the limits of a precision that was accepted, never at ones the shard chose.

This module is pure Python (torch only inside the two probes) so it can run anywhere, including
on a peer that holds no model.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

__all__ = [
    "EXACT_PEER_LIMIT",
    "Allocation",
    "LinkMeasure",
    "ModelCost",
    "ModelDoesNotFit",
    "PeerResources",
    "Router",
    "Stage",
    "allocate",
    "chain_latency",
    "measure_compute",
    "measure_free_memory",
    "measure_precision_tflops",
    "model_cost_from_config",
    "moved_layers",
    "parse_precision",
    "precision_name",
    "replan",
    "route",
    "validate_allocation",
]

# Subset DP over minimal groups: 12 peers take ~0.05 s in CPython, 14 ~0.25 s; above that the greedy plan is used.
EXACT_PEER_LIMIT = 12
DEFAULT_KV_TOKENS = 2048


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class PeerResources:
    """What one peer offers, as measured by that peer.

    ``free_memory_bytes`` is the budget for model shards on that peer, including whatever it holds
    already (a peer re-reporting after loading its layers must add them back), so that `replan`
    can tell whether its current range still fits.
    """

    peer_id: str
    free_memory_bytes: int
    tflops: float
    precision: str = "float32"  # what it serves at (`precision_name`); ``tflops`` is measured at it


# From the strictest verification limits to the loosest (verify.verifier's calibration): when a stage
# must be checked at a precision the requester accepted, the strictest accepted one is used.
PRECISIONS = ("float32", "float16", "nf4", "nf4+float16", "nf4+bfloat16", "bfloat16", "int8",
              "int8+float16", "int8+bfloat16")
_DTYPES = ("float32", "bfloat16", "float16")
_QUANTS = ("int8", "nf4")


def precision_name(dtype: str = "float32", quantization: str | None = None) -> str:
    """One name for what a peer serves: the dtype, or the quantization (computing in float32), or
    ``"<quantization>+<dtype>"``. Raises ValueError for anything the loader does not serve."""
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES or (quantization is not None and quantization not in _QUANTS):
        raise ValueError(f"unknown precision: dtype {dtype!r}, quantization {quantization!r}")
    if quantization is None:
        return dtype
    return quantization if dtype == "float32" else f"{quantization}+{dtype}"


def parse_precision(name: str) -> tuple[str, str | None]:
    """(dtype, quantization) of a `precision_name`; ValueError for an unknown name."""
    quant, _, dtype = str(name).partition("+")
    if quant in _DTYPES and not dtype:
        return quant, None
    dtype = dtype or "float32"
    precision_name(dtype, quant)  # validates
    return dtype, quant


def strictest(precisions: Iterable[str]) -> str:
    """The accepted precision with the tightest verification limits."""
    known = [p for p in precisions if p in PRECISIONS]
    if not known:
        raise ValueError(f"no known precision among {sorted(precisions)!r}")
    return min(known, key=PRECISIONS.index)


@dataclass
class LinkMeasure:
    """A measured link between two peers (symmetric)."""

    a: str
    b: str
    rtt_ms: float
    mbps: float | None = None


@dataclass
class ModelCost:
    num_layers: int
    layer_bytes: int
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_layer: int
    flops_per_token_per_layer: float
    hidden_bytes_per_token: int


class ModelDoesNotFit(ValueError):
    """No group of the given peers can hold one complete copy of the model."""


def model_cost_from_config(config: Any, bytes_per_param: float = 4.0) -> ModelCost:
    """Costs of a Llama-like decoder from its HF config (``bytes_per_param`` 2 for bf16, ~0.5 for nf4).

    The head is counted even when embeddings are tied: the last stage needs the matrix whatever
    the first stage holds.
    """
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    inter = int(config.intermediate_size)
    vocab = int(config.vocab_size)
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    layer_params = attn + 3 * h * inter + 2 * h
    return ModelCost(
        num_layers=int(config.num_hidden_layers),
        layer_bytes=int(layer_params * bytes_per_param),
        embed_bytes=int(vocab * h * bytes_per_param),
        head_bytes=int((vocab * h + h) * bytes_per_param),
        # The KV cache stays in the activation dtype, not the weights' quantised one.
        kv_bytes_per_token_per_layer=2 * kv_heads * head_dim * max(2, int(bytes_per_param)),
        flops_per_token_per_layer=2.0 * layer_params,
        hidden_bytes_per_token=h * max(2, int(bytes_per_param)),
    )


def measure_compute(seconds: float = 0.3, device: str = "cpu", n: int = 512) -> float:
    """Dense matmul throughput of ``device`` in TFLOP/s: the probe every peer publishes in the registry."""
    from ..mesh.resources import matmul_tflops

    return matmul_tflops(device, seconds, n)


def measure_precision_tflops(precision: str = "float32", device: str = "cpu", seconds: float = 0.3,
                             n: int = 512) -> float:
    """Throughput of one ``n`` x ``n`` linear layer stored and run at ``precision``, in TFLOP/s.

    A quantized layer (bitsandbytes int8 / nf4) or a 16-bit one runs through other kernels than the
    float32 matmul probe: on a CPU int8 is several times slower, bfloat16 faster or slower depending
    on AMX. Phase 1 splits layers by this figure, for the precision each peer will serve.
    """
    import time

    import torch

    from ..models.loader import SKELETON_LOCK

    dtype, quant = parse_precision(precision)
    with SKELETON_LOCK:  # a shard loading on another thread must not turn these weights into meta tensors
        layer = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)).to(getattr(torch, dtype))
        if quant is not None:
            from ..models.quantize import quantize_linears

            quantize_linears(layer, quant, dtype=getattr(torch, dtype))
    layer = layer.to(device)
    x = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        layer(x)  # warm-up: kernel selection, quantization state
        sync()
        runs, start = 0, time.perf_counter()
        while True:
            layer(x)
            runs += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2 * n**3 * runs / elapsed / 1e12


def measure_free_memory(device: str = "cpu") -> int:
    """Bytes available now on ``device`` (what the registry publishes)."""
    from ..mesh.resources import free_memory

    return free_memory(device)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Stage:
    """Peer ``peer_id`` runs layers [start, end)."""

    peer_id: str
    start: int
    end: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass
class Allocation:
    """Complete pipelines (each tiles layers 0..num_layers), spare peers, and ``extra`` stages: ranges
    that complete no pipeline (peers given a fixed range) but that routing can still stitch in."""

    num_layers: int
    pipelines: list[list[Stage]] = field(default_factory=list)
    spare: list[str] = field(default_factory=list)
    extra: list[Stage] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)  # what the mesh accepts for the model (empty: unstated)
    line: list[str] = field(default_factory=list)  # the coordinator's succession line (serve.coordinator)

    @property
    def num_pipelines(self) -> int:
        return len(self.pipelines)

    @property
    def num_stages(self) -> int:
        return sum(len(p) for p in self.pipelines)

    @property
    def objective(self) -> Fraction:
        """Parallax's k²/s (0 without a pipeline)."""
        return _objective(self.num_pipelines, self.num_stages)

    def stages(self) -> list[Stage]:
        return [st for p in self.pipelines for st in p] + list(self.extra)

    def layers_of(self, peer_id: str) -> range | None:
        for st in self.stages():
            if st.peer_id == peer_id:
                return range(st.start, st.end)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "pipelines": [[[st.peer_id, st.start, st.end] for st in p] for p in self.pipelines],
            "spare": list(self.spare),
            "extra": [[st.peer_id, st.start, st.end] for st in self.extra],
            "precisions": list(self.precisions),
            "line": list(self.line),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Allocation:
        """Parse a published plan; the structure is checked (it may come from another peer)."""
        try:
            num_layers = int(d["num_layers"])
            pipelines = [[Stage(str(p), int(s), int(e)) for p, s, e in pipe] for pipe in d["pipelines"]]
            spare = [str(x) for x in d.get("spare", [])]
            extra = [Stage(str(p), int(s), int(e)) for p, s, e in d.get("extra", [])]
            precisions = [str(x) for x in d.get("precisions", [])]
            line = [str(x) for x in d.get("line", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed allocation: {exc}") from exc
        if any(p not in PRECISIONS for p in precisions):
            raise ValueError(f"malformed allocation: unknown precision in {precisions[:8]!r}")
        alloc = cls(num_layers, pipelines, spare, extra, precisions, line)
        problems = _structure_problems(alloc)
        if problems:
            raise ValueError("malformed allocation: " + "; ".join(problems))
        return alloc


def moved_layers(old: Allocation | None, new: Allocation) -> int:
    """Layers peers must load to go from ``old`` to ``new``: Σ_peer |new layers \\ old layers|."""
    held: dict[str, set[int]] = defaultdict(set)
    if old is not None:
        for st in old.stages():
            held[st.peer_id].update(range(st.start, st.end))
    return sum(len(set(range(st.start, st.end)) - held[st.peer_id]) for st in new.stages())


def _objective(k: int, s: int) -> Fraction:
    return Fraction(k * k, s) if s else Fraction(0)


def _structure_problems(alloc: Allocation) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    L = alloc.num_layers
    if L < 1:
        problems.append("num_layers must be positive")
    for i, pipe in enumerate(alloc.pipelines):
        pos = 0
        for st in pipe:
            if st.peer_id in seen:
                problems.append(f"peer {st.peer_id} appears in more than one stage")
            seen.add(st.peer_id)
            if st.start != pos or st.end <= st.start:
                problems.append(f"pipeline {i}: stage {st} does not continue at layer {pos}")
            pos = st.end
        if pos != L:
            problems.append(f"pipeline {i} covers layers up to {pos}, not {L}")
    for st in alloc.extra:
        if st.peer_id in seen:
            problems.append(f"peer {st.peer_id} appears in more than one stage")
        seen.add(st.peer_id)
        if not 0 <= st.start < st.end <= L:
            problems.append(f"extra stage {st} is outside layers 0..{L}")
    for p in alloc.spare:
        if p in seen:
            problems.append(f"spare peer {p} also holds a stage")
    return problems


def fixed_pipelines(fixed: Mapping[str, tuple[int, int]], num_layers: int) -> tuple[list[list[Stage]], list[Stage]]:
    """Group peers with fixed layer ranges into as many complete pipelines as they tile; the ranges
    left over come back as extra stages (routing stitches them in where they help)."""
    left = sorted((Stage(pid, s, e) for pid, (s, e) in fixed.items()), key=lambda st: (st.start, -st.end, st.peer_id))
    pipelines: list[list[Stage]] = []

    def tile(pos: int, pool: list[Stage], dead: set[int]) -> list[Stage] | None:
        if pos == num_layers:
            return []
        if pos in dead:
            return None
        for st in pool:
            if st.start == pos and st.end <= num_layers:
                rest = tile(st.end, [o for o in pool if o is not st], dead)
                if rest is not None:
                    return [st, *rest]
        dead.add(pos)  # sound: every path reaches pos with the same unused stages from pos on
        return None

    while (chain := tile(0, left, set())) is not None:
        pipelines.append(chain)
        left = [st for st in left if all(st is not c for c in chain)]
    return pipelines, left


def _stage_bytes(cost: ModelCost, start: int, end: int, kv_tokens: int) -> int:
    n = end - start
    b = n * (cost.layer_bytes + cost.kv_bytes_per_token_per_layer * kv_tokens)
    if start == 0:
        b += cost.embed_bytes
    if end == cost.num_layers:
        b += cost.head_bytes
    return b


def _usable(peer: PeerResources, memory_reserve: float) -> int:
    return int(peer.free_memory_bytes * (1.0 - memory_reserve))


def validate_allocation(alloc: Allocation, peers: Iterable[PeerResources], model_cost: ModelCost, *,
                        memory_reserve: float = 0.1, kv_tokens: int = DEFAULT_KV_TOKENS) -> list[str]:
    """Every way ``alloc`` is wrong for these peers (empty when valid): structure and memory caps."""
    by_id = {p.peer_id: p for p in peers}
    problems = _structure_problems(alloc)
    if alloc.num_layers != model_cost.num_layers:
        problems.append(f"plan has {alloc.num_layers} layers, model {model_cost.num_layers}")
    for st in alloc.stages():
        peer = by_id.get(st.peer_id)
        if peer is None:
            problems.append(f"stage on unknown peer {st.peer_id}")
            continue
        need = _stage_bytes(model_cost, st.start, st.end, kv_tokens)
        if need > _usable(peer, memory_reserve):
            problems.append(f"{st} needs {need} bytes, peer has {_usable(peer, memory_reserve)} usable")
    return problems


# ---------------------------------------------------------------------------------------------
# Phase 1: capacities, groups, order, split


@dataclass(frozen=True)
class _Cap:
    """How many layers a peer holds at each position of a pipeline (clipped to the model's depth)."""

    mid: int
    first: int
    last: int
    only: int


def _cap(peer: PeerResources, cost: ModelCost, memory_reserve: float, kv_tokens: int) -> _Cap:
    usable = _usable(peer, memory_reserve)
    per = cost.layer_bytes + cost.kv_bytes_per_token_per_layer * kv_tokens
    L = cost.num_layers

    def fit(extra: int) -> int:
        room = usable - extra
        if room <= 0:
            return 0
        return min(L, room // per) if per > 0 else L

    return _Cap(fit(0), fit(cost.embed_bytes), fit(cost.head_bytes),
                fit(cost.embed_bytes + cost.head_bytes))


def _position_cap(c: _Cap, first: bool, last: bool) -> int:
    if first and last:
        return c.only
    if first:
        return c.first
    if last:
        return c.last
    return c.mid


def _group_capacity(members: list[str], caps: Mapping[str, _Cap], L: int) -> int:
    """Most layers the group can hold as one pipeline in its best order (0 when it cannot form one)."""
    m = len(members)
    if m == 1:
        return caps[members[0]].only
    if m > L or any(caps[p].mid < 1 for p in members):
        return 0
    base = sum(caps[p].mid for p in members)
    best = 0
    for f in members:
        if caps[f].first < 1:
            continue
        for last in members:
            if last == f or caps[last].last < 1:
                continue
            best = max(best, base + caps[f].first - caps[f].mid + caps[last].last - caps[last].mid)
    return best


def _feasible(members: list[str], caps: Mapping[str, _Cap], L: int) -> bool:
    return _group_capacity(members, caps, L) >= L


def _exact_groups(ids: list[str], caps: Mapping[str, _Cap], L: int) -> list[list[str]]:
    """Disjoint feasible groups maximising k²/s (then k), by DP over subsets."""
    n = len(ids)
    full = (1 << n) - 1

    def members(mask: int) -> list[str]:
        return [ids[i] for i in range(n) if mask >> i & 1]

    feasible = [False] * (1 << n)
    for mask in range(1, 1 << n):
        feasible[mask] = _feasible(members(mask), caps, L)
    # A group with a redundant member only adds a stage: keep minimal groups only.
    minimal = [False] * (1 << n)
    for mask in range(1, 1 << n):
        if feasible[mask]:
            minimal[mask] = not any(feasible[mask & ~(1 << i)] for i in range(n) if mask >> i & 1
                                    and mask & ~(1 << i))

    # table[mask]: {stages s: (max pipelines k, group chosen for the lowest peer or 0 = spare)}
    table: dict[int, dict[int, tuple[int, int]]] = {0: {0: (0, 0)}}

    def solve(mask: int) -> dict[int, tuple[int, int]]:
        got = table.get(mask)
        if got is not None:
            return got
        low = mask & -mask
        rest = mask ^ low
        out: dict[int, tuple[int, int]] = {s: (k, 0) for s, (k, _g) in solve(rest).items()}
        sub = rest
        while True:
            g = sub | low
            if minimal[g]:
                size = g.bit_count()
                for s, (k, _g) in solve(mask ^ g).items():
                    cand = (k + 1, g)
                    if s + size not in out or cand[0] > out[s + size][0]:
                        out[s + size] = cand
            if sub == 0:
                break
            sub = (sub - 1) & rest
        table[mask] = out
        return out

    best = solve(full)  # recursion depth ≤ n: each level drops at least one peer
    s_best = max(best, key=lambda s: (_objective(best[s][0], s), best[s][0], -s))
    groups: list[list[str]] = []
    mask, s = full, s_best
    while mask:
        _k, g = table[mask][s]
        low = mask & -mask
        if g == 0:
            mask ^= low
        else:
            groups.append(members(g))
            mask ^= g
            s -= g.bit_count()
    return groups


def _greedy_pass(singles: list[str], rest: list[str], caps: Mapping[str, _Cap], L: int) -> list[list[str]]:
    """Grow groups in ``rest``'s order until feasible, then trim each to a minimal group."""
    groups: list[list[str]] = []
    while rest:
        group: list[str] = []
        for p in rest:
            group.append(p)
            if _feasible(group, caps, L):
                break
        if not _feasible(group, caps, L):
            break
        # Swap the member that closed the gap for the smallest one that still does, then drop
        # whatever became redundant: the big peers stay available for the next pipeline.
        others = [p for p in rest if p not in group]
        for p in sorted(others, key=lambda p: (caps[p].mid, p)):
            trial = [*group[:-1], p]
            if _feasible(trial, caps, L):
                group = trial
                break
        for p in sorted(group, key=lambda p: (caps[p].mid, p)):
            if len(group) > 1 and _feasible([q for q in group if q != p], caps, L):
                group = [q for q in group if q != p]
        groups.append(group)
        rest = [p for p in rest if p not in group]
    plans = [[[p] for p in singles] + groups[:j] for j in range(len(groups) + 1)]
    return max(plans, key=lambda gs: (_objective(len(gs), sum(map(len, gs))), len(gs)))


def _greedy_groups(ids: list[str], caps: Mapping[str, _Cap], L: int, tries: int = 16) -> list[list[str]]:
    """Large clusters: whole-model peers alone, then greedy groups over several peer orders (by
    room in each position, then seeded shuffles); the best plan wins. Position matters because
    the embedding and head make a good first or last stage scarcer than raw memory says."""
    import random

    singles = [p for p in ids if caps[p].only >= L]
    rest = [p for p in ids if caps[p].only < L]
    orders = [sorted(rest, key=lambda p, f=f: (-f(caps[p]), p)) for f in (
        lambda c: c.mid, lambda c: c.first, lambda c: c.last, lambda c: c.first + c.last)]
    rng = random.Random(0)  # fixed: the same inputs must give the same plan on every peer
    for _ in range(tries):
        shuffled = sorted(rest)
        rng.shuffle(shuffled)
        orders.append(shuffled)
    plans = [_greedy_pass(singles, order, caps, L) for order in orders]
    return max(plans, key=lambda gs: (_objective(len(gs), sum(map(len, gs))), len(gs)))


class _Links:
    def __init__(self, links: Iterable[LinkMeasure] | None, unknown_rtt_ms: float | None) -> None:
        self.by_pair: dict[frozenset[str], LinkMeasure] = {}
        for link in links or ():
            self.by_pair[frozenset((link.a, link.b))] = link
        known = [link.rtt_ms for link in self.by_pair.values()]
        # An unmeasured pair is assumed as slow as the slowest measured one: optimism about a
        # link nobody has seen is how requests end up crossing an ocean.
        self.unknown_rtt_ms = unknown_rtt_ms if unknown_rtt_ms is not None else (max(known) if known else 0.0)

    def rtt_s(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        link = self.by_pair.get(frozenset((a, b)))
        return (link.rtt_ms if link else self.unknown_rtt_ms) / 1000.0

    def transfer_s(self, a: str, b: str, nbytes: int) -> float:
        link = self.by_pair.get(frozenset((a, b)))
        if a == b or link is None or not link.mbps:
            return 0.0
        return nbytes * 8 / (link.mbps * 1e6)


def _order(group: list[str], caps: Mapping[str, _Cap], L: int, links: _Links,
           tflops: Mapping[str, float]) -> list[str]:
    """A feasible stage order: least total RTT, then most room, then strongest peers first."""
    m = len(group)
    if m == 1:
        return list(group)

    def room(order: tuple[str, ...]) -> int | None:
        total = 0
        for i, p in enumerate(order):
            c = _position_cap(caps[p], i == 0, i == m - 1)
            if c < 1:
                return None
            total += c
        return total if total >= L else None

    def key(order: tuple[str, ...], r: int) -> tuple:
        rtt = sum(links.rtt_s(a, b) for a, b in itertools.pairwise(order))
        return (rtt, -r, tuple(-tflops[p] for p in order), order)

    if m <= 7:
        best = None
        for order in itertools.permutations(sorted(group)):
            r = room(order)
            if r is not None and (best is None or key(order, r) < best[0]):
                best = (key(order, r), order)
        assert best is not None, "group was checked feasible"
        return list(best[1])
    # Many stages: fix the best first/last pair for room, chain the middle by nearest neighbour.
    pairs = [(caps[f].first - caps[f].mid + caps[la].last - caps[la].mid, f, la)
             for f in group for la in group if f != la and caps[f].first >= 1 and caps[la].last >= 1]
    _gain, f, la = max(pairs, key=lambda t: (t[0], t[1], t[2]))
    middle = sorted(p for p in group if p not in (f, la))
    order = [f]
    while middle:
        nxt = min(middle, key=lambda p: (links.rtt_s(order[-1], p), -tflops[p], p))
        order.append(nxt)
        middle.remove(nxt)
    order.append(la)
    return order


def _split(total: int, weights: list[float], caps: list[int], lows: list[int]) -> list[int] | None:
    """Integers in [lows[i], caps[i]] summing to ``total``, as close to proportional to weights as
    the caps allow (water-filling, then largest remainder). None when impossible."""
    m = len(weights)
    if sum(lows) > total or sum(caps) < total or any(lo > c for lo, c in zip(lows, caps, strict=True)):
        return None
    w = [max(x, 1e-12) for x in weights]
    ideal = [0.0] * m
    fixed = [False] * m
    remaining = float(total)
    while True:
        free = [i for i in range(m) if not fixed[i]]
        if not free:
            break
        tw = sum(w[i] for i in free)
        for i in free:
            ideal[i] = remaining * w[i] / tw
        over = [i for i in free if ideal[i] > caps[i]]
        if not over:
            break
        for i in over:
            ideal[i] = float(caps[i])
            fixed[i] = True
            remaining -= caps[i]
    out = [min(caps[i], max(lows[i], math.floor(ideal[i]))) for i in range(m)]
    diff = total - sum(out)
    while diff > 0:
        i = max((i for i in range(m) if out[i] < caps[i]), key=lambda i: (ideal[i] - out[i], -i))
        out[i] += 1
        diff -= 1
    while diff < 0:
        i = max((i for i in range(m) if out[i] > lows[i]), key=lambda i: (out[i] - ideal[i], -i))
        out[i] -= 1
        diff += 1
    return out


def _build_pipeline(order: list[str], caps: Mapping[str, _Cap], L: int,
                    tflops: Mapping[str, float]) -> list[Stage]:
    m = len(order)
    pcaps = [_position_cap(caps[p], i == 0, i == m - 1) for i, p in enumerate(order)]
    lengths = _split(L, [tflops[p] for p in order], pcaps, [1] * m)
    assert lengths is not None, "order was checked feasible"
    stages, pos = [], 0
    for p, n in zip(order, lengths, strict=True):
        stages.append(Stage(p, pos, pos + n))
        pos += n
    return stages


def _plan_groups(ids: list[str], caps: Mapping[str, _Cap], L: int) -> list[list[str]]:
    ids = sorted(ids)
    if len(ids) <= EXACT_PEER_LIMIT:
        return _exact_groups(ids, caps, L)
    return _greedy_groups(ids, caps, L)


def _does_not_fit(peers: list[PeerResources], cost: ModelCost, memory_reserve: float, kv_tokens: int) -> str:
    per = cost.layer_bytes + cost.kv_bytes_per_token_per_layer * kv_tokens
    need = cost.num_layers * per + cost.embed_bytes + cost.head_bytes
    usable = [_usable(p, memory_reserve) for p in peers]
    gib = 1024**3
    return (f"the model does not fit: one copy needs {need / gib:.2f} GiB ({cost.num_layers} layers × "
            f"{per / gib:.3f} GiB with a {kv_tokens}-token KV cache, plus embedding and head), but the "
            f"{len(peers)} peer(s) have {sum(usable) / gib:.2f} GiB usable in all after the "
            f"{memory_reserve:.0%} reserve (largest {max(usable, default=0) / gib:.2f} GiB), and no group "
            f"of them can hold it with at most one layer range each")


def allocate(peers: Iterable[PeerResources], model_cost: ModelCost, links: Iterable[LinkMeasure] | None = None,
             *, memory_reserve: float = 0.1, kv_tokens: int = DEFAULT_KV_TOKENS,
             unknown_rtt_ms: float | None = None) -> Allocation:
    """Phase 1: the plan with the most pipelines per stage (max k²/s); peers that fit nowhere are spare.

    Raises `ModelDoesNotFit` when no group of peers can hold one copy of the model.
    """
    peers = list(peers)
    if len({p.peer_id for p in peers}) != len(peers):
        raise ValueError("peer ids must be unique")
    L = model_cost.num_layers
    if L < 1:
        raise ValueError("the model must have at least one layer")
    caps = {p.peer_id: _cap(p, model_cost, memory_reserve, kv_tokens) for p in peers}
    tflops = {p.peer_id: p.tflops for p in peers}
    groups = _plan_groups([p.peer_id for p in peers], caps, L)
    if not groups:
        raise ModelDoesNotFit(_does_not_fit(peers, model_cost, memory_reserve, kv_tokens))
    lk = _Links(links, unknown_rtt_ms)
    pipelines = [_build_pipeline(_order(g, caps, L, lk, tflops), caps, L, tflops) for g in groups]
    # Shallowest (fastest) pipelines first: a stable order for readers of the published state.
    pipelines.sort(key=lambda pipe: (len(pipe), [st.peer_id for st in pipe]))
    used = {st.peer_id for pipe in pipelines for st in pipe}
    return Allocation(L, pipelines, sorted(p.peer_id for p in peers if p.peer_id not in used))


# ---------------------------------------------------------------------------------------------
# Phase 1 after churn


def _fits(st: Stage, peer: PeerResources | None, cost: ModelCost, memory_reserve: float, kv_tokens: int) -> bool:
    return peer is not None and _stage_bytes(cost, st.start, st.end, kv_tokens) <= _usable(peer, memory_reserve)


def _fill_hole(a: int, b: int, left: Stage | None, right: Stage | None, pool: list[str],
               caps: Mapping[str, _Cap], L: int, tflops: Mapping[str, float],
               max_spares: int = 3) -> tuple[Stage | None, list[Stage], Stage | None] | None:
    """Cover layers [a, b) by growing the neighbours and/or adding spare peers, fewest spares first.

    Neighbours only grow (what they hold stays), so every layer of the hole is loaded exactly once:
    the least any repair can move.
    """
    h = b - a
    for j in range(0, min(max_spares, len(pool)) + 1):
        best: tuple[tuple, tuple[Stage | None, list[Stage], Stage | None]] | None = None
        combos = itertools.combinations(sorted(pool, key=lambda p: (-tflops[p], p)), j)
        for combo in itertools.islice(combos, 2000):
            for order in (itertools.permutations(combo) if j <= 3 else [combo]):
                parts: list[tuple[str, int, int, int, float]] = []  # peer, kept, cap, low, weight
                n_parts = (left is not None) + j + (right is not None)
                idx = 0
                if left is not None:
                    last = idx == n_parts - 1 and b == L
                    cap = _position_cap(caps[left.peer_id], left.start == 0, last) - left.num_layers
                    parts.append((left.peer_id, left.num_layers, cap, 0, tflops[left.peer_id]))
                    idx += 1
                for p in order:
                    first = idx == 0 and a == 0
                    last = idx == n_parts - 1 and b == L
                    parts.append((p, 0, _position_cap(caps[p], first, last), 1, tflops[p]))
                    idx += 1
                if right is not None:
                    first = idx == 0 and a == 0
                    cap = _position_cap(caps[right.peer_id], first, right.end == L) - right.num_layers
                    parts.append((right.peer_id, right.num_layers, cap, 0, tflops[right.peer_id]))
                if any(c < 0 for _p, _k, c, _lo, _w in parts):
                    continue  # a neighbour's new position (holding embedding/head) overflows it
                # Balance the whole segment by compute, then take each part's share of the hole.
                seg = h + sum(k for _p, k, _c, _lo, _w in parts)
                ideal = _split(seg, [w for *_x, w in parts], [k + c for _p, k, c, _lo, _w in parts],
                               [k + lo for _p, k, _c, lo, _w in parts])
                if ideal is None:
                    continue
                grow = [n - k for n, (_p, k, *_r) in zip(ideal, parts, strict=True)]
                times = [n / max(w, 1e-12) for n, (*_x, w) in zip(ideal, parts, strict=True)]
                key = (max(times), [p for p, *_r in parts])
                if best is None or key < best[0]:
                    pos = a
                    new_left, mids, new_right = left, [], right
                    for (p, _k, *_r), g in zip(parts, grow, strict=True):
                        if left is not None and p == left.peer_id:
                            new_left = Stage(p, left.start, left.end + g)
                            pos += g
                        elif right is not None and p == right.peer_id:
                            new_right = Stage(p, pos, right.end)
                        else:
                            mids.append(Stage(p, pos, pos + g))
                            pos += g
                    best = (key, (new_left, mids, new_right))
        if best is not None:
            return best[1]
    return None


def _repair(survivors: list[Stage], L: int, pool: list[str], caps: Mapping[str, _Cap],
            tflops: Mapping[str, float]) -> list[Stage] | None:
    stages = sorted(survivors, key=lambda st: st.start)
    pool = list(pool)
    while True:
        pos, hole = 0, None
        for i, st in enumerate(stages):
            if st.start > pos:
                hole = (pos, st.start, stages[i - 1] if i else None, st, i)
                break
            pos = st.end
        if hole is None and pos < L:
            hole = (pos, L, stages[-1] if stages else None, None, len(stages))
        if hole is None:
            return stages
        a, b, left, right, i = hole
        filled = _fill_hole(a, b, left, right, pool, caps, L, tflops)
        if filled is None:
            return None
        new_left, mids, new_right = filled
        before = stages[: i - 1] if left is not None else stages[:i]
        after = stages[i + 1:] if right is not None else stages[i:]
        stages = [*before, *([new_left] if new_left else []), *mids, *([new_right] if new_right else []), *after]
        for st in mids:
            pool.remove(st.peer_id)


def replan(old: Allocation, peers: Iterable[PeerResources], model_cost: ModelCost,
           links: Iterable[LinkMeasure] | None = None, *, memory_reserve: float = 0.1,
           kv_tokens: int = DEFAULT_KV_TOKENS, unknown_rtt_ms: float | None = None,
           rebalance_gain: float = 1.25) -> Allocation:
    """Phase 1 after joins and leaves, loading as few layers as it can.

    Intact pipelines stay as they are. A pipeline that lost peers (or whose peer no longer has the
    memory for its range) is repaired by growing its surviving neighbours into the hole and/or
    adding spare peers, which loads exactly the missing layers: the minimum for keeping that
    pipeline. Pipelines that cannot be repaired dissolve into the spare pool; spares form new
    pipelines when that raises k²/s. Only when a fresh `allocate` gives more pipelines and a k²/s at
    least ``rebalance_gain`` times the repaired plan's is the fresh plan used: a rebalance reloads
    most layers, so it has to buy a real gain (or rescue a cluster left with no pipeline).
    """
    peers = list(peers)
    L = model_cost.num_layers
    if old.num_layers != L:
        return allocate(peers, model_cost, links, memory_reserve=memory_reserve, kv_tokens=kv_tokens,
                        unknown_rtt_ms=unknown_rtt_ms)
    by_id = {p.peer_id: p for p in peers}
    caps = {p.peer_id: _cap(p, model_cost, memory_reserve, kv_tokens) for p in peers}
    tflops = {p.peer_id: p.tflops for p in peers}

    kept: list[list[Stage]] = []
    broken: list[list[Stage]] = []
    for pipe in old.pipelines:
        alive = [st for st in pipe if _fits(st, by_id.get(st.peer_id), model_cost, memory_reserve, kv_tokens)]
        (kept if len(alive) == len(pipe) else broken).append(alive)
    placed = {st.peer_id for pipe in kept + broken for st in pipe}
    pool = sorted(p for p in by_id if p not in placed)
    # Smallest holes first: they are the cheapest to close and need the fewest spares.
    broken.sort(key=lambda alive: -sum(st.num_layers for st in alive))
    for alive in broken:
        fixed = _repair(alive, L, pool, caps, tflops) if alive else None
        if fixed is None:
            pool.extend(st.peer_id for st in alive)
            continue
        kept.append(fixed)
        used = {st.peer_id for st in fixed}
        pool = [p for p in pool if p not in used]

    lk = _Links(links, unknown_rtt_ms)
    if pool:
        for g in _plan_groups(pool, caps, L):
            k, s = len(kept), sum(map(len, kept))
            if _objective(k + 1, s + len(g)) > _objective(k, s):
                kept.append(_build_pipeline(_order(g, caps, L, lk, tflops), caps, L, tflops))
                pool = [p for p in pool if p not in g]
    repaired = Allocation(L, kept, sorted(pool))
    try:
        fresh = allocate(peers, model_cost, links, memory_reserve=memory_reserve, kv_tokens=kv_tokens,
                         unknown_rtt_ms=unknown_rtt_ms)
    except ModelDoesNotFit:
        if not kept:
            raise
        return repaired
    if fresh.num_pipelines > repaired.num_pipelines and fresh.objective >= repaired.objective * Fraction(
            rebalance_gain):
        return fresh
    return repaired


# ---------------------------------------------------------------------------------------------
# Phase 2: routing


def _as_peer_map(peers: Iterable[PeerResources] | Mapping[str, PeerResources]) -> dict[str, PeerResources]:
    if isinstance(peers, Mapping):
        return dict(peers)
    return {p.peer_id: p for p in peers}


def _compute_s(peer: PeerResources, n_layers: int, cost: ModelCost, tokens: int, queue: int) -> float:
    flops = cost.flops_per_token_per_layer * tokens * n_layers
    # Requests ahead of this one on the peer each take about as long again.
    return flops / (max(peer.tflops, 1e-9) * 1e12) * (1 + max(queue, 0))


def chain_latency(chain: list[Stage], *, peers: Iterable[PeerResources] | Mapping[str, PeerResources],
                  links: Iterable[LinkMeasure] | None, load: Mapping[str, int] | None, model_cost: ModelCost,
                  prompt_tokens: int, unknown_rtt_ms: float | None = None) -> float:
    """Expected seconds for ``chain``: compute (scaled by queue) plus RTT and hidden-state transfer per hop."""
    pm, lk, load = _as_peer_map(peers), _Links(links, unknown_rtt_ms), load or {}
    total = 0.0
    for i, st in enumerate(chain):
        total += _compute_s(pm[st.peer_id], st.num_layers, model_cost, prompt_tokens, load.get(st.peer_id, 0))
        if i:
            prev = chain[i - 1].peer_id
            total += lk.rtt_s(prev, st.peer_id)
            total += lk.transfer_s(prev, st.peer_id, model_cost.hidden_bytes_per_token * prompt_tokens)
    return total


def route(allocation: Allocation, num_layers: int, *,
          peers: Iterable[PeerResources] | Mapping[str, PeerResources], links: Iterable[LinkMeasure] | None,
          load: Mapping[str, int] | None, model_cost: ModelCost, prompt_tokens: int,
          unknown_rtt_ms: float | None = None, enter_anywhere: bool = True, hop_overhead_s: float = 0.0,
          precisions: Iterable[str] | None = None) -> list[Stage]:
    """Phase 2: the chain covering layers [0, num_layers) with the least `chain_latency`, plus
    ``hop_overhead_s`` per stage (what a call costs beyond RTT and compute: framing, RPC, scheduling;
    the engine measures it), so an extra hop must save more than it costs.

    Any peer holding a range may be entered at any layer boundary inside it (only at its first layer
    with ``enter_anywhere=False``) and runs to the end of its range, so replicas stitch where ranges
    overlap or abut. Peers absent from ``peers``
    are taken as gone, and so are peers whose precision is not in ``precisions`` (None: any), the
    precisions the requester accepts. Shortest path over (boundary, last peer) states, O(stages² · layers).
    """
    pm, lk, load = _as_peer_map(peers), _Links(links, unknown_rtt_ms), load or {}
    if precisions is not None:
        accepted = set(precisions)
        pm = {pid: p for pid, p in pm.items() if p.precision in accepted}
    nodes = [st for st in allocation.stages() if st.peer_id in pm and st.end <= num_layers]
    xfer_bytes = model_cost.hidden_bytes_per_token * prompt_tokens
    per_layer = {st.peer_id: _compute_s(pm[st.peer_id], 1, model_cost, prompt_tokens, load.get(st.peer_id, 0))
                 for st in nodes}
    # best[(boundary, peer)] = (cost, chain) for chains whose last hop is ``peer`` ending at ``boundary``
    best: dict[tuple[int, str | None], tuple[float, list[Stage]]] = {(0, None): (0.0, [])}
    for boundary in range(num_layers):
        arrivals = [(peer, v) for (b, peer), v in best.items() if b == boundary]
        if not arrivals:
            continue
        for node in nodes:
            if not node.start <= boundary < node.end or (not enter_anywhere and boundary != node.start):
                continue
            hop = Stage(node.peer_id, boundary, node.end)
            for prev, (cost, chain) in arrivals:
                if prev == node.peer_id:
                    continue
                c = cost + per_layer[node.peer_id] * hop.num_layers + hop_overhead_s
                if prev is not None:
                    c += lk.rtt_s(prev, node.peer_id) + lk.transfer_s(prev, node.peer_id, xfer_bytes)
                key = (node.end, node.peer_id)
                if key not in best or (c, len(chain) + 1) < (best[key][0], len(best[key][1])):
                    best[key] = (c, [*chain, hop])
    ends = [v for (b, _p), v in best.items() if b == num_layers]
    if not ends:
        raise RuntimeError(f"no live chain of peers covers layers 0..{num_layers}: the allocation "
                           f"has holes among the {len(pm)} known peer(s)")
    return min(ends, key=lambda v: (v[0], len(v[1]), [st.peer_id for st in v[1]]))[1]


class Router:
    """Routes concurrent requests over one allocation, counting each routed request as queue load
    on its peers until it is released, so simultaneous requests spread over replicas."""

    def __init__(self, allocation: Allocation, *, peers: Iterable[PeerResources], model_cost: ModelCost,
                 links: Iterable[LinkMeasure] | None = None, precisions: Iterable[str] | None = None) -> None:
        self.allocation = allocation
        self.precisions = None if precisions is None else set(precisions)
        self.peers = _as_peer_map(peers)
        self.links = list(links or [])
        self.model_cost = model_cost
        self.load: dict[str, int] = defaultdict(int)

    def acquire(self, prompt_tokens: int, extra_load: Mapping[str, int] | None = None) -> list[Stage]:
        """Route one request and count it on its peers (``extra_load``: queue depths peers report)."""
        load = dict(self.load)
        for p, q in (extra_load or {}).items():
            load[p] = load.get(p, 0) + q
        chain = route(self.allocation, self.allocation.num_layers, peers=self.peers, links=self.links,
                      load=load, model_cost=self.model_cost, prompt_tokens=prompt_tokens,
                      precisions=self.precisions)
        for st in chain:
            self.load[st.peer_id] += 1
        return chain

    def release(self, chain: list[Stage]) -> None:
        for st in chain:
            if self.load.get(st.peer_id, 0) > 0:
                self.load[st.peer_id] -= 1
