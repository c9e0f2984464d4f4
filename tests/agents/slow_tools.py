"""An MCP server for the planner tests: an exact calculator that takes a while (so work overlaps and an agent
can be killed mid-task), and one that fails its first calls (a flaky tool)."""

from __future__ import annotations

import asyncio
import os

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from gradient_nb.agents.tools import calculate as exact

DELAY = float(os.environ.get("SLOW_TOOLS_DELAY", "0.4"))
server = MCPServer("slow-tools")


@server.tool()
async def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly, slowly."""
    await asyncio.sleep(DELAY)
    return exact(expression)


def flaky(failures: int) -> MCPServer:
    """A calculator whose first ``failures`` calls fail with a Transient error."""
    srv = MCPServer("flaky-tools")
    left = [failures]

    @srv.tool(name="calculate")
    def calc(expression: str) -> str:
        """Evaluate an arithmetic expression exactly (fails at first)."""
        if left[0] > 0:
            left[0] -= 1
            raise ToolError("Transient: the backend is warming up")
        return exact(expression)

    return srv
