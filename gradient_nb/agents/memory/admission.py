"""Write admission by reproducible replay (SEDM), distillation, abstraction, and re-verification.

**The rule.** A candidate item is admitted only if an A/B replay says it helps: the solver answers the
item's origin task and a few held-back neighbours of the same family twice, without and with the item
in its prompt, with greedy decoding and a fixed seed; the item is admitted iff it scores strictly
higher *on the held-back neighbours* (the origin task is replayed and recorded too, but an item distilled
from a task carries that task's answer, so a gain there proves nothing: the first bench run admitted
conversion examples on exactly that, and they then hurt the test tasks). The replay record (solver descriptor, model name and weights hash, seed, tasks with
their exact answers, both answer lists and scores) is signed with the item (``records.entry_record``).

**The solver** (:class:`ToolCallSolver`) is the agents' tool-using worker reduced to one step, so a
replay is cheap and exactly repeatable: one chat completion against an OpenAI-compatible endpoint
(the package's own API over the bundled model, or a mesh's) under ``tool_choice: required`` (constrained
decoding: the call always parses), temperature 0, a fixed seed; the call is executed by the same exact
tools the agents host (``agents.tools.calculate`` / ``convert_units``) and the answer is its result.
Memory goes into the system prompt. Its descriptor hashes the prompt template and tool specs, so a
verifier whose solver differs is told so instead of disagreeing silently.

**Verification** (:func:`verify_entry`) is what any peer runs on an entry it found: ``check_entry`` (the
signature, the content address, the scores re-derived from the answers, the gain), then the replay
itself on its own solver, which must have the same descriptor and model hash, and must give exactly the
recorded answers. A record whose answers were edited to fake a gain fails the re-run even when it was
re-signed by its author.

Why replay and not a learned critic: a replay is evidence anyone can recompute; a critic's score is
another claim to trust. Why greedy and one request at a time: sampling, and even batching with other
requests, can change a 135M model's argmax in a near tie; a verifier must get the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ...mesh.errors import SignatureInvalid
from ...mesh.identity import Identity
from ..tools import calculate, convert_units
from ..vote import normalize
from .records import Entry, Item, Replay, check_entry, entry_record, score

PROMPT = ("Solve the task with one tool call. calculate takes one arithmetic expression built from the "
          "numbers in the task; convert_units takes the value and the two units.")
MEMORY_HEADER = "Worked examples from memory:"
UNITS = ["km", "mi", "kg", "lb", "c", "f", "m", "ft"]
TOOLS = [
    {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression exactly.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 24}},
                       "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value between units of one dimension.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number", "minimum": -1e6, "maximum": 1e6},
            "from_unit": {"type": "string", "enum": UNITS}, "to_unit": {"type": "string", "enum": UNITS}},
            "required": ["value", "from_unit", "to_unit"], "additionalProperties": False}}},
]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def system_prompt(memory: Sequence[str]) -> str:
    if not memory:
        return PROMPT
    return PROMPT + "\n\n" + MEMORY_HEADER + "\n" + "\n".join(f"- {m}" for m in memory)


@dataclass
class Attempt:
    answer: str | None
    tokens: int  # prompt + completion tokens
    call: dict[str, Any] | None  # {"name", "arguments"}
    result: str | None
    error: str | None = None


class ToolCallSolver:
    """One constrained tool call per task, greedy, fixed seed (see the module docstring)."""

    name = "tool-call-v1"

    def __init__(self, base_url: str, *, model: str, model_hash: str, max_tokens: int = 40, seed: int = 0,
                 api_key: str | None = None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model, self.model_hash, self.api_key = model, model_hash, api_key
        self.max_tokens, self.seed, self.timeout = max_tokens, seed, timeout
        self.calls = 0  # completions actually requested (the cache answers repeats)
        self._cache: dict[tuple[str, str], Attempt] = {}
        self._http: httpx.AsyncClient | None = None

    def descriptor(self) -> dict[str, Any]:
        return {"name": self.name, "prompt_sha": _sha([PROMPT, MEMORY_HEADER]), "tools_sha": _sha(TOOLS),
                "max_tokens": self.max_tokens}

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def solve(self, task: str, memory: Sequence[str] = ()) -> Attempt:
        """The answer to ``task`` with ``memory`` in the prompt; repeats of one (prompt, task) are cached
        (greedy decoding gives the same answer again)."""
        system = system_prompt(memory)
        key = (system, task)
        if key not in self._cache:
            self._cache[key] = await self._solve(system, task)
        return self._cache[key]

    async def _solve(self, system: str, task: str) -> Attempt:
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = httpx.AsyncClient(timeout=self.timeout, headers=headers)
        body = {"model": self.model, "messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": task}],
                "tools": TOOLS, "tool_choice": "required", "max_tokens": self.max_tokens, "temperature": 0.0,
                "seed": self.seed}
        self.calls += 1
        r = await self._http.post(f"{self.base_url}/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"the model endpoint answered {r.status_code}: {r.text[:300]}")
        out = r.json()
        usage = out.get("usage") or {}
        tokens = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
        calls = out["choices"][0]["message"].get("tool_calls") or []
        if not calls:
            return Attempt(None, tokens, None, None, "no tool call (ran out of tokens)")
        fn = calls[0]["function"]
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            return Attempt(None, tokens, None, None, "arguments are not JSON")
        call = {"name": fn["name"], "arguments": args}
        try:
            if fn["name"] == "calculate":
                result = calculate(str(args["expression"]))
            elif fn["name"] == "convert_units":
                result = str(convert_units(float(args["value"]), str(args["from_unit"]), str(args["to_unit"])))
            else:
                return Attempt(None, tokens, call, None, f"unknown tool {fn['name']}")
        except Exception as exc:  # a tool's own refusal (ToolError, ZeroDivision, a bad unit) is a wrong answer
            return Attempt(None, tokens, call, None, f"{type(exc).__name__}: {exc}")
        return Attempt(normalize(result), tokens, call, result)


@dataclass
class Verdict:
    admitted: bool
    item: Item
    replay: Replay
    record: dict[str, Any] | None  # the signed entry when admitted

    @property
    def gain(self) -> float:
        return self.replay.held_gain()


async def replay(solver: ToolCallSolver, tasks: Sequence[dict[str, str]], item: Item | None,
                 context: Sequence[str] = ()) -> tuple[list[str | None], float, int]:
    """Answers, score and tokens of ``tasks`` with ``context`` (+ ``item``) in memory, one at a time."""
    memory = [*context, item.text] if item is not None else list(context)
    answers, tokens = [], 0
    for t in tasks:
        a = await solver.solve(t["task"], memory)
        answers.append(a.answer)
        tokens += a.tokens
    return answers, score(answers, [t["truth"] for t in tasks]), tokens


async def admit(solver: ToolCallSolver, identity: Identity, item: Item, tasks: Sequence[dict[str, str]],
                *, min_gain: float = 0.0) -> Verdict:
    """The A/B admission test of ``item`` on ``tasks`` (its origin first, then held-back neighbours).
    Admitted iff the gain on the neighbours (``Replay.held_gain``) is above ``min_gain`` (>= 0); the
    signed record comes with it."""
    tasks = [{"task": str(t["task"]), "truth": str(t["truth"])} for t in tasks]
    without, s0, n0 = await replay(solver, tasks, None)
    with_, s1, n1 = await replay(solver, tasks, item)
    rec = Replay(solver.descriptor(), solver.model, solver.model_hash, solver.seed, tasks, without, with_, s0, s1,
                 n0, n1)
    ok = rec.held_gain() > max(0.0, min_gain)
    return Verdict(ok, item, rec, entry_record(identity, item, rec) if ok else None)


@dataclass
class Verification:
    ok: bool
    reason: str
    entry: Entry | None = None


async def verify_entry(record: Any, solver: ToolCallSolver, *, owner: str | None = None) -> Verification:
    """Check ``record`` as any peer can: signature, content address and scores (``check_entry``), then
    the replay re-run on ``solver`` (same descriptor and model hash), answer for answer."""
    try:
        entry = check_entry(record, owner)
    except SignatureInvalid as exc:
        return Verification(False, f"record: {exc}")
    rep = entry.replay
    if rep.model_hash != solver.model_hash:
        return Verification(False, f"model: the replay ran {rep.model_hash[:12]}, this peer has "
                                   f"{solver.model_hash[:12]}; cannot re-run", entry)
    if rep.solver != solver.descriptor() or rep.seed != solver.seed:
        return Verification(False, "solver: the replay used another prompt, tool set, token budget or seed",
                            entry)
    without, _, _ = await replay(solver, rep.tasks, None)
    with_, _, _ = await replay(solver, rep.tasks, entry.item)
    for label, got, claimed in (("without", without, rep.answers_without), ("with", with_, rep.answers_with)):
        for i, (g, c) in enumerate(zip(got, claimed, strict=True)):
            if g != c:
                return Verification(False, f"re-run: task {i} {label} the item answered {g!r}, the record says "
                                           f"{c!r}", entry)
    return Verification(True, f"re-ran {len(rep.tasks)} tasks twice: {rep.score_without:.2f} -> "
                              f"{rep.score_with:.2f}, as recorded", entry)


# -- distillation and diffusion --------------------------------------------------------------------
def _call_text(call: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in call["arguments"].items())
    return f"{call['name']}({args})"


def distill(family: str, task: str, attempt: Attempt) -> Item | None:
    """A worked example from a finished trajectory (a task and the tool call that answered it), or None
    when the trajectory made no call."""
    if attempt.call is None:
        return None
    return Item("example", family, f"Task: {task} Call: {_call_text(attempt.call)}", origin=task)


def distill_plan(family: str, task: str, calls: Sequence[dict[str, Any]]) -> Item | None:
    """A tool recipe from a finished multi-step trajectory (the planner's tool calls, in order, each
    ``{"tool", "arguments", "result"}``): the steps folded into the one call that does it all, each
    earlier result replaced by the expression that produced it ("43*6" = 258, "(258) + (33)" becomes
    ``calculate(expression="(43*6)+33")``). None when there is nothing to fold (no call, or a conversion
    among several steps)."""
    if not calls:
        return None
    if len(calls) == 1:
        c = calls[0]
        return Item("recipe", family, f"Task: {task} Call: {_call_text({'name': c['tool'], 'arguments': c['arguments']})}",
                    origin=task)
    done: list[tuple[str, str]] = []  # (expression, its result)
    for c in calls:
        if c.get("tool") != "calculate" or c.get("result") is None:
            return None
        e = str(c["arguments"]["expression"]).replace(" ", "")
        for expr, result in done:
            e = re.sub(rf"(?<![\d.]){re.escape(result)}(?![\d.])", f"({expr})", e)
        while re.search(r"\(\(([^()]*)\)\)", e):
            e = re.sub(r"\(\(([^()]*)\)\)", r"(\1)", e)
        e = re.sub(r"\((\d+(?:\.\d+)?)\)", r"\1", e)
        done.append((e, str(c["result"])))
    return Item("recipe", family, f"Task: {task} Call: calculate(expression={json.dumps(done[-1][0])})", origin=task)


_NUM = re.compile(r"\d+(?:\.\d+)?")


def abstract(item: Item, target_family: str) -> Item:
    """Cross-domain diffusion: the item as a general insight for another family. Its numbers become
    letters, in the task and in the call alike, so what is left is the *shape* of the solution (which
    numbers of the task go where in which tool), offered to ``target_family`` for its own admission test."""
    letters: dict[str, str] = {}

    def letter(m: re.Match) -> str:
        return letters.setdefault(m.group(0), "ABCDEFGH"[min(len(letters), 7)])

    text = _NUM.sub(letter, item.text)
    return Item("insight", target_family, f"General rule (from {item.family}): {text}", origin=item.origin,
                parent=item.id)
