"""Tasks: where prompts come from and how a completion is scored (the reward plug-in API).

A task is any object with ``prompt(rng) -> Prompt`` and ``reward(prompt, completion) -> float``; a task
that scores a whole batch at once (a reward model, a sandbox) may define
``rewards(prompts, completions) -> list[float]`` instead, and ``score`` uses it when present.
``FunctionTask`` wraps two plain functions. ``register_task`` makes a task available by name to
``%%echo train`` and ``gradient-nb echo train`` (``task: NAME`` in the YAML), where ``module:attr`` also
names a task object or factory in an importable module.

Shipped tasks generate their prompts locally from a seeded RNG (no dataset download), and their
rewards are verifiable:

- ``format`` — answer inside ``<answer>…</answer>`` with a target length, partial credit: 0.25 for
  the opening tag, 0.25 for the closing tag, 0.5 scaled by how close the answer's length is to the
  target. Dense enough that a tiny model improves within a few dozen steps.
- ``addition`` — 1–2-digit addition, 1.0 for ``<answer>N</answer>`` with the right sum, 0.1 for a
  well-formed tag with a wrong number, 0 otherwise.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Prompt:
    text: str  # the user message (the chat template is applied by the rollout code)
    meta: dict[str, Any] = field(default_factory=dict)  # what the reward needs (the answer, a target)


class Task(Protocol):
    name: str

    def prompt(self, rng: random.Random) -> Prompt: ...

    def reward(self, prompt: Prompt, completion: str) -> float: ...


def score(task: Any, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
    """Rewards of a batch: the task's ``rewards`` when it has one, else ``reward`` per item."""
    batch = getattr(task, "rewards", None)
    out = list(batch(prompts, completions)) if batch is not None else \
        [task.reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    if len(out) != len(completions):
        raise ValueError(f"the task scored {len(out)} of {len(completions)} completions")
    return [float(r) for r in out]


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


class FormatTask:
    """``<answer>`` tags around an answer of a target length, with partial credit."""

    name = "format"

    def __init__(self, min_len: int = 2, max_len: int = 6) -> None:
        self.min_len, self.max_len = min_len, max_len

    def prompt(self, rng: random.Random) -> Prompt:
        n = rng.randint(self.min_len, self.max_len)
        return Prompt(f"Reply with {n} letters inside <answer></answer>.", {"length": n})

    def reward(self, prompt: Prompt, completion: str) -> float:
        target = int(prompt.meta["length"])
        opened = completion.lstrip().startswith("<answer>")
        closed = "</answer>" in completion
        m = _ANSWER.search(completion)
        body = m.group(1) if m else completion.replace("<answer>", "").split("</answer>")[0]
        closeness = max(0.0, 1.0 - abs(len(body.strip()) - target) / max(target, 1))
        return 0.25 * opened + 0.25 * closed + 0.5 * closeness


class AdditionTask:
    """1–2-digit addition; the sum goes in ``<answer>`` tags."""

    name = "addition"

    def prompt(self, rng: random.Random) -> Prompt:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return Prompt(f"What is {a}+{b}? Put the number in <answer></answer>.", {"answer": a + b})

    def reward(self, prompt: Prompt, completion: str) -> float:
        m = _ANSWER.search(completion)
        if m is None:
            return 0.0
        try:
            return 1.0 if int(m.group(1).strip()) == int(prompt.meta["answer"]) else 0.1
        except ValueError:
            return 0.0


@dataclass
class FunctionTask:
    """A task from two functions: ``prompt(rng) -> Prompt | str`` and ``reward(prompt, completion)``."""

    prompt_fn: Callable[[random.Random], Prompt | str]
    reward_fn: Callable[[Prompt, str], float]
    name: str = "custom"

    def prompt(self, rng: random.Random) -> Prompt:
        p = self.prompt_fn(rng)
        return Prompt(p) if isinstance(p, str) else p

    def reward(self, prompt: Prompt, completion: str) -> float:
        return float(self.reward_fn(prompt, completion))


_REGISTRY: dict[str, Callable[[], Any]] = {"format": FormatTask, "addition": AdditionTask}


def register_task(name: str, factory: Callable[[], Any]) -> None:
    _REGISTRY[name] = factory


def get_task(spec: Any) -> Any:
    """A task from a registered name, ``module:attr`` (an object or a factory), ``{"name": NAME, **kwargs}``
    (a registered task with settings, e.g. ``{name: format, min_len: 4, max_len: 4}``), or a task object."""
    if isinstance(spec, dict):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if name not in _REGISTRY:
            raise ValueError(f"unknown task {name!r}: one of {sorted(_REGISTRY)}")
        return _REGISTRY[name](**kwargs)
    if not isinstance(spec, str):
        return spec
    if spec in _REGISTRY:
        return _REGISTRY[spec]()
    if ":" in spec:
        module, _, attr = spec.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        return obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "reward")) else obj
    raise ValueError(f"unknown task {spec!r}: one of {sorted(_REGISTRY)} or module:attr")
