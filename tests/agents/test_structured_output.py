"""Constrained decoding on the real bundled model through the OpenAI API and the official `openai` client:
every tool call parses and validates against its tool's schema; response_format json_schema likewise."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import jsonschema
import openai
import pytest
import pytest_asyncio

from gradient_nb.models import DEFAULT_MODEL
from gradient_nb.serve.api import serve_api
from gradient_nb.serve.shard import LocalEngine

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

TOOLS = [
    {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression exactly.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 24}},
                       "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value between units of one dimension.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number", "minimum": -1e6, "maximum": 1e6},
            "from_unit": {"type": "string", "enum": ["km", "mi", "kg", "lb", "c", "f", "m", "ft"]},
            "to_unit": {"type": "string", "enum": ["km", "mi", "kg", "lb", "c", "f", "m", "ft"]}},
            "required": ["value", "from_unit", "to_unit"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _prompts(n: int) -> list[str]:
    rng = random.Random(3)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        out.append(rng.choice([f"What is {a} times {b}?", f"Compute {a} + {b} * 3.", f"How much is {a} minus {b}?"])
                   if i % 2 == 0 else
                   rng.choice([f"Convert {a} km to miles.", f"How many pounds is {b} kg?", f"What is {b} C in F?"]))
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    engine = LocalEngine(DEFAULT_MODEL)
    engine.model_name = DEFAULT_MODEL
    server = await serve_api(engine, api_key="k")
    async with openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0) as c:
        yield c
    await server.stop()
    await engine.aclose()


async def test_fifty_tool_calls_all_parse_and_validate(client: openai.AsyncOpenAI) -> None:
    prompts = _prompts(50)
    limit = asyncio.Semaphore(25)  # concurrent requests ride the engine's batches

    async def ask(i: int, prompt: str):
        choice = "required" if i % 5 else {"type": "function", "function": {"name": "calculate"}}
        async with limit:
            return await client.chat.completions.create(
                model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}], tools=TOOLS, tool_choice=choice,
                max_tokens=64, temperature=0.0 if i % 2 else 0.7, seed=i)

    answers = await asyncio.gather(*(ask(i, p) for i, p in enumerate(prompts)))
    for i, resp in enumerate(answers):
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls", (prompts[i], choice)
        (call,) = choice.message.tool_calls
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        if i % 5 == 0:
            assert call.function.name == "calculate"


async def test_response_format_json_schema_and_refusals(client: openai.AsyncOpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "population_millions": {"type": "number", "minimum": 0,
                                                                       "maximum": 100}},
              "required": ["city", "population_millions"], "additionalProperties": False}
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Name the capital of France and its population."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        max_tokens=64, temperature=0.0)
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError, match="tool_choice names no listed tool"):
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}],
                                             tools=TOOLS, tool_choice={"type": "function",
                                                                       "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="streaming tool calls"):
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}],
                                             tools=TOOLS, stream=True)
