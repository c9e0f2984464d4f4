"""The "gradient_nb.mesh" comm, driven from a real client against a real ipykernel process."""

from __future__ import annotations

import queue
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

from gradient_nb.notebook.comm import TARGET_NAME, _json_safe

REPO = Path(__file__).resolve().parents[2]
WAIT = 30.0  # generous bound on any single wait; a healthy run takes well under a second each

# Runs inside the kernel: a snapshot source it controls, and join/leave callbacks that change it
# the way the real mesh would, after an await.
SETUP = textwrap.dedent(
    """
    import asyncio
    from gradient_nb.notebook import comm as _gc

    mesh_state = {"joined": False}
    calls = []

    async def join_cb(url, name):
        await asyncio.sleep(0)
        if url == "ws://refuse":
            raise ConnectionError("rendezvous refused the join")
        calls.append(("join", url, name))
        mesh_state.clear()
        mesh_state.update(joined=True, mesh="default", self="p1", rendezvous=url, links=[],
                          peers=[{"id": "p1", "name": name or "me", "devices": [], "services": [],
                                  "layers": None, "free_memory_bytes": 0, "tflops": 0.0,
                                  "last_seen": 0}])

    async def leave_cb():
        await asyncio.sleep(0)
        calls.append(("leave",))
        mesh_state.clear()
        mesh_state["joined"] = False

    target = _gc.register(get_ipython(), lambda: dict(mesh_state), join_cb, leave_cb, poll_interval=0.05)
    """
)


class Kernel:
    def __init__(self) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(REPO))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.comm_id = ""

    def execute(self, code: str) -> None:
        # Wait on the shell reply only: iopub stays untouched so that no comm message the kernel
        # pushed meanwhile is consumed here (execute_interactive would drop them).
        msg_id = self.kc.execute(code)
        deadline = time.monotonic() + WAIT
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["status"] == "ok", reply["content"]

    def open_comm(self) -> str:
        self.comm_id = uuid.uuid4().hex
        msg = self.kc.session.msg("comm_open", {"comm_id": self.comm_id, "target_name": TARGET_NAME, "data": {}})
        self.kc.shell_channel.send(msg)
        return self.comm_id

    def send(self, data: dict[str, Any]) -> None:
        msg = self.kc.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data})
        self.kc.shell_channel.send(msg)

    def close_comm(self) -> None:
        self.kc.shell_channel.send(self.kc.session.msg("comm_close", {"comm_id": self.comm_id, "data": {}}))

    def next_data(self, predicate, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no comm message: {what}")
            try:
                msg = self.kc.get_iopub_msg(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if self._matches(msg, predicate):
                return msg["content"]["data"]

    def _matches(self, msg: dict[str, Any], predicate) -> bool:
        return (
            msg["msg_type"] == "comm_msg"
            and msg["content"].get("comm_id") == self.comm_id
            and predicate(msg["content"]["data"])
        )

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def is_snapshot(pred=lambda s: True):
    return lambda d: d.get("type") == "snapshot" and pred(d["snapshot"])


def is_reply(request: str):
    return lambda d: d.get("type") == "reply" and d.get("request") == request


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    try:
        k.execute(SETUP)
        yield k
    finally:
        k.stop()


def test_initial_snapshot_then_updates_on_change(kernel: Kernel) -> None:
    kernel.open_comm()
    first = kernel.next_data(is_snapshot(), "initial snapshot")
    assert first["snapshot"] == {"joined": False}

    kernel.execute(
        "mesh_state.update(joined=True, mesh='m', self='a', rendezvous='ws://x', links=[],"
        " peers=[{'id': 'a'}, {'id': 'b'}, {'id': 'c'}])"
    )
    three = kernel.next_data(is_snapshot(lambda s: len(s.get("peers", [])) == 3), "snapshot with 3 peers")
    assert [p["id"] for p in three["snapshot"]["peers"]] == ["a", "b", "c"]

    kernel.execute("mesh_state['peers'] = mesh_state['peers'][:2]")
    two = kernel.next_data(is_snapshot(lambda s: len(s.get("peers", [])) == 2), "snapshot with 2 peers")
    assert two["snapshot"]["mesh"] == "m"

    # The kernel stays usable while the poll task runs: a cell executes and returns normally.
    kernel.execute("assert 1 + 1 == 2")
    kernel.close_comm()
    # Shell messages are handled in order, so the close is done before this cell runs.
    kernel.execute("assert target.open_comms == 0, target.open_comms")


def test_only_changes_are_pushed(kernel: Kernel) -> None:
    kernel.execute("mesh_state.clear(); mesh_state['joined'] = False")
    kernel.open_comm()
    kernel.next_data(is_snapshot(), "initial snapshot")
    # Several poll intervals pass with no change; then one change. The next snapshot to arrive must
    # be that change, not a repeat of the unchanged one.
    time.sleep(0.5)  # about ten poll intervals go by unchanged
    kernel.execute("mesh_state['marker'] = 1")
    nxt = kernel.next_data(is_snapshot(), "snapshot after change")
    assert nxt["snapshot"] == {"joined": False, "marker": 1}
    # An explicit request always answers, changed or not.
    kernel.send({"request": "snapshot", "id": 7})
    again = kernel.next_data(is_snapshot(), "snapshot on request")
    assert again["snapshot"] == {"joined": False, "marker": 1}
    reply = kernel.next_data(is_reply("snapshot"), "reply to snapshot request")
    assert reply == {"type": "reply", "request": "snapshot", "id": 7, "ok": True, "error": ""}
    kernel.close_comm()


def test_join_and_leave_requests(kernel: Kernel) -> None:
    kernel.execute("mesh_state.clear(); mesh_state['joined'] = False; calls.clear()")
    kernel.open_comm()
    kernel.next_data(is_snapshot(), "initial snapshot")

    kernel.send({"request": "join", "url": "ws://127.0.0.1:9999", "name": "alice", "id": "j1"})
    reply = kernel.next_data(is_reply("join"), "join reply")
    assert reply["ok"] is True and reply["error"] == "" and reply["id"] == "j1"
    joined = kernel.next_data(is_snapshot(lambda s: s.get("joined") is True), "joined snapshot")
    assert joined["snapshot"]["rendezvous"] == "ws://127.0.0.1:9999"
    assert joined["snapshot"]["peers"][0]["name"] == "alice"

    kernel.send({"request": "join", "url": "ws://refuse", "name": None})
    refused = kernel.next_data(is_reply("join"), "refused join reply")
    assert refused["ok"] is False and "refused" in refused["error"]

    kernel.send({"request": "join", "url": ""})
    bad = kernel.next_data(is_reply("join"), "join without url")
    assert bad["ok"] is False and "URL" in bad["error"]

    kernel.send({"request": "leave"})
    left = kernel.next_data(is_reply("leave"), "leave reply")
    assert left["ok"] is True
    kernel.next_data(is_snapshot(lambda s: s == {"joined": False}), "snapshot after leave")

    kernel.send({"request": "frobnicate"})
    unknown = kernel.next_data(is_reply("frobnicate"), "unknown request reply")
    assert unknown["ok"] is False

    kernel.execute("assert calls == [('join', 'ws://127.0.0.1:9999', 'alice'), ('leave',)], calls")
    kernel.close_comm()


def test_failing_snapshot_source_is_reported_not_fatal(kernel: Kernel) -> None:
    kernel.execute(
        "def _boom():\n"
        "    raise RuntimeError('mesh state unavailable')\n"
        "_t2 = _gc.register(get_ipython(), _boom, poll_interval=0.05)"
    )
    try:
        kernel.open_comm()
        snap = kernel.next_data(is_snapshot(), "error snapshot")
        assert snap["snapshot"]["joined"] is False
        assert "mesh state unavailable" in snap["snapshot"]["error"]
        kernel.send({"request": "join", "url": "ws://x"})
        reply = kernel.next_data(is_reply("join"), "join without callback")
        assert reply["ok"] is False and "does not offer join" in reply["error"]
        kernel.close_comm()
    finally:
        # put the controllable source back for any test that runs after this one
        kernel.execute(
            "target = _gc.register(get_ipython(), lambda: dict(mesh_state), join_cb, leave_cb, poll_interval=0.05)"
        )


def test_json_safe() -> None:
    assert _json_safe({"rtt_ms": float("nan"), "layers": (0, 12), 3: float("inf")}) == {
        "rtt_ms": None,
        "layers": [0, 12],
        "3": None,
    }
