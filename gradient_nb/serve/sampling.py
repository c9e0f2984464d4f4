"""Token sampling (OpenAI semantics) and stop-string detection over incremental detokenisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy; OpenAI allows 0..2
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    max_tokens: int = 16
    seed: int | None = None  # same seed + same logits -> same tokens
    stop: list[str] = field(default_factory=list)

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


class Sampler:
    """Picks the next token from last-position logits; one per request (it owns the RNG)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is None:
            self.generator.seed()  # fresh OS entropy: unseeded requests must not repeat each other
        else:
            self.generator.manual_seed(params.seed)

    def next_token(self, logits: torch.Tensor) -> int:
        logits = logits.detach().reshape(-1).to("cpu", torch.float32)
        p = self.params
        if p.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep a token when the mass before it is still below top_p (the top token is always kept)
            keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < p.top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))


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
