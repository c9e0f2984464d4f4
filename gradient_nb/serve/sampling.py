"""Token sampling (OpenAI semantics) and stop-string detection over incremental detokenisation.

A draw is a pure function of (logits, spec): the spec says temperature, top_p, the (seed, step) of
the draw's own random generator, and optionally a token mask (packed bits, one per vocabulary entry,
little-endian within each byte: the tokens a constraint allows at this step) and how many top
alternatives to report. The mask applies first, then the temperature, then top_p; the log-probability
returned with a token is under exactly that distribution (greedy: the log-softmax of the masked logits).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy; OpenAI allows 0..2
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    max_tokens: int = 16
    seed: int | None = None  # same seed + same logits -> same tokens
    stop: list[str] = field(default_factory=list)
    logprobs: int = 0  # how many of the most likely alternatives each step reports (OpenAI: 0..20)

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if isinstance(self.stop, str):  # OpenAI accepts a single string
            self.stop = [self.stop]
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ValueError("stop takes at most 4 non-empty strings")
        if not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or \
                not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], not {self.logprobs!r}")


@dataclass
class TokenStep:
    """One generated token with its log-probability under the distribution it was drawn from, and the
    ``SamplingParams.logprobs`` most likely tokens of that distribution as (token, logprob), best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


MAX_SEED = (1 << 63) - 1
MAX_LOGPROBS = 20


def mask_nbytes(vocab_size: int) -> int:
    """Bytes of a packed token mask over a vocabulary of ``vocab_size`` entries."""
    return -(-int(vocab_size) // 8)


def pack_mask(allowed: torch.Tensor, vocab_size: int) -> bytes:
    """A bool mask over the vocabulary (``True`` = allowed), packed as the spec carries it.

    A mask shorter than ``vocab_size`` (a tokenizer's vocabulary inside the model's padded one) allows
    nothing beyond its end; a longer one may only disallow the entries past ``vocab_size``.
    """
    allowed = torch.as_tensor(allowed).reshape(-1).to("cpu", torch.bool)
    if allowed.numel() > vocab_size:
        if bool(allowed[vocab_size:].any()):
            raise ValueError(f"the mask allows tokens beyond the model's vocabulary of {vocab_size}")
        allowed = allowed[:vocab_size]
    if not bool(allowed.any()):
        raise ValueError("the mask allows no token at all")
    padded = torch.zeros(mask_nbytes(vocab_size) * 8, dtype=torch.bool)
    padded[: allowed.numel()] = allowed
    return np.packbits(padded.numpy(), bitorder="little").tobytes()


def unpack_mask(data: bytes, vocab_size: int) -> torch.Tensor:
    """The bool mask [vocab_size] of packed bits (ValueError when the size is not the vocabulary's)."""
    if not isinstance(data, bytes | bytearray) or len(data) != mask_nbytes(vocab_size):
        got = len(data) if isinstance(data, bytes | bytearray) else type(data).__name__
        raise ValueError(f"a token mask is {mask_nbytes(vocab_size)} bytes of packed bits for a vocabulary of "
                         f"{vocab_size}, not {got}")
    bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8), bitorder="little")[:vocab_size]
    mask = torch.from_numpy(bits.astype(np.bool_))
    if not bool(mask.any()):
        raise ValueError("the token mask allows no token at all")
    return mask


class Sampler:
    """Picks the next token from last-position logits; one per request.

    Each draw uses a generator seeded from (request seed, step), not one generator consumed in order:
    the peer that holds the model's head can then draw a request's token itself (``spec`` travels
    with the call, ``sample_with`` draws), so a step moves a token id instead of the whole vocabulary's
    logits, and a replay after a failover draws exactly what the lost chain would have.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        # Unseeded requests get fresh OS entropy: they must not repeat each other.
        self.seed = secrets.randbelow(MAX_SEED + 1) if params.seed is None else int(params.seed) & MAX_SEED
        self.step = 0

    def spec(self, step: int | None = None, mask: bytes | None = None) -> dict[str, Any]:
        """What the peer holding the head needs to draw token ``step`` (msgpack-able); ``mask`` is a
        packed token mask (``pack_mask``) for this step."""
        p = self.params
        spec: dict[str, Any] = {"temperature": float(p.temperature), "top_p": float(p.top_p), "seed": self.seed,
                                "step": self.step if step is None else int(step)}
        if p.logprobs:
            spec["logprobs"] = int(p.logprobs)
        if mask is not None:
            spec["mask"] = bytes(mask)
        return spec

    def next_token(self, logits: torch.Tensor) -> int:
        token = sample_with(logits, self.spec())
        self.step += 1
        return token

    def next_step(self, logits: torch.Tensor, mask: bytes | None = None) -> TokenStep:
        """The next token with its log-probabilities (``draw``), under an optional packed token mask."""
        step = draw(logits, self.spec(mask=mask))
        self.step += 1
        return step


def parse_spec(spec: Any, vocab_size: int | None = None) -> dict[str, Any]:
    """A sampling spec that came from the network, checked (ValueError says what is wrong). A token mask
    is checked against ``vocab_size`` (required when the spec carries one)."""
    if not isinstance(spec, dict):
        raise ValueError("a sampling spec is a map of temperature, top_p, seed and step")
    t, p, seed, step = (spec.get(k) for k in ("temperature", "top_p", "seed", "step"))
    if not isinstance(t, int | float) or isinstance(t, bool) or not 0.0 <= t <= 2.0:
        raise ValueError("temperature must be a number in [0, 2]")
    if not isinstance(p, int | float) or isinstance(p, bool) or not 0.0 < p <= 1.0:
        raise ValueError("top_p must be a number in (0, 1]")
    for name, v in (("seed", seed), ("step", step)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SEED:
            raise ValueError(f"{name} must be an integer in [0, 2**63)")
    out: dict[str, Any] = {"temperature": float(t), "top_p": float(p), "seed": seed, "step": step}
    k = spec.get("logprobs", 0)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}]")
    if k:
        out["logprobs"] = k
    mask = spec.get("mask")
    if mask is not None:
        if vocab_size is None:
            raise ValueError("this peer cannot check a token mask (no vocabulary size)")
        unpack_mask(mask, vocab_size)  # raises on a wrong size or a mask that allows nothing
        out["mask"] = bytes(mask)
    return out


def _masked(logits: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """Last-position logits as float32 on the CPU, -inf where the spec's token mask disallows."""
    logits = logits.detach().reshape(-1).to("cpu", torch.float32)
    mask = spec.get("mask")
    if mask is None:
        return logits
    return logits.masked_fill(~unpack_mask(mask, logits.numel()), -math.inf)


def nucleus(logits: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """The tokens [vocab] a sampled draw may pick: the smallest set of the most likely ones whose
    probability at the temperature reaches top_p (the top token is always in it), within the spec's
    token mask."""
    logits = _masked(logits, spec)
    if spec["top_p"] >= 1.0:
        return logits > -math.inf if "mask" in spec else torch.ones_like(logits, dtype=torch.bool)
    sorted_p, order = torch.sort(torch.softmax(logits / spec["temperature"], dim=-1), descending=True)
    # keep a token when the mass before it is still below top_p
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep[order] = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < spec["top_p"]
    keep[order[0]] = True
    return keep & (logits > -math.inf)


def draw_scores(logits: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """Per token, the score whose argmax is the token ``spec`` draws from ``logits`` [vocab].

    Greedy: the logits. Sampling: the Gumbel-max trick, log-probabilities at the temperature plus
    Gumbel noise from the (seed, step) generator, -inf outside the top_p nucleus. The argmax of that
    is an exact draw from the distribution, and unlike ``torch.multinomial`` the rule is ours: a
    verifier recomputing the logits can tell a draw an honest peer could have made (its score within
    the precision's noise of the best) from a token the peer chose. A token mask makes every
    disallowed token's score -inf, before the temperature and top_p.
    """
    logits = _masked(logits, spec)
    if spec["temperature"] == 0.0:
        return logits
    logp = torch.log_softmax(logits / spec["temperature"], dim=-1)
    if spec["top_p"] < 1.0:
        logp = logp.masked_fill(~nucleus(logits, spec), -math.inf)
    digest = hashlib.blake2b(f"{spec['seed']}:{spec['step']}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & MAX_SEED)
    u = torch.rand(logp.shape, generator=generator).clamp_(1e-12, 1.0 - 1e-7)
    return logp - torch.log(-torch.log(u))


def sample_with(logits: torch.Tensor, spec: dict[str, Any]) -> int:
    """Draw one token from last-position logits as ``spec`` (``Sampler.spec``) says."""
    return int(torch.argmax(draw_scores(logits, spec)))


def distribution(logits: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """Log-probabilities [vocab] of the distribution ``spec`` draws from: the masked logits at the
    temperature (greedy: at 1), renormalised over the top_p nucleus; -inf where a draw cannot land."""
    logits = _masked(logits, spec)
    if spec["temperature"] == 0.0:
        return torch.log_softmax(logits, dim=-1)
    logp = torch.log_softmax(logits / spec["temperature"], dim=-1)
    if spec["top_p"] < 1.0:
        logp = logp.masked_fill(~nucleus(logits, spec), -math.inf)
        logp = logp - torch.logsumexp(logp, dim=-1)
    return logp


def draw(logits: torch.Tensor, spec: dict[str, Any]) -> TokenStep:
    """``sample_with``'s token, with its log-probability and the spec's ``logprobs`` top alternatives."""
    token = sample_with(logits, spec)
    logp = distribution(logits, spec)
    k = min(int(spec.get("logprobs", 0)), logp.numel())
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(logp, k)
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return TokenStep(token, float(logp[token]), top)


class StopDetector:
    """Incremental detokenisation that holds back text which might turn into a stop string.

    ``push(token_id)`` returns the text that is now safe to show; once a stop string appears,
    ``stopped`` is true and the text before it has been returned (the stop string itself never is,
    as in OpenAI's API). ``flush()`` returns what was held back when generation ends otherwise.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None = None, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        self.text = text
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, self.emitted - longest + 1)
        hits = [i for i in (text.find(s, search_from) for s in self.stop) if i != -1]
        if hits:
            self.stopped = True
            cut = max(min(hits), self.emitted)
            out, self.emitted = text[self.emitted:cut], cut
            return out
        hold = 0
        for s in self.stop:  # the longest tail of the text that begins some stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = max(self.emitted, len(text) - hold)
        out, self.emitted = text[self.emitted:safe], safe
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
