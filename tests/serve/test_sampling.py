"""Sampling (greedy, seeded, nucleus) and stop strings over incremental detokenisation."""

from __future__ import annotations

import pytest
import torch

from gradient_nb.models import load_tokenizer, resolve_model
from gradient_nb.serve.sampling import Sampler, SamplingParams, StopDetector, parse_spec, sample_with


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams(temperature=0.0)).next_token(logits) == 1


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draw(seed: int | None) -> list[int]:
        s = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [s.next_token(logits) for _ in range(50)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(None) != draw(None)  # unseeded requests must not repeat each other


def test_top_p_keeps_only_the_nucleus() -> None:
    # probabilities ~ 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two only (0.5 < 0.7 <= 0.8)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=1))
    seen = {s.next_token(logits) for _ in range(400)}
    assert seen == {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=1))
    assert {s.next_token(logits) for _ in range(400)} == {0, 1, 2, 3}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=1))
    assert {s.next_token(logits) for _ in range(50)} == {0}


def test_temperature_sharpens() -> None:
    logits = torch.log(torch.tensor([0.6, 0.4]))
    cold = Sampler(SamplingParams(temperature=0.1, seed=3))
    hot = Sampler(SamplingParams(temperature=2.0, seed=3))
    cold_ones = sum(cold.next_token(logits) for _ in range(500))
    hot_ones = sum(hot.next_token(logits) for _ in range(500))
    assert cold_ones < 20 < 150 < hot_ones  # p(1) ~ 0.017 cold, ~ 0.45 hot


def test_params_are_checked() -> None:
    for bad in [dict(temperature=-1), dict(temperature=2.5), dict(top_p=0), dict(max_tokens=0),
                dict(stop=["a", "b", "c", "d", "e"]), dict(stop=[""])]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="END").stop == ["END"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model())


def stream(tok, text: str, stop: list[str]) -> tuple[list[str], StopDetector]:
    d = StopDetector(tok, stop)
    pieces = []
    for t in tok(text, add_special_tokens=False).input_ids:
        pieces.append(d.push(t))
        if d.stopped:
            break
    pieces.append(d.flush())
    return pieces, d


def test_stop_string_cut_and_held_back(tok) -> None:
    pieces, d = stream(tok, "The answer is 42. END of story", ["END"])
    assert d.stopped and "".join(pieces) == "The answer is 42. "
    # the text before the stop string is emitted incrementally, not all at the end
    assert sum(1 for p in pieces if p) > 3


def test_stop_string_across_tokens_and_partial_prefix(tok) -> None:
    pieces, d = stream(tok, "alpha beta<|stop|>gamma", ["<|stop|>"])
    assert d.stopped and "".join(pieces) == "alpha beta"
    # a prefix of a stop string that never completes is released at the end
    pieces, d = stream(tok, "value <|st", ["<|stop|>"])
    assert not d.stopped and "".join(pieces) == "value <|st"


def test_multibyte_characters_are_never_split(tok) -> None:
    text = "Zürich 東京 🙂 ok"
    pieces, d = stream(tok, text, ["XYZ"])
    assert not d.stopped
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    pieces, _ = stream(tok, text, ["東京"])
    assert "".join(pieces) == "Zürich "


def test_a_spec_draws_what_the_sampler_draws() -> None:
    """The peer holding the head draws from ``spec``: the same tokens as the entry's own sampler."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    here = Sampler(params)
    specs = Sampler(params)
    assert [here.next_token(logits) for _ in range(30)] == [sample_with(logits, specs.spec(i)) for i in range(30)]
    assert specs.spec(3) == parse_spec(specs.spec(3))


@pytest.mark.parametrize("spec", [
    None, "greedy", {}, {"temperature": 0.0},
    {"temperature": 2.5, "top_p": 1.0, "seed": 1, "step": 0},
    {"temperature": True, "top_p": 1.0, "seed": 1, "step": 0},
    {"temperature": 1.0, "top_p": 0.0, "seed": 1, "step": 0},
    {"temperature": 1.0, "top_p": 1.0, "seed": -1, "step": 0},
    {"temperature": 1.0, "top_p": 1.0, "seed": 1 << 63, "step": 0},
    {"temperature": 1.0, "top_p": 1.0, "seed": 1, "step": 1.5},
])
def test_bad_specs_from_the_network_are_refused(spec) -> None:
    with pytest.raises(ValueError):
        parse_spec(spec)


def test_logprobs_are_those_of_the_distribution_sampled_from() -> None:
    from gradient_nb.serve.sampling import distribution, draw

    logits = torch.randn(300, generator=torch.Generator().manual_seed(4)) * 3
    greedy = Sampler(SamplingParams(temperature=0.0, logprobs=5)).next_step(logits)
    want = torch.log_softmax(logits, dim=-1)
    assert greedy.token == int(logits.argmax()) and greedy.logprob == pytest.approx(float(want.max()), abs=1e-6)
    assert [t for t, _ in greedy.top] == torch.topk(want, 5).indices.tolist()
    spec = {"temperature": 0.7, "top_p": 0.8, "seed": 3, "step": 0, "logprobs": 2}
    step = draw(logits, spec)
    logp = torch.log_softmax(logits / 0.7, dim=-1)
    sorted_p, order = torch.sort(logp.exp(), descending=True)
    kept = torch.zeros(300, dtype=torch.bool)
    kept[order[(torch.cumsum(sorted_p, 0) - sorted_p) < 0.8]] = True  # the nucleus, computed here
    assert torch.equal(distribution(logits, spec) > -float("inf"), kept)
    renorm = logp[kept] - torch.logsumexp(logp[kept], dim=-1)
    assert step.token in torch.nonzero(kept)[:, 0].tolist()
    assert step.logprob == pytest.approx(float(logp[step.token] - torch.logsumexp(logp[kept], dim=-1)), abs=1e-5)
    assert step.top[0][1] == pytest.approx(float(renorm.max()), abs=1e-5) and len(step.top) == 2
    assert Sampler(SamplingParams(temperature=0.0)).next_step(logits).top == []  # logprobs=0: no alternatives


def test_a_token_mask_restricts_draws_and_is_size_checked() -> None:
    from gradient_nb.serve.sampling import pack_mask, unpack_mask

    vocab = 37
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1))
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[3, 11, 30]] = True
    packed = pack_mask(allowed, vocab)
    assert len(packed) == 5 and unpack_mask(packed, vocab).tolist() == allowed.tolist()
    greedy = Sampler(SamplingParams(temperature=0.0)).next_step(logits, packed)
    assert greedy.token == max((3, 11, 30), key=lambda t: float(logits[t]))
    masked = torch.full_like(logits, -float("inf"))
    masked[allowed] = logits[allowed]
    assert greedy.logprob == pytest.approx(float(torch.log_softmax(masked, -1)[greedy.token]), abs=1e-6)
    s = Sampler(SamplingParams(temperature=2.0, top_p=0.95, seed=5))
    assert {s.next_step(logits, packed).token for _ in range(200)} <= {3, 11, 30}
    # A shorter mask (a tokenizer's vocabulary inside a padded one) allows nothing past its end.
    assert unpack_mask(pack_mask(allowed[:31], vocab), vocab).tolist() == allowed.tolist()
    spec = {"temperature": 1.0, "top_p": 1.0, "seed": 1, "step": 0}
    assert parse_spec({**spec, "mask": packed}, vocab)["mask"] == packed
    for bad, why in ((packed[:4], "5 bytes of packed bits"), (packed + b"\0", "5 bytes of packed bits"),
                     ("xx", "packed bits"), (bytes(5), "allows no token")):
        with pytest.raises(ValueError, match=why):
            parse_spec({**spec, "mask": bad}, vocab)
    with pytest.raises(ValueError, match="logprobs"):
        parse_spec({**spec, "logprobs": 21}, vocab)
    with pytest.raises(ValueError, match="allows no token"):
        pack_mask(torch.zeros(vocab, dtype=torch.bool), vocab)
    with pytest.raises(ValueError):
        SamplingParams(logprobs=21)
