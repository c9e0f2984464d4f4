"""TopologyWidget: its bundled front-end, its synced snapshot, and following a source."""

from __future__ import annotations

import asyncio
import queue
import time
from pathlib import Path

from jupyter_client.manager import KernelManager

from gradient_nb.notebook.topology import TopologyWidget

REPO = Path(__file__).resolve().parents[2]


def test_bundle_is_shipped_and_loaded() -> None:
    w = TopologyWidget()
    esm = str(w._esm)
    # the esbuild bundle of widgets/src/topology.js, d3-force inside, an anywidget default export
    assert "d3-force" in esm and "export" in esm and "gnb-topology" in esm
    assert w.get_state()["snapshot"] == {"joined": False}
    w.close()


def test_update_cleans_and_skips_unchanged() -> None:
    w = TopologyWidget({"joined": True, "peers": [{"id": "a", "layers": (0, 4)}],
                        "links": [{"a": "a", "b": "b", "rtt_ms": float("nan")}]})
    assert w.snapshot["peers"][0]["layers"] == [0, 4]
    assert w.snapshot["links"][0]["rtt_ms"] is None
    changes: list[dict] = []
    w.observe(lambda ch: changes.append(ch["new"]), names="snapshot")
    w.update({"joined": True, "peers": [{"id": "a", "layers": [0, 4]}],
              "links": [{"a": "a", "b": "b", "rtt_ms": None}]})
    assert changes == []
    w.update({"joined": False})
    assert changes == [{"joined": False}]
    w.close()


async def test_follow_shows_changes_and_stops_on_close() -> None:
    state: dict = {"joined": False}
    reads = 0

    def source() -> dict:
        nonlocal reads
        reads += 1
        return dict(state)

    w = TopologyWidget()
    task = w.follow(source, interval=0.01)
    state.update(joined=True, peers=[{"id": "a"}, {"id": "b"}])
    for _ in range(500):
        if w.snapshot.get("joined"):
            break
        await asyncio.sleep(0.01)
    assert [p["id"] for p in w.snapshot["peers"]] == ["a", "b"]
    w.close()
    await asyncio.sleep(0)
    assert task.cancelled() or task.done()
    seen = reads
    await asyncio.sleep(0.05)
    assert reads == seen


def test_widget_state_reaches_the_frontend_from_a_real_kernel() -> None:
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(REPO))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kc.execute(
            "from gradient_nb.notebook.topology import TopologyWidget\n"
            "w = TopologyWidget({'joined': True, 'mesh': 'm', 'self': 'a', 'peers': [{'id': 'a'}, {'id': 'b'}],"
            " 'links': []})\n"
            "display(w)\n"
            "w.update({'joined': True, 'mesh': 'm', 'self': 'a', 'peers': [{'id': 'a'}], 'links': []})\n"
        )
        opened = None
        updates = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not updates:
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            content = msg["content"]
            if msg["msg_type"] == "comm_open" and content["data"]["state"].get("_model_name") == "AnyModel":
                opened = content
            elif msg["msg_type"] == "error":
                raise AssertionError(content["traceback"])
            elif (msg["msg_type"] == "comm_msg" and opened and content["comm_id"] == opened["comm_id"]
                  and "snapshot" in content["data"].get("state", {})):
                updates.append(content["data"]["state"]["snapshot"])
        assert opened is not None, "no widget comm opened"
        state = opened["data"]["state"]
        assert [p["id"] for p in state["snapshot"]["peers"]] == ["a", "b"]
        assert "gnb-topology" in state["_esm"]
        assert [p["id"] for p in updates[0]["peers"]] == ["a"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
