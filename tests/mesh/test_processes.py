"""Owned child processes end with their parent, however it ends (mesh/processes.py).

A parent process starts an owned child and is then SIGKILLed (no atexit, no cleanup of any kind). The
child must learn both ways: SIGTERM from ``PR_SET_PDEATHSIG``, and EOF on its parent-watch pipe, which
:class:`ParentWatch` reports as ``gone``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from gradient_nb.mesh.processes import ParentWatch
from tests.conftest import wait_until

CHILD = textwrap.dedent("""
    import asyncio, signal, sys
    from gradient_nb.mesh.processes import ParentWatch

    out = open(sys.argv[1], "a", buffering=1)

    async def main():
        watch = ParentWatch.from_env()
        gone = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: out.write("sigterm\\n"))
        watch.install(gone.set)
        out.write("ready\\n")
        await gone.wait()
        out.write(f"gone {watch.gone}\\n")

    asyncio.run(main())
""")

PARENT = textwrap.dedent("""
    import sys, time
    from gradient_nb.mesh.processes import spawn_owned

    child = spawn_owned([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=None, stderr=None)
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_an_owned_child_learns_at_once_that_its_parent_was_killed(tmp_path: Path) -> None:
    report = tmp_path / "child.log"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(report)], stdout=subprocess.PIPE, text=True)
    child_pid = 0
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        wait_until(lambda: report.exists() and "ready" in report.read_text(), timeout=60, what="the child")
        parent.kill()
        parent.wait()
        wait_until(lambda: "gone True" in report.read_text(), timeout=30, what="the child to see its parent gone")
        assert "sigterm" in report.read_text()  # PR_SET_PDEATHSIG, on Linux
    finally:
        if parent.poll() is None:
            parent.kill()
        if child_pid:
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_process_nobody_owns_has_no_parent_watch(monkeypatch) -> None:
    monkeypatch.delenv("GRADIENT_NB_PARENT_FD", raising=False)
    assert ParentWatch.from_env() is None
    monkeypatch.setenv("GRADIENT_NB_PARENT_FD", "not-a-number")
    assert ParentWatch.from_env() is None
