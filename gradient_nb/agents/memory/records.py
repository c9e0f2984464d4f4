"""Memory entries as signed, content-addressed records (SEDM's verifiable write, the record half).

An **item** is what an agent remembers: a worked ``example`` or a tool ``recipe`` distilled from a
finished trajectory, or an ``insight`` abstracted from another item (cross-domain diffusion). Its id is
the sha256 of its canonical msgpack encoding (:func:`item_id`), so two peers that distil the same item
name it the same way and an altered item no longer matches its name.

An **entry** is an item with the **replay record** of its admission test, signed by the peer that
admitted it (:func:`entry_record`): the solver (its prompt, tool specs and token budget, by hash), the
model (name and content hash of its weights), the seed, greedy decoding, the tasks replayed (with their
exact answers), the answers given without and with the item, and both scores. In the mesh state an entry
lives under namespace :data:`NAMESPACE`, name = item id, in the admitting peer's own slot (the state's
per-owner signature says who wrote the slot; the record's own signature travels with the content).

:func:`check_entry` is what every reader runs before it believes an entry; it re-derives everything the
record claims that can be derived without a model: the signature and signer, the id from the item, the
scores from the answers and the truths, and the admission rule itself (a gain on the held-back tasks).
Whether the answers are what the model really gives is checked by re-running it
(:func:`gradient_nb.agents.memory.admission.verify_entry`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from ...mesh.errors import SignatureInvalid
from ...mesh.identity import Identity, canonical_bytes, sign_record, verify_record
from ..vote import normalize

NAMESPACE = "agent-memory"
KINDS = ("example", "recipe", "insight")
MAX_TEXT = 1200
MAX_TASKS = 16


@dataclass(frozen=True)
class Item:
    kind: str  # example | recipe | insight
    family: str  # the task family it was admitted for
    text: str  # what goes into the prompt
    origin: str = ""  # the task it was distilled from
    parent: str = ""  # for an insight: the id of the item it was abstracted from

    def payload(self) -> dict[str, Any]:
        return {"kind": self.kind, "family": self.family, "text": self.text, "origin": self.origin,
                "parent": self.parent}

    @property
    def id(self) -> str:
        return item_id(self.payload())

    @property
    def key(self) -> str:
        """What a task is compared with to retrieve the item: the task it was distilled from when it has
        one (task against task), else its text (an insight speaks for itself)."""
        return self.origin if self.origin and self.kind != "insight" else self.text

    @classmethod
    def from_payload(cls, p: Any) -> Item:
        if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("kind", "family", "text")):
            raise SignatureInvalid("an item has kind, family and text (strings)")
        if p["kind"] not in KINDS or not p["text"] or len(p["text"]) > MAX_TEXT or not p["family"]:
            raise SignatureInvalid(f"an item's kind is one of {KINDS}, its text 1..{MAX_TEXT} characters")
        return cls(p["kind"], p["family"], p["text"], str(p.get("origin", "")), str(p.get("parent", "")))


def item_id(payload: dict[str, Any]) -> str:
    """The content address of an item: sha256 of its canonical encoding."""
    return hashlib.sha256(canonical_bytes(payload)).hexdigest()


def matches(answer: str | None, truth: str) -> bool:
    """Whether ``answer`` is ``truth`` (numbers within 0.1% + 0.01, as the agents bench judges)."""
    if answer is None:
        return False
    try:
        a, t = Fraction(normalize(str(answer))), Fraction(truth)
    except (ValueError, ZeroDivisionError):
        return normalize(str(answer)) == normalize(truth)
    return abs(a - t) <= abs(t) * Fraction(1, 1000) + Fraction(1, 100)


def score(answers: list[str | None], truths: list[str]) -> float:
    return sum(matches(a, t) for a, t in zip(answers, truths, strict=True)) / len(truths)


@dataclass
class Replay:
    """The A/B replay of an admission test: what any peer needs to run it again."""

    solver: dict[str, Any]  # {"name", "prompt_sha", "tools_sha", "max_tokens"}
    model: str
    model_hash: str
    seed: int
    tasks: list[dict[str, str]]  # [{"task", "truth"}]: the origin task first, then held-back neighbours
    answers_without: list[str | None]
    answers_with: list[str | None]
    score_without: float
    score_with: float
    tokens_without: int = 0
    tokens_with: int = 0
    decoding: str = "greedy"

    def payload(self) -> dict[str, Any]:
        return dict(vars(self))

    def held_gain(self) -> float:
        """The gain on the held-back neighbours (``tasks[1:]``): what admission is decided on. The origin
        task alone would leak: an item distilled from a task carries that task's answer."""
        if len(self.tasks) == 1:
            return float(self.score_with) - float(self.score_without)
        truths = [t["truth"] for t in self.tasks[1:]]
        return score(self.answers_with[1:], truths) - score(self.answers_without[1:], truths)

    @classmethod
    def from_payload(cls, p: Any) -> Replay:
        if not isinstance(p, dict):
            raise SignatureInvalid("a replay record is a map")
        try:
            r = cls(**{k: p[k] for k in ("solver", "model", "model_hash", "seed", "tasks", "answers_without",
                                         "answers_with", "score_without", "score_with")},
                    tokens_without=int(p.get("tokens_without", 0)), tokens_with=int(p.get("tokens_with", 0)),
                    decoding=p.get("decoding", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise SignatureInvalid(f"a replay record misses a field: {exc}") from None
        if r.decoding != "greedy" or not isinstance(r.seed, int) or not isinstance(r.solver, dict):
            raise SignatureInvalid("a replay is greedy, with an integer seed and a solver descriptor")
        if not isinstance(r.model_hash, str) or len(r.model_hash) != 64:
            raise SignatureInvalid("a replay names the sha256 of the model's weights")
        ok_tasks = isinstance(r.tasks, list) and 1 <= len(r.tasks) <= MAX_TASKS and all(
            isinstance(t, dict) and isinstance(t.get("task"), str) and isinstance(t.get("truth"), str) for t in r.tasks)
        if not ok_tasks:
            raise SignatureInvalid(f"a replay has 1..{MAX_TASKS} tasks, each {{task, truth}}")
        for answers in (r.answers_with, r.answers_without):
            if not isinstance(answers, list) or len(answers) != len(r.tasks) or not all(
                    a is None or isinstance(a, str) for a in answers):
                raise SignatureInvalid("a replay has one answer (or null) per task, with and without the item")
        return r


@dataclass
class Entry:
    """A verified memory entry as a reader holds it."""

    item: Item
    replay: Replay
    author: str  # the peer id that admitted and signed it
    ts: float
    record: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def id(self) -> str:
        return self.item.id

    @property
    def gain(self) -> float:
        return self.replay.held_gain()


def entry_record(identity: Identity, item: Item, replay: Replay) -> dict[str, Any]:
    """The entry signed by ``identity`` (the admitting peer)."""
    return sign_record(identity, {"kind": "memory", "peer_id": identity.peer_id, "id": item.id,
                                  "item": item.payload(), "replay": replay.payload(), "ts": time.time()})


def check_entry(record: Any, owner: str | None = None, *, name: str | None = None) -> Entry:
    """The entry in ``record`` if everything it claims checks out without a model; raises
    :class:`SignatureInvalid` saying what does not (a forged signature, another signer than the slot's
    owner, an id that is not the item's hash, scores that the answers do not give, no gain)."""
    payload = verify_record(record, expect_peer_id=owner)
    if payload.get("kind") != "memory":
        raise SignatureInvalid("not a memory entry")
    item = Item.from_payload(payload.get("item"))
    if payload.get("id") != item.id or (name is not None and name != item.id):
        raise SignatureInvalid("the entry's id is not the hash of its item (altered, or stored under another name)")
    replay = Replay.from_payload(payload.get("replay"))
    truths = [t["truth"] for t in replay.tasks]
    if (abs(score(replay.answers_with, truths) - float(replay.score_with)) > 1e-9
            or abs(score(replay.answers_without, truths) - float(replay.score_without)) > 1e-9):
        raise SignatureInvalid("the replay's scores are not what its answers score")
    if not replay.held_gain() > 0:
        raise SignatureInvalid("the replay shows no gain on the held-back tasks: the item was not admissible")
    return Entry(item, replay, str(payload["peer_id"]), float(payload.get("ts", 0.0)), record)
