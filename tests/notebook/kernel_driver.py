"""A real ipykernel driven through jupyter_client, seen the way a front-end sees it (used by the tests here).

:class:`Kernel` reads every iopub message: each cell's own outputs, and the widget state that comm
messages carry whichever cell they belong to (background work updates widgets after its cell is done).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

REPO = Path(__file__).resolve().parents[2]


@dataclass
class CellResult:
    status: str
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)  # display_data / execute_result contents
    error: dict[str, Any] | None = None
    payload: list[dict[str, Any]] = field(default_factory=list)  # e.g. the pager, where `%magic?` help goes

    def widget_ids(self) -> list[str]:
        return [o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for o in self.outputs
                if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]


class Kernel:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(REPO), env={**os.environ, **(env or {})})
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.widgets: dict[str, dict[str, Any]] = {}  # comm id -> widget state, as a front-end holds it
        self.displays: dict[str, dict[str, Any]] = {}  # display id -> its latest data (updated in place)
        self.updates: list[tuple[str, dict[str, Any]]] = []  # every widget state change, in order
        self._pending: dict[str, CellResult] = {}

    # -- iopub -------------------------------------------------------------------------------------
    def _handle(self, msg: dict[str, Any]) -> str | None:
        """Apply one iopub message; returns the parent msg id when it says that request is idle."""
        kind, content = msg["msg_type"], msg["content"]
        parent = msg["parent_header"].get("msg_id")
        if kind == "comm_open" and "state" in content.get("data", {}):
            self.widgets[content["comm_id"]] = dict(content["data"]["state"])
        elif kind == "comm_msg" and content.get("data", {}).get("method") == "update":
            self.widgets.setdefault(content["comm_id"], {}).update(content["data"].get("state", {}))
            self.updates.append((content["comm_id"], content["data"].get("state", {})))
        elif kind == "comm_close":
            self.widgets.pop(content["comm_id"], None)
        if kind in ("display_data", "update_display_data") and content.get("transient", {}).get("display_id"):
            self.displays[content["transient"]["display_id"]] = content["data"]
        cell = self._pending.get(parent)
        if cell is None:
            return None
        if kind == "stream":
            if content["name"] == "stdout":
                cell.stdout += content["text"]
            else:
                cell.stderr += content["text"]
        elif kind in ("display_data", "execute_result"):
            cell.outputs.append(content)
        elif kind == "error":
            cell.error = content
        elif kind == "status" and content["execution_state"] == "idle":
            return parent
        return None

    def pump(self, seconds: float) -> None:
        """Read iopub for ``seconds`` (widget updates from background work keep arriving)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._handle(self.kc.get_iopub_msg(timeout=min(left, 0.2)))
            except queue.Empty:
                pass

    # -- cells -------------------------------------------------------------------------------------
    def start(self, code: str) -> str:
        """Send a cell without waiting; :meth:`finish` collects it."""
        msg_id = self.kc.execute(code, allow_stdin=False)
        self._pending[msg_id] = CellResult(status="?")
        return msg_id

    def partial(self, msg_id: str) -> CellResult:
        """What a cell sent so far (it may still be running)."""
        return self._pending[msg_id]

    def read_until(self, msg_id: str, predicate: Callable[[CellResult], bool], timeout: float, what: str) -> None:
        """Read iopub until the running cell's output so far satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while not predicate(self._pending[msg_id]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                self._handle(self.kc.get_iopub_msg(timeout=min(left, 0.5)))
            except queue.Empty:
                pass

    def finish(self, msg_id: str, timeout: float = 120.0, *, ok: bool = True, code: str = "") -> CellResult:
        cell = self._pending[msg_id]
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"cell did not finish in {timeout:.0f} s: {code[:200]!r}")
                try:
                    msg = self.kc.get_iopub_msg(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if self._handle(msg) == msg_id:
                    break
        finally:
            self._pending.pop(msg_id, None)
        while True:
            reply = self.kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        cell.status = reply["content"]["status"]
        cell.payload = reply["content"].get("payload", [])
        if cell.error is None and cell.status == "error":
            cell.error = reply["content"]
        if ok:
            assert cell.status == "ok", f"{code[:200]!r} failed: {cell.error}\n{cell.stderr}"
        return cell

    def run(self, code: str, timeout: float = 120.0, *, ok: bool = True) -> CellResult:
        """Execute a cell and wait until the kernel is idle again; ``ok`` asserts it raised nothing."""
        return self.finish(self.start(code), timeout, ok=ok, code=code)

    def widgets_of(self, model: str) -> list[dict[str, Any]]:
        """The states of every live widget of this model class (e.g. ``HTMLModel``), oldest first."""
        return [st for st in self.widgets.values() if st.get("_model_name") == model]

    def value(self, expr: str, timeout: float = 120.0) -> Any:
        """The JSON value of ``expr`` evaluated in the kernel (top-level ``await`` allowed)."""
        out = self.run(f"import json as _j\nprint(_j.dumps({expr}))", timeout).stdout
        return json.loads(out.strip().splitlines()[-1])

    def wait_value(self, expr: str, predicate: Callable[[Any], bool], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(expr)
            if predicate(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: last {expr} = {v!r}")
            self.pump(0.3)

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def stop(self) -> None:
        """Shut the kernel down the way a server would (its atexit handlers run), then make sure."""
        try:
            self.km.shutdown_kernel(now=False)
        except Exception:
            self.km.shutdown_kernel(now=True)
        finally:
            self.kc.stop_channels()


def kill_pids(pids: list[int]) -> None:
    """Last resort for processes a kernel started: the kernel is gone, they must be too."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped by its parent yet) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
