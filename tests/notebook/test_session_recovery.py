"""The notebook session as a state machine: a newcomer's mistakes, in a real kernel, each one leaving the
session usable, with a one-line message and no traceback (issue 19).

One kernel, a local mesh it introduces itself, the bundled model served by the kernel (half of it first,
so that an ask has no route) and a volunteer it spawns for the other half, then kills; small answers.
"""

from __future__ import annotations

import os
import signal

import pytest
from kernel_driver import CellResult, Kernel

pytestmark = pytest.mark.slow

SERVED = 200  # s: bound on waiting for the model to be served (~20 s the first time on a fresh machine)


def short_error(cell: CellResult, *expected: str) -> str:
    """The cell failed with a short message (IPython's UsageError) saying ``expected``, and no traceback."""
    assert cell.status == "error" and cell.error is not None and cell.error.get("ename") == "UsageError", \
        (cell.status, cell.error, cell.stderr)
    message = cell.error["evalue"]
    for text in expected:
        assert text in message, message
    shown = cell.stderr + "".join(cell.error.get("traceback") or [])
    assert "Traceback" not in shown and "File \"" not in shown, shown
    assert len(cell.stderr.strip().splitlines()) <= 3, cell.stderr  # the message (and a usage line)
    return message


def test_mistakes_leave_the_session_usable(kernel: Kernel) -> None:
    kernel.run("%load_ext gradient_nb\nfrom gradient_nb.notebook.session import current\nnb = current()")

    # Asking before joining: one line that says what to do.
    short_error(kernel.run("%%parallax ask\nWhat is the capital of France?", ok=False), "%mesh join")
    short_error(kernel.run("%%verify ask\nWhat is the capital of France?", ok=False), "%mesh join")
    assert kernel.value("nb.busy") == []

    kernel.run("%mesh join --ephemeral --name notebook --heartbeat 0.5 --peer-timeout 3")
    mesh_id = kernel.value("(await nb.wait_mesh()).id")
    kernel.pump(0.3)
    joined = [w["value"] for w in kernel.widgets_of("HTMLModel") if "joined mesh" in w.get("value", "")]
    # A loopback rendezvous is said to be one, and how to open it; no 127.0.0.1 URL offered to "others".
    assert joined and "only this machine can join" in joined[-1] and "--host 0.0.0.0" in joined[-1], joined
    # Joining twice, and a typo: one line each, and the session is unchanged.
    short_error(kernel.run("%mesh join --ephemeral", ok=False), "already in mesh")
    short_error(kernel.run("%mesh jion", ok=False), "unknown %mesh command 'jion'")

    # A serve whose layers do not fit the model, with nothing served yet: the check runs in the
    # background (the model is not loaded in the cell), fails, and leaves nothing behind.
    kernel.run("%%parallax serve\nlayers: 40:50")
    kernel.wait_value("nb._serve_task.done()", bool, timeout=SERVED, what="the serve check")
    assert kernel.value("[nb.server is None, type(nb.last_error).__name__]") == [True, "BadServeConfig"]
    kernel.pump(1.5)
    status = [w["value"] for w in kernel.widgets_of("HTMLModel") if "serving failed" in w.get("value", "")]
    assert status and "do not fit" in status[-1] and "Traceback" not in status[-1], status

    # Half of the model: an ask has no route, and says at once which layers are missing.
    kernel.run("%%parallax serve\nlayers: 0:15")
    kernel.wait_value("nb.server is not None and nb.server.runtime is not None", bool, timeout=SERVED,
                      what="layers 0:15 to load")
    message = short_error(kernel.run("%%parallax ask --max-tokens 4\nHello", ok=False, timeout=60),
                          "15–30", "--wait")
    assert "no route" in message
    assert "15–30" in kernel.run("%parallax status").stdout

    # Layers beyond the model while serving: refused in the cell, before the serve is touched.
    server = kernel.value("id(nb.server)")
    short_error(kernel.run("%%parallax serve\nlayers: 40:50", ok=False), "do not fit", "30 layers")
    assert kernel.value("[id(nb.server), nb.server.layers, nb.server.runtime is not None]") == [server, [0, 15], True]

    # A volunteer serves the other half: an ask that waits for the route gets its answer.
    kernel.run("%mesh spawn 1 --serve default --layers 15:30")
    kernel.run("%%parallax ask --max-tokens 8 --wait 200\nWhat is the capital of France?", timeout=SERVED + 30)
    assert "Paris" in kernel.value("nb.last_answer")
    # While it waited, the answer's place said why (the volunteer was still joining, then loading).
    said = [st["value"] for _, st in kernel.updates if "waiting for a route:" in st.get("value", "")]
    assert any("15–30" in v for v in said), said
    # It goes away (killed): the next ask names it, and the layers it took with it.
    pid = kernel.value("nb.local_peers[0].pid")
    os.kill(pid, signal.SIGKILL)
    kernel.wait_value("[p.name for p in nb.mesh.peers()]", lambda names: "volunteer-1" not in names, timeout=60,
                      what="the volunteer to be dropped")
    short_error(kernel.run("%%parallax ask --max-tokens 4\nHello", ok=False, timeout=60),
                "volunteer-1 (15–30) left the mesh")

    # The corrected cell just works, in the same mesh; an ask that waits for the route gets its answer.
    kernel.run("%%parallax serve\nlayers: 0:30\nmemory_cap: 2G")
    kernel.run("%%parallax ask --max-tokens 8 --wait 200\nWhat is the capital of France?", timeout=SERVED + 30)
    assert "Paris" in kernel.value("nb.last_answer")
    assert kernel.value("nb.mesh.id") == mesh_id and kernel.value("nb.server.layers") == [0, 30]

    # The metrics are current: the tokens just served are counted (they travel with heartbeats).
    served = kernel.value("(await nb.metrics()).filter(__import__('polars').col('name') == 'notebook')"
                          "['served_tokens'].max()")
    assert served >= 8

    # %%verify ask shows the answer and the report.
    kernel.run("%%verify ask --max-tokens 4\nWhat is the capital of France?")
    kernel.wait_value("getattr(nb, 'last_verification', None) is not None", bool, timeout=120,
                      what="the verification")
    kernel.pump(0.5)
    shown = [d.get("text/html", "") for d in kernel.displays.values()]
    assert any("gradient-nb-verified-answer" in h and "France" in h and "verdict" in h and "verification " in h
               for h in shown), shown

    # %mesh watch shows what the kernel offers within its memory cap; after the leave, the end state.
    kernel.run("%mesh watch")
    kernel.pump(0.5)
    table = [w["value"] for w in kernel.widgets_of("HTMLModel") if "gradient-nb-peers" in w.get("value", "")]
    assert table and "GiB (capped;" in table[-1], table
    kernel.run("%mesh leave")
    kernel.wait_value("nb.mesh is None and nb.busy == []", bool, timeout=60, what="leaving")
    kernel.pump(0.5)
    tables = [w["value"] for w in kernel.widgets_of("HTMLModel") if "gradient-nb-peers" in w.get("value", "")
              or "has not joined" in w.get("value", "")]
    assert tables and "has not joined" in tables[-1], tables
    assert any("this kernel left the mesh" in w.get("value", "") for w in kernel.widgets_of("HTMLModel"))
