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

from gradient_nb.agents.agent import Agent
from gradient_nb.agents.ledger import Skill
from gradient_nb.agents.react import DISPATCH, FINAL, LlmPlanner, mesh_tools
from gradient_nb.agents.requester import Requester
from gradient_nb.agents.tools import builtin_tools
from gradient_nb.agents.worker import ToolWorker
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.rendezvous import Rendezvous
from gradient_nb.models import DEFAULT_MODEL
from gradient_nb.serve.api import serve_api
from gradient_nb.serve.grammar import GrammarConstraint, StructuredOutput
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
async def served() -> AsyncIterator[tuple[LocalEngine, object]]:
    engine = LocalEngine(DEFAULT_MODEL)
    engine.model_name = DEFAULT_MODEL
    server = await serve_api(engine, api_key="k")
    yield engine, server
    await server.stop()
    await engine.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(served) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=served[1].url, api_key="k", max_retries=0) as c:
        yield c


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


async def test_tool_choice_auto_lets_the_model_answer_in_text_or_call(served, client: openai.AsyncOpenAI) -> None:
    engine, _ = served
    tok = engine.tokenizer
    auto = StructuredOutput.from_request({"tools": TOOLS})  # no tool_choice: OpenAI's default, "auto"
    assert auto.optional and StructuredOutput.from_request({"tools": TOOLS, "tool_choice": "auto"}).optional
    assert not StructuredOutput.from_request({"tools": TOOLS, "tool_choice": "required"}).optional
    assert StructuredOutput.from_request({"tools": TOOLS, "tool_choice": "none"}) is None
    eos = set(engine.eos_ids)

    def feed(text: str) -> GrammarConstraint:
        c = auto.constraint(tok, len(tok), eos)
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            c.accept(t)
        return c

    # The grammar takes a whole call or text that does not begin with "{", and may end after either.
    for text in ('{"name":"calculate","arguments":{"expression":"1+1"}}', "Hello there, no tool needed."):
        assert any(feed(text).allowed()[i] for i in eos), text
    with pytest.raises(ValueError, match="does not continue the grammar"):
        feed('{"name":"shell","arguments":{}}')
    msg, finish = auto.message('{"name":"calculate","arguments":{"expression":"1+1"}}')
    assert finish == "tool_calls" and msg["tool_calls"][0]["function"]["name"] == "calculate"
    assert auto.message("Hi!") == ({"role": "assistant", "content": "Hi!"}, None)
    # The real model, through the official client: with "auto" it answers a greeting in text (greedy);
    # whatever it chooses, a reply is a valid call or text; "none" never calls.
    async def ask(choice: str, prompt: str):
        return await client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}],
                                                    tools=TOOLS, tool_choice=choice, max_tokens=16, temperature=0.0)

    asked = [("auto", "Hello! How are you today?"), ("auto", "What is 37 times 24?"), ("none", "What is 37 times 24?")]
    for (choice, prompt), r in zip(asked, await asyncio.gather(*(ask(*a) for a in asked)), strict=True):
        m = r.choices[0].message
        if m.tool_calls:
            assert choice == "auto" and r.choices[0].finish_reason == "tool_calls"
            jsonschema.validate(json.loads(m.tool_calls[0].function.arguments), SCHEMAS[m.tool_calls[0].function.name])
        else:
            assert m.content and not m.content.startswith("{"), (choice, prompt, m)
        if prompt.startswith("Hello"):
            assert not m.tool_calls and r.choices[0].finish_reason in ("stop", "length")


async def test_the_llm_planner_chooses_valid_actions_and_runs_them(served) -> None:
    """The served model plans (ReAct under constrained decoding): every action it chose parses, validates
    against its function's schema and was carried out on the mesh within capacity; a failing planning
    endpoint is retried with backoff and then ends the run with the reason."""
    _, server = served
    async with Rendezvous() as rv:
        async def peer(name: str):
            return await join(rv.url, name=name, identity=Identity.generate(), heartbeat=0.5, peer_timeout=5.0,
                              probe_seconds=0.05)

        agents = []
        for i in range(2):
            a = Agent(await peer(f"calc{i}"), name=f"calc{i}", servers={"tools": builtin_tools()}, capacity=1,
                      heartbeat=0.5, skills=[Skill("arithmetic", "compute sums and products of numbers exactly")])
            a.worker = ToolWorker(a.local).run
            await a.start()
            agents.append(a)
        llm = LlmPlanner(server.url, model=DEFAULT_MODEL, api_key="k")
        req = Requester(await peer("requester"), llm=llm, planner_options={"max_steps": 2, "backoff": 0.05})
        try:
            for _ in range(300):
                if len(set(req.ledger.agents()) - {req.mesh.id}) >= 2:
                    break
                await asyncio.sleep(0.1)
            out = await req.run("Compute 17*23, then add 9 to that.", mode="plan")
            log = req.runs.runs[out["run_id"]]
            events = [(e.kind, e.data) for e in log.events]
            print("llm plan:", out.get("answer"), out.get("error"), [(d["action"], d["arguments"])
                                                                    for k, d in events if k == "plan"])
            assert out["planning"] == "llm" and log.kinds()[-1] == "final" and log.kinds()[0] == "plan", events
            specs = {t["function"]["name"]: t["function"]["parameters"]
                     for t in (*mesh_tools(req.ledger.agents().values()), DISPATCH, FINAL)}
            plans = [d for k, d in events if k == "plan"]
            assert 1 <= len(plans) <= 2 and out["turns"] == len(plans), events
            for d in plans:
                jsonschema.validate(d["arguments"], specs[d["action"]])
            # Each action but a final one was carried out: a tool call on a hosting agent, or dispatches.
            acted = [k for k, _ in events if k in ("plan", "tool_call", "dispatch")]
            for i, k in enumerate(acted):
                if k == "plan" and plans[acted[:i + 1].count("plan") - 1]["action"] != "final_answer":
                    assert i + 1 < len(acted) and acted[i + 1] != "plan", events
            if plans[-1]["action"] == "final_answer":
                assert "error" not in out and out["answer"] is not None
            else:
                assert "budget" in out["error"], out
            assert all(req.planner.peak[a] <= 1 for a in req.planner.peak), req.planner.peak
            # A planning endpoint that fails (an unknown model: a real 404) is retried, then the run ends.
            bad = Requester(req.mesh, llm=LlmPlanner(server.url, model="no-such-model", api_key="k"),
                            planner_options={"max_retries": 2, "backoff": 0.05})
            out = await bad.run("Compute 2*3", mode="plan")
            log = bad.runs.runs[out["run_id"]]
            retries = [e.data for e in log.events if e.kind == "retry"]
            assert [r["attempt"] for r in retries] == [1, 2] and retries[1]["backoff_s"] == 2 * retries[0]["backoff_s"]
            assert out["answer"] is None and "planning model failed 3 times" in out["error"] and "404" in out["error"]
        finally:
            for a in agents:
                await a.stop()
                await a.mesh.leave()
            await req.mesh.leave()
