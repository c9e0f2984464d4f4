"""Weighted voting over chain-of-thought answers (Symphony) and the deterministic answer extractor.

k agents answer the same question independently, each with its own reasoning. The answer is read out
of each text by one deterministic rule (``extract_answer``), so two agents that reason differently
but land on the same number vote together. Each vote weighs ``reputation × confidence``: the
requester's own ledger view of the agent (never the agent's claim) times the agent's confidence in
this answer (the mean probability of the answer's tokens when the model reports log-probabilities,
else 1). The answer with the largest total wins; ties go to the answer first given. Afterwards every
voter's outcome is recorded: agreeing with the winner is a success.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

_ANSWER = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*([^\n]+)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def normalize(text: str) -> str:
    """A canonical form: numbers as exact decimals without trailing zeros, other text lower-cased."""
    t = text.strip().strip(".").strip()
    m = _NUMBER.fullmatch(t.replace(" ", ""))
    if m:
        try:
            v = Fraction(t.replace(",", "").replace(" ", ""))
        except (ValueError, ZeroDivisionError):
            return t.lower()
        if v.denominator == 1:
            return str(v.numerator)
        return f"{float(v):.6f}".rstrip("0").rstrip(".")
    return " ".join(t.lower().split())


def extract_answer(text: str) -> str | None:
    """The answer in a chain-of-thought text: what follows the last 'answer is/:' marker, reduced to its
    first number when it has one; else the text's last number; else None."""
    if not text:
        return None
    marks = _ANSWER.findall(text)
    if marks:
        tail = marks[-1]
        nums = _NUMBER.findall(tail)
        return normalize(nums[0]) if nums else normalize(tail)
    nums = _NUMBER.findall(text)
    return normalize(nums[-1]) if nums else None


def confidence_of(logprobs: list[float] | None) -> float:
    """Mean token probability (1.0 when unknown)."""
    if not logprobs:
        return 1.0
    return max(0.0, min(1.0, sum(math.exp(lp) for lp in logprobs) / len(logprobs)))


@dataclass
class Vote:
    agent: str
    answer: str | None
    weight: float


def weighted_vote(votes: list[Vote]) -> tuple[str | None, dict[str, float]]:
    """The winning answer and the tally by answer (votes without an answer do not count)."""
    tally: dict[str, float] = {}
    for v in votes:
        if v.answer is not None:
            tally[v.answer] = tally.get(v.answer, 0.0) + max(0.0, v.weight)
    if not tally:
        return None, tally
    best = max(tally.values())
    winner = next(a for a in tally if tally[a] == best)  # dicts keep insertion order: first given wins ties
    return winner, tally


def votes_from(replies: list[dict[str, Any]], reputation: Any) -> list[Vote]:
    """Votes from agent replies ``{"agent", "text"|"answer", "confidence"}``, weighted by ``reputation(agent)``."""
    out = []
    for r in replies:
        answer = r.get("answer")
        answer = normalize(str(answer)) if answer is not None else extract_answer(str(r.get("text", "")))
        conf = r.get("confidence", 1.0)
        conf = float(conf) if isinstance(conf, int | float) and not isinstance(conf, bool) else 1.0
        out.append(Vote(str(r["agent"]), answer, reputation(r["agent"]) * max(0.0, min(1.0, conf))))
    return out
