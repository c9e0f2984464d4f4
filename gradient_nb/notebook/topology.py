"""A live, force-directed picture of the mesh: peers as nodes, links colored direct vs relayed.

The front-end is ``static/topology.js``, bundled from ``widgets/src/topology.js`` (d3-force).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from .comm import _json_safe

__all__ = ["TopologyWidget"]

_STATIC = Path(__file__).parent / "static"
_log = logging.getLogger(__name__)


class TopologyWidget(anywidget.AnyWidget):
    """Shows a mesh snapshot (the dict ``Mesh.snapshot()`` returns) as a graph.

    Set :attr:`snapshot` to redraw; peers that stay keep their place, new ones drift in.
    :meth:`follow` keeps it updated from a snapshot source without blocking the kernel.
    """

    _esm = _STATIC / "topology.js"

    snapshot = traitlets.Dict(default_value={"joined": False}).tag(sync=True)
    height = traitlets.Int(360).tag(sync=True)

    def __init__(self, snapshot: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if snapshot is not None:
            # Passed to the constructor so the front-end's first state already has it.
            kwargs["snapshot"] = _json_safe(snapshot)
        super().__init__(**kwargs)
        self._follow_task: asyncio.Task[None] | None = None

    def update(self, snapshot: Mapping[str, Any]) -> None:
        """Show this snapshot; a snapshot equal to the current one sends nothing."""
        clean = _json_safe(snapshot)
        if clean != self.snapshot:
            self.snapshot = clean

    def follow(
        self,
        source: Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]],
        interval: float = 1.0,
    ) -> asyncio.Task[None]:
        """Poll ``source()`` every ``interval`` seconds on the running loop and show each change.

        Call it from a cell (the kernel's loop is running there). The widget owns the task:
        calling ``follow`` again, :meth:`stop` or ``close()`` cancels it.
        """
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.stop()
        self._follow_task = asyncio.get_running_loop().create_task(self._follow(source, interval))
        return self._follow_task

    async def _follow(self, source: Callable[[], Any], interval: float) -> None:
        while True:
            try:
                result = source()
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, 5.0)
                self.update(result)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A transient failure (the mesh is reconnecting) should not end the picture.
                _log.warning("topology snapshot failed", exc_info=True)
            await asyncio.sleep(interval)

    def stop(self) -> None:
        """Stop following (no-op if not following)."""
        task, self._follow_task = self._follow_task, None
        if task is not None and not task.done():
            task.cancel()

    def close(self) -> None:
        self.stop()
        super().close()
