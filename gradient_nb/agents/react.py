"""The planner's LLM step (Gradientsys' scheduler): the served model chooses the next action, ReAct-style.

Each turn the planner shows the model the task and what happened so far (its earlier actions as tool
calls, their results or typed errors as tool messages) and asks for **one action** through the OpenAI
API's ``tools`` with ``tool_choice: "required"``, so constrained decoding (``serve/grammar.py``) makes
even the bundled 135M model emit a call that parses and validates against its schema:

- a **tool** of the mesh: one function per MCP tool in the ledger's signed capability records (name,
  description, JSON schema as the hosting agent published them); the planner calls it on an agent
  that hosts it (``Planner._call_tool``);
- ``dispatch``: one to ``MAX_PARALLEL`` independent sub-tasks for agents (each goes through a beacon,
  selection and ``agent.task``, in parallel, within every agent's capacity);
- ``final_answer``: the answer; the run ends. It is not offered on the first turn: a plan gathers a
  result (a tool's or an agent's) before it answers, or a small model "answers" from its own guess,
  which is what planning is meant to replace.

Why a function per action and not free text with a parser (ReAct's "Action: ..." lines): a small model
writes almost-right text; a grammar over the listed functions leaves it nothing to get wrong but the
choice itself. The model's decisions are only as good as the model: this module guarantees that each
one is well formed and executable, not that it is wise; the planner's budget and deadline bound the
cost of a bad one.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from .worker import chat

MAX_PARALLEL = 4
SYSTEM = ("You are a planner. Solve the task in steps. Each turn call exactly one function: a tool to compute "
          "something exactly, dispatch to hand independent sub-tasks to agents, or final_answer once the "
          "results give the answer.")
DISPATCH = {"type": "function", "function": {
    "name": "dispatch", "description": "Hand independent sub-tasks to agents of the mesh; returns their answers.",
    "parameters": {"type": "object", "properties": {"tasks": {
        "type": "array", "minItems": 1, "maxItems": MAX_PARALLEL,
        "items": {"type": "string", "minLength": 8, "maxLength": 60}}},
        "required": ["tasks"], "additionalProperties": False}}}
FINAL = {"type": "function", "function": {
    "name": "final_answer", "description": "Give the final answer to the task.",
    "parameters": {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 32}},
                   "required": ["answer"], "additionalProperties": False}}}
RESERVED = {"dispatch", "final_answer"}


@dataclass
class Action:
    """What the model chose: ``kind`` is ``tool``, ``dispatch`` or ``final``."""

    kind: str
    name: str
    arguments: dict[str, Any]
    call_id: str = field(default_factory=lambda: "call_" + secrets.token_hex(8))
    tokens: int = 0


MAX_STRING = 32  # the longest string argument the planner lets the model write


def _bounded(schema: Any) -> Any:
    """``schema`` with a ``maxLength`` on every string that has none: a small model that starts repeating
    itself inside a string still closes its call within the planner's token budget."""
    if isinstance(schema, list):
        return [_bounded(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _bounded(v) for k, v in schema.items()}
    if out.get("type") == "string" and "maxLength" not in out and "enum" not in out and "const" not in out:
        out["maxLength"] = MAX_STRING
    return out


def mesh_tools(capabilities: Any) -> list[dict[str, Any]]:
    """One OpenAI function per distinct tool name in the capability records (first publisher's schema,
    its strings bounded)."""
    seen: dict[str, dict[str, Any]] = {}
    for cap in capabilities:
        for t in cap.tools:
            name = t.get("name")
            if isinstance(name, str) and name not in seen and name not in RESERVED:
                seen[name] = {"type": "function", "function": {
                    "name": name, "description": str(t.get("description", ""))[:300],
                    "parameters": _bounded(t.get("input_schema") or {"type": "object", "properties": {}})}}
    return list(seen.values())


class LlmPlanner:
    """The decision step: ``await next_action(task, history, tools)`` → an ``Action``.

    ``base_url`` is any OpenAI-compatible endpoint (the mesh's served model through ``serve/api.py``)."""

    def __init__(self, base_url: str, *, model: str, api_key: str | None = None, max_tokens: int = 192,
                 timeout: float = 120.0) -> None:
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.max_tokens, self.timeout = max_tokens, timeout

    def messages(self, task: str, history: list[tuple[Action, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}]
        for action, observation in history:
            out.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": action.call_id, "type": "function",
                "function": {"name": action.name, "arguments": json.dumps(action.arguments)}}]})
            out.append({"role": "tool", "tool_call_id": action.call_id, "content": observation})
        return out

    async def next_action(self, task: str, history: list[tuple[Action, str]], tools: list[dict[str, Any]],
                          attempt: int = 0) -> Action:
        """Greedy; a retry (``attempt`` > 0) samples (temperature 0.7, seed ``attempt``): the greedy choice
        would come out the same."""
        offered = [*tools, DISPATCH, FINAL] if history else [*tools, DISPATCH]
        body = {"model": self.model, "messages": self.messages(task, history), "tools": offered,
                "tool_choice": "required", "max_tokens": self.max_tokens, "temperature": 0.7 if attempt else 0.0}
        if attempt:
            body["seed"] = attempt
        out = await chat(self.base_url, body, api_key=self.api_key, timeout=self.timeout)
        msg = out["choices"][0]["message"]
        tokens = int(out.get("usage", {}).get("completion_tokens", 0))
        calls = msg.get("tool_calls") or []
        if not calls:  # the grammar guarantees a call unless max_tokens cut it short
            raise ValueError(f"the model's action was cut short at {self.max_tokens} tokens: "
                             f"{str(msg.get('content'))[:120]!r}")
        fn = calls[0]["function"]
        name, args = fn["name"], json.loads(fn["arguments"])
        kind = "final" if name == "final_answer" else "dispatch" if name == "dispatch" else "tool"
        return Action(kind, name, args, tokens=tokens)
