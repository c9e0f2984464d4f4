"""An MCP client peer for the NAT-lab MCP test, run inside a lab host:
``python tests/natlab/mcp_caller.py URL MESH ICE_JSON AGENT_PEER_ID``.

Joins the mesh, waits for the agent's signed capability record, then uses the official ``mcp`` SDK's
``Client`` over the mesh transport (``Toolbox`` + ``MeshServer``) to list the agent's tools and call
them, including calls that fail, and prints one JSON report: the tools listed, each result or typed
error kind, and the link type (direct or relayed) as this peer's mesh reports it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from gradient_nb.agents.ledger import Ledger
from gradient_nb.agents.mcp_mesh import MeshServer, Toolbox, ToolCallError
from gradient_nb.mesh.ice import IceConfig
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join

CALLS: list[tuple[str, dict[str, Any]]] = [
    ("calculate", {"expression": "(17 + 25) * 3"}),
    ("convert_units", {"value": 100, "from_unit": "c", "to_unit": "f"}),
    ("calculate", {"expression": "1 / 0"}),
    ("calculate", {"expr": "1"}),
    ("no_such_tool", {}),
]


async def main(url: str, mesh_name: str, ice: IceConfig, agent: str) -> dict[str, Any]:
    mesh = await join(url, mesh=mesh_name, name="mcp-caller", identity=Identity.generate(), ice=ice,
                      heartbeat=0.5, peer_timeout=10.0, probe_seconds=0.05)
    try:
        ledger = Ledger(mesh.state, mesh.identity)
        deadline = time.monotonic() + 60
        while agent not in ledger.agents():
            if time.monotonic() > deadline:
                raise TimeoutError("the agent's capability record never arrived")
            await asyncio.sleep(0.2)
        cap = ledger.agents()[agent]
        box = Toolbox(mesh)
        box.add("remote", MeshServer(agent, "tools"))
        t0 = time.monotonic()
        listed = await asyncio.wait_for(box.list_tools(), 60)
        calls = []
        for tool, args in CALLS:
            try:
                calls.append({"tool": tool, "result": await asyncio.wait_for(box.call("remote", tool, args), 60)})
            except ToolCallError as exc:
                calls.append({"tool": tool, "error": exc.kind, "message": exc.message[:200]})
        link = mesh.links().get(agent) or {}
        return {"ok": True, "self": mesh.id, "ledger_tools": sorted(t["name"] for t in cap.tools),
                "listed": sorted(t["name"] for t in listed),
                "schema": next(t["input_schema"] for t in listed if t["name"] == "calculate"),
                "calls": calls, "mcp_s": round(time.monotonic() - t0, 2),
                "link": {k: link.get(k) for k in ("kind", "relayed", "local_type", "type")}}
    finally:
        await asyncio.wait_for(mesh.leave(), 15)


if __name__ == "__main__":
    url, mesh_name, ice_json, agent_id = sys.argv[1:5]
    try:
        report = asyncio.run(main(url, mesh_name, IceConfig.from_dict(json.loads(ice_json)), agent_id))
    except Exception as exc:  # the test reads the reason from the report
        report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(report), flush=True)
