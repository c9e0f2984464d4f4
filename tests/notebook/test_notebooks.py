"""Every notebook in notebooks/ runs top to bottom in a real kernel (nbclient), and its outputs say so.

The outputs checked are what the notebook saved: cell outputs, and the widget state nbclient stores in
the notebook's metadata (the front-end's view of every widget: the streamed answer, the topology).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernel_driver import REPO, kill_pids, pid_alive
from nbclient import NotebookClient

from tests.conftest import wait_until

pytestmark = pytest.mark.slow

# Notebooks that need something this test cannot give them, executed by a test of their own.
CHECKED_ELSEWHERE = {"volunteer.ipynb": "tests/notebook/test_volunteer.py (it joins a mesh by URL)"}
NOTEBOOKS = sorted(p for p in (REPO / "notebooks").glob("*.ipynb") if p.name not in CHECKED_ELSEWHERE)
ARTIFACTS = REPO / "test-artifacts"


def widget_states(nb: Any) -> dict[str, dict[str, Any]]:
    meta = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return {mid: w["state"] for mid, w in meta.get("state", {}).items()}


def outputs_text(cell: Any) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(str(out["data"].get("text/plain", "")))
    return "".join(parts)


def cell_with(nb: Any, source: str) -> Any:
    found = [c for c in nb.cells if c.cell_type == "code" and source in c.source]
    assert found, f"no cell with {source!r}"
    return found[0]


def check_quickstart(nb: Any) -> None:
    states = widget_states(nb)
    htmls = [s.get("value", "") for s in states.values() if s.get("_model_name") == "HTMLModel"]
    # The answer: printed by the cell that awaited it, and streamed into the ask cell's widget.
    assert "Paris" in outputs_text(cell_with(nb, "answer = await nb.answer()"))
    assert any("Paris" in v and "tokens" in v for v in htmls), htmls
    # The serving dashboard says which route requests took (through all three peers), and, since the
    # notebook ends with %mesh leave, that this kernel left.
    assert any("last route:" in v and v.count("→") == 2 and "left the mesh" in v for v in htmls), htmls
    status = outputs_text(cell_with(nb, "%parallax status"))
    assert re.search(r"route: .*\[0:\d+\] -> .*\[\d+:\d+\] -> .*\[\d+:30\]", status), status
    # The topology widget follows the mesh to the end: after the leave it shows none.
    topo = [s["snapshot"] for s in states.values() if "snapshot" in s]
    assert topo and not topo[-1]["joined"]
    # Every peer served tokens, counted already (the metrics DataFrame, printed as text).
    metrics = outputs_text(cell_with(nb, "await nb.metrics()"))
    for name in ("notebook", "volunteer-1", "volunteer-2"):
        row = re.search(rf"{name}\s*┆\s*(\d+)", metrics)
        assert row and int(row.group(1)) > 0, (name, metrics)
    # It left: the last cell printed an empty snapshot.
    assert "{'joined': False}" in outputs_text(nb.cells[-1])


def check_mesh(nb: Any) -> None:
    status = outputs_text(cell_with(nb, "%mesh status"))
    assert "3 peers" in status and "volunteer-1" in status and "volunteer-2" in status, status
    assert status.count("local peer volunteer-") == 2
    assert "UsageError" in outputs_text(cell_with(nb, "join notaurl"))
    topo = [s["snapshot"] for s in widget_states(nb).values() if "snapshot" in s]
    assert topo and not topo[-1]["joined"]  # %mesh watch follows the leave (the links: the RTT table below)
    rtts = outputs_text(cell_with(nb, "median_rtt_ms"))
    assert "median_rtt_ms" in rtts and "shape: (2," in rtts, rtts  # a row per linked peer
    assert "{'joined': False}" in outputs_text(nb.cells[-1])


def check_parallax(nb: Any) -> None:
    status = outputs_text(cell_with(nb, "%parallax status"))
    assert re.search(r"route: notebook\[0:15\] -> volunteer-1\[15:30\]", status), status
    # Greedy through the magic and through the OpenAI API: the same tokens, so the same text.
    streamed = outputs_text(cell_with(nb, "print(await nb.answer())")).strip()
    assert len(streamed) > 10 and streamed == outputs_text(cell_with(nb, "AsyncOpenAI")).strip()
    assert "Paris" in outputs_text(cell_with(nb, "capital of France"))
    htmls = [s.get("value", "") for s in widget_states(nb).values() if s.get("_model_name") == "HTMLModel"]
    assert any("OpenAI API at" in v and "last route:" in v and "left the mesh" in v for v in htmls), htmls
    assert "{'joined': False}" in outputs_text(nb.cells[-1])


def check_verify(nb: Any) -> None:
    # The answer stays above the verification report (one verdict per shard) in the %%verify ask cell.
    shown = "".join(str(o.get("data", {}).get("text/html", "")) for o in cell_with(nb, "%%verify ask").outputs)
    assert "Paris" in shown and shown.index("Paris") < shown.index("<table"), shown
    verdicts = outputs_text(cell_with(nb, "report.verdicts"))
    assert "layers 0:15  pass" in verdicts and "layers 15:30  pass" in verdicts, verdicts
    reputation = outputs_text(cell_with(nb, "%verify reputation"))
    assert re.search(r"volunteer-1\s+1 pass\s+0 fail", reputation), reputation
    assert "probability 0.05" in outputs_text(cell_with(nb, "%verify policy"))
    assert "{'joined': False}" in outputs_text(nb.cells[-1])


def check_echo(nb: Any) -> None:
    # Training ran on the mesh's sampler to its end, and the reward rose (the last quarter's mean beats the first's).
    done = outputs_text(cell_with(nb, "state = await finished()"))
    assert "done after 12 steps; sync failures: 0" in done, done
    rewards = re.search(r"first 3 steps: ([\d.]+); last 3 steps: ([\d.]+)", outputs_text(cell_with(nb, "%echo metrics")))
    assert rewards and float(rewards.group(2)) > float(rewards.group(1)), rewards
    table = outputs_text(cell_with(nb, "%echo metrics"))
    assert "shape: (12, 9)" in table and "sync_bytes" in table, table
    # %echo status, while it ran and after.
    running, ended = (outputs_text(c) for c in nb.cells if c.cell_type == "code" and c.source == "%echo status")
    assert "'mode': 'sequential'" in running and "'status': 'done'" in ended and "'done_steps': 12" in ended, ended
    # The live widget: a plotly FigureWidget (an anywidget) with a panel per metric, updated after every step
    # (plotly sends each update as a delta, which the stored state counts but does not hold).
    figs = [s for s in widget_states(nb).values() if "FigureWidget" in str(s.get("_anywidget_id"))]
    assert len(figs) == 1 and [t["name"] for t in figs[0]["_widget_data"]][:2] == ["reward_mean", "kl"], figs
    assert int(figs[0]["_last_trace_edit_id"]) >= 12, figs[0]["_last_trace_edit_id"]
    htmls = [s.get("value", "") for s in widget_states(nb).values() if s.get("_model_name") == "HTMLModel"]
    assert any("echo</b>: done after 12 steps, reward" in v for v in htmls), htmls
    # The trained adapter, served by the kernel alone (the sampler serves the base), answered.
    assert "answer>" in outputs_text(cell_with(nb, "await nb.ask("))
    assert "{'joined': False}" in outputs_text(nb.cells[-1])


CHECKS: dict[str, Callable[[Any], None]] = {"verify.ipynb": check_verify, "echo.ipynb": check_echo,
                                            "quickstart.ipynb": check_quickstart, "mesh.ipynb": check_mesh,
                                            "parallax.ipynb": check_parallax}



def check_agents(nb: Any) -> None:
    ledger = outputs_text(cell_with(nb, "%agents ledger")) + str(cell_with(nb, "%agents ledger").outputs)
    assert all(f"calc-{i}" in ledger for i in (1, 2, 3)) and "tools.calculate" in ledger, ledger
    assert "tools.convert_units(value, from_unit, to_unit)" in outputs_text(cell_with(nb, "%agents tools"))
    runs = [r for r in outputs_text(cell_with(nb, "await finished()")).splitlines() if r.split()[:1] in
            (["tools"], ["vote"], ["plan"])]
    assert [r.split()[:2] for r in runs] == [["tools", "212"], ["vote", "391"], ["plan", "400"]], runs
    assert all(r.split()[2] in ("beacon", "plan") and r.endswith("final") for r in runs), runs
    # Two steps, each answered once (a step an agent refused while busy with the vote is retried: both count).
    assert " vote " in runs[1] and runs[2].split().count("tool_result") == 2, runs
    # Each run's timeline widget followed its events to the final one, with the answer.
    views = [s.get("value", "") for s in widget_states(nb).values() if s.get("_model_name") == "HTMLModel"]
    for answer in ("212", "391", "400"):
        assert any(re.search(rf"<b>final</b></td><td>answer={answer}\b", v) for v in views), (answer, views)
    # With the URL of the run's Server-Sent Events stream.
    assert sum(bool(re.search(r"events: <code>http://127\.0\.0\.1:\d+/runs/\w+/events", v)) for v in views) == 3, views
    assert "{'joined': False}" in outputs_text(nb.cells[-1])


CHECKS["agents.ipynb"] = check_agents


def check_hide_and_shill(nb: Any) -> None:
    text = outputs_text(cell_with(nb, "run_study(small(), grpo"))
    got = {k: float(v) for k, v in re.findall(r"\b(f1_\w+|attribution_accuracy): ([\d.]+)\n", text)}
    assert {"f1_rule", "f1_untrained", "f1_trained", "attribution_accuracy"} <= set(got), text
    assert got["f1_trained"] > max(got["f1_rule"], got["f1_untrained"]), got  # the trained detector wins held out
    for source in ("make_subplots(rows=2", "roc_curve(y, s)", "attribute(e, f)"):  # the three plotly figures
        assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in cell_with(nb, source).outputs)


CHECKS["hide_and_shill.ipynb"] = check_hide_and_shill


def spawned_pids(nb: Any) -> list[int]:
    """The local peers' process ids, as the `%mesh spawn` widget reported them."""
    return [int(p) for s in widget_states(nb).values() for p in re.findall(r"pid (\d+)", str(s.get("value", "")))]


def test_every_notebook_is_checked() -> None:
    assert NOTEBOOKS and {p.name for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_shows_its_results(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                            store_widget_state=True)
    started = time.perf_counter()
    pids: list[int] = []
    try:
        client.execute()
    finally:
        pids = spawned_pids(nb)
        ARTIFACTS.mkdir(exist_ok=True)
        nbformat.write(nb, ARTIFACTS / path.name)  # the executed notebook, to look at when this fails
        try:
            # The kernel is gone; so must be every process it started.
            wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30, what="spawned peers to exit")
        finally:
            kill_pids([p for p in pids if pid_alive(p)])
    print(f"{path.name}: {time.perf_counter() - started:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert not errors, errors
    check = CHECKS.get(path.name)
    if check is not None:
        check(nb)
