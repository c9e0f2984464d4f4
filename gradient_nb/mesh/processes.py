"""Peer processes on this machine: start ``gradient-nb peer`` children, read their events, stop them,
and make an owned child end as soon as its parent does.

The idea: a child a kernel (or ``gradient-nb demo``) starts is *owned* by that process, and must never
outlive it, however the parent ends (a clean shutdown, a kernel restart, SIGKILL). Two mechanisms, since
neither covers every case alone:

- ``PR_SET_PDEATHSIG`` (Linux, via ``prctl``): the kernel sends the child SIGTERM when the thread that
  forked it exits. Immediate, but Linux only, and tied to the forking *thread*.
- A parent-watch pipe: the child inherits the read end (its fd number in ``$GRADIENT_NB_PARENT_FD``),
  the parent keeps the write end and never writes. When the parent process ends, the kernel closes the
  write end and the child reads EOF. Works wherever pipes do, and also says *why* the child stops.

An owned child whose parent is gone leaves the mesh at once, without the serving handover: the handover
waits (up to 30 s) for the coordinator to re-plan without it, while its siblings, started by the same
parent, are leaving too, so nobody would take its layers over in time. That wait is what left spawned
peers alive, orphaned, for 30-60 s after a kernel restart.

Invariant: the write end is non-inheritable (``os.pipe`` makes it so), so a grandchild never keeps a
sibling's parent-watch open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PARENT_FD_ENV", "ParentWatch", "read_event", "spawn_owned", "spawn_peer", "stop_processes"]

PARENT_FD_ENV = "GRADIENT_NB_PARENT_FD"
# A leave without the handover takes well under a second; this only ends a child stuck elsewhere.
ORPHAN_EXIT_S = 10.0


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. PR_SET_PDEATHSIG = 1.
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def spawn_owned(cmd: list[str], *, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` as a child that ends with this process (see the module docstring).

    The child gets its own session: interrupting a kernel signals its process group, which must not stop
    the peers it started. Call it from the main thread (``PR_SET_PDEATHSIG`` follows the forking thread).
    """
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, start_new_session=True,
                                env={**(env if env is not None else os.environ), PARENT_FD_ENV: str(read_end)},
                                pass_fds=(read_end,), preexec_fn=_die_with_parent)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    proc.parent_watch_fd = write_end  # type: ignore[attr-defined]  # closed by release_child()
    return proc


def release_child(proc: subprocess.Popen) -> None:
    """Close the write end of ``proc``'s parent-watch: it reads EOF, as if this process had ended."""
    fd = getattr(proc, "parent_watch_fd", None)
    if fd is not None:
        proc.parent_watch_fd = None  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            os.close(fd)


def spawn_peer(url: str, *, name: str, mesh: str = "default", extra: list[str] | None = None,
               env: dict[str, str] | None = None, module: str = "gradient_nb.cli") -> subprocess.Popen:
    """Start ``gradient-nb peer`` as an owned child; its first stdout line is a JSON 'joined' event.
    ``module`` runs another entry point with the same options (tests: ``gradient_nb.testing.diagpeer``)."""
    cmd = [sys.executable, "-m", module, "peer", "--rendezvous", url, "--mesh", mesh,
           "--name", name, "--ephemeral", *(extra or [])]
    return spawn_owned(cmd, env={**os.environ, **(env or {})})


async def read_event(proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    """The next JSON event line a child peer prints."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"peer process exited (code {proc.poll()}): {err[-2000:]}")
    return json.loads(line)


def stop_processes(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM each (they leave the mesh on their way out), SIGKILL what is left after ``timeout``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        release_child(p)


class ParentWatch:
    """In an owned child: knows whether the parent that started it is gone.

    ``ParentWatch.from_env()`` is ``None`` in a process nobody owns (a volunteer's own ``gradient-nb
    peer``), so it changes nothing there.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.ppid = os.getppid()
        self._gone = False

    @classmethod
    def from_env(cls) -> ParentWatch | None:
        value = os.environ.get(PARENT_FD_ENV, "")
        if not value.isdigit():
            return None
        fd = int(value)
        try:
            os.fstat(fd)
        except OSError:
            return None
        return cls(fd)

    @property
    def gone(self) -> bool:
        """True once the parent ended (EOF on the pipe, or this process was re-parented)."""
        if not self._gone:
            if os.getppid() != self.ppid:
                self._gone = True
            else:
                with contextlib.suppress(OSError):
                    readable, _, _ = select.select([self.fd], [], [], 0)
                    if readable and not os.read(self.fd, 1):
                        self._gone = True
        return self._gone

    def install(self, on_gone: Callable[[], None], exit_after: float = ORPHAN_EXIT_S) -> None:
        """Call ``on_gone`` on the running loop when the parent ends (EOF on the pipe); should the process
        still run ``exit_after`` seconds later (stuck joining, say), it exits there and then."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = os.read(self.fd, 1)
            except OSError:
                data = b""
            if not data:  # EOF: the parent is gone (it never writes)
                loop.remove_reader(self.fd)
                self._gone = True
                on_gone()
                loop.call_later(exit_after, os._exit, 3)

        loop.add_reader(self.fd, readable)
