"""``%%echo train`` / ``%echo status|stop|metrics``: RL post-training from a notebook (Echo).

The cell body is YAML with ``EchoConfig``'s keys (task, mode, num_generations, steps, learning_rate,
lora_rank, max_staleness, samplers: auto / N / names, and TRL's GRPO names). ``colocated`` trains in
this kernel alone; ``sequential`` and ``async`` sample on the mesh this kernel joined, through the serving
peers of the model (every ``gradient-nb peer --serve`` is a sampler), with a rollout engine of their own so
the notebook's other requests are untouched. The run is a task on the kernel's event loop (training
steps run in a worker thread), so other cells keep running; a live plotly widget shows reward mean/std,
KL, entropy, staleness, sampler/trainer log-prob mismatch, sync time and samples/s. A mesh run first waits
until its samplers serve the model (``%mesh spawn`` peers may still be loading it); ``await finished()``
in a cell waits for the run to end.
"""

from __future__ import annotations

import asyncio
import html
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from ..rl.trainer import EchoConfig, EchoRun
from .session import current

USAGE = "usage: %%echo train + a YAML body, or %echo status | stop | metrics"
PLOTS = [("reward_mean", "reward (mean ± std)"), ("kl", "KL to the reference"), ("entropy", "entropy"),
         ("staleness", "staleness (versions)"), ("mismatch", "|sampler - trainer| log-prob"),
         ("sync_ms", "sync (ms)"), ("samples_per_s", "samples/s")]

_RUN: dict[str, Any] = {}
SAMPLERS_TIMEOUT = 300.0  # s: for the samplers to serve the model (a first load of the bundled one takes ~20 s)


class EchoWidget:
    """A status line and a plotly FigureWidget with one panel per metric, updated after every step.

    The figure comes a moment after the cell returned (``prepare``): a kernel's first plotly FigureWidget
    costs seconds (plotly's import and its JavaScript bundle), which the cell need not wait for."""

    def __init__(self) -> None:
        import ipywidgets as widgets

        self.status = widgets.HTML("<b>echo</b>: starting…")
        self.box = widgets.VBox([self.status])
        self.figure: Any = None

    async def prepare(self) -> None:
        from .monitor import _import_plotly

        await asyncio.to_thread(_import_plotly)  # the slow, thread-safe part; widgets are made on the loop
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=4, subplot_titles=[t for _, t in PLOTS])
        for i, (key, _) in enumerate(PLOTS):
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name=key,
                                     error_y={"type": "data", "array": []} if key == "reward_mean" else None),
                          row=i // 4 + 1, col=i % 4 + 1)
        fig.update_layout(height=420, showlegend=False, margin={"t": 40, "b": 20, "l": 30, "r": 10})
        self.figure = go.FigureWidget(fig)
        self.box.children = (self.status, self.figure)

    def say(self, text: str, error: bool = False) -> None:
        body = f"<span style='color:#c62828'>{html.escape(text)}</span>" if error else html.escape(text)
        self.status.value = f"<b>echo</b>: {body}"

    def update(self, metrics: list[dict[str, Any]], steps_total: int) -> None:
        last = metrics[-1]
        self.say(f"step {last['step']} of {steps_total}, reward {last.get('reward_mean', 0.0):.3f}")
        if self.figure is None:
            return
        steps = [m["step"] for m in metrics]
        with self.figure.batch_update():
            for trace, (key, _) in zip(self.figure.data, PLOTS, strict=True):
                trace.x = steps
                trace.y = [m.get(key, 0.0) for m in metrics]
                if key == "reward_mean":
                    trace.error_y.array = [m.get("reward_std", 0.0) for m in metrics]


def metrics_frame(run: EchoRun) -> Any:
    """The run's metrics, one row per step, as a polars DataFrame."""
    import polars as pl

    return pl.DataFrame(run.state.metrics)


async def _train(cfg: EchoConfig, widget: EchoWidget) -> None:
    try:
        await widget.prepare()  # a few seconds, while spawned samplers load the model anyway
        await _run(cfg, widget)
    except asyncio.CancelledError:
        widget.say("stopped")
        raise
    except Exception as exc:
        from .magics import short_message

        widget.say(f"failed: {short_message(exc) or f'{type(exc).__name__}: {exc}'}", error=True)
        raise
    state = _RUN["run"].state
    widget.say(f"{state.status} after {len(state.metrics)} steps" + (
        f", reward {state.metrics[-1]['reward_mean']:.3f}" if state.metrics else ""))


async def _run(cfg: EchoConfig, widget: EchoWidget) -> None:
    session = current()
    engine = None
    try:
        if cfg.mode != "colocated":
            mesh = await session.wait_mesh()
            from ..serve.cluster import wait_ready
            from ..serve.pipeline import MeshEngine

            if cfg.model is None and session.engine is not None:
                cfg.model = str(session.engine.path)  # the model this kernel serves
            engine = await asyncio.to_thread(MeshEngine, mesh, cfg.model)
            # Until the samplers asked for (at least one) serve the model: spawned peers may still be loading.
            want = cfg.samplers if isinstance(cfg.samplers, int) and not isinstance(cfg.samplers, bool) else \
                len(cfg.samplers) if isinstance(cfg.samplers, list) else 1
            widget.say(f"waiting for {max(1, want)} sampler(s) to serve {engine.model_name}")
            await wait_ready(mesh, engine, max(1, want), SAMPLERS_TIMEOUT)
            run = await asyncio.to_thread(EchoRun, cfg, mesh=mesh, engine=engine)
        else:
            run = await asyncio.to_thread(EchoRun, cfg)
        _RUN["run"] = run
        widget.say(f"training ({cfg.mode}, {cfg.steps} steps)")
        run.on_step = lambda _m: widget.update(run.state.metrics, cfg.steps)
        await run.run()
    finally:
        if engine is not None:
            await engine.aclose()


async def finished(timeout: float = 3600.0) -> Any:
    """Wait (in a cell: ``await finished()``) for the last ``%%echo train`` to end; returns its ``RunState``.
    A run that failed raises its error here; interrupting the cell stops the waiting, not the run."""
    task = _RUN.get("task")
    if task is None:
        raise RuntimeError("no run yet: start one with %%echo train")
    await asyncio.wait_for(asyncio.shield(task), timeout)
    return _RUN["run"].state


@magics_class
class EchoMagics(Magics):
    @line_cell_magic
    def echo(self, line: str, cell: str | None = None) -> Any:
        """RL post-training (GRPO over a LoRA adapter) with samplers on the mesh.

        %%echo train
        task: format            # or addition, {name: format, min_len: 4, max_len: 4}, module:attr
        mode: sequential        # colocated | sequential | async
        num_generations: 8
        steps: 20
        learning_rate: 0.002
        lora_rank: 8
        max_staleness: 4
        samplers: auto          # auto | N | [peer names]

        %echo status            the run's state and last step
        %echo stop              stop after the current step
        %echo metrics           the metrics as a polars DataFrame
        """
        args = shlex.split(line)
        if not args:
            raise UsageError(USAGE)
        cmd = args[0]
        run: EchoRun | None = _RUN.get("run")
        if cmd == "train":
            if cell is None:
                raise UsageError("%%echo train needs a YAML body (see %echo?)")
            if (run is not None and run.state.status in ("starting", "running")) or \
                    (_RUN.get("task") is not None and not _RUN["task"].done()):
                raise UsageError("a run is going on: %echo stop it first")
            try:
                cfg = EchoConfig.from_yaml(cell)
            except (ValueError, TypeError) as exc:
                raise UsageError(str(exc)) from None
            session = current()
            if cfg.mode != "colocated" and session.mesh is None and session._join_task is None:
                raise UsageError(f"mode {cfg.mode!r} samples on the mesh: join it (%mesh join) and start "
                                 "samplers (%mesh spawn N --serve MODEL, or volunteers' gradient-nb peer "
                                 "--serve), or use mode: colocated")
            widget = EchoWidget()
            display(widget.box)
            _RUN.pop("run", None)
            _RUN["cfg"] = cfg
            _RUN["task"] = session.spawn(_train(cfg, widget), "echo-train")
            return None
        task = _RUN.get("task")
        if run is None:
            if task is None:
                raise UsageError("no run yet: start one with %%echo train")
            if task.done():
                why = "cancelled" if task.cancelled() else f"{type(task.exception()).__name__}: {task.exception()}"
                raise UsageError(f"the run ended before its first step: {why}")
            if cmd == "status":  # its engine is starting, or the samplers are still loading the model
                cfg = _RUN["cfg"]
                return {"mode": cfg.mode, "steps": cfg.steps, "status": "starting: waiting for the samplers",
                        "done_steps": 0}
            if cmd == "stop":
                task.cancel()
                return "stopped before its first step"
        if cmd == "status":
            return run.state.summary()
        if cmd == "stop":
            run.stop()
            return "stopping after the current step"
        if cmd == "metrics":
            return metrics_frame(run)
        raise UsageError(USAGE)
