"""Live monitoring widgets, updated by tasks on the kernel's loop (never by blocking a cell).

- :class:`MeshMonitor`: the topology (a force-directed anywidget, ``topology.py``) and a peer table.
- :class:`ServingMonitor`: a status line and plotly ``FigureWidget``s of each peer's layers, and of its
  tokens/s, queue and latency over time, from the heartbeat history (``Mesh.metrics()``).

Both are displayed by the cell that makes them and then only change their widgets' state, which every
front-end follows by comm id, whichever cell is running.
"""

from __future__ import annotations

import asyncio
import html
import logging
from typing import Any

import ipywidgets as widgets
from IPython.display import display

log = logging.getLogger(__name__)

REFRESH_S = 1.0
HISTORY_S = 120.0  # the speed plots show the last two minutes


def _memory(p: dict[str, Any]) -> str:
    """What a peer offers: its free memory, within its memory cap when it set one (what the coordinator
    counts; the machine's free memory alone would overstate it)."""
    free = p["free_memory_bytes"] / 2**30
    cap = p.get("memory_cap_bytes")
    if not cap:
        return f"{free:.1f} GiB"
    offered = p.get("offered_memory_bytes", min(p["free_memory_bytes"], cap)) / 2**30
    return f"{offered:.2f} GiB (capped; {free:.1f} free)"


def peer_table_html(snapshot: dict[str, Any]) -> str:
    if not snapshot.get("joined"):
        return "<i>This kernel has not joined a mesh (or is still joining): run <code>%mesh join</code></i>"
    rows = []
    for p in snapshot["peers"]:
        dev = ", ".join(d.get("name", "?") for d in p.get("devices", []))
        layers = p.get("layers")
        rows.append(f"<tr data-peer-id='{html.escape(p['id'])}'>" + "".join(
            f"<td>{html.escape(str(c))}</td>" for c in (
                p["name"] + (" (this kernel)" if p.get("self") else ""), p["id"][:10], dev,
                f"{p['tflops']:.3f}", _memory(p),
                ", ".join(s for s in p["services"] if not s.startswith(("dht.", "mesh.", "diag."))) or "-",
                f"{layers[0]}–{layers[1]}" if layers else "-")) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("name", "id", "devices", "TFLOP/s", "free", "services", "layers"))
    return (f"<table class='gradient-nb-peers' data-peer-count='{len(snapshot['peers'])}'><thead><tr>{head}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


class _Refreshing:
    session: Any
    _task: asyncio.Task | None = None

    def refresh(self) -> None:
        raise NotImplementedError

    async def _prepare(self) -> None:
        """Make what the first refresh needs (runs on the loop, after the cell returned)."""

    async def _loop(self) -> None:
        await self._prepare()
        while True:
            try:
                self.refresh()
            except Exception:
                # One bad snapshot (a peer mid-join) must not end the live view.
                log.warning("%s refresh failed", type(self).__name__, exc_info=True)
            await asyncio.sleep(REFRESH_S)

    def start(self) -> None:
        """Keep the widgets updated in the background (owned by the session: ``leave`` stops it)."""
        if self._task is None or self._task.done():
            self._task = self.session.spawn(self._loop(), f"{type(self).__name__}-refresh")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


class MeshMonitor(_Refreshing):
    """The topology of the kernel's mesh and a table of its peers, kept up to date."""

    def __init__(self, session: Any) -> None:
        from .topology import TopologyWidget

        self.session = session
        self.topology = TopologyWidget(session.snapshot())
        self.table = widgets.HTML()
        self.box = widgets.VBox([self.topology, self.table])
        self.refresh()

    def refresh(self) -> None:
        snap = self.session.snapshot()
        self.topology.update(snap)
        table = peer_table_html(snap)
        if table != self.table.value:
            self.table.value = table

    def show(self) -> MeshMonitor:
        display(self.box)
        self.start()
        return self

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text("<MeshMonitor>")


class ServingMonitor(_Refreshing):
    """What this kernel's mesh serves: a status line, layers per peer, and tokens/s, queue and latency
    per peer over time."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.status = widgets.HTML("<b>parallax</b>: starting to serve…")
        self.ready = False
        # The plots come a moment later (see _prepare): a kernel's first plotly FigureWidget costs
        # seconds (plotly's import and its JavaScript bundle), which the cell need not wait for.
        self.layers: Any = None
        self.speed: Any = None
        self.queue: Any = None
        self.box = widgets.VBox([self.status])
        self._shown_layers: list[Any] = []
        self._last = ""  # what it served and how, while it was ready

    async def _prepare(self) -> None:
        if self.layers is not None:
            return
        await asyncio.to_thread(_import_plotly)  # the slow, thread-safe part; widgets are made on the loop
        import plotly.graph_objects as go

        self.layers = go.FigureWidget(layout={"title": {"text": "layers per peer"}, "height": 240,
                                              "barmode": "overlay", "xaxis": {"title": {"text": "layer"}},
                                              "margin": {"t": 40, "b": 40}})
        self.speed = go.FigureWidget(layout={"title": {"text": "tokens/s served"}, "height": 240,
                                             "xaxis": {"title": {"text": "seconds ago"}}, "margin": {"t": 40, "b": 40}})
        self.queue = go.FigureWidget(layout={"title": {"text": "queue (requests) and latency (ms per call)"},
                                             "height": 240, "xaxis": {"title": {"text": "seconds ago"}},
                                             "margin": {"t": 40, "b": 40}})
        self.box.children = (self.status, self.layers, self.speed, self.queue)

    def failed(self, exc: BaseException) -> None:
        from .magics import short_message

        text = short_message(exc) or f"{type(exc).__name__}: {exc}"
        log.info("serving failed", exc_info=exc)
        running = self.session.server is not None
        after = ("the serve before this cell goes on" if running else
                 "nothing was left running; fix the cell and run it again")
        self.status.value = (f"<b>parallax</b>: <span style='color:#c62828'>serving failed: "
                             f"{html.escape(text)}</span> ({after})")
        self._final = True
        self.stop()

    def resume(self) -> None:
        """Follow the serve again (a later cell that would have replaced it failed)."""
        self._final = False
        self.start()

    def replaced(self) -> None:
        """A later ``%%parallax serve`` cell took over: this dashboard stops following."""
        self.stop()
        if not getattr(self, "_final", False):
            self.status.value = "<b>parallax</b>: <i>replaced by a later %%parallax serve cell</i>"
            self._final = True

    def refresh(self) -> None:
        if getattr(self, "_final", False):
            return
        self._refresh()

    def _status_line(self) -> str:
        from ..serve.pipeline import NoRoute

        s = self.session
        server, engine = s.server, s.engine
        if s.mesh is None and s._join_task is None:
            last = f" ({self._last})" if self._last else ""
            return f"<b>parallax</b>: not serving: this kernel left the mesh{last}"
        if server is None:
            return "<b>parallax</b>: starting to serve…"
        mine = f"layers {server.layers[0]}–{server.layers[1]}" if server.layers else "no layers yet"
        api = f"; OpenAI API at <code>{html.escape(s.api.url)}</code>" if s.api is not None else ""
        if engine is None:
            return f"<b>parallax</b>: serving {html.escape(server.model_id)} (this kernel: {mine}); loading…"
        try:
            chain = engine.current_route()
        except NoRoute as exc:
            why = s.route_status()
            return (f"<b>parallax</b>: serving {html.escape(server.model_id)} (this kernel: {mine}); "
                    f"no route yet: {html.escape(why.message if why is not None else str(exc))}")
        self.ready = True
        names = {p.id: p.name for p in s.mesh.peers()} if s.mesh is not None else {}
        route = " → ".join(f"{html.escape(names.get(st.peer_id, st.peer_id[:8]))} [{st.start}:{st.end}]"
                           for st in chain)
        # What it did, kept for the line shown after a leave.
        closed = f"; its OpenAI API at <code>{html.escape(s.api.url)}</code> is closed" if s.api is not None else ""
        self._last = f"it served {html.escape(server.model_id)}, {mine}; last route: {route}{closed}"
        return (f"<b>parallax</b>: serving {html.escape(server.model_id)} (this kernel: {mine}); "
                f"ready, route: {route}{api}")

    def _refresh(self) -> None:
        import plotly.graph_objects as go

        line = self._status_line()
        if line != self.status.value:
            self.status.value = line
        mesh = self.session.mesh
        if mesh is None or self.layers is None:
            return
        serving = [(p["name"], tuple(p["layers"])) for p in mesh.snapshot()["peers"] if p.get("layers")]
        if serving != self._shown_layers:
            self._shown_layers = serving
            with self.layers.batch_update():
                self.layers.data = []
                for name, (s, e) in serving:
                    self.layers.add_trace(go.Bar(y=[name], x=[e - s], base=[s], orientation="h", name=name))
        df = mesh.metrics("peers")
        if df.is_empty():
            return
        import polars as pl

        now = df["time"].max()
        df = (df.filter(pl.col("time") >= now - HISTORY_S).sort("time")
              .with_columns((pl.col("served_tokens").diff().over("peer")
                             / pl.col("time").diff().over("peer")).alias("rate"),
                            (pl.col("time") - now).alias("ago")))
        with self.speed.batch_update(), self.queue.batch_update():
            self.speed.data = []
            self.queue.data = []
            for _key, part in df.group_by(["peer"], maintain_order=True):
                if part["layer_start"].drop_nulls().is_empty():
                    continue  # never served a layer: nothing to plot
                name = part["name"][-1]
                ago = part["ago"].to_list()
                self.speed.add_trace(go.Scatter(x=ago, y=part["rate"].fill_null(0).to_list(), mode="lines",
                                                name=name))
                self.queue.add_trace(go.Scatter(x=ago, y=part["queue"].to_list(), mode="lines",
                                                name=f"{name} queue"))
                self.queue.add_trace(go.Scatter(x=ago, y=part["latency_ms"].to_list(), mode="lines",
                                                name=f"{name} ms", line={"dash": "dot"}))

    def show(self) -> ServingMonitor:
        display(self.box)
        self.start()
        return self

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text("<ServingMonitor>")


def _import_plotly() -> None:
    # FigureWidget's module (anywidget, and the JavaScript bundle it sends) and the figure classes.
    import plotly.basewidget
    import plotly.graph_objects  # noqa: F401
