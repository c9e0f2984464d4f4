"""Constrained decoding: tool calls and JSON output a small model cannot get wrong.

A 135M model asked for JSON writes almost-JSON. Here the output's grammar masks the next-token
distribution at the step where the token is drawn (``MeshEngine.generate_steps(..., constraint=)``:
the mask travels as packed bits to the stage that samples), so every token keeps the text a prefix of
some valid document, and the end of sequence is only allowed once the document is complete. The
grammar engine is xgrammar (a pushdown automaton over the tokenizer's byte-level vocabulary, compiled
once per schema and cached; a step's mask costs microseconds to a millisecond).

- ``GrammarConstraint`` is the engine's ``constraint`` interface: ``allowed()`` (bool mask over the
  vocabulary) and ``accept(token)``.
- ``StructuredOutput.from_request`` reads OpenAI's ``tools``/``tool_choice`` and ``response_format``
  (``json_schema`` or ``json_object``). A tool call is the JSON object ``{"name": ..., "arguments":
  {...}}`` whose schema is the ``anyOf`` of one branch per allowed tool (name fixed by ``const``,
  arguments by the tool's ``parameters``), so the arguments always validate against the chosen tool.
  ``tool_choice`` ``"required"`` or a named function constrains to a call; ``"none"`` ignores the tools;
  ``"auto"`` (OpenAI's default when tools are listed) lets the model answer in text *or* call a tool:
  the grammar is the union of the call's JSON and free text that does not begin with ``{``, so the
  model's first token decides, and a reply that begins with ``{`` is always a valid call.

Only the schema keywords xgrammar supports are enforced (types, properties, required, enum, const,
anyOf, items, lengths, numeric ranges); an unsupported schema is refused up front, not half-enforced.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GrammarConstraint", "StructuredOutput", "grammar_compiler"]

_compilers: dict[tuple[int, int, tuple[int, ...]], Any] = {}
_lock = threading.Lock()
_SHIFTS = torch.arange(32, dtype=torch.int32)
_TEXT = "root ::= [^{] [^]*"  # free text whose first character is not "{" (tool_choice "auto")


def grammar_compiler(tokenizer: Any, vocab_size: int, stop_ids: set[int] | frozenset[int] = frozenset()) -> Any:
    """One xgrammar compiler per (tokenizer, vocabulary, stop tokens), with its compiled-grammar cache."""
    import xgrammar as xgr

    key = (id(tokenizer), int(vocab_size), tuple(sorted(stop_ids)))
    with _lock:
        comp = _compilers.get(key)
        if comp is None:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=int(vocab_size),
                                                      stop_token_ids=sorted(stop_ids) or None)
            comp = _compilers[key] = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        return comp


class GrammarConstraint:
    """The engine's per-step token mask for one generation under a compiled grammar."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def allowed(self) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bits = (self.bitmask[0].view(-1, 1) >> _SHIFTS) & 1  # bit i of word w is token 32·w + i
        return bits.reshape(-1)[: self.vocab_size].to(torch.bool)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(int(token)):
            raise ValueError(f"token {token} does not continue the grammar")

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole document (the grammar may end here)."""
        return bool(self.matcher.is_terminated())


def _tool_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    branches = []
    for t in tools:
        params = t.get("parameters") or {"type": "object", "properties": {}}
        branches.append({"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": params},
                         "required": ["name", "arguments"], "additionalProperties": False})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


class RequestError(ValueError):
    """The request's tools / tool_choice / response_format are malformed (``param`` names which)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class StructuredOutput:
    """What a request asked the output to be: a tool call, or JSON under a schema."""

    kind: str  # "tool_call" | "json"
    schema: dict[str, Any] | None  # None: any JSON value (json_object)
    tools: list[dict[str, Any]]
    optional: bool = False  # tool_choice "auto": the model may answer in text instead of calling

    @classmethod
    def from_request(cls, body: dict[str, Any]) -> StructuredOutput | None:
        tools, choice, fmt = body.get("tools"), body.get("tool_choice"), body.get("response_format")
        if body.get("functions"):
            raise RequestError("'functions' is deprecated; send 'tools'", "functions")
        if tools:
            if not isinstance(tools, list):
                raise RequestError("'tools' is a list of {type: function, function: {...}}", "tools")
            fns = []
            for i, t in enumerate(tools):
                fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise RequestError(f"tools[{i}] needs type 'function' and a function name", "tools")
                if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                    raise RequestError(f"tools[{i}].function.parameters is a JSON schema object", "tools")
                fns.append(fn)
            if choice == "none":
                tools = None
            else:
                if isinstance(choice, dict):
                    name = (choice.get("function") or {}).get("name")
                    fns = [f for f in fns if f["name"] == name]
                    if not fns:
                        raise RequestError(f"tool_choice names no listed tool: {name!r}", "tool_choice")
                elif choice not in (None, "auto", "required"):
                    raise RequestError("tool_choice is none, auto, required or {type: function, ...}", "tool_choice")
                if fmt not in (None, {"type": "text"}):
                    raise RequestError("send tools or response_format, not both", "response_format")
                return cls("tool_call", _tool_schema(fns), fns, optional=choice in (None, "auto"))
        if fmt is None or fmt == {"type": "text"}:
            return None
        if not isinstance(fmt, dict):
            raise RequestError("response_format is an object", "response_format")
        if fmt.get("type") == "json_object":
            return cls("json", None, [])
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise RequestError("response_format.json_schema needs a 'schema' object", "response_format")
            return cls("json", spec["schema"], [])
        raise RequestError(f"response_format type {fmt.get('type')!r} is not supported", "response_format")

    def system_prompt(self) -> str:
        """What the model is told, so its (masked) distribution favours sensible values."""
        if self.kind == "tool_call":
            lines = ["You call a tool. Reply with only a JSON object {\"name\": <tool name>, \"arguments\": "
                     "<object>}. Tools:"]
            if self.optional:
                lines[0] = ("If a tool helps, call it: reply with only a JSON object {\"name\": <tool name>, "
                            "\"arguments\": <object>}. Otherwise answer in plain text. Tools:")
            for t in self.tools:
                lines.append(f"- {t['name']}: {t.get('description', '')} arguments schema: "
                             f"{json.dumps(t.get('parameters') or {}, separators=(',', ':'))}")
            return "\n".join(lines)
        if self.schema is None:
            return "Reply with only a JSON object."
        return "Reply with only JSON matching this schema: " + json.dumps(self.schema, separators=(",", ":"))

    def constraint(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> GrammarConstraint:
        comp = grammar_compiler(tokenizer, vocab_size, stop_ids)
        try:
            if self.schema is None:
                compiled = comp.compile_builtin_json_grammar()
            elif self.optional:  # a call, or text that does not begin with "{"
                import xgrammar as xgr

                call = xgr.Grammar.from_json_schema(json.dumps(self.schema), any_whitespace=False,
                                                    separators=(",", ":"), strict_mode=True)
                compiled = comp.compile_grammar(xgr.Grammar.union(call, xgr.Grammar.from_ebnf(_TEXT)))
            else:
                # Compact separators: every structural token costs a decode step.
                compiled = comp.compile_json_schema(json.dumps(self.schema), any_whitespace=False,
                                                    separators=(",", ":"), strict_mode=True)
        except Exception as exc:  # xgrammar's own errors for a schema it cannot enforce
            raise RequestError(f"the schema cannot be enforced: {exc}",
                               "tools" if self.kind == "tool_call" else "response_format") from None
        return GrammarConstraint(compiled, vocab_size)

    def message(self, text: str) -> tuple[dict[str, Any], str | None]:
        """The assistant message for the generated ``text`` and, for a tool call, finish reason 'tool_calls'
        (None when the text is not a complete call: generation ran out of tokens)."""
        if self.kind != "tool_call" or (self.optional and not text.startswith("{")):
            return {"role": "assistant", "content": text}, None
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            return {"role": "assistant", "content": text}, None
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]}, "tool_calls"
