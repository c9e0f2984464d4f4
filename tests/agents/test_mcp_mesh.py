"""MCP across the mesh: tools hosted by a real `gradient-nb agent` process, called from this process
through mesh RPC with the official SDK on both ends; a user's stdio server hosted the same way."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp import StdioServerParameters

from gradient_nb.agents.ledger import Ledger
from gradient_nb.agents.mcp_mesh import MeshServer, Toolbox, ToolCallError
from gradient_nb.agents.tools import builtin_tools, calculate
from gradient_nb.mesh.demo import read_event
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from tests.conftest import HEARTBEAT, PEER_TIMEOUT


def test_calculator_is_exact_and_refuses_code() -> None:
    assert calculate("(17 + 25) * 3 - 4 / 8") == "125.5"
    assert calculate("0.1 + 0.2") == "0.3"
    assert calculate("2 ** 10 // 3 % 7") == "5"
    for bad in ("__import__('os')", "a + 1", "2 ** 1000", "[1, 2]", "(lambda: 1)()", "1 if 1 else 2"):
        with pytest.raises(Exception, match="InvalidExpression"):
            calculate(bad)


async def test_local_toolbox_typed_errors_and_documents(tmp_path: Path) -> None:
    (tmp_path / "tides.md").write_text("The tide tables of Brest list high water twice a day.")
    (tmp_path / "bread.txt").write_text("Sourdough bread needs a starter, flour, water and salt.")
    box = Toolbox()
    box.add("local", builtin_tools(tmp_path))
    hits = await box.call("local", "search_documents", {"query": "sourdough starter"})
    assert hits[0]["document"] == "bread.txt"
    assert await box.call("local", "convert_units", {"value": 5, "from_unit": "km", "to_unit": "mi"}) == \
        pytest.approx(3.106855961)
    with pytest.raises(ToolCallError) as e:
        await box.call("local", "convert_units", {"value": 5, "from_unit": "km", "to_unit": "kg"})
    assert e.value.kind == "IncompatibleUnits"
    # A user's existing stdio MCP server (this package's tools run as one).
    box.add("stdio", StdioServerParameters(command=sys.executable, args=["-m", "gradient_nb.agents.tools"]))
    assert await box.call("stdio", "calculate", {"expression": "6 * 7"}) == "42"


def spawn_agent(procs, url: str, name: str, *extra: str) -> subprocess.Popen:
    agent = subprocess.Popen(
        [sys.executable, "-m", "gradient_nb.cli", "agent", "--rendezvous", url, "--name", name, "--ephemeral",
         "--heartbeat", str(HEARTBEAT), "--peer-timeout", str(PEER_TIMEOUT), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    procs.all.append(agent)
    return agent


async def test_tools_across_the_mesh_from_a_real_agent_process(procs) -> None:
    _, url = procs.rendezvous()
    agent = spawn_agent(procs, url, "toolsmith", "--capacity", "2",
                        "--mcp", f"ext={sys.executable} -m gradient_nb.agents.tools")
    ready = await read_event(agent, timeout=90)
    assert ready["event"] == "agent" and "tools.calculate" in ready["tools"] and "ext.calculate" in ready["tools"]
    mesh = await join(url, name="requester", identity=Identity.generate(), heartbeat=HEARTBEAT,
                      peer_timeout=PEER_TIMEOUT, probe_seconds=0.05)
    try:
        ledger = Ledger(mesh.state, mesh.identity)
        deadline = time.monotonic() + 30
        while ready["peer_id"] not in ledger.agents():
            assert time.monotonic() < deadline, "the agent's capability record never arrived"
            await asyncio.sleep(0.2)
        cap = ledger.agents()[ready["peer_id"]]
        assert cap.capacity == 2
        schema = next(t for t in cap.tools if t["name"] == "calculate")["input_schema"]
        assert schema["properties"]["expression"]["type"] == "string"
        box = Toolbox(mesh)
        box.add("remote", MeshServer(ready["peer_id"], "tools"))
        box.add("remote-ext", MeshServer(ready["peer_id"], "ext"))
        names = {t["name"] for t in await box.list_tools()}
        assert {"calculate", "convert_units"} <= names
        assert await box.call("remote", "calculate", {"expression": "(2 + 3) * 7"}) == "35"
        assert await box.call("remote-ext", "convert_units", {"value": 100, "from_unit": "c",
                                                               "to_unit": "f"}) == pytest.approx(212)
        for args, kind in ((("calculate", {"expression": "1 / 0"}), "ZeroDivision"),
                           (("calculate", {"expr": "1"}), "InvalidArguments"),
                           (("no_such_tool", {}), "UnknownTool")):
            with pytest.raises(ToolCallError) as e:
                await box.call("remote", *args)
            assert e.value.kind == kind, e.value
        box.add("missing", MeshServer(ready["peer_id"], "nope"))
        with pytest.raises(ToolCallError) as e:
            await box.call("missing", "calculate", {"expression": "1"})
        assert e.value.kind == "Unavailable"
        # The agent process ends: it drops out of the ledger, and its tools become Unavailable.
        agent.terminate()
        deadline = time.monotonic() + PEER_TIMEOUT + 15
        while ready["peer_id"] in ledger.agents():
            assert time.monotonic() < deadline, "a stopped agent stayed in the ledger"
            await asyncio.sleep(0.3)
        with pytest.raises(ToolCallError) as e:
            await box.call("remote", "calculate", {"expression": "1"})
        assert e.value.kind == "Unavailable"
    finally:
        await mesh.leave()
