"""Live monitoring widgets, updated by tasks on the kernel's loop (never by blocking a cell).

- :class:`MeshMonitor`: the topology (a force-directed anywidget, ``topology.py``) and a peer table.
- :class:`ServingMonitor`: plotly ``FigureWidget``s of each peer's layers, and its tokens/s, queue and
  latency over time, from the heartbeat history (``Mesh.metrics()``).
"""

from __future__ import annotations

import asyncio
import html
from typing import Any

import ipywidgets as widgets
from IPython.display import display

REFRESH_S = 1.0


def peer_table_html(snapshot: dict[str, Any]) -> str:
    if not snapshot.get("joined"):
        return "<i>This kernel has not joined a mesh: run <code>%mesh join</code></i>"
    rows = []
    for p in snapshot["peers"]:
        dev = ", ".join(d.get("name", "?") for d in p.get("devices", []))
        layers = p.get("layers")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            p["name"] + (" (this kernel)" if p.get("self") else ""), p["id"][:10], dev, f"{p['tflops']:.3f}",
            f"{p['free_memory_bytes'] / 2**30:.1f} GiB",
            ", ".join(s for s in p["services"] if not s.startswith(("dht.", "mesh.", "diag."))) or "-",
            f"{layers[0]}–{layers[1]}" if layers else "-")) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("name", "id", "devices", "TFLOP/s", "free", "services", "layers"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


class MeshMonitor:
    def __init__(self, session: Any) -> None:
        from .topology import TopologyWidget

        self.session = session
        self.topology = TopologyWidget()
        self.table = widgets.HTML()
        self.box = widgets.VBox([self.topology, self.table])
        self.refresh()

    def refresh(self) -> None:
        snap = self.session.snapshot()
        self.topology.snapshot = snap
        self.table.value = peer_table_html(snap)

    async def _loop(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(REFRESH_S)

    def show(self) -> MeshMonitor:
        display(self.box)
        self.session.spawn(self._loop(), "mesh-monitor")
        return self

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text("<MeshMonitor>")


class ServingMonitor:
    """Layers per peer, and tokens/s, queue and latency per peer over time."""

    def __init__(self, session: Any) -> None:
        import plotly.graph_objects as go

        self.session = session
        self.layers = go.FigureWidget(layout={"title": "layers per peer", "height": 260, "barmode": "overlay",
                                              "xaxis": {"title": "layer"}})
        self.speed = go.FigureWidget(layout={"title": "tokens/s served", "height": 260,
                                             "xaxis": {"title": "seconds ago"}})
        self.queue = go.FigureWidget(layout={"title": "queue and latency (ms)", "height": 260})
        self.box = widgets.VBox([self.layers, self.speed, self.queue])

    def refresh(self) -> None:
        import plotly.graph_objects as go

        mesh = self.session.mesh
        if mesh is None:
            return
        df = mesh.metrics("peers")
        snap = mesh.snapshot()
        serving = [p for p in snap["peers"] if p.get("layers")]
        with self.layers.batch_update():
            self.layers.data = []
            for p in serving:
                s, e = p["layers"]
                self.layers.add_trace(go.Bar(y=[p["name"]], x=[e - s], base=[s], orientation="h", name=p["name"]))
        if df.is_empty():
            return
        import polars as pl

        now = df["time"].max()
        df = df.sort("time").with_columns(
            ((pl.col("served_tokens").diff().over("peer")) / pl.col("time").diff().over("peer")).alias("rate"),
            (pl.col("time") - now).alias("ago"))
        with self.speed.batch_update(), self.queue.batch_update():
            self.speed.data = []
            self.queue.data = []
            for _key, part in df.group_by(["peer"], maintain_order=True):
                name = part["name"][-1]
                if part["layer_start"].drop_nulls().is_empty():
                    continue
                self.speed.add_trace(go.Scatter(x=part["ago"].to_list(), y=part["rate"].fill_null(0).to_list(),
                                                mode="lines", name=name))
                self.queue.add_trace(go.Scatter(x=part["ago"].to_list(), y=part["queue"].to_list(),
                                                mode="lines", name=f"{name} queue"))
                self.queue.add_trace(go.Scatter(x=part["ago"].to_list(), y=part["latency_ms"].to_list(),
                                                mode="lines", name=f"{name} ms", line={"dash": "dot"}))

    async def _loop(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(REFRESH_S)

    def show(self) -> ServingMonitor:
        display(self.box)
        self.session.spawn(self._loop(), "serving-monitor")
        return self
