"""What an agent does with a task: ask its model (``LlmWorker``), or route it to a tool (``ToolWorker``).

A task is ``{"task": text, "mode": "single" | "tools", "temperature", "seed"}``; the reply is
``{"answer", "text", "confidence", "tokens", "tool_calls": [...]}``.

- ``LlmWorker`` talks to any OpenAI-compatible endpoint (the mesh's served model through our API, or
  another). ``single``: chain of thought ending in ``Answer: <value>``, read by ``extract_answer``.
  ``tools``: a ReAct loop: each turn the model must call one tool (constrained decoding guarantees a
  valid call even from a 135M model) among the agent's MCP tools and ``final_answer``; tool results
  (or typed tool errors) go back as tool messages; the loop ends with ``final_answer``, or at
  ``max_steps`` with the last tool result as the answer.
- ``ToolWorker`` is the agent without a model: it reads a conversion ("5 km to mi") or an arithmetic
  expression (digits and operators, or "add 5 to 84"-style phrases) out of the task and calls the
  matching tool. Deterministic, so the planner's behaviour can be measured apart from a model's.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from .mcp_mesh import Toolbox, ToolCallError
from .vote import confidence_of, extract_answer, normalize

COT_PROMPT = ("Solve the problem. Think step by step, then end with a line 'Answer: <number>'.")
REACT_PROMPT = ("Solve the problem with the tools. Call a tool to compute; when you know the result, call "
                "final_answer with it.")
FINAL = {"type": "function", "function": {
    "name": "final_answer", "description": "Give the final answer to the problem.",
    "parameters": {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 32}},
                   "required": ["answer"], "additionalProperties": False}}}


async def chat(base_url: str, body: dict[str, Any], *, api_key: str | None = None,
               timeout: float = 120.0) -> dict[str, Any]:
    """One chat completion at an OpenAI-compatible endpoint (``RuntimeError`` when it answers an error)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout) as http:
        r = await http.post(f"{base_url.rstrip('/')}/chat/completions", json=body, headers=headers)
    if r.status_code != 200:
        raise RuntimeError(f"the model endpoint answered {r.status_code}: {r.text[:300]}")
    return r.json()


class LlmWorker:
    def __init__(self, base_url: str, *, model: str, api_key: str | None = None, toolbox: Toolbox | None = None,
                 max_tokens: int = 160, max_steps: int = 3, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model, self.api_key, self.toolbox = model, api_key, toolbox
        self.max_tokens, self.max_steps, self.timeout = max_tokens, max_steps, timeout
        self._tools: list[dict[str, Any]] | None = None  # OpenAI function specs, with their MCP server

    async def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return await chat(self.base_url, {"model": self.model, **body}, api_key=self.api_key, timeout=self.timeout)

    async def run(self, task: dict[str, Any]) -> dict[str, Any]:
        if task.get("mode") == "tools" and self.toolbox is not None:
            return await self._react(task)
        return await self._cot(task)

    async def _cot(self, task: dict[str, Any]) -> dict[str, Any]:
        body = {"messages": [{"role": "system", "content": COT_PROMPT}, {"role": "user", "content": str(task["task"])}],
                "max_tokens": self.max_tokens, "temperature": float(task.get("temperature", 0.0))}
        if task.get("seed") is not None:
            body["seed"] = int(task["seed"])
        out = await self._chat(body)
        text = out["choices"][0]["message"]["content"] or ""
        lp = out["choices"][0].get("logprobs")
        logprobs = [c["logprob"] for c in (lp or {}).get("content") or []] if isinstance(lp, dict) else None
        return {"answer": extract_answer(text), "text": text, "confidence": confidence_of(logprobs),
                "tokens": out.get("usage", {}).get("completion_tokens", 0), "tool_calls": []}

    async def _tool_specs(self) -> list[dict[str, Any]]:
        if self._tools is None:
            assert self.toolbox is not None
            self._tools = [{"server": t["server"], "spec": {"type": "function", "function": {
                "name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}}
                for t in await self.toolbox.list_tools()]
        return self._tools

    async def _react(self, task: dict[str, Any]) -> dict[str, Any]:
        tools = await self._tool_specs()
        server_of = {t["spec"]["function"]["name"]: t["server"] for t in tools}
        messages: list[dict[str, Any]] = [{"role": "system", "content": REACT_PROMPT},
                                          {"role": "user", "content": str(task["task"])}]
        calls, tokens, last = [], 0, None
        for _ in range(self.max_steps):
            out = await self._chat({"messages": messages, "tools": [t["spec"] for t in tools] + [FINAL],
                                    "tool_choice": "required", "max_tokens": 64,
                                    "temperature": float(task.get("temperature", 0.0))})
            tokens += out.get("usage", {}).get("completion_tokens", 0)
            msg = out["choices"][0]["message"]
            if not msg.get("tool_calls"):
                break  # ran out of tokens mid-call: nothing to execute
            call = msg["tool_calls"][0]
            name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
            if name == "final_answer":
                return {"answer": normalize(str(args["answer"])), "text": str(args["answer"]), "confidence": 1.0,
                        "tokens": tokens, "tool_calls": calls}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            try:
                result = await self.toolbox.call(server_of[name], name, args)  # type: ignore[union-attr]
                last, content = result, json.dumps(result)
                calls.append({"tool": name, "arguments": args, "result": result})
            except ToolCallError as exc:
                content = f"error: {exc.kind}: {exc.message}"
                calls.append({"tool": name, "arguments": args, "error": exc.kind})
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        answer = None if last is None else normalize(str(last))
        return {"answer": answer, "text": "" if last is None else str(last), "confidence": 1.0, "tokens": tokens,
                "tool_calls": calls}


_CONVERT = re.compile(r"(-?\d+(?:\.\d+)?)\s*(°?[a-zA-Z/]+)\s+(?:to|in|into)\s+(°?[a-zA-Z/]+)")
_EXPR = re.compile(r"[-+*/×÷^().\d\s]*\d[-+*/×÷^().\d\s]*")
_PHRASES = [(re.compile(r"add (-?[\d.]+) to (-?[\d.]+)", re.I), "({1}) + ({0})"),
            (re.compile(r"subtract (-?[\d.]+) from (-?[\d.]+)", re.I), "({1}) - ({0})"),
            (re.compile(r"multiply (-?[\d.]+) by (-?[\d.]+)", re.I), "({0}) * ({1})"),
            (re.compile(r"divide (-?[\d.]+) by (-?[\d.]+)", re.I), "({0}) / ({1})")]


def route_task(text: str) -> tuple[str, dict[str, Any]] | None:
    """The tool call a task reads as: ``("convert_units", {...})``, ``("calculate", {...})`` or None."""
    m = _CONVERT.search(text)
    if m:
        return "convert_units", {"value": float(m.group(1)), "from_unit": m.group(2), "to_unit": m.group(3)}
    for pattern, template in _PHRASES:
        m = pattern.search(text)
        if m:
            return "calculate", {"expression": template.format(*m.groups())}
    exprs = [e.strip() for e in _EXPR.findall(text) if re.search(r"\d\s*[-+*/×÷^]\s*[(\d]", e)]
    if exprs:
        return "calculate", {"expression": max(exprs, key=len)}
    return None


class ToolWorker:
    """Routes a task to the agent's own tools without a model (see ``route_task``)."""

    def __init__(self, toolbox: Toolbox, server: str = "tools") -> None:
        self.toolbox, self.server = toolbox, server

    async def run(self, task: dict[str, Any]) -> dict[str, Any]:
        routed = route_task(str(task.get("task", "")))
        if routed is None:
            raise ValueError("no tool reads this task (no conversion and no arithmetic in it)")
        tool, args = routed
        result = await self.toolbox.call(self.server, tool, args)  # a ToolCallError reaches the requester typed
        return {"answer": normalize(str(result)), "text": str(result), "confidence": 1.0, "tokens": 0,
                "tool_calls": [{"tool": tool, "arguments": args, "result": result}]}
