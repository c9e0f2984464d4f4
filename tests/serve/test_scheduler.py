"""The two-phase scheduler against brute force on small random heterogeneous clusters.

Brute force here is written independently of the scheduler: it enumerates every assignment
(peer groups x stage orders x layer splits) and checks memory from the byte formula directly.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from fractions import Fraction

import msgpack
import pytest

from gradient_nb.serve import scheduler as sch
from gradient_nb.serve.scheduler import (
    Allocation,
    LinkMeasure,
    ModelCost,
    ModelDoesNotFit,
    PeerResources,
    Router,
    Stage,
    allocate,
    chain_latency,
    fixed_pipelines,
    measure_compute,
    measure_free_memory,
    model_cost_from_config,
    moved_layers,
    replan,
    route,
    validate_allocation,
)

RESERVE = 0.1
KV_TOKENS = 2


# ----------------------------------------------------------------------------- brute force


def _fits(peer: PeerResources, cost: ModelCost, start: int, end: int) -> bool:
    need = (end - start) * (cost.layer_bytes + cost.kv_bytes_per_token_per_layer * KV_TOKENS)
    need += cost.embed_bytes if start == 0 else 0
    need += cost.head_bytes if end == cost.num_layers else 0
    return need <= int(peer.free_memory_bytes * (1 - RESERVE))


def _compositions(total: int, parts: int) -> Iterator[list[int]]:
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = [0, *cuts, total]
        yield [b - a for a, b in itertools.pairwise(bounds)]


def _pipeline_options(group: list[PeerResources], cost: ModelCost) -> Iterator[list[Stage]]:
    L = cost.num_layers
    for order in itertools.permutations(group):
        for lengths in _compositions(L, len(order)):
            stages, pos, ok = [], 0, True
            for peer, n in zip(order, lengths, strict=True):
                if not _fits(peer, cost, pos, pos + n):
                    ok = False
                    break
                stages.append(Stage(peer.peer_id, pos, pos + n))
                pos += n
            if ok:
                yield stages


def _labelings(n: int, i: int = 0, used: int = 0) -> Iterator[list[int]]:
    """Each peer: -1 (spare) or a group label, labels in order of first use (no duplicates)."""
    if i == n:
        yield []
        return
    for lab in range(-1, used + 1):
        for rest in _labelings(n, i + 1, max(used, lab + 1)):
            yield [lab, *rest]


def _groupings(peers: list[PeerResources]) -> Iterator[list[list[PeerResources]]]:
    for labels in _labelings(len(peers)):
        k = max(labels, default=-1) + 1
        yield [[p for p, lab in zip(peers, labels, strict=True) if lab == g] for g in range(k)]


def brute_best_objective(peers: list[PeerResources], cost: ModelCost) -> Fraction:
    best = Fraction(0)
    for groups in _groupings(peers):
        if groups and all(next(_pipeline_options(g, cost), None) is not None for g in groups):
            k, s = len(groups), sum(map(len, groups))
            best = max(best, Fraction(k * k, s))
    return best


def brute_allocations(peers: list[PeerResources], cost: ModelCost) -> Iterator[Allocation]:
    for groups in _groupings(peers):
        options = [list(_pipeline_options(g, cost)) for g in groups]
        for combo in itertools.product(*options):
            yield Allocation(cost.num_layers, [list(p) for p in combo])


def brute_chains(alloc: Allocation, peers: dict[str, PeerResources]) -> Iterator[list[Stage]]:
    nodes = [st for st in alloc.stages() if st.peer_id in peers]

    def extend(boundary: int, chain: list[Stage]) -> Iterator[list[Stage]]:
        if boundary == alloc.num_layers:
            yield chain
            return
        for st in nodes:
            if st.start <= boundary < st.end:
                yield from extend(st.end, [*chain, Stage(st.peer_id, boundary, st.end)])

    yield from extend(0, [])


# ----------------------------------------------------------------------------- random clusters


def random_cluster(rng: random.Random, n: int, L: int) -> tuple[list[PeerResources], ModelCost]:
    cost = ModelCost(num_layers=L, layer_bytes=10, embed_bytes=rng.choice([0, 4, 9, 15]),
                     head_bytes=rng.choice([0, 5, 12]), kv_bytes_per_token_per_layer=1,
                     flops_per_token_per_layer=1e9, hidden_bytes_per_token=1000)
    per = cost.layer_bytes + KV_TOKENS
    peers = []
    for i in range(n):
        layers = rng.randint(0, L + 1)  # from "holds nothing" to "holds it all with room"
        mem = int((layers * per + rng.randint(0, 20)) / (1 - RESERVE)) + 1
        peers.append(PeerResources(f"p{i}", mem, round(rng.uniform(0.2, 5.0), 3)))
    return peers, cost


def _alloc(peers: list[PeerResources], cost: ModelCost) -> Allocation:
    return allocate(peers, cost, memory_reserve=RESERVE, kv_tokens=KV_TOKENS)


def _valid(alloc: Allocation, peers: list[PeerResources], cost: ModelCost) -> None:
    assert validate_allocation(alloc, peers, cost, memory_reserve=RESERVE, kv_tokens=KV_TOKENS) == []
    for st in alloc.stages():  # and by the independent byte formula
        assert _fits(next(p for p in peers if p.peer_id == st.peer_id), cost, st.start, st.end)
    placed = {st.peer_id for st in alloc.stages()}
    assert placed.isdisjoint(alloc.spare)
    assert placed | set(alloc.spare) == {p.peer_id for p in peers}


# ----------------------------------------------------------------------------- phase 1


@pytest.mark.parametrize("seed", range(60))
def test_allocation_objective_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    peers, cost = random_cluster(rng, rng.randint(2, 6), rng.randint(2, 6))
    best = brute_best_objective(peers, cost)
    if best == 0:
        with pytest.raises(ModelDoesNotFit, match="does not fit"):
            _alloc(peers, cost)
        return
    alloc = _alloc(peers, cost)
    _valid(alloc, peers, cost)
    assert alloc.objective == best


def _mem(usable: int) -> int:
    """Free memory whose usable part (after the reserve) is at least ``usable`` bytes."""
    return int(usable / (1 - RESERVE)) + 1


def test_split_follows_compute_within_memory() -> None:
    cost = ModelCost(12, 10, 0, 0, 0, 1e9, 100)
    # Neither holds all 12 layers; the fast peer has 3x the compute: it gets 3x the layers.
    alloc = allocate([PeerResources("fast", _mem(100), 3.0), PeerResources("slow", _mem(100), 1.0)], cost,
                     memory_reserve=RESERVE, kv_tokens=0)
    assert alloc.num_pipelines == 1
    assert len(alloc.layers_of("fast")) == 9 and len(alloc.layers_of("slow")) == 3
    # Now the fast one only has memory for 4 layers: it is capped there, the rest spills over.
    capped = [PeerResources("fast", _mem(40), 3.0), PeerResources("slow", _mem(100), 1.0)]
    alloc = allocate(capped, cost, memory_reserve=RESERVE, kv_tokens=0)
    assert len(alloc.layers_of("fast")) == 4 and len(alloc.layers_of("slow")) == 8


def test_first_and_last_stage_hold_embedding_and_head() -> None:
    # The embedding costs 7 layers' worth: only "big" can hold it beside layers, so it goes first.
    cost = ModelCost(10, 10, 70, 0, 0, 1e9, 10)
    peers = [PeerResources("small", _mem(65), 1.0), PeerResources("big", _mem(140), 1.0)]
    alloc = allocate(peers, cost, memory_reserve=RESERVE, kv_tokens=0)
    assert [st.peer_id for st in alloc.pipelines[0]] == ["big", "small"]
    assert validate_allocation(alloc, peers, cost, memory_reserve=RESERVE, kv_tokens=0) == []


def test_prefers_more_pipelines_per_stage() -> None:
    cost = ModelCost(8, 10, 0, 0, 0, 1e9, 10)
    full = int(80 / (1 - RESERVE)) + 1
    half = int(40 / (1 - RESERVE)) + 1
    peers = [PeerResources("a", full, 1), PeerResources("b", half, 1), PeerResources("c", half, 1),
             PeerResources("d", 5, 1)]
    alloc = allocate(peers, cost, memory_reserve=RESERVE, kv_tokens=0)
    # {a}, {b, c}: k=2, s=3 -> 4/3 beats {a} alone (1); d holds nothing and stays spare.
    assert alloc.num_pipelines == 2 and alloc.num_stages == 3
    assert alloc.objective == Fraction(4, 3)
    assert alloc.spare == ["d"]


def test_links_order_the_stages() -> None:
    cost = ModelCost(9, 10, 0, 0, 0, 1e9, 10)
    third = int(30 / (1 - RESERVE)) + 1
    peers = [PeerResources(x, third, 1.0) for x in "abc"]
    # All three are needed; only orders with c in the middle avoid the 100 ms a-b link.
    links = [LinkMeasure("a", "b", 100.0), LinkMeasure("a", "c", 1.0), LinkMeasure("b", "c", 1.0)]
    alloc = allocate(peers, cost, links, memory_reserve=RESERVE, kv_tokens=0)
    order = [st.peer_id for st in alloc.pipelines[0]]
    assert order[1] == "c"


def test_model_that_cannot_fit_gives_a_clear_error() -> None:
    cost = ModelCost(30, 10**9, 10**8, 10**8, 10**5, 1e9, 1000)
    peers = [PeerResources("laptop", 4 * 10**9, 1.0), PeerResources("phone", 2 * 10**9, 0.3)]
    with pytest.raises(ModelDoesNotFit, match=r"does not fit: one copy needs .* GiB.*2 peer\(s\)"):
        allocate(peers, cost)
    with pytest.raises(ModelDoesNotFit):
        allocate([], cost)
    with pytest.raises(ValueError, match="unique"):
        allocate([PeerResources("x", 10, 1), PeerResources("x", 10, 1)], cost)


def test_large_cluster_uses_greedy_and_stays_valid() -> None:
    rng = random.Random(7)
    peers, cost = random_cluster(rng, 40, 24)
    alloc = _alloc(peers, cost)
    _valid(alloc, peers, cost)
    assert alloc.num_pipelines >= 1


@pytest.mark.parametrize("seed", range(0, 1500, 50))
def test_greedy_stays_close_to_exact(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stated bound for clusters above EXACT_PEER_LIMIT: the greedy plan reaches at least 4/5 of
    the optimal k²/s. Measured, not proven: the worst over seeds 0..1499 of this generator was 5/6."""
    rng = random.Random(seed)
    peers, cost = random_cluster(rng, rng.randint(6, 10), rng.randint(4, 14))
    try:
        exact = _alloc(peers, cost)
    except ModelDoesNotFit:
        monkeypatch.setattr(sch, "EXACT_PEER_LIMIT", 0)
        with pytest.raises(ModelDoesNotFit):
            _alloc(peers, cost)
        return
    monkeypatch.setattr(sch, "EXACT_PEER_LIMIT", 0)
    greedy = _alloc(peers, cost)
    _valid(greedy, peers, cost)
    assert greedy.objective <= exact.objective
    assert greedy.objective >= Fraction(4, 5) * exact.objective


def test_allocation_round_trips_through_json_and_msgpack() -> None:
    rng = random.Random(3)
    peers, cost = random_cluster(rng, 6, 6)
    peers.append(PeerResources("whole", 10**6, 1.0))
    alloc = _alloc(peers, cost)
    for blob in (json.loads(json.dumps(alloc.to_dict())), msgpack.unpackb(msgpack.packb(alloc.to_dict()))):
        back = Allocation.from_dict(blob)
        assert back == alloc
    assert moved_layers(alloc, alloc) == 0
    assert moved_layers(None, alloc) == alloc.num_pipelines * cost.num_layers
    with pytest.raises(ValueError, match="malformed"):
        Allocation.from_dict({"num_layers": 4, "pipelines": [[["a", 0, 2], ["b", 3, 4]]]})
    with pytest.raises(ValueError, match="malformed"):
        Allocation.from_dict({"num_layers": 4, "pipelines": [[["a", 0, 4]], [["a", 0, 4]]]})
    with pytest.raises(ValueError, match="malformed"):
        Allocation.from_dict({"pipelines": "nope"})


# ----------------------------------------------------------------------------- replan


def test_replan_without_change_moves_nothing() -> None:
    rng = random.Random(11)
    peers, cost = random_cluster(rng, 8, 8)
    peers.append(PeerResources("whole", 10**6, 1.0))
    alloc = _alloc(peers, cost)
    again = replan(alloc, peers, cost, memory_reserve=RESERVE, kv_tokens=KV_TOKENS)
    assert again == alloc and moved_layers(alloc, again) == 0


@pytest.mark.parametrize("seed", range(40))
def test_replan_after_a_leave_moves_the_minimum(seed: int) -> None:
    rng = random.Random(500 + seed)
    L = rng.randint(3, 6)
    peers, cost = random_cluster(rng, 5, L)
    try:
        old = _alloc(peers, cost)
    except ModelDoesNotFit:
        return
    gone = rng.choice(peers)
    left = [p for p in peers if p is not gone]
    held = len(old.layers_of(gone.peer_id) or ())
    try:
        new = replan(old, left, cost, memory_reserve=RESERVE, kv_tokens=KV_TOKENS)
    except ModelDoesNotFit:
        assert not any(a.num_pipelines for a in brute_allocations(left, cost))
        return
    _valid(new, left, cost)
    moved = moved_layers(old, new)
    k_old = old.num_pipelines
    if new.num_pipelines == k_old:
        # Keeping k pipelines needs k·L held layers; survivors held k·L - held: no plan moves fewer.
        best = min(moved_layers(old, a) for a in brute_allocations(left, cost) if a.num_pipelines == k_old)
        assert moved == best == held
    elif new.num_pipelines < k_old:
        # A pipeline was given up: no plan keeps k pipelines by loading only the missing layers.
        assert all(moved_layers(old, a) > held for a in brute_allocations(left, cost) if a.num_pipelines >= k_old)


def test_replan_repairs_from_neighbours_and_spares() -> None:
    cost = ModelCost(12, 10, 0, 0, 0, 1e9, 10)

    def mem(layers: int) -> int:
        return int(layers * 10 / (1 - RESERVE)) + 1

    # One pipeline a[0,4) b[4,8) c[8,12); spare s holds 4 layers.
    old = Allocation(12, [[Stage("a", 0, 4), Stage("b", 4, 8), Stage("c", 8, 12)]], ["s"])
    # b leaves; a and c have room for 2 more layers each: the neighbours close the hole alone.
    peers = [PeerResources("a", mem(6), 1.0), PeerResources("c", mem(6), 1.0), PeerResources("s", mem(4), 1.0)]
    new = replan(old, peers, cost, memory_reserve=RESERVE, kv_tokens=0)
    assert new.pipelines == [[Stage("a", 0, 6), Stage("c", 6, 12)]] and new.spare == ["s"]
    assert moved_layers(old, new) == 4
    # Neighbours are full: the spare takes b's place.
    peers = [PeerResources("a", mem(4), 1.0), PeerResources("c", mem(4), 1.0), PeerResources("s", mem(4), 1.0)]
    new = replan(old, peers, cost, memory_reserve=RESERVE, kv_tokens=0)
    assert new.pipelines == [[Stage("a", 0, 4), Stage("s", 4, 8), Stage("c", 8, 12)]]
    assert moved_layers(old, new) == 4


def test_replan_after_joins_keeps_existing_ranges() -> None:
    cost = ModelCost(6, 10, 0, 0, 0, 1e9, 10)
    half = int(30 / (1 - RESERVE)) + 1
    peers = [PeerResources("a", half, 1.0), PeerResources("b", half, 1.0)]
    old = allocate(peers, cost, memory_reserve=RESERVE, kv_tokens=0)
    # A small newcomer cannot form a pipeline: it stays spare, nothing moves.
    new = replan(old, [*peers, PeerResources("tiny", 5, 1.0)], cost, memory_reserve=RESERVE, kv_tokens=0)
    assert new.pipelines == old.pipelines and new.spare == ["tiny"]
    # A newcomer that holds the whole model becomes a pipeline; only it loads layers.
    new = replan(old, [*peers, PeerResources("big", 10**6, 1.0)], cost, memory_reserve=RESERVE, kv_tokens=0)
    assert old.pipelines[0] in new.pipelines and [Stage("big", 0, 6)] in new.pipelines
    assert moved_layers(old, new) == 6


# ----------------------------------------------------------------------------- phase 2


def random_replicas(rng: random.Random) -> tuple[Allocation, dict[str, PeerResources], list[LinkMeasure],
                                                  dict[str, int], ModelCost]:
    L = rng.randint(2, 7)
    pipelines, n = [], 0
    for _ in range(rng.randint(1, 3)):
        parts = rng.randint(1, min(3, L))
        cuts = sorted(rng.sample(range(1, L), parts - 1))
        bounds = [0, *cuts, L]
        pipe = []
        for a, b in itertools.pairwise(bounds):
            pipe.append(Stage(f"p{n}", a, b))
            n += 1
        pipelines.append(pipe)
    alloc = Allocation(L, pipelines)
    peers = {f"p{i}": PeerResources(f"p{i}", 10**9, round(rng.uniform(0.1, 4.0), 3)) for i in range(n)}
    links = [LinkMeasure(f"p{i}", f"p{j}", round(rng.uniform(0.1, 80.0), 2), rng.choice([None, 10.0, 1000.0]))
             for i in range(n) for j in range(i + 1, n) if rng.random() < 0.8]
    load = {p: rng.randint(0, 3) for p in peers if rng.random() < 0.5}
    cost = ModelCost(L, 10, 0, 0, 0, rng.choice([1e8, 1e9, 1e10]), 2000)
    return alloc, peers, links, load, cost


@pytest.mark.parametrize("seed", range(80))
def test_route_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    alloc, peers, links, load, cost = random_replicas(rng)
    tokens = rng.choice([1, 16, 300])
    if rng.random() < 0.3:  # a peer vanished: routes must avoid it
        peers.pop(rng.choice(sorted(peers)))
    kw = dict(peers=peers, links=links, load=load, model_cost=cost, prompt_tokens=tokens)
    chains = list(brute_chains(alloc, peers))
    if not chains:
        with pytest.raises(RuntimeError, match="no live chain"):
            route(alloc, alloc.num_layers, **kw)
        return
    chain = route(alloc, alloc.num_layers, **kw)
    assert chain in chains
    assert chain_latency(chain, **kw) == pytest.approx(min(chain_latency(c, **kw) for c in chains), rel=1e-12)


def test_chain_latency_by_hand() -> None:
    cost = ModelCost(4, 10, 0, 0, 0, 1e12, 1000)  # 1 TFLOP per token-layer
    peers = [PeerResources("a", 1, 2.0), PeerResources("b", 1, 1.0)]
    links = [LinkMeasure("a", "b", 10.0, 8.0)]  # 8 Mbit/s = 1 MB/s
    chain = [Stage("a", 0, 2), Stage("b", 2, 4)]
    # a: 2 layers x 2 tokens x 1 TFLOP / 2 TFLOP/s = 2 s, x (1 + queue 1) = 4 s; b: 4 s;
    # hop: 10 ms + 2 tokens x 1000 B / 1 MB/s = 2 ms.
    got = chain_latency(chain, peers=peers, links=links, load={"a": 1}, model_cost=cost, prompt_tokens=2)
    assert got == pytest.approx(4 + 4 + 0.010 + 0.002)


def test_route_stitches_across_replicas() -> None:
    cost = ModelCost(8, 10, 0, 0, 0, 1e9, 10)
    # Two pipelines; the fast halves are in different ones, joined by a fast link.
    alloc = Allocation(8, [[Stage("a1", 0, 4), Stage("a2", 4, 8)], [Stage("b1", 0, 3), Stage("b2", 3, 8)]])
    peers = [PeerResources("a1", 1, 10.0), PeerResources("a2", 1, 0.1), PeerResources("b1", 1, 0.1),
             PeerResources("b2", 1, 10.0)]
    links = [LinkMeasure(x, y, 1.0) for x, y in itertools.combinations(["a1", "a2", "b1", "b2"], 2)]
    chain = route(alloc, 8, peers=peers, links=links, load={}, model_cost=cost, prompt_tokens=100)
    assert chain == [Stage("a1", 0, 4), Stage("b2", 4, 8)]


def test_fixed_ranges_form_pipelines_and_extra_stages() -> None:
    fixed = {"a": (0, 10), "b": (10, 30), "c": (0, 20), "d": (20, 30), "e": (0, 10), "f": (5, 25)}
    pipelines, extra = fixed_pipelines(fixed, 30)
    assert sorted([[(st.peer_id, st.start, st.end) for st in p] for p in pipelines]) == [
        [("a", 0, 10), ("b", 10, 30)], [("c", 0, 20), ("d", 20, 30)]]
    assert sorted(st.peer_id for st in extra) == ["e", "f"]
    # Duplicates of one complete range are replicas, not an error.
    pipelines, extra = fixed_pipelines({"x": (0, 30), "y": (0, 30)}, 30)
    assert len(pipelines) == 2 and extra == []
    # Backtracking: the greedy first choice (0..20) leaves a hole, 0..10 + 10..30 tiles.
    pipelines, extra = fixed_pipelines({"p": (0, 20), "q": (0, 10), "r": (10, 30)}, 30)
    assert [[st.peer_id for st in p] for p in pipelines] == [["q", "r"]] and [st.peer_id for st in extra] == ["p"]
    alloc = Allocation(30, pipelines, [], extra)
    assert Allocation.from_dict(json.loads(json.dumps(alloc.to_dict()))) == alloc
    assert alloc.layers_of("p") == range(0, 20) and alloc.num_pipelines == 1
    with pytest.raises(ValueError, match="outside"):
        Allocation.from_dict({"num_layers": 4, "pipelines": [], "extra": [["z", 2, 9]]})


def test_route_stitches_extra_stages_around_a_lost_peer() -> None:
    cost = ModelCost(30, 10, 0, 0, 0, 1e9, 10)
    alloc = Allocation(30, [[Stage("q", 0, 10), Stage("r", 10, 30)]], [], [Stage("p", 0, 20)])
    peers = {x: PeerResources(x, 1, 0.5 if x == "p" else 1.0) for x in "pqr"}  # p is the slow one
    assert route(alloc, 30, peers=peers, links=None, load={}, model_cost=cost, prompt_tokens=10) == [
        Stage("q", 0, 10), Stage("r", 10, 30)]
    # q is gone: p covers 0..20 and r is entered at its layer 20, no re-plan needed.
    del peers["q"]
    assert route(alloc, 30, peers=peers, links=None, load={}, model_cost=cost, prompt_tokens=10) == [
        Stage("p", 0, 20), Stage("r", 20, 30)]


def test_router_spreads_concurrent_requests() -> None:
    cost = ModelCost(4, 10, 0, 0, 0, 1e9, 10)
    alloc = Allocation(4, [[Stage("x", 0, 4)], [Stage("y", 0, 4)]])
    router = Router(alloc, peers=[PeerResources("x", 1, 1.0), PeerResources("y", 1, 1.0)], model_cost=cost)
    first, second = router.acquire(10), router.acquire(10)
    assert {first[0].peer_id, second[0].peer_id} == {"x", "y"}
    router.release(first)
    third = router.acquire(10)
    assert third[0].peer_id == first[0].peer_id
    # A peer that reports a deep queue is avoided even with nothing routed there by us.
    router.release(second)
    router.release(third)
    assert router.acquire(10, extra_load={"x": 5})[0].peer_id == "y"


# ----------------------------------------------------------------------------- measurements


def test_probes_measure_something() -> None:
    assert measure_compute(seconds=0.05) > 0
    assert measure_free_memory() > 0


def test_model_cost_from_config_matches_real_parameters() -> None:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=300)
    cost = model_cost_from_config(cfg, bytes_per_param=4)
    layer = LlamaDecoderLayer(cfg, 0)
    assert cost.layer_bytes == sum(p.numel() for p in layer.parameters()) * 4
    assert cost.embed_bytes == 300 * 64 * 4
    assert cost.num_layers == 3
    assert cost.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4
    assert torch.float32.itemsize == 4


# ----------------------------------------------------------------------------- precision, coordinator


def test_route_only_to_accepted_precisions() -> None:
    cost = ModelCost(4, 10, 0, 0, 0, 1e9, 10)
    alloc = Allocation(4, [[Stage("fast-int8", 0, 4)], [Stage("slow-fp32", 0, 4)]])
    peers = [PeerResources("fast-int8", 1, 100.0, "int8"), PeerResources("slow-fp32", 1, 1.0)]
    kw = {"peers": peers, "links": [], "load": {}, "model_cost": cost, "prompt_tokens": 4}
    assert route(alloc, 4, **kw) == [Stage("fast-int8", 0, 4)]  # whoever asks for nothing gets the fastest
    assert route(alloc, 4, precisions={"float32"}, **kw) == [Stage("slow-fp32", 0, 4)]
    with pytest.raises(RuntimeError, match="no live chain"):
        route(alloc, 4, precisions={"bfloat16"}, **kw)
    assert sch.precision_name("float32", "nf4") == "nf4" and sch.parse_precision("int8+bfloat16") == ("bfloat16", "int8")
    assert sch.strictest({"int8", "bfloat16", "float32"}) == "float32"
    with pytest.raises(ValueError):
        sch.precision_name("int3")


def test_precision_probe_measures_each_precision() -> None:
    for p in ("float32", "bfloat16", "int8"):
        assert sch.measure_precision_tflops(p, seconds=0.02, n=128) > 0


class _Mesh:
    """What the coordinator needs of a Mesh: its id and its (real) replicated state."""

    def __init__(self, identity, record: dict | None = None) -> None:
        from gradient_nb.mesh.state import MeshState

        self.identity, self.id = identity, identity.peer_id
        self.state = MeshState(identity)
        self.state.heartbeat({"free_memory_bytes": 10**9, "tflops": 1.0, **(record or {})})


def _serving(precision: str = "float32") -> dict:
    dtype, quant = sch.parse_precision(precision)
    return {"serving": {"model": "m", "hash": "h", "dtype": dtype, "quantization": quant, "layers": None,
                        "ready": False, "fixed_layers": None, "memory_cap_bytes": None}}


def _sync_all(*meshes) -> None:
    for dst in meshes:
        for src in meshes:
            if src is not dst:
                if hasattr(dst.state, "receive"):
                    dst.state.receive(src.state.export())
                else:
                    dst.state.doc.apply_update(src.state.doc.get_update())


COST = ModelCost(8, 1000, 1000, 1000, 1, 1e9, 16)


def test_a_freshly_ground_lowest_id_does_not_become_coordinator() -> None:
    from gradient_nb.mesh.identity import Identity
    from gradient_nb.serve.coordinator import SERVE_NS, Coordinator, allocation_of, coordinator_of

    honest = [_Mesh(Identity.generate(), _serving()) for _ in range(3)]
    coords = [Coordinator(m, "m", COST) for m in honest]
    for _ in range(3):  # a few rounds: note who serves, vote, plan
        _sync_all(*honest)
        for c in coords:
            c.step()
    _sync_all(*honest)
    incumbent = coordinator_of(honest[0], "m")
    assert incumbent == min(m.id for m in honest)  # peers that started together: nobody is senior
    assert all(coordinator_of(m, "m") == incumbent for m in honest)
    plan = allocation_of(honest[0], "m")
    assert plan is not None and {st.peer_id for st in plan.stages()} | set(plan.spare) == {m.id for m in honest}

    # A newcomer grinds an id below everyone's, serves, votes for itself and publishes its own plan.
    while (ident := Identity.generate()).peer_id > incumbent:
        pass
    sybil = _Mesh(ident, _serving())
    grab = Allocation(8, [[Stage(sybil.id, 0, 8)]], precisions=["int8"], line=[sybil.id])
    sybil.state.put(SERVE_NS, "follow-m", {"coordinator": sybil.id, "line": [sybil.id]})
    sybil.state.put(SERVE_NS, "alloc-m", grab.to_dict())
    fresh = _Mesh(Identity.generate())  # an entry that joins after it: no history of its own
    everyone = [*honest, sybil, fresh]
    for _ in range(2):
        _sync_all(*everyone)
        for c in coords:
            c.step()
    _sync_all(*everyone)
    for m in [*honest, fresh]:
        assert coordinator_of(m, "m") == incumbent
        alloc = allocation_of(m, "m")
        assert alloc is not None and alloc.precisions == ["float32"] and sybil.id in alloc.spare + [
            st.peer_id for st in alloc.stages()]  # the incumbent places it like anyone else

    # The incumbent leaves: its succession line, copied into every follower's vote, names an honest heir.
    gone = next(m for m in honest if m.id == incumbent)
    gone.state.remove_self()
    rest = [m for m in everyone if m is not gone]
    _sync_all(gone, *rest)
    heir = coordinator_of(fresh, "m")
    assert heir != sybil.id and heir in {m.id for m in honest} - {incumbent}
    assert all(coordinator_of(m, "m") == heir for m in rest if m is not sybil)


def test_phase_1_uses_throughput_at_the_served_precision_and_accepted_precisions_only() -> None:
    from gradient_nb.mesh.identity import Identity
    from gradient_nb.serve.coordinator import SERVE_NS, Coordinator

    a, b = _Mesh(Identity.generate(), _serving()), _Mesh(Identity.generate(), _serving())
    q = _Mesh(Identity.generate(), _serving("int8"))
    # Measured at the precision each serves: b runs 3x a's speed (the registry's float32 probes are equal).
    a.state.put(SERVE_NS, "rate-m", {"precision": "float32", "tflops": 1.0})
    b.state.put(SERVE_NS, "rate-m", {"precision": "float32", "tflops": 3.0})
    q.state.put(SERVE_NS, "rate-m", {"precision": "int8", "tflops": 50.0})
    _sync_all(a, b, q)
    c = Coordinator(a, "m", ModelCost(8, 10**8, 10**8, 10**8, 1, 1e9, 16))
    alloc = c.plan_once()
    assert alloc.precisions == ["float32"] and q.id not in alloc.spare + [st.peer_id for st in alloc.stages()]
    # Memory holds 4.5 layers per peer at most: the two float32 peers form one pipeline, split by speed.
    (pipe,) = alloc.pipelines
    n = {st.peer_id: st.num_layers for st in pipe}
    assert n[b.id] > n[a.id]


def test_phase_1_orders_stages_by_the_registrys_measured_link_rtts() -> None:
    from gradient_nb.mesh.identity import Identity
    from gradient_nb.serve.coordinator import Coordinator

    # Ids drawn so that the peer that belongs in the middle (near both others) is not the middle id:
    # without the links, ties would be broken by id and put another peer there.
    while True:
        ids = [Identity.generate() for _ in range(3)]
        if sorted(i.peer_id for i in ids)[1] != ids[1].peer_id:
            break
    a, b, c = (i.peer_id for i in ids)
    rtt = {frozenset((a, b)): 1.0, frozenset((b, c)): 1.0, frozenset((a, c)): 100.0}
    meshes = [_Mesh(i, {**_serving(), "free_memory_bytes": 450_000_000,
                        "links": [{"peer": o, "rtt_ms": rtt[frozenset((i.peer_id, o))]}
                                  for o in (a, b, c) if o != i.peer_id]}) for i in ids]
    _sync_all(*meshes)
    # Each peer holds at most 4 of the 9 layers (3 next to the embedding or head): one 3-stage pipeline.
    alloc = Coordinator(meshes[0], "m", ModelCost(9, 10**8, 10**8, 10**8, 1, 1e9, 16)).plan_once()
    (pipe,) = alloc.pipelines
    assert [st.peer_id for st in pipe][1] == b
